"""Phase-1 objectives: what a σ table is scored by (DESIGN.md §2–§3, docs/method.md).

All objectives are differentiable with respect to the table `sigmas` (a 1-D tensor).
The denoiser is any `D(x, sigma, **extra_args)` in σ-space (e.g. :class:`~diffusers_fewstep.SigmaDenoiser`).

- :func:`trajectory_loss` — the distance (:func:`endpoint_loss`: squared error, pseudo-Huber, or the
  model's own features) between solver(x_T; σ) and reference(x_T), back-propagated through the
  solver; the default objective, valid for every solver in :mod:`~diffusers_fewstep.solvers`.
- :func:`bound` — the first-order solver's discretization-error bound
  ``Σ_i c_i·‖∫_{u_i}^{u_{i+1}} (D(u) − D(u_i)) du‖`` (u = 1/σ) estimated by stratified Monte
  Carlo along ``x0 + σ·ε`` paths, with ``c_i = σ_N`` (``weighting="literal"``, the convex
  weights; degenerate, see DESIGN.md §3 lesson 1) or ``c_i = σ_{i+1}·√((σ_d² + σ_N²)/(σ_d² + σ_{i+1}²))``
  (``weighting="propagated"``).
- :func:`stationarity_targets` — the step lengths at which the bound is stationary (for the
  literal weights: ``τ(u_i) − τ(u_{i−1}) = (u_{i+1} − u_i)·τ'(u_i)``, projected on the local-error
  directions), used by the gradient-free fixed-point solver.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .solvers import sample

WEIGHTINGS = ("literal", "propagated")


LOSSES = ("l2", "pseudo_huber", "feature")


def endpoint_loss(x: torch.Tensor, reference: torch.Tensor, loss: str = "l2", features=None, noise=None,
                  cond: Optional[dict] = None) -> torch.Tensor:
    """Per-sample distance between few-step endpoints and their references.

    `l2`: mean squared error; `pseudo_huber`: √(MSE + c²) − c with c = 0.00054 (about the per-sample RMSE,
    robust to outliers as in consistency training, arXiv 2310.14189); `feature`: the LPIPS-style distance in
    the model's own features (:func:`~diffusers_fewstep.features.feature_distance`; needs `features`
    and the feature `noise`), which sees blur where the squared error rewards it.
    """
    reference = reference.to(x.dtype)
    if loss == "feature":
        if features is None:
            raise ValueError("loss='feature' needs the model's features (a denoiser with a diffusers model)")
        from .features import feature_distance

        return feature_distance(features, x, reference, noise, cond)
    mse = (x - reference).pow(2).flatten(1).mean(1)
    if loss == "l2":
        return mse
    if loss == "pseudo_huber":
        return (mse + 0.00054**2).sqrt() - 0.00054
    raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")


def trajectory_loss(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, reference: torch.Tensor,
                    solver: str = "euler", extra_args: Optional[dict] = None, loss: str = "l2", features=None,
                    feature_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean endpoint loss of a few-step solve against a reference solution.

    Args:
        denoiser (`Callable`): `D(x, sigma, **extra_args)` in σ-space.
        x (`torch.Tensor`): σ-space initial states at `sigmas[0]`.
        sigmas (`torch.Tensor`): the table `[σ_0, …, σ_N]` (may require grad; usually ends in 0).
        reference (`torch.Tensor`): the many-step solution from the same noise.
        solver (`str`, *optional*, defaults to `"euler"`): any solver of :mod:`~diffusers_fewstep.solvers`.
        extra_args (`dict`, *optional*): keyword arguments for the denoiser (conditioning).
        loss (`str`, *optional*, defaults to `"l2"`): see :func:`endpoint_loss`; `features`/`feature_noise` for `feature`.

    Returns:
        `torch.Tensor`: scalar, the loss averaged over samples.
    """
    x_end = sample(denoiser, x, sigmas, solver, extra_args=extra_args)
    cond = (extra_args or {}).get("cond")
    return endpoint_loss(x_end, reference, loss, features, feature_noise, cond).mean()


