"""Text-to-image pipelines in `train.py`: prompts, the pipeline loaded once, guided denoisers, the LoRA output.

    accelerate launch scripts/train_fewstep.py --pretrained_model_name_or_path assets/fmnist-t2i-sd \
      --prompts_file prompts.txt --nfe 4 --output_dir fmnist-t2i-fewstep

- Prompts come from `--prompts_file` (one a line, or a `.csv`/`.json`/`.jsonl` table with `--prompt_column`;
  :func:`~diffusers_fewstep.conditioning.read_prompts`) or from a captioned image folder `--train_data_dir` in
  the `imagefolder` layout of diffusers' `train_text_to_image.py` (`metadata.jsonl` or `metadata.csv` with a
  `file_name` column and a `text` column). The images are read only for the optional denoising loss
  (`--denoising_weight`): the VAE encodes them once, each paired with its own caption.
- The pipeline is loaded once (`DiffusionPipeline.from_pretrained`, :func:`~diffusers_fewstep.hub.load_pipeline`); the prompts are encoded once with its own
  `encode_prompt` (:func:`~diffusers_fewstep.conditioning.encode_text_to_image`) and the encodings stay in memory;
  the text encoders and the VAE are frozen, used once and freed (`--offload_text_encoders` runs them on the
  CPU, so they never take accelerator memory).
- Guidance is inside the σ-space denoiser (:class:`~diffusers_fewstep.SigmaDenoiser` with `guidance_scale`), so
  the teacher's reference solves, the student's targets and the student itself are all guided, as the pipeline
  guides at sampling time (`--guidance_scale`, default the pipeline's).
- The LoRA adapter (on the attention projections, :data:`~diffusers_fewstep.finetune.TEXT_TO_IMAGE_LORA_MODULES`)
  is saved in diffusers' format (`<Pipeline>.save_lora_weights`), so the output folder loads with
  `pipe.load_lora_weights(output_dir)`.

Tested on Stable Diffusion, SDXL and SD3 (`tests/test_train_text_to_image.py`); Flux runs the same code, untested.
"""
from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .adapter import SigmaDenoiser
from .conditioning import (DEFAULT_COLUMN, TEXT_ENCODERS, FluxSigmaDenoiser, TextToImage, _column, _read_rows, release,
                           encode_text_to_image, latent_scaling, read_prompts)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # diffusers' imagefolder convention
