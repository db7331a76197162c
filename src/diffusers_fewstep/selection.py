"""Paths with reference solutions, and the held-out selection that keeps the best table (DESIGN.md §3).

A :class:`Paths` set holds native noises, their reference solutions (the one reference solve, or the
pipeline's own scheduler: :class:`~diffusers_fewstep.reference.Reference`) and, per path, its row of the
conditioning. Phase 1 trains on one set and scores candidate tables on another it never trained on
(`held_out`). Measures, all against the references of the same noises, lower is better:

- ``rmse``: endpoint RMSE (per-sample RMSE, averaged); rewards blur at 8–10 steps (docs/method.md). For latent
  pipelines with a decoder (:meth:`Paths.decode_references`) it is the RMSE of the decoded images, the fidelity users
  see: on the SD fixture the latent RMSE ranked a learned 8-step table .063 against UniPC's .088 while its decoded
  images were further from the pipeline's own (.0567 against .0532; docs/results.md);
- ``feature``: LPIPS-style distance in the model's own features (:func:`~diffusers_fewstep.features.feature_distance`);
- ``fd_self``: Fréchet distance between the pooled model features of the samples and of the references;
- ``fd_data`` (optional, needs clean data images; unconditional models): the same Fréchet distance, against the
  pooled model features of data images instead of the references (:meth:`Paths.featurize_data`). It is the one
  measure that is not data-free, and the one that does not ask for closeness to the model's own reference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import reference
from .features import compare, frechet_distance, pooled_features
from .objectives import endpoint_loss
from .solvers import sample

MEASURES = ("rmse", "feature", "fd_self", "fd_data")


def phase1_measures(text_to_image: bool) -> tuple:
    """Phase 1's default (loss, held-out measure): the model's own features (`feature`, `fd_self`), and for
    text-to-image pipelines `l2` and `rmse`, which kept tables closer to the pipeline's own images on the SD fixture
    (docs/results.md, "Learned tables on the text-to-image fixture")."""
    return ("l2", "rmse") if text_to_image else ("feature", "fd_self")


def _select_cond(cond: Optional[dict], idx: torch.Tensor) -> Optional[dict]:
    """Per-path conditioning: tensors with one row are broadcast, others indexed (cyclically) by path."""
    if cond is None:
        return None
    out = {}
    for key, value in cond.items():
        if isinstance(value, dict):
            value = _select_cond(value, idx)
        elif torch.is_tensor(value) and value.ndim > 0:
            rows = value.shape[0]
            value = value.expand(len(idx), *value.shape[1:]) if rows == 1 else value[idx.to(value.device) % rows]
        out[key] = value
    return out


def extra_args(cond: Optional[dict], uncond: Optional[dict], idx: torch.Tensor) -> dict:
    """The denoiser's keyword arguments (`cond`, `uncond`) for the paths `idx`."""
    extra = {}
    if cond is not None:
        extra["cond"] = _select_cond(cond, idx)
    if uncond is not None:
        extra["uncond"] = _select_cond(uncond, idx)
    return extra


