"""Train a tiny text-to-image pipeline on captioned Fashion-MNIST and save it as a stock diffusers folder.

    python benchmarks/t2i/train_tiny_t2i.py --kind sd  --data DIR --out assets/fmnist-t2i-sd  --seconds 300
    python benchmarks/t2i/train_tiny_t2i.py --kind sd3 --data DIR --out assets/fmnist-t2i-sd3 --seconds 300

`--kind sd`: `StableDiffusionPipeline` — AutoencoderKL (32×32 RGB ↔ 4×8×8 latents), one frozen CLIPTextModel,
UNet2DConditionModel (ε-prediction, scaled-linear β 0.00085…0.012, 1000 steps) and the PNDM scheduler config that
Stable Diffusion ships (`clip_sample: false`, `set_alpha_to_one: false`, `skip_prk_steps: true`, `steps_offset: 1`).
`--kind sd3`: `StableDiffusion3Pipeline` — its own AutoencoderKL (8×8×8 latents, `shift_factor`/`scaling_factor`
from the latents), two frozen CLIPTextModelWithProjection, no T5, SD3Transformer2DModel (rectified flow, logit-normal
σ shifted by 3) and FlowMatchEulerDiscreteScheduler(shift=3).

The text encoders are random-init and frozen: the captions ("a photo of a sneaker", 6 templates × 10 classes) are
told apart by their tokens alone; the denoiser learns to read them (class accuracy in `evaluate_t2i.py` shows it
does). The tokenizers are byte-level BPE vocabularies trained offline on the caption words with `tokenizers`.
The VAE trains first (`--vae-seconds`, default a fifth of the budget, at most 60 s), then the denoiser with 10%
caption dropout (the empty caption, which the pipelines encode for classifier-free guidance) and an EMA.
Weights are saved in fp16; `training.json` holds the recipe and `samples.png` a 50-step look at every class.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t2i_common import (CLASS_NAMES, TEMPLATES, caption, caption_table, fmnist_labelled, load_pipeline,  # noqa: E402
                        pick_device, to_classifier_space, to_rgb)

IMAGE_SIZE = 32
CLIP_MAX_LENGTH = 16  # the longest caption is 11 tokens with BOS/EOS
CAPTION_DROPOUT = 0.1
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
FLOW_SHIFT = 3.0
LATENT_CHANNELS = {"sd": 4, "sd3": 8}
MAX_FILE_MB, MAX_PIPELINE_MB = 15.0, 12.0


@dataclass
class Sizes:
    vae_channels: tuple = (32, 64, 64)  # three blocks: 32×32 → 8×8 latents
    vae_groups: int = 16
    clip_hidden: int = 64
    clip_layers: int = 3
    clip_heads: int = 4
    clip_ff: int = 256
    unet_channels: tuple = (64, 128)
    unet_layers: int = 2
    unet_heads: int = 4
    unet_groups: int = 32
    dit_dim: int = 128
    dit_layers: int = 6
    dit_head_dim: int = 32


TINY = Sizes(vae_channels=(8, 16, 16), vae_groups=4, clip_hidden=16, clip_layers=1, clip_heads=2, clip_ff=32,
             unet_channels=(16, 32), unet_layers=1, unet_heads=2, unet_groups=8, dit_dim=32, dit_layers=1,
             dit_head_dim=16)


def log(msg: str) -> None:
    print(msg, flush=True)


def autocast(dev):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


# --- text side: tokenizer and frozen text encoders ---------------------------------------------------------
def build_tokenizer(folder: str):
    """A byte-level BPE CLIP vocabulary learned with `tokenizers` from the captions (whole words become single
    tokens; any other text still tokenizes byte by byte), written as vocab.json + merges.txt."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # CLIP's word split, then bytes → printable unicode
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=10_000, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False)
    bpe.train_from_iterator(caption_table() * 4, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    vocab = alphabet + [c + "</w>" for c in alphabet]  # CLIP's layout: bytes, bytes ending a word, merges, specials
    vocab += [a + b for a, b in merges if a + b not in set(vocab)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH, local_files_only=True)


def build_text_encoder(tokenizer, s: Sizes, seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=s.clip_hidden, intermediate_size=s.clip_ff,
                            num_hidden_layers=s.clip_layers, num_attention_heads=s.clip_heads,
                            max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=s.clip_hidden,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval().requires_grad_(False)


# --- VAE ------------------------------------------------------------------------------------------------------
def build_vae(kind: str, s: Sizes):
    from diffusers import AutoencoderKL

    n = len(s.vae_channels)
    extra = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0} if kind == "sd3" else {}
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=s.vae_channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         latent_channels=LATENT_CHANNELS[kind], norm_num_groups=s.vae_groups,
                         sample_size=IMAGE_SIZE, **extra)