IMAGE_COLUMN = "file_name"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The text-to-image options of the training script (one per line, as diffusers' training examples)."""
    group = parser.add_argument_group("text-to-image pipelines (Stable Diffusion 1.x/2.x, SDXL, SD3)")
    group.add_argument("--prompts_file", type=str, default=None, help="Prompts to train on: a text file (one a line) or a .csv/.json/.jsonl table (--prompt_column); or give a captioned --train_data_dir instead.")
    group.add_argument("--prompt_column", "--caption_column", type=str, default=None, help=f"Column of the prompts in a table or in --train_data_dir's metadata (default: {DEFAULT_COLUMN}).")
    group.add_argument("--negative_prompt", type=str, default=None, help="Negative prompt of classifier-free guidance (default: the pipeline's).")
    group.add_argument("--guidance_scale", type=float, default=None, help="Guidance scale inside teacher and student (default: the pipeline's: SD 7.5, SDXL 5, SD3 7, Flux 3.5); sample with the same value.")
    group.add_argument("--resolution", type=int, default=None, help="Image height and width in pixels (default: the pipeline's).")
    group.add_argument("--offload_text_encoders", action="store_true", help="Encode the prompts (and images) on the CPU: the text encoders and the VAE never take accelerator memory. Either way they are freed after encoding.")
    group.add_argument("--variant", type=str, default=None, help="Weights variant of the pipeline files (e.g. fp16); they are trained in float32.")
    return parser


def has_text_encoder(path_or_id: str) -> bool:
    """Whether the pipeline's `model_index.json` names a text encoder (a text-to-image pipeline); reads only that
    file (`DiffusionPipeline.load_config`), False where there is none."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path_or_id)
    except (OSError, ValueError):
        return False
    return any(isinstance(index.get(name), (list, tuple)) and index[name][0] is not None for name in TEXT_ENCODERS)


def read_captioned_folder(folder: str, column: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(image files, captions), one pair per row of an imagefolder dataset's `metadata.jsonl` (or `.csv`):
    `file_name` relative to the metadata file, the caption in `column` (default `text`; an empty one is the
    empty prompt)."""
    found = [os.path.join(folder, n) for n in METADATA_FILES if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise FileNotFoundError(f"{folder} has no metadata.jsonl or metadata.csv; a captioned --train_data_dir needs "
                                "one (imagefolder layout: file_name and text columns), or pass --prompts_file")
    rows = _read_rows(found[0], os.path.splitext(found[0])[1])
    files = [os.path.join(folder, f) for f in _column(rows, IMAGE_COLUMN, found[0])]
    return files, [p.strip() for p in _column(rows, column or DEFAULT_COLUMN, found[0])]


@torch.no_grad()
def encode_images(vae, files: Sequence[str], height: int, width: int, device, batch_size: int = 32) -> torch.Tensor:
    """Latents of image files as the pipelines' VAE scaling defines them: each image resized and centre-cropped to
    (height, width) (as `train_text_to_image.py`), then the VAE's mean latent in the pipelines' convention
    (:func:`~diffusers_fewstep.conditioning.latent_scaling`, the inverse of the pipelines' decoding)."""
    import numpy as np
    from PIL import Image, ImageOps

    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images named in the metadata are missing, e.g. {missing[0]}; "
                                "fix file_name (relative to the metadata file) or set --denoising_weight 0")
    vae.to(device)
    out = []
    for start in range(0, len(files), batch_size):
        pixels = [np.asarray(ImageOps.fit(Image.open(f).convert("RGB"), (width, height), Image.BICUBIC))
                  for f in files[start:start + batch_size]]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        z = vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist.mode().float()
        offset, factor = latent_scaling(vae.config, z)
        out.append((z - offset) * factor)
    return torch.cat(out)


@dataclass
class TrainingPipeline:
    """A text-to-image pipeline prepared for training: the model to tune and everything else already encoded.

    Attributes:
        pipeline_class (`type`): the pipeline's class (its `save_lora_weights` writes the adapter).
        component (`str`): `"unet"` or `"transformer"`.
        model (`torch.nn.Module`): the UNet or transformer (float32, on the device).
        encoded (`TextToImage`): the prompts' encodings (`cond`, one row per prompt, and `uncond`, one row per
            prompt or a single row when every prompt has the same negative prompt; on the device), the scheduler
            config, the latent shape, the guidance scale, `mu`.
        latents (`torch.Tensor`, *optional*): clean latents of the captioned images, row k with prompt k (for the
            denoising loss).
    """

    pipeline_class: type
    component: str
    model: nn.Module
    encoded: TextToImage
    latents: Optional[torch.Tensor] = None

    def denoiser(self, model: nn.Module) -> SigmaDenoiser:
        """`model` (the student, the teacher or the tuned model) in σ-space, guided as the pipeline guides."""
        template = self.encoded.denoiser
        kwargs = {"guidance_scale": template.guidance_scale, "mu": self.encoded.mu}
        if isinstance(template, FluxSigmaDenoiser):
            return FluxSigmaDenoiser(model, self.encoded.scheduler_config, template.img_ids, **kwargs)
        return SigmaDenoiser(model, self.encoded.scheduler_config, **kwargs)

    def provenance(self) -> dict:
        """What the tables and the model were trained for (stored with the scheduler)."""
        e = self.encoded
        return {"pipeline": self.pipeline_class.__name__, "component": self.component, "guidance_scale": e.guidance_scale,
                "height": e.height, "width": e.width, "num_prompts": len(e.prompts), "example_prompt": e.prompts[0]}


def check_arguments(args: argparse.Namespace) -> None:
    """Text-to-image settings that cannot work, refused before the pipeline is loaded (one-line ValueError)."""
    if args.conditioning_file:
        raise ValueError("--conditioning_file holds class labels; a text-to-image pipeline takes prompts: leave it "
                         "out and pass --prompts_file or a captioned --train_data_dir")
    if args.fd_classifier:
        raise ValueError("--fd_classifier measures pixel images; text-to-image training evaluates latents (endpoint "
                         "RMSE against the guided reference): leave out --fd_classifier")
    if not args.prompts_file and not args.train_data_dir:
        raise ValueError(f"{args.pretrained_model_name_or_path} is a text-to-image pipeline: pass its prompts with "
                         "--prompts_file (one a line, or .csv/.jsonl with --prompt_column) or a captioned "
                         "--train_data_dir (metadata.jsonl with file_name and text)")
    if args.prompts_file and args.train_data_dir:
        raise ValueError("pass the prompts either with --prompts_file or as the captions of --train_data_dir, not both")


def load_training_pipeline(args: argparse.Namespace, device, need_images: bool) -> TrainingPipeline:
    """Load the pipeline once, encode the prompts (and, with `need_images`, the captioned images) once, free the
    text encoders and the VAE, and return the model to tune with the encodings on `device`."""
    from .hub import load_pipeline

    check_arguments(args)
    files = None
    if args.prompts_file:
        prompts = read_prompts(args.prompts_file, args.prompt_column)
    else:
        files, prompts = read_captioned_folder(args.train_data_dir, args.prompt_column)
    pipe = load_pipeline(args.pretrained_model_name_or_path, **({"variant": args.variant} if args.variant else {}))
    work = torch.device("cpu") if args.offload_text_encoders else torch.device(device)
    encoded = encode_text_to_image(pipe, prompts, args.negative_prompt, args.guidance_scale, args.resolution,
                                   args.resolution, work)
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    latents = None
    if need_images and files is not None:
        if isinstance(encoded.denoiser, FluxSigmaDenoiser):
            raise ValueError("the denoising loss on images is not supported for Flux (packed latents); set "
                             "--denoising_weight 0 (the teacher's own samples are used without --train_data_dir)")
        latents = encode_images(pipe.vae, files, encoded.height, encoded.width, work).to(device)
    pipeline_class, model = type(pipe), getattr(pipe, component)
    release(pipe, (*TEXT_ENCODERS, "vae"), device)  # frozen, used once: the encodings are all training needs
    del pipe
    uncond = encoded.uncond
    if uncond is not None and all(torch.equal(v, v[:1].expand_as(v)) for v in uncond.values()):
        uncond = {k: v[:1] for k, v in uncond.items()}  # one negative prompt for all: one row, broadcast
    move = lambda rows: None if rows is None else {k: v.to(device) for k, v in rows.items()}  # noqa: E731
    encoded.cond, encoded.uncond = move(encoded.cond), move(uncond)
    if isinstance(encoded.denoiser, FluxSigmaDenoiser):
        encoded.denoiser.img_ids = encoded.denoiser.img_ids.to(device)
    if model.dtype != torch.float32:  # trained in float32 (diffusers warns on every cast)
        model.to(dtype=torch.float32)
    return TrainingPipeline(pipeline_class, component, model.to(device), encoded, latents)


def half_precision_base(model: nn.Module, mixed_precision: str) -> None:
    """The frozen weights in half precision and the adapter in float32, as diffusers' LoRA scripts keep them under
    mixed precision (`cast_training_params`): half the memory of the base model."""
    from diffusers.training_utils import cast_training_params

    model.to(dtype=torch.float16 if mixed_precision == "fp16" else torch.bfloat16)
    cast_training_params(model, dtype=torch.float32)


def save_lora(training: TrainingPipeline, model: nn.Module, output_dir: str) -> str:
    """The adapter of `model` (added in place, :func:`~diffusers_fewstep.finetune.add_lora`) in diffusers' LoRA
    format: `output_dir/pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(output_dir)`.
    The keys stay peft's (`….lora_A.weight`), which the loader reads as they are: diffusers'
    `convert_state_dict_to_diffusers` renames the attention layers' keys only (`….lora.down.weight`), and a file with
    convolution adapters beside them then reloads without the attention adapters (tests)."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model)
    kwargs = {f"{training.component}_lora_layers": layers}
    metadata = f"{training.component}_lora_adapter_metadata"  # rank and α, so that loading scales as training did
    if metadata in inspect.signature(training.pipeline_class.save_lora_weights).parameters:
        kwargs[metadata] = model.peft_config["default"].to_dict()
    training.pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **kwargs)
    return os.path.join(output_dir, "pytorch_lora_weights.safetensors")