def propagation_factors(sigmas: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """√((σ_d² + σ_N²)/(σ_d² + σ²)) for σ = σ_1 … σ_N: how an error made at σ reaches σ_N
    (exact when the data are Gaussian with std σ_d)."""
    sigma_end = sigmas[-1]
    return ((sigma_data**2 + sigma_end**2) / (sigma_data**2 + sigmas[1:] ** 2)).sqrt()


def interval_weights(sigmas: torch.Tensor, weighting: str = "propagated", sigma_data: float = 0.5) -> torch.Tensor:
    """The weights c_i of the local errors ∫_{u_i}^{u_{i+1}} (D(u) − D(u_i)) du, i = 0 … N−1.

    `literal`: c_i = σ_N (the convex-combination weights of DESIGN.md §2);
    `propagated`: c_i = σ_{i+1}·√((σ_d² + σ_N²)/(σ_d² + σ_{i+1}²)) (the local error in x, carried to σ_N).
    """
    if weighting == "literal":
        return sigmas[-1].expand(len(sigmas) - 1)
    if weighting == "propagated":
        return sigmas[1:] * propagation_factors(sigmas, sigma_data)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {list(WEIGHTINGS)}")


def _path_denoised(denoiser, x0, noise, sigma, extra_args):
    """τ(u) = D(x0 + σ·ε; σ) along the straight noising path; `sigma` scalar or per sample."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))) if sigma.ndim else sigma
    return denoiser(x0 + s * noise, sigma, **(extra_args or {}))


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.float().pow(2).flatten(1).mean(1).add(1e-20).sqrt()


def local_errors(denoiser: Callable, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                 strata: int = 1, offsets: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 extra_args: Optional[dict] = None):
    """Stratified Monte-Carlo estimates of L_i = ∫_{u_i}^{u_{i+1}} (D(u) − D(u_i)) du along x0 + σ·ε.

    Each interval [u_i, u_{i+1}] (u = 1/σ) is cut into `strata` equal parts with one uniform
    sample in each (per path). Needs N·(1 + strata) denoiser calls.

    Args:
        offsets (`torch.Tensor` of shape `(N, strata, batch)`, *optional*): the uniform variates
            in [0, 1) (drawn from `generator` when not given); fix them for common random numbers.

    Returns:
        `(L, D)`: lists of the N local errors and of the N denoised values D(u_i), each shaped like x0.
    """
    n = len(sigmas) - 1
    if float(sigmas[-1].detach()) <= 0:
        raise ValueError("the bound needs a positive final σ (the model's σ_min), got a table ending in 0")
    if offsets is None:
        offsets = torch.rand(n, strata, x0.shape[0], generator=generator, dtype=torch.float64)
    offsets = offsets.to(device=x0.device, dtype=sigmas.dtype)
    u = 1 / sigmas
    errors, denoised = [], []
    for i in range(n):
        d_i = _path_denoised(denoiser, x0, noise, sigmas[i], extra_args)
        du = u[i + 1] - u[i]
        acc = torch.zeros_like(d_i)
        for j in range(strata):
            u_ij = u[i] + du * (j + offsets[i, j]) / strata  # one sample per stratum and path
            acc = acc + _path_denoised(denoiser, x0, noise, 1 / u_ij, extra_args) - d_i
        errors.append(du * acc / strata)
        denoised.append(d_i)
    return errors, denoised


def bound(denoiser: Callable, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
          weighting: str = "propagated", sigma_data: float = 0.5, strata: int = 1,
          offsets: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
          extra_args: Optional[dict] = None) -> torch.Tensor:
    """The first-order discretization-error bound of a table, averaged over paths x0 + σ·ε.

    ``B(σ) = E Σ_i c_i·rms(L_i)``, with the local errors ``L_i`` of :func:`local_errors` and the
    weights ``c_i`` of :func:`interval_weights`. With `weighting="literal"` (c_i = σ_N) it bounds
    the norm of ``e = σ_N·Σ_i L_i``, the Riemann-sum error of DESIGN.md §2, by the triangle
    inequality — but it is degenerate (every interval except the last is nearly free; DESIGN.md §3,
    lesson 1). `weighting="propagated"` weights each local error by its growth to σ_N.

    Args:
        x0 (`torch.Tensor`): clean samples (data, or the model's own many-step samples).
        noise (`torch.Tensor`): ε, same shape as x0.
        sigmas (`torch.Tensor`): `[σ_0, …, σ_N]` with σ_N > 0 (usually the model's σ_min).
        sigma_data (`float`, *optional*, defaults to 0.5): σ_d of the propagation weights.
        strata (`int`, *optional*, defaults to 1): Monte-Carlo samples per interval.

    Returns:
        `torch.Tensor`: the scalar estimate (RMS over elements, mean over paths).
    """
    errors, _ = local_errors(denoiser, x0, noise, sigmas, strata, offsets, generator, extra_args)
    weights = interval_weights(sigmas, weighting, sigma_data)
    return sum(c * _rms(err) for c, err in zip(weights, errors)).mean()


def _weight_fn(weighting: str, sigma_end: float, sigma_data: float):
    """c(u) of the local error ending at u = 1/σ, as a function of u (for the stationarity condition)."""
    if weighting == "literal":
        return lambda u: torch.full_like(u, sigma_end)
    if weighting == "propagated":
        return lambda u: (1 / u) * ((sigma_data**2 + sigma_end**2) / (sigma_data**2 + u.pow(-2))).sqrt()
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {list(WEIGHTINGS)}")


def _per_path_dot(a, b):
    return (a.double() * b.double()).flatten(1).sum(1)


@torch.no_grad()
def stationarity_targets(denoiser: Callable, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                         weighting: str = "propagated", sigma_data: float = 0.5, fd_step: float = 1e-2,
                         strata: int = 1, offsets: Optional[torch.Tensor] = None,
                         extra_args: Optional[dict] = None) -> torch.Tensor:
    """The step lengths Δ_i = u_{i+1} − u_i at which the bound of :func:`bound` is stationary.

    Along one path τ(u) = D(x0 + ε/u; 1/u); the local errors are L_i = ∫_{u_i}^{u_{i+1}} (τ − τ(u_i)) du,
    so ∂L_{i−1}/∂u_i = τ(u_i) − τ(u_{i−1}) and ∂L_i/∂u_i = −(u_{i+1} − u_i)·τ'(u_i). With
    n_i = ∇ rms(L_i) (the unit direction of L_i, scaled by 1/size) and c_{i−1} = c(u_i),
    ∂B/∂u_i = 0 for B = E Σ_i c_i·rms(L_i) reads (docs/method.md)

        E[c(u_i)·⟨n_{i−1}, τ(u_i) − τ(u_{i−1})⟩ + c'(u_i)·rms(L_{i−1})] = c(u_{i+1})·(u_{i+1} − u_i)·E⟨n_i, τ'(u_i)⟩,

    i.e. for constant c (`literal`) the condition ``τ(u_i) − τ(u_{i−1}) = (u_{i+1} − u_i)·τ'(u_i)``,
    projected on the local-error directions (exact for scalar τ). τ' is a central finite
    difference in log σ with relative step `fd_step`; L_i are the stratified Monte-Carlo estimates
    of :func:`local_errors`. Forward passes only: N·(1 + strata) + 2·(N − 1) denoiser calls.

    Returns:
        `torch.Tensor` of shape `(N − 1,)`: the target Δ_i for the interior points i = 1 … N−1,
        evaluated at the current table (float64).
    """
    sigmas = sigmas.double()
    n = len(sigmas) - 1
    u = 1 / sigmas
    c = _weight_fn(weighting, float(sigmas[-1]), sigma_data)
    errors, tau = local_errors(denoiser, x0, noise, sigmas, strata, offsets, extra_args=extra_args)
    size = errors[0][0].numel()
    directions = [err.double() / (size * _rms(err).double().reshape(-1, *([1] * (err.ndim - 1)))) for err in errors]
    targets = []
    for i in range(1, n):
        s_lo, s_hi = sigmas[i] * (1 - fd_step), sigmas[i] * (1 + fd_step)
        tau_prime = (_path_denoised(denoiser, x0, noise, s_lo, extra_args)
                     - _path_denoised(denoiser, x0, noise, s_hi, extra_args)) / (1 / s_lo - 1 / s_hi)
        h = 1e-6 * u[i]
        c_prime = (c(u[i] + h) - c(u[i] - h)) / (2 * h)
        lhs = c(u[i]) * _per_path_dot(directions[i - 1], tau[i] - tau[i - 1]).mean() \
            + c_prime * _rms(errors[i - 1]).double().mean()
        slope = c(u[i + 1]) * _per_path_dot(directions[i], tau_prime).mean()
        targets.append(lhs / slope)
    return torch.stack(targets) if targets else sigmas.new_zeros(0)


def stationarity_residual(denoiser: Callable, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                          **kwargs) -> torch.Tensor:
    """|Δ_i − Δ_i^target| / Δ_i for the interior points: 0 at an exact stationary table."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    u = 1 / sigmas
    steps = u[2:] - u[1:-1]
    targets = stationarity_targets(denoiser, x0, noise, sigmas, **kwargs)
    return (steps - targets).abs() / steps