def random_batch(images: torch.Tensor, batch: int) -> torch.Tensor:
    """A random batch with random horizontal flips (as the pixel fixture trains)."""
    x = images[torch.randint(0, len(images), (batch,), device=images.device)]
    flip = torch.rand(batch, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def check_finite(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; stops the run on NaN/inf instead of saving a broken pipeline."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} at step {step}; lower --lr / --vae-lr")
    return value


def warmup_cosine(base: float, step: int, frac: float, warmup: int = 200) -> float:
    """Linear warm-up over `warmup` steps, then cosine over the time budget down to a tenth."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_vae(vae, images, seconds: float, args, dev):
    """MSE reconstruction + a small KL term (per latent element, weight `--kl-weight`)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    step, t0, last = 0, time.time(), 0.0
    while time.time() - t0 < seconds:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(args.vae_lr, step, (time.time() - t0) / seconds)
        x = to_rgb(random_batch(images, args.vae_batch))
        with autocast(dev):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon.float(), x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            check_finite(loss, step)
        if time.time() - last > 10 or step == 0:
            last = time.time()
            log(f"vae step {step} mse {mse.item():.5f} kl/elem {kl.item():.3f} elapsed {last - t0:.0f}s")
        step += 1
    log(f"vae trained {step} steps in {time.time() - t0:.0f}s")
    return vae.eval().requires_grad_(False), step


@torch.no_grad()
def vae_recon_rmse(vae, images: torch.Tensor, batch: int = 1000) -> float:
    """RMSE in [-1, 1] of posterior-mean reconstructions (grey, as the classifier sees them)."""
    err = []
    for j in range(0, len(images), batch):
        x = images[j:j + batch]
        recon = vae.decode(vae.encode(to_rgb(x)).latent_dist.mode()).sample
        err.append((to_classifier_space((recon.clamp(-1, 1) + 1) / 2) - x).pow(2).flatten(1).mean(1))
    return float(torch.cat(err).mean().sqrt())


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 2000):
    """Posterior mean and std of every image and of its mirror image (the denoiser's flip augmentation)."""
    means, stds = [], []
    for x in (images, images.flip(3)):
        for j in range(0, len(x), batch):
            posterior = vae.encode(to_rgb(x[j:j + batch])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_normalisation(kind: str, means, stds) -> dict:
    """SD: `scaling_factor` = 1/std of sampled latents; SD3 also `shift_factor` = their mean."""
    z = (means + stds * torch.randn_like(stds)).float()
    if kind == "sd":
        return {"scaling_factor": float(1 / z.std())}
    return {"shift_factor": float(z.mean()), "scaling_factor": float(1 / z.std())}


# --- denoisers -------------------------------------------------------------------------------------------------
def build_unet(s: Sizes, latent_size: int, cross_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    return UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4,
                                layers_per_block=s.unet_layers, block_out_channels=s.unet_channels,
                                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                                cross_attention_dim=cross_dim, attention_head_dim=s.unet_heads,
                                norm_num_groups=s.unet_groups)


def build_transformer(s: Sizes, latent_size: int, joint_dim: int, pooled_dim: int):
    from diffusers import SD3Transformer2DModel

    channels = LATENT_CHANNELS["sd3"]
    return SD3Transformer2DModel(sample_size=latent_size, patch_size=1, in_channels=channels, out_channels=channels,
                                 num_layers=s.dit_layers, attention_head_dim=s.dit_head_dim,
                                 num_attention_heads=s.dit_dim // s.dit_head_dim, joint_attention_dim=joint_dim,
                                 caption_projection_dim=s.dit_dim, pooled_projection_dim=pooled_dim,
                                 pos_embed_max_size=latent_size)


def build_pipeline(kind: str, s: Sizes, vae, tokenizer_dir: str, seed: int):
    """The stock pipeline around a trained VAE, fresh frozen text encoders and an untrained denoiser."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, PNDMScheduler, StableDiffusion3Pipeline,
                           StableDiffusionPipeline)

    latent_size = IMAGE_SIZE // 2 ** (len(s.vae_channels) - 1)
    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=build_text_encoder(tokenizer, s, seed + 1, False), tokenizer=tokenizer,
            unet=build_unet(s, latent_size, s.clip_hidden), scheduler=PNDMScheduler.from_config(SD_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(s, latent_size, 2 * s.clip_hidden, 2 * s.clip_hidden),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT), vae=vae,
        text_encoder=build_text_encoder(tokenizer, s, seed + 1, True), tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer, s, seed + 2, True), tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None, tokenizer_3=None)


@torch.no_grad()
def caption_embeddings(kind: str, pipe, dev) -> dict:
    """Every caption's conditioning exactly as the pipeline computes it (`encode_prompt`, the text side is frozen)."""
    captions = caption_table()
    if kind == "sd":
        return {"encoder_hidden_states": pipe.encode_prompt(captions, dev, 1, False)[0].float()}
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=dev,
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}