class Paths:
    """Native noises (seeded), their reference solutions and a second noise for feature measures.

    Args:
        size (`int`): number of paths; `sample_shape`: one sample's shape; `generator`: seeds the draws.
        cond, uncond (`dict`, *optional*): conditioning with one row per path (cycled) or one row for all.
    """

    def __init__(self, size: int, sample_shape, device, generator: torch.Generator, cond=None, uncond=None):
        self.noise = torch.randn(size, *sample_shape, generator=generator).to(device)
        self.path_noise = torch.randn(size, *sample_shape, generator=generator).to(device)  # ε of x0 + σ·ε
        self.cond, self.uncond = cond, uncond
        self.reference: Optional[torch.Tensor] = None
        self.reference_features: Optional[torch.Tensor] = None
        self.data_features: Optional[torch.Tensor] = None
        self.decode = None  # native latents -> images: `rmse` compares decoded images (decode_references)
        self.reference_images: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batches(self, batch_size: int):
        """(indices, device indices, denoiser kwargs) over all paths, in order."""
        for start in range(0, len(self), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(self)))
            yield idx, idx.to(self.noise.device), extra_args(self.cond, self.uncond, idx)

    @torch.no_grad()
    def solve_references(self, denoiser, truth: reference.Reference, batch_size: int, progress: bool = False) -> None:
        """The reference solution of every path (`truth`: the ODE solve or the pipeline's own scheduler)."""
        refs = [truth(denoiser, self.noise[dev], extra_args=extra)
                for _, dev, extra in tqdm(list(self.batches(batch_size)), desc="reference solves", disable=not progress)]
        self.reference = torch.cat(refs)

    @torch.no_grad()
    def decode_references(self, decode) -> None:
        """Measure `rmse` on images: keep `decode` (native latents → images, e.g. the pipeline's VAE) and the
        decoded references."""
        self.decode, self.reference_images = decode, decode(self.reference)

    @torch.no_grad()
    def featurize_references(self, features, batch_size: int) -> None:
        self.reference_features = torch.cat([pooled_features(features, self.reference[dev], self.path_noise[dev],
                                                             extra.get("cond"))
                                             for _, dev, extra in self.batches(batch_size)])

    @torch.no_grad()
    def featurize_data(self, features, data: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        """The reference set of ``fd_data``: pooled features of as many clean images as there are paths (fewer if
        `data` has fewer), drawn from `data` without replacement, each shown with its own noise as the references
        are. Unconditional models only: data images come without the paths' conditioning."""
        pick = torch.randperm(len(data), generator=generator)[: len(self)]
        x = data[pick].to(self.noise.device, torch.float32)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        self.data_features = pooled_features(features, x, noise, batch_size=batch_size)


@dataclass
class Candidate:
    """A table competing for one step count: where it came from and what it scored on held-out paths."""

    name: str
    solver: str
    table: List[float]
    source: str  # "stock", "init", "existing", "resampled" (a smaller count's kept table), "end" (a start with its
    # end lowered), "learned"
    scores: Dict[str, float] = field(default_factory=dict)
    start: Optional[str] = None  # learned: the candidate it started from

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def score(model_fn, paths: Paths, table, solver: str, batch_size: int, features=None) -> Dict[str, float]:
    """Every measure of :data:`MEASURES` the set allows for `table` with `solver` on the held-out `paths`
    (`feature` and `fd_self` need `features`; `fd_data` also needs :meth:`Paths.featurize_data`)."""
    sigmas = torch.as_tensor(table, dtype=torch.float32, device=paths.noise.device)
    rmse, dist, pooled = [], [], []
    for _, dev, extra in paths.batches(batch_size):
        x = reference.start_state(paths.noise[dev], model_fn.schedule, sigmas[0])
        x = sample(model_fn, x, sigmas, solver, extra_args=extra).float()
        if paths.decode is not None:  # tables end at σ = 0, where σ-space is native
            rmse.append(endpoint_loss(paths.decode(x), paths.reference_images[dev]).sqrt())
        else:
            rmse.append(endpoint_loss(x, paths.reference[dev]).sqrt())
        if features is not None:  # one model call gives both feature measures
            d, p = compare(features, x, paths.reference[dev], paths.path_noise[dev], extra.get("cond"))
            dist.append(d)
            pooled.append(p)
    out = {"rmse": float(torch.cat(rmse).mean())}
    if features is not None:
        out["feature"] = float(torch.cat(dist).mean())
        pooled = torch.cat(pooled)
        out["fd_self"] = frechet_distance(pooled, paths.reference_features)
        if paths.data_features is not None:
            out["fd_data"] = frechet_distance(pooled, paths.data_features)
    return out


def check_measure(measure: str, has_data: bool = True, conditional: bool = False) -> None:
    """Raise `ValueError` unless `measure` is one of :data:`MEASURES` that a run can score: ``fd_data`` needs
    clean data images (`has_data`) and an unconditional model (not `conditional`)."""
    others = [m for m in MEASURES if m != "fd_data"]
    if measure not in MEASURES:
        raise ValueError(f"unknown selection measure {measure!r}; choose one of {list(MEASURES)}")
    if measure == "fd_data" and not has_data:
        raise ValueError("fd_data compares samples with clean data images; pass them (optimize --data: an IDX file, "
                         f".pt tensor or image folder) or select by one of {others}")
    if measure == "fd_data" and conditional:
        raise ValueError("fd_data is for unconditional models: data images carry no prompts or labels; select by "
                         f"one of {others}")


def best(candidates: List[Candidate], measure: str) -> Candidate:
    """The candidate with the lowest held-out `measure` (ties: the first listed)."""
    check_measure(measure)
    scored = [c for c in candidates if measure in c.scores]
    if not scored:
        raise ValueError(f"no candidate has the measure {measure!r}; `feature`/`fd_self`/`fd_data` need a model with "
                         "feature layers (diffusers_fewstep.features), `fd_data` also clean data images")
    return min(scored, key=lambda c: c.scores[measure])
