"""Text-to-image conditioning for Phase 1: a diffusers text-to-image pipeline and a list of prompts become a
σ-space denoiser with classifier-free guidance plus one row of model kwargs per prompt::

    t2i = load_text_to_image("stabilityai/stable-diffusion-xl-base-1.0", read_prompts("prompts.txt"), device="cuda")
    result = optimize_schedule(t2i.denoiser, nfes=[4, 6], cond=t2i.cond, uncond=t2i.uncond,
                               sample_shape=t2i.sample_shape)
    result.save("out", t2i.scheduler_config, base_model="stabilityai/stable-diffusion-xl-base-1.0")

Prompts are encoded once, with the pipeline's own `encode_prompt`; the text encoders are dropped afterwards (the
optimiser works on latents) and the VAE is kept as `TextToImage.decode`, with which the held-out fidelity is measured
on decoded images, as users compare them. Solvers, objectives and the optimiser never see text: nested model
kwargs (SDXL's `added_cond_kwargs`) travel as flat dotted keys that :class:`~diffusers_fewstep.SigmaDenoiser`
nests again. Supported: Stable Diffusion 1.x/2.x, SDXL, SD3 (classifier-free guidance, negative prompts) and
Flux (guidance embedding, packed latents, dynamic shifting `mu`).
"""
from __future__ import annotations

import argparse
import csv
import gc
import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .adapter import SigmaDenoiser, nest_kwargs

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DEFAULT_COLUMN = "text"  # diffusers' imagefolder convention (metadata.jsonl with a `text` column)


# --- prompts --------------------------------------------------------------------------------------
def read_prompts(source: str, column: Optional[str] = None) -> List[str]:
    """Prompts from a text file (one a line, blank lines skipped), a dataset folder with `metadata.jsonl` or
    `metadata.csv` (diffusers' imagefolder convention), or a `.csv`, `.json` or `.jsonl` file.

    Args:
        source (`str`): the file or folder.
        column (`str`, *optional*, defaults to `"text"`): the column holding the prompts (tables and folders only).
    """
    if os.path.isdir(source):
        found = [os.path.join(source, n) for n in ("metadata.jsonl", "metadata.csv")
                 if os.path.isfile(os.path.join(source, n))]
        if not found:
            raise FileNotFoundError(f"{source} has no metadata.jsonl or metadata.csv; pass a prompts file or a "
                                    "dataset folder in diffusers' imagefolder layout")
        source = found[0]
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"prompts file {source} not found")
    ext = os.path.splitext(source)[1].lower()
    if ext in (".csv", ".json", ".jsonl"):
        prompts = _column(_read_rows(source, ext), column or DEFAULT_COLUMN, source)
    else:
        if column is not None:
            raise ValueError(f"{source} is a plain text file (one prompt a line); --prompt-column applies to "
                             ".csv, .json, .jsonl files and dataset folders")
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts


def _read_rows(path: str, ext: str) -> list:
    with open(path, encoding="utf-8", newline="" if ext == ".csv" else None) as f:
        if ext == ".csv":
            return list(csv.DictReader(f))
        try:
            return json.load(f) if ext == ".json" else [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid {ext[1:].upper()}: {err}") from err


def _column(rows: list, column: str, path: str) -> List[str]:
    if isinstance(rows, list) and all(isinstance(r, str) for r in rows):
        return rows  # a JSON list of prompts
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} must hold a list of records (or, for .json, a list of strings)")
    columns = set().union(*rows)
    if column not in columns:
        raise ValueError(f"{path} has no column {column!r}; its columns are {sorted(columns)}; pass --prompt-column")
    return [str(r.get(column) or "") for r in rows]