def sample_captions(labels: torch.Tensor) -> torch.Tensor:
    """A random template of each label's class; the empty caption (last row) with probability CAPTION_DROPOUT."""
    idx = labels * len(TEMPLATES) + torch.randint(0, len(TEMPLATES), labels.shape, device=labels.device)
    drop = torch.rand(labels.shape, device=labels.device) < CAPTION_DROPOUT
    return torch.where(drop, torch.full_like(idx, len(caption_table()) - 1), idx)


def sd_loss(unet, z, cond, alphas_cumprod):
    """ε-prediction on the discrete scaled-linear schedule (t uniform in 0…999)."""
    t = torch.randint(0, len(alphas_cumprod), (len(z),), device=z.device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = torch.randn_like(z)
    out = unet(a.sqrt() * z + (1 - a).sqrt() * eps, t, **cond).sample
    return F.mse_loss(out.float(), eps)


def sd3_loss(transformer, z, cond, shift: float = FLOW_SHIFT):
    """Rectified flow: x = (1−σ)·z + σ·ε, target ε − z, σ logit-normal then shifted as the sampler (SD3)."""
    sigma = torch.sigmoid(torch.randn(len(z), device=z.device))
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    s4 = sigma.view(-1, 1, 1, 1)
    eps = torch.randn_like(z)
    out = transformer(hidden_states=(1 - s4) * z + s4 * eps, timestep=sigma * 1000, **cond).sample
    return F.mse_loss(out.float(), eps - z)


def train_denoiser(kind, model, latents, labels, embeds, norm, seconds, args, dev):
    """Train `model` on normalised latents with caption conditioning; returns its EMA copy and the step count."""
    means, stds = latents
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    alphas_cumprod = None
    if kind == "sd":
        from diffusers import DDPMScheduler
        alphas_cumprod = DDPMScheduler.from_config(SD_SCHEDULER).alphas_cumprod.to(dev)
    model.train()
    step, t0, last, losses = 0, time.time(), 0.0, []
    while time.time() - t0 < seconds:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(args.lr, step, (time.time() - t0) / seconds)
        idx = torch.randint(0, len(means), (args.batch,), device=dev)
        z = (means[idx] + stds[idx] * torch.randn_like(stds[idx]) - norm.get("shift_factor", 0.0)) * norm["scaling_factor"]
        caps = sample_captions(labels[idx])
        cond = {k: v[caps] for k, v in embeds.items()}
        with autocast(dev):
            loss = sd_loss(model, z, cond, alphas_cumprod) if kind == "sd" else sd3_loss(model, z, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # one fused update: the per-tensor loop costs more launches than the tiny model
            torch._foreach_lerp_(ema_params, params, 1 - min(args.ema, (1 + step) / (10 + step)))
        if step % 50 == 0:
            losses.append(check_finite(loss, step))
        if time.time() - last > 10 or step == 0:
            last = time.time()
            log(f"{kind} step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{step / max(last - t0, 1e-9):.1f} it/s elapsed {last - t0:.0f}s")
        step += 1
    recent = losses[-20:]
    log(f"{kind} trained {step} steps in {time.time() - t0:.0f}s, recent loss {sum(recent) / max(len(recent), 1):.4f}")
    return ema, step


# --- saving and a first look ------------------------------------------------------------------------------
def round_to_fp16(module):
    """Round weights to fp16 values in place, so that training sees exactly the weights that are saved."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def save_pipeline(pipe, out: str, tokenizer_dir: str) -> dict:
    """fp16 weights that load back into fp32 modules by default (the text encoders' config records float32 as
    their loading dtype: transformers 5 otherwise loads them in the stored fp16), tokenizers also as
    vocab.json + merges.txt."""
    import shutil

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "fp16 pipelines cannot run on cpu": we only save
    try:
        pipe.to("cpu", torch.float16)
        pipe.save_pretrained(out, safe_serialization=True)
        pipe.to(torch.float32)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for sub in ("text_encoder", "text_encoder_2"):
        path = os.path.join(out, sub, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config} or {"dtype": "float32"})
            with open(path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(out, sub)):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, sub, name))
    return folder_sizes(out)


def folder_sizes(out: str) -> dict:
    sizes = {os.path.relpath(os.path.join(d, f), out): os.path.getsize(os.path.join(d, f)) / 2**20
             for d, _, files in os.walk(out) for f in files}
    total = sum(sizes.values())
    log(f"saved {out}: {total:.2f} MB in {len(sizes)} files, largest "
        f"{max(sizes, key=sizes.get)} {max(sizes.values()):.2f} MB")
    if total > MAX_PIPELINE_MB or max(sizes.values()) > MAX_FILE_MB:
        log(f"WARNING: over the size budget ({MAX_PIPELINE_MB} MB in all, {MAX_FILE_MB} MB a file)")
    return {"total_mb": round(total, 3), "largest_mb": round(max(sizes.values()), 3)}


@torch.no_grad()
def first_look(out: str, dev, steps: int, per_class: int, classifier: str = "") -> dict:
    """Reload the saved folder with the stock pipeline, sample every class (guidance 5) and save samples.png;
    with a classifier folder, also the share of samples of the prompted class."""
    from PIL import Image

    pipe = load_pipeline(out, dev)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    prompts = [caption(int(c)) for c in labels]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator(dev).manual_seed(0)).images
    grey = to_classifier_space(images)
    grid = ((grey + 1) * 127.5).round().byte().cpu()[:, 0]
    grid = grid.reshape(len(CLASS_NAMES), per_class, IMAGE_SIZE, IMAGE_SIZE).permute(0, 2, 1, 3)
    Image.fromarray(grid.reshape(len(CLASS_NAMES) * IMAGE_SIZE, per_class * IMAGE_SIZE).numpy()).save(
        os.path.join(out, "samples.png"))
    result = {"pipeline_class": type(pipe).__name__, "steps": steps, "guidance": 5.0, "samples": len(labels)}
    if classifier:
        from diffusers_fewstep.evaluation import load_fmnist_classifier
        net = load_fmnist_classifier(classifier, dev)
        result["class_accuracy"] = float((net(grey.to(dev)).argmax(1).cpu() == labels).float().mean())
    log(f"first look: {result}")
    return result


# --- main -----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["sd", "sd3"], required=True)
    p.add_argument("--data", required=True, help="folder with the Fashion-MNIST IDX .gz files (train split)")
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--seconds", type=float, default=300, help="wall budget of both training phases")
    p.add_argument("--vae-seconds", type=float, default=None, help="VAE share (default min(60, seconds/5))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="denoiser batch (default: sd 512, sd3 256)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5, help="KL per latent element, against MSE per pixel")
    p.add_argument("--max-images", type=int, default=0, help="use the first N training images (0: all 60k)")
    p.add_argument("--classifier", default="", help="fmnist-classifier folder: class accuracy of the first look")
    p.add_argument("--look-steps", type=int, default=None, help="steps of the first look (default 50; --tiny: 2)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny networks, 256 images, batch 16")
    p.add_argument("--device", default="")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 512 if args.kind == "sd" else 256
    if args.tiny:
        args.max_images = args.max_images or 256
        args.batch, args.vae_batch = min(args.batch, 16), min(args.vae_batch, 16)
    if args.look_steps is None:
        args.look_steps = 2 if args.tiny else 50
    if args.vae_seconds is None:
        args.vae_seconds = min(60.0, args.seconds / 5)
    return args


def autoencoder_phase(args, s: Sizes, images, test_images, dev):
    """Train the VAE, round it to its saved fp16 weights, encode the data set, set the latent normalisation."""
    vae, steps = train_vae(build_vae(args.kind, s).to(dev), images, args.vae_seconds, args, dev)
    round_to_fp16(vae)
    recon = vae_recon_rmse(vae, test_images.to(dev))
    means, stds = encode_dataset(vae, images)
    norm = latent_normalisation(args.kind, means, stds)
    vae.register_to_config(**norm)
    log(f"vae test recon RMSE {recon:.4f}; latents {tuple(means.shape[1:])}, {norm}")
    return vae, (means, stds), {"vae_steps": steps, "vae_test_recon_rmse": recon, "latent_normalisation": norm}


def denoiser_phase(args, s: Sizes, pipe, latents, labels, norm, seconds, dev) -> int:
    """Train the pipeline's denoiser on the latents (text side frozen); the EMA weights replace it."""
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            round_to_fp16(getattr(pipe, name))
    model = pipe.unet if args.kind == "sd" else pipe.transformer
    log(f"denoiser {type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{seconds:.0f}s")
    embeds = caption_embeddings(args.kind, pipe, dev)
    ema, steps = train_denoiser(args.kind, model, latents, labels.repeat(2), embeds, norm, seconds, args, dev)
    pipe.register_modules(**({"unet": ema} if args.kind == "sd" else {"transformer": ema}))
    return steps


def main(argv=None):
    import shutil
    import tempfile

    args = parse_args(argv)
    args.command = "python benchmarks/t2i/train_tiny_t2i.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dev = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    s, t_start = (TINY if args.tiny else Sizes()), time.time()
    images, labels = fmnist_labelled(args.data, "train", args.max_images)
    test_images, _ = fmnist_labelled(args.data, "test", 64 if args.tiny else 2000)
    images, labels = images.to(dev), labels.to(dev)
    log(f"{args.kind}: {len(images)} training images on {dev}, budget {args.seconds:.0f}s (VAE {args.vae_seconds:.0f}s)")

    vae, latents, results = autoencoder_phase(args, s, images, test_images, dev)
    tokenizer_dir = tempfile.mkdtemp(prefix="t2i-tokenizer-")
    try:
        pipe = build_pipeline(args.kind, s, vae, tokenizer_dir, args.seed).to(dev)
        remaining = max(args.seconds - (time.time() - t_start), 1.0)
        results["denoiser_steps"] = denoiser_phase(args, s, pipe, latents, labels, results["latent_normalisation"],
                                                   remaining, dev)
        results["files"] = save_pipeline(pipe, args.out, tokenizer_dir)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    results["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in pipe.components.items()
                         if isinstance(m, torch.nn.Module)}
    results["wall_seconds_training"] = round(time.time() - t_start, 1)
    results["first_look"] = first_look(args.out, dev, args.look_steps, 2 if args.tiny else 8,
                                       args.classifier)
    results["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    write_recipe(args, s, results)


def write_recipe(args, s: Sizes, results: dict) -> None:
    import diffusers
    import transformers

    recipe = {"command": args.command, "kind": args.kind,
              "args": {k: v for k, v in vars(args).items() if k not in ("data", "out", "command")},
              "sizes": asdict(s), "dataset": "Fashion-MNIST train, zero-padded to 32x32, [-1,1], RGB copies, random h-flip",
              "captions": {"classes": CLASS_NAMES, "templates": TEMPLATES, "dropout": CAPTION_DROPOUT},
              "text_encoders": "random-init, frozen", "versions": {"torch": torch.__version__,
                                                                   "diffusers": diffusers.__version__,
                                                                   "transformers": transformers.__version__},
              **results}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(recipe, f, indent=2)


if __name__ == "__main__":
    main()
