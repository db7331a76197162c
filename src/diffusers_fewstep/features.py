"""The model's own features: a data-free, weights-free view of image quality that sees blur.

Endpoint RMSE rewards blur: the posterior mean is the L2-optimal guess, and tables that end on a
large σ win on RMSE while their samples look worse (docs/method.md). Perceptual measures fix that
with a feature network (LPIPS, FID's Inception); here the feature network is the diffusion model
itself. A sample x̂ is noised to a small σ_f with a fixed ε and passed through the model; the outputs
of its encoder blocks (a UNet's down blocks and mid block, or a few transformer blocks) are its
features, computed in one batched call for x̂ and the reference it is compared with:

- :func:`feature_distance`: paired, LPIPS-style (channel vectors scaled to unit length, squared
  difference averaged over positions and layers); differentiable, a Phase-1 loss;
- :func:`pooled_features` + :func:`frechet_distance`: the Fréchet distance between the spatially
  averaged features of a set of samples and those of the references (an FD in the model's own
  feature space), a held-out quality measure.
"""
from __future__ import annotations

import contextlib
import re
from typing import List, Optional

import torch
from torch import nn

FEATURE_SIGMA = 0.1  # σ at which samples are shown to the model (x = x̂ + σ_f·ε)
_UNET_LAYERS = re.compile(r"(^|\.)(down_blocks\.\d+|mid_block)$")
_TRANSFORMER_LAYERS = re.compile(r"(^|\.)(transformer_blocks|single_transformer_blocks)\.\d+$")


def feature_layers(model: nn.Module, max_transformer_layers: int = 4) -> List[nn.Module]:
    """The blocks whose outputs are the features: a UNet's down blocks and mid block, else up to
    `max_transformer_layers` evenly spaced transformer blocks."""
    named = list(model.named_modules())
    layers = [m for name, m in named if _UNET_LAYERS.search(name)]
    if layers:
        return layers
    blocks = [m for name, m in named if _TRANSFORMER_LAYERS.search(name)]
    if not blocks:
        raise ValueError(f"no feature layers found in {type(model).__name__}: expected `down_blocks`/`mid_block` "
                         "(UNets) or `transformer_blocks` (transformers)")
    step = max(1, len(blocks) // max_transformer_layers)
    return blocks[step - 1::step][:max_transformer_layers]


def _as_map(output) -> torch.Tensor:
    """A block's output as (batch, positions, channels): the last tensor of a tuple (the image stream)."""
    if isinstance(output, (tuple, list)):
        output = [o for o in output if torch.is_tensor(o)][-1]
    if output.ndim == 4:  # (B, C, H, W)
        return output.flatten(2).transpose(1, 2)
    return output  # (B, L, D)


class ModelFeatures:
    """Features of σ-space samples from the model of a `SigmaDenoiser` (see the module docstring).

    Args:
        denoiser (`SigmaDenoiser`): the model and its noise schedule.
        sigma (`float`, *optional*, defaults to `FEATURE_SIGMA`): the σ the samples are shown at.
        autocast_dtype (`torch.dtype`, *optional*): autocast the model call (e.g. bf16 on CUDA).
    """

    def __init__(self, denoiser, sigma: float = FEATURE_SIGMA, autocast_dtype: Optional[torch.dtype] = None):
        self.denoiser, self.autocast_dtype = denoiser, autocast_dtype
        schedule = denoiser.schedule
        self.sigma = min(max(sigma, schedule.sigma_min), schedule.sigma_max)
        self.layers = feature_layers(denoiser.model)

    def maps(self, x: torch.Tensor, noise: torch.Tensor, cond: Optional[dict] = None) -> List[torch.Tensor]:
        """Per layer, (batch, positions, channels) features of σ-space samples `x` shown at σ_f with noise ε."""
        schedule = self.denoiser.schedule
        sigma = torch.full((x.shape[0],), self.sigma, device=x.device)
        x_native = (x + self.sigma * noise) * float(schedule.native_scale(torch.tensor(self.sigma)))
        captured = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(_as_map(out))) for layer in self.layers]
        dtype = next(self.denoiser.model.parameters()).dtype
        autocast = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        try:
            with autocast:
                self.denoiser.model_output(x_native.to(dtype), schedule.sigma_to_t(sigma).to(dtype), cond)
        finally:
            for hook in hooks:
                hook.remove()
        return [m.float() for m in captured]


def compare(features: ModelFeatures, x: torch.Tensor, reference: torch.Tensor, noise: torch.Tensor,
            cond: Optional[dict] = None):
    """One model call on `x` and `reference` (σ-space, same shape), both shown at σ_f with the same noise; returns
    the per-sample LPIPS-style distance in the model's features — mean over layers of the positions' mean
    ‖f̂/‖f̂‖ − f/‖f‖‖² (0 for identical images, at most 4), differentiable in `x` — and the pooled features of
    `x` (as :func:`pooled_features`)."""
    both = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in (cond or {}).items()} or None
    maps = features.maps(torch.cat([x, reference.to(x.dtype)]), torch.cat([noise, noise]), both)
    total, pooled = 0.0, []
    for m in maps:
        pooled.append(m.chunk(2)[0].mean(1))
        unit = m / (m.norm(dim=-1, keepdim=True) + 1e-6)
        a, b = unit.chunk(2)
        total = total + (a - b).pow(2).sum(-1).mean(-1)
    return total / len(maps), torch.cat(pooled, dim=1)


def feature_distance(features: ModelFeatures, x: torch.Tensor, reference: torch.Tensor, noise: torch.Tensor,
                     cond: Optional[dict] = None) -> torch.Tensor:
    """Per-sample LPIPS-style distance in the model's features between `x` and `reference` (see :func:`compare`)."""
    return compare(features, x, reference, noise, cond)[0]


def pooled_features(features: ModelFeatures, x: torch.Tensor, noise: torch.Tensor, cond: Optional[dict] = None,
                    batch_size: Optional[int] = None) -> torch.Tensor:
    """(batch, Σ channels): every layer's features averaged over positions, concatenated; `batch_size` splits an
    unconditional set into model calls of at most that many samples."""
    if batch_size is not None and len(x) > batch_size:
        if cond is not None:
            raise ValueError("batch_size splits unconditional sets only; batch conditioned samples with their cond")
        return torch.cat([pooled_features(features, x[i:i + batch_size], noise[i:i + batch_size])
                          for i in range(0, len(x), batch_size)])
    return torch.cat([m.mean(1) for m in features.maps(x, noise, cond)], dim=1)


def frechet_distance(feats: torch.Tensor, ref_feats: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (rows are samples), each dimension scaled
    by the reference's standard deviation so that no layer dominates, in the span of the reference's top
    n/4 principal components (a covariance of d dimensions needs many more than d samples). Uses
    tr((Σ_a Σ_b)^½) = Σ √λ(Σ_b^½ Σ_a Σ_b^½), in float64."""
    a, b = feats.double(), ref_feats.double()
    scale = b.std(0).clamp(min=1e-6)
    a, b = a / scale, b / scale
    k = min(a.shape[1], max(2, len(b) // 4))
    if k < a.shape[1]:
        _, vecs = torch.linalg.eigh(torch.cov(b.T))
        basis = vecs[:, -k:]
        a, b = a @ basis, b @ basis
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_b)
    root_b = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_b @ cov_a @ root_b).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