# --- the conditioned denoiser ---------------------------------------------------------------------
@dataclass
class TextToImage:
    """What :func:`load_text_to_image` prepares for :func:`~diffusers_fewstep.optimizer.optimize_schedule`.

    Attributes:
        denoiser (`SigmaDenoiser`): the pipeline's UNet or transformer in σ-space, with classifier-free guidance
            (`FluxSigmaDenoiser` for Flux).
        sample_shape (`tuple`): one latent, `(C, height / vae_scale_factor, width / vae_scale_factor)`; Flux's
            packed latents are `(tokens, 4·C)`.
        cond (`dict[str, torch.Tensor]`): model kwargs with one row per prompt (flat dotted keys).
        uncond (`dict[str, torch.Tensor]`, *optional*): the negative-prompt kwargs, one row per prompt;
            `None` without classifier-free guidance (`guidance_scale` ≤ 1, and Flux, whose `cond` holds `guidance`).
        scheduler_config (`dict`): the pipeline's scheduler config (the base of the learned scheduler).
        prompts (`list[str]`), guidance_scale (`float`), height (`int`), width (`int`): as used.
        mu (`float`, *optional*): the dynamic shift of flow schedulers with `use_dynamic_shifting`.
        default_steps (`int`): the pipeline's default `num_inference_steps` (the steps of its own image).
        decode (`Callable`, *optional*): native latents → decoded images in [-1, 1], as the pipeline decodes them
            (:func:`image_decoder`); `None` for a pipeline without a VAE.
    """

    denoiser: SigmaDenoiser
    sample_shape: Tuple[int, ...]
    cond: Dict[str, torch.Tensor]
    uncond: Optional[Dict[str, torch.Tensor]]
    scheduler_config: dict
    prompts: List[str]
    guidance_scale: float
    height: int
    width: int
    mu: Optional[float] = None
    default_steps: int = 50
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def load_text_to_image(path_or_id: str, prompts: Sequence[str], negative_prompt: Union[str, Sequence[str], None] = None,
                       guidance_scale: Optional[float] = None, height: Optional[int] = None,
                       width: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                       torch_dtype: Optional[torch.dtype] = None, batch_size: int = 32,
                       **from_pretrained_kwargs) -> TextToImage:
    """Load a text-to-image pipeline (local folder or Hub id), encode `prompts`, and keep only the denoiser.

    Args:
        path_or_id (`str`): a diffusers pipeline folder or Hub id (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux).
        prompts (`list[str]`): the prompts the table is learned for (see :func:`read_prompts`).
        negative_prompt (`str` or `list[str]`, *optional*): the unconditional prompt(s) of guidance; `None` is the
            pipeline's own default (an empty prompt, or zeros for SDXL's `force_zeros_for_empty_prompt`).
        guidance_scale (`float`, *optional*): classifier-free guidance (Flux: the transformer's guidance embedding);
            defaults to the pipeline's `__call__` default.
        height (`int`, *optional*), width (`int`, *optional*): image size; defaults to the pipeline's.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the text encoders and the denoiser run.
        torch_dtype (`torch.dtype`, *optional*): passed to `DiffusionPipeline.from_pretrained`.
        batch_size (`int`, *optional*, defaults to 32): prompts per `encode_prompt` call.
        from_pretrained_kwargs: further arguments of `DiffusionPipeline.from_pretrained` (`variant="fp16"`;
            `text_encoder_3=None, tokenizer_3=None` to run SD3 without T5, as its pipeline allows).
    """
    from .hub import load_pipeline

    if torch_dtype is not None:
        from_pretrained_kwargs["torch_dtype"] = torch_dtype
    pipe = load_pipeline(path_or_id, **from_pretrained_kwargs)
    result = encode_text_to_image(pipe, prompts, negative_prompt, guidance_scale, height, width, device, batch_size)
    release(pipe, TEXT_ENCODERS, device)  # the encodings are all the optimiser needs
    return result


