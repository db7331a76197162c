"""Tiny random diffusers components for fast CPU tests (reusable by every test file).

Each builder returns a dict of components that the matching stock diffusers pipeline accepts
as keyword arguments (`DDPMPipeline(**tiny_unconditional())`, `StableDiffusionPipeline(**tiny_sd())`,
…). Weights are random but reproducible (`seed`); tokenizers are built offline from a
byte-level vocabulary written to a temporary folder, so nothing is downloaded. For FD tests:
:func:`write_idx_images` (Fashion-MNIST's file format) and :data:`STAND_IN_CLASSIFIER` (an `arch.py`
in the FD feature network's folder format).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache

import torch

# `arch.py` of a stand-in FD feature network: the 2×2 average pool of the image, no weights
STAND_IN_CLASSIFIER = """import torch
class Net(torch.nn.Module):
    def features(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
def load_classifier(folder):
    return Net()
"""
CLIP_HIDDEN = 32
CLIP_MAX_LENGTH = 16  # short prompts keep the text encoders fast
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _bytes_to_unicode():
    """GPT-2's reversible byte → printable-unicode table (what CLIP's BPE vocabulary is built on)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=None)
def tiny_tokenizer_folder() -> str:
    """A folder with `vocab.json` and `merges.txt` for a character-level CLIP tokenizer (no merges)."""
    folder = tempfile.mkdtemp(prefix="tiny-clip-tokenizer-")
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return folder


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    folder = tiny_tokenizer_folder()
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=CLIP_MAX_LENGTH)


def _clip_config(tokenizer, projection_dim=None):
    from transformers import CLIPTextConfig

    kwargs = dict(hidden_size=CLIP_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH, layer_norm_eps=1e-5,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def tiny_clip_text_model(tokenizer, seed: int = 0):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config(tokenizer)).eval()


def tiny_clip_text_model_with_projection(tokenizer, seed: int = 0, projection_dim: int = CLIP_HIDDEN):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim)).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **kwargs).eval()


def tiny_unconditional(seed: int = 0, prediction_type: str = "epsilon", beta_schedule: str = "linear") -> dict:
    """`unet` (UNet2DModel, 1×16×16) and `scheduler` (DDPMScheduler) for `DDPMPipeline`."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type,
                              clip_sample=False)
    return {"unet": unet, "scheduler": scheduler}


def tiny_sd(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Components of `StableDiffusionPipeline`: 4×16×16 latents, 32×32 images, one CLIP text encoder."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=CLIP_HIDDEN,
                                attention_head_dim=4, norm_num_groups=4).eval()
    return {"unet": unet, "scheduler": DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULER),
            "vae": tiny_vae(seed + 1), "text_encoder": tiny_clip_text_model(tokenizer, seed + 2),
            "tokenizer": tokenizer, "safety_checker": None, "feature_extractor": None, "image_encoder": None,
            "requires_safety_checker": False}


def tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Components of `StableDiffusionXLPipeline`: two text encoders (the second with projection)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    tokenizer = tiny_tokenizer()
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=2 * CLIP_HIDDEN, attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + CLIP_HIDDEN,
                                norm_num_groups=4).eval()
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type, timestep_spacing="leading",
                                       **{k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")})
    return {"unet": unet, "scheduler": scheduler, "vae": tiny_vae(seed + 1),
            "text_encoder": tiny_clip_text_model(tokenizer, seed + 2), "tokenizer": tokenizer,
            "text_encoder_2": tiny_clip_text_model_with_projection(tokenizer, seed + 3), "tokenizer_2": tiny_tokenizer(),
            "image_encoder": None, "feature_extractor": None, "force_zeros_for_empty_prompt": True}


def tiny_sd3(seed: int = 0, shift: float = 3.0) -> dict:
    """Components of `StableDiffusion3Pipeline`: SD3 transformer, two CLIP encoders, no T5 (`text_encoder_3=None`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=2 * CLIP_HIDDEN, pooled_projection_dim=2 * CLIP_HIDDEN,
                                        pos_embed_max_size=16).eval()
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
            "vae": tiny_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5035),
            "text_encoder": tiny_clip_text_model_with_projection(tokenizer, seed + 2), "tokenizer": tokenizer,
            "text_encoder_2": tiny_clip_text_model_with_projection(tokenizer, seed + 3), "tokenizer_2": tiny_tokenizer(),
            "text_encoder_3": None, "tokenizer_3": None}


def fake_learned_table(scheduler_config, num_steps: int = 4, seed: int = 0) -> list:
    """A valid σ table that no diffusers scheduler uses: uniform in log σ over the model's range, interior
    points jittered by up to a third of a step, then 0 — a stand-in for a learned table."""
    from diffusers_fewstep import NoiseSchedule

    schedule = NoiseSchedule(scheduler_config)
    log_sigmas = torch.linspace(torch.tensor(schedule.sigma_max).log(), torch.tensor(schedule.sigma_min).log(),
                                num_steps, dtype=torch.float64)
    step = (log_sigmas[0] - log_sigmas[-1]) / max(num_steps - 1, 1)
    jitter = (torch.rand(num_steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5) * step / 1.5
    jitter[0] = jitter[-1] = 0
    return (log_sigmas + jitter).exp().tolist() + [0.0]


def learned_scheduler(scheduler_config, steps=(3, 4), solver: str = "euler", **kwargs):
    """`LearnedScheduleScheduler` for `scheduler_config` holding :func:`fake_learned_table` tables for `steps`."""
    from diffusers_fewstep import LearnedScheduleScheduler

    tables = {n: fake_learned_table(scheduler_config, n, seed=n) for n in steps}
    return LearnedScheduleScheduler.from_config(scheduler_config, sigma_tables=tables, solver=solver, **kwargs)




def tiny_t5_tokenizer():
    """A character-level tokenizer with T5's special tokens (`<pad>` 0, `</s>` 1, `<unk>` 2), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5_encoder(tokenizer, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=CLIP_HIDDEN, d_kv=8, d_ff=37, num_layers=1,
                                   num_heads=4)).eval()


def tiny_flux(seed: int = 0, guidance_embeds: bool = True, use_dynamic_shifting: bool = True) -> dict:
    """Components of `FluxPipeline` as diffusers' fast tests build them: a one-block Flux transformer on packed
    latents (1 latent channel × 2×2 patches), a CLIP and a T5 encoder, a VAE that does not downsample; the
    scheduler shifts dynamically (`mu`) like FLUX.1's, with sequence lengths scaled to tiny images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=CLIP_HIDDEN,
                                         pooled_projection_dim=CLIP_HIDDEN, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=use_dynamic_shifting,
                                                base_image_seq_len=64, max_image_seq_len=1024)
    return {"transformer": transformer, "scheduler": scheduler, "vae": vae,
            "text_encoder": tiny_clip_text_model(tokenizer, seed + 2), "tokenizer": tokenizer,
            "text_encoder_2": tiny_t5_encoder(tokenizer_2, seed + 3), "tokenizer_2": tokenizer_2,
            "image_encoder": None, "feature_extractor": None}


def write_idx_images(path, images) -> None:
    """Write images `(n, h, w)` (values 0–255) as a gzipped IDX file: Fashion-MNIST's `*-images-idx3-ubyte.gz`."""
    header = (2051).to_bytes(4, "big") + b"".join(int(v).to_bytes(4, "big") for v in images.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype("uint8").tobytes())