def release(pipe, names: Sequence[str], device) -> None:
    """Drop the pipeline components `names` (e.g. the text encoders once the prompts are encoded) and free their
    memory."""
    for name in names:
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_text_to_image(pipe, prompts: Sequence[str], negative_prompt: Union[str, Sequence[str], None] = None,
                         guidance_scale: Optional[float] = None, height: Optional[int] = None,
                         width: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                         batch_size: int = 32) -> TextToImage:
    """:func:`load_text_to_image` for a pipeline already in memory (its text encoders and denoiser move to
    `device`; the VAE moves only when `TextToImage.decode` is called). Arguments as for :func:`load_text_to_image`."""
    family = pipeline_family(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    model = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    guidance_scale = default_guidance_scale(pipe) if guidance_scale is None else float(guidance_scale)
    guided = _classifier_free(family, model, guidance_scale, negative_prompt)
    sample_shape, height, width, image_seq_len = _latent_shape(pipe, family, model, height, width)
    for name in TEXT_ENCODERS:
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device)
    cond, uncond = _encode_all(pipe, family, prompts, _per_prompt(negative_prompt, len(prompts)), guided, device,
                               (height, width), batch_size)
    config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}  # for the pipeline reference
    mu = dynamic_shift(config, image_seq_len, family)
    kwargs = {"guidance_scale": guidance_scale if guided else 1.0, "mu": mu}
    model = model.to(device).eval()
    if family == "flux":
        img_ids = pipe._prepare_latent_image_ids(1, height // pipe.vae_scale_factor // 2,
                                                 width // pipe.vae_scale_factor // 2, device, torch.float32)
        denoiser = FluxSigmaDenoiser(model, config, img_ids, **kwargs)
        if model.config.guidance_embeds:  # guidance-distilled (FLUX.1-dev): the scale is an input, one per row
            cond["guidance"] = torch.full((len(prompts),), guidance_scale, dtype=torch.float32, device=device)
    else:
        denoiser = SigmaDenoiser(model, config, **kwargs)
    denoiser.sample_shape = sample_shape  # read by optimize_schedule when no sample_shape is passed
    return TextToImage(denoiser, sample_shape, cond, uncond, config, prompts, guidance_scale, height, width, mu,
                       default_steps(pipe), image_decoder(pipe, family, height, width))


def latent_scaling(vae_config, like: torch.Tensor) -> tuple:
    """The pipelines' latent convention, `(offset, factor)` with `latents = (z − offset)·factor` for the VAE's own
    latents z: `offset = latents_mean`, `factor = scaling_factor / latents_std` where the VAE sets both (SDXL
    pipelines), else `offset = shift_factor` (SD3, Flux; 0 for SD), `factor = scaling_factor`. Tensors shaped to
    broadcast over `like` (channels second)."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        view = (1, -1) + (1,) * (like.ndim - 2)
        return (torch.tensor(mean).view(view).to(like),
                vae_config.scaling_factor / torch.tensor(std).view(view).to(like))
    return vae_config.get("shift_factor") or 0.0, vae_config.scaling_factor


def image_decoder(pipe, family: str, height: int, width: int, batch_size: int = 8) -> Optional[Callable]:
    """The pipeline's last step as a function: native latents → images in [-1, 1] (float32), decoded as its
    `__call__` decodes them (Flux latents unpacked; SD3 and Flux `shift_factor`; SDXL `latents_mean`/`latents_std`
    where set; a float16 VAE with `force_upcast` run in float32, as SDXL's pipeline does), `batch_size` latents per
    VAE call, on the latents' device. The VAE is looked up at each call and moved only then, so `release(pipe,
    ["vae"])` still frees it. `None` for a pipeline without a VAE."""
    if getattr(pipe, "vae", None) is None:
        return None

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        if vae is None:
            raise ValueError("the pipeline's VAE was released; decoding needs it")
        vae.to(latents.device)
        if vae.dtype == torch.float16 and vae.config.get("force_upcast"):
            vae.to(torch.float32)
        if family == "flux":
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        offset, factor = latent_scaling(vae.config, latents)
        z = latents / factor + offset
        images = [vae.decode(z[i: i + batch_size].to(vae.dtype), return_dict=False)[0]
                  for i in range(0, len(z), batch_size)]
        return torch.cat(images).float().clamp(-1, 1)

    return decode


class FluxSigmaDenoiser(SigmaDenoiser):
    """:class:`~diffusers_fewstep.SigmaDenoiser` for `FluxTransformer2DModel`: packed latents (tokens, 4·C),
    timesteps in [0, 1] as `FluxPipeline` passes them, and the position ids (the same for every sample) kept here.

    Args:
        img_ids (`torch.Tensor`): the (tokens, 3) image position ids of the latent size
            (`FluxPipeline._prepare_latent_image_ids`); other arguments as for `SigmaDenoiser`.
    """

    def __init__(self, model, scheduler_config, img_ids: torch.Tensor, **kwargs):
        super().__init__(model, scheduler_config, **kwargs)
        self.register_buffer("img_ids", img_ids, persistent=False)

    def model_output(self, x_native: torch.Tensor, t: torch.Tensor, cond: Optional[dict]) -> torch.Tensor:
        kwargs = nest_kwargs(cond or {})
        txt_ids = x_native.new_zeros(kwargs["encoder_hidden_states"].shape[1], 3)  # as FluxPipeline.encode_prompt
        return self.model(x_native, timestep=t / 1000, img_ids=self.img_ids.to(x_native.dtype), txt_ids=txt_ids,
                          return_dict=False, **kwargs)[0]

    def set_timesteps_kwargs(self, num_inference_steps: int, scheduler_config) -> dict:
        """FluxPipeline's: its own σ's `linspace(1, 1/n, n)` unless the scheduler says `use_flow_sigmas`, and `mu`."""
        kwargs = super().set_timesteps_kwargs(num_inference_steps, scheduler_config)
        if not scheduler_config.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return kwargs


def pipeline_family(pipe) -> str:
    """`"sd"`, `"sdxl"`, `"sd3"` or `"flux"`: which prompt encoding and model kwargs the pipeline uses."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    for family, cls in (("sdxl", StableDiffusionXLPipeline), ("sd3", StableDiffusion3Pipeline),
                        ("sd", StableDiffusionPipeline), ("flux", FluxPipeline)):
        if isinstance(pipe, cls):
            return family
    raise ValueError(f"{type(pipe).__name__} is not supported for text-conditional optimisation; supported are "
                     "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline "
                     "(and subclasses)")


def _call_default(pipe, name: str):
    """The default of `name` in the pipeline's `__call__` (few-step subclasses take **kwargs: the stock class's), or
    None."""
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        param = inspect.signature(call).parameters.get(name) if call else None
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return None


def default_guidance_scale(pipe) -> float:
    """The `guidance_scale` default of the pipeline's `__call__` (SD 7.5, SDXL 5.0, SD3 7.0, Flux 3.5)."""
    value = _call_default(pipe, "guidance_scale")
    if value is None:
        raise ValueError(f"{type(pipe).__name__}.__call__ has no guidance_scale default; pass guidance_scale")
    return float(value)


def default_steps(pipe) -> int:
    """The `num_inference_steps` default of the pipeline's `__call__` (SD and SDXL 50, SD3 and Flux 28; 50 if none)."""
    return int(_call_default(pipe, "num_inference_steps") or 50)


def _classifier_free(family, model, guidance_scale, negative_prompt) -> bool:
    """Whether the pipeline would run classifier-free guidance (its `do_classifier_free_guidance`)."""
    if getattr(model.config, "time_cond_proj_dim", None) is not None:
        raise ValueError(f"{type(model).__name__} embeds the guidance scale (time_cond_proj_dim, LCM); only "
                         "classifier-free guidance is supported")
    if family == "flux":  # guidance is an input of the transformer (guidance-distilled), not two model calls
        if negative_prompt is not None:
            raise ValueError("negative prompts (Flux's true_cfg_scale) are not supported for Flux; its guidance "
                             "is the transformer's guidance embedding")
        return False
    return guidance_scale > 1


MAX_SHIFT_DEFAULT = {"sd3": 1.16, "flux": 1.15}  # the pipelines' fallback when the scheduler config has no max_shift


def dynamic_shift(scheduler_config, image_seq_len: int, family: str = "flux") -> Optional[float]:
    """`mu` for flow schedulers with `use_dynamic_shifting`, from the number of image tokens as the SD3 and Flux
    pipelines compute it (diffusers' `calculate_shift`, with each pipeline's default `max_shift`); `None` for every
    other scheduler."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", MAX_SHIFT_DEFAULT.get(family, 1.15)))


def _latent_shape(pipe, family, model, height, width):
    """One latent's shape, the image size and the number of image tokens, from `height`/`width` or the
    pipeline's default size. Flux latents are packed 2×2 patches: (tokens, 4·C)."""
    factor = pipe.vae_scale_factor
    size = getattr(pipe, "default_sample_size", None) or model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    height, width = height or size[0] * factor, width or size[1] * factor
    patch = 2 if family == "flux" else getattr(model.config, "patch_size", None) or 1
    if height % (factor * patch) or width % (factor * patch):
        raise ValueError(f"height and width must be multiples of {factor * patch} for {type(pipe).__name__}; "
                         f"got {height}×{width}")
    tokens = (height // factor // patch) * (width // factor // patch)
    if family == "flux":
        return (tokens, model.config.in_channels), height, width, tokens
    return (model.config.in_channels, height // factor, width // factor), height, width, tokens


def _per_prompt(negative_prompt, n: int) -> Optional[List[str]]:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return None if negative_prompt is None else [negative_prompt] * n
    if len(negative_prompt) != n:
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {n} prompts; pass one, or one per prompt")
    return list(negative_prompt)


def _encode_all(pipe, family, prompts, negatives, guided, device, size, batch_size) -> Tuple[dict, Optional[dict]]:
    """(cond, uncond) of every prompt, encoded `batch_size` at a time; uncond is `None` without guidance."""
    cond, uncond = [], []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        c, u = _encode(pipe, family, prompts[start:stop], negatives and negatives[start:stop], guided, device, size)
        cond.append(c)
        uncond.append(u)
    return _cat_rows(cond), _cat_rows(uncond) if guided else None


def _encode(pipe, family: str, prompts, negatives, guided: bool, device, size) -> Tuple[dict, dict]:
    """(cond, uncond) model kwargs of one batch of prompts, from the pipeline's own `encode_prompt`."""
    if family == "flux":  # (T5 embeddings, pooled CLIP embedding, text ids); no unconditional branch
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=torch.device(device))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None
    kwargs = {"prompt": prompts, "device": torch.device(device), "num_images_per_prompt": 1,
              "do_classifier_free_guidance": guided, "negative_prompt": negatives}
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs.update({name: None for name in ("prompt_2", "prompt_3") if name in params})  # SD3: default to `prompt`
    out = pipe.encode_prompt(**kwargs)
    if family == "sd":  # (prompt_embeds, negative_prompt_embeds)
        return {"encoder_hidden_states": out[0]}, {"encoder_hidden_states": out[1]}
    embeds, neg_embeds, pooled, neg_pooled = out
    if family == "sd3":
        return ({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled})
    time_ids = _sdxl_time_ids(pipe, size, embeds.dtype, pooled).to(embeds.device).repeat(len(prompts), 1)
    return ({"encoder_hidden_states": embeds, "added_cond_kwargs.text_embeds": pooled,
             "added_cond_kwargs.time_ids": time_ids},
            {"encoder_hidden_states": neg_embeds, "added_cond_kwargs.text_embeds": neg_pooled,
             "added_cond_kwargs.time_ids": time_ids})


def _sdxl_time_ids(pipe, size, dtype, pooled) -> torch.Tensor:
    """SDXL's micro-conditioning as its pipeline builds it: original = target size = (height, width), crop (0, 0)."""
    projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)


def _cat_rows(batches: List[dict]) -> dict:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffusers-fewstep optimize` for text-to-image pipelines (active with --prompts-file)."""
    group = parser.add_argument_group("text-to-image models")
    group.add_argument("--prompts-file", default=None,
                       help="prompts to learn the table for: a text file (one a line), a .csv/.json/.jsonl file "
                            "or an imagefolder dataset with metadata.jsonl; makes --model a text-to-image pipeline")
    group.add_argument("--prompt-column", default=None,
                       help=f"column of the prompts in a table or dataset folder (default: {DEFAULT_COLUMN})")
    group.add_argument("--negative-prompt", default=None,
                       help="negative prompt of classifier-free guidance (default: the pipeline's)")
    group.add_argument("--guidance-scale", type=float, default=None,
                       help="classifier-free guidance scale, Flux: its guidance embedding (default: the pipeline's: "
                            "SD 7.5, SDXL 5, SD3 7, Flux 3.5)")
    group.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    group.add_argument("--torch-dtype", default=None, choices=sorted(TORCH_DTYPES),
                       help="weights dtype of the pipeline (default: as saved)")


def load_from_args(args: argparse.Namespace, device: Union[str, torch.device]) -> Optional[TextToImage]:
    """:func:`load_text_to_image` for the parsed options of :func:`add_arguments` (and `--model`);
    `None` when no `--prompts-file` was given (an unconditional or class-conditional model)."""
    if args.prompts_file is None:
        return None
    return load_text_to_image(args.model, read_prompts(args.prompts_file, args.prompt_column),
                              negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                              height=args.height, width=args.width, device=device,
                              torch_dtype=TORCH_DTYPES.get(args.torch_dtype))
