"""Pure, batched, differentiable sampler steps in σ-space (DESIGN.md §2).

One implementation of each solver, shared by `LearnedScheduleScheduler.step` and by the
differentiable schedule optimiser. Every step has the same signature::

    x_next, state = step(solver, x, denoised, sigmas, i, state)

where `x` is the σ-space state at `sigmas[i]`, `denoised` is D(x; σ_i), `sigmas` the whole
table (a tensor, possibly requiring grad; the last entry may be 0) and `state` whatever the
solver carries between steps (`None` before the first step). A run may begin at any index
(image-to-image starts part-way down the table): a multistep solver's order follows the history
held in `state`, not `i`, so it warms up from first order wherever it starts, as diffusers'
multistep schedulers do (`lower_order_nums`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

SOLVERS = ("euler", "dpmpp_2m", "unipc", "ipndm")
SOLVER_ALIASES = {"ddim": "euler", "first_order": "euler", "dpmsolver++": "dpmpp_2m", "dpm++2m": "dpmpp_2m",
                  "unipc_bh2": "unipc"}


def canonical_solver(name: str) -> str:
    name = SOLVER_ALIASES.get(name, name)
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {list(SOLVERS)}")
    return name


def first_order_step(x, sigma, sigma_next, denoised):
    """DDIM ≡ Euler in σ-space: x' = (σ'/σ)·x + (1 − σ'/σ)·D."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


def _is_zero(sigma) -> bool:
    return float(sigma.detach() if torch.is_tensor(sigma) else sigma) == 0.0


def _steps_to_zero(sigmas, i: int) -> bool:
    """Whether the step from σ_i ends at σ = 0. A table is strictly decreasing and only its last entry may be 0, so
    only the last step reads a σ back from the device (a read waits for the device's queued work)."""
    return i + 2 == len(sigmas) and _is_zero(sigmas[-1])


def dpmpp_2m_step(x, denoised, sigmas, i, state):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), data prediction, λ = −log σ.
    First order at the first step of a run and at a final step to σ = 0 (diffusers' `lower_order_final`)."""
    history = (state or {}).get("denoised", []) + [denoised]
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if len(history) < 2 or _steps_to_zero(sigmas, i):
        d = denoised
    else:
        h = sigma.log() - sigma_next.log()
        h_prev = sigmas[i - 1].log() - sigma.log()
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * history[-2]
    return first_order_step(x, sigma, sigma_next, d), {"denoised": history[-2:]}


def _unipc_bh2_update(x, m0, m1, m_new, sigmas, i, order, corrector):
    """One UniP (predictor) or UniC (corrector) update from σ_i to σ_{i+1}, order ≤ 2, B(h) = e^h − 1.

    m0 = D at σ_i, m1 = D at σ_{i−1} (order 2), m_new = D at σ_{i+1} (corrector only).
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x_first = first_order_step(x, sigma, sigma_next, m0)
    if _steps_to_zero(sigmas, i) or (order == 1 and not corrector):
        return x_first
    hh = sigma_next.log() - sigma.log()  # −h, with h = λ_{i+1} − λ_i > 0
    b_h = torch.expm1(hh)  # bh2
    if order == 2:
        r1 = (sigma.log() - sigmas[i - 1].log()) / -hh  # (λ_{i−1} − λ_i)/h, negative
        d1 = (m1 - m0) / r1
    if not corrector:  # UniP-2: ρ = 1/2
        return x_first - b_h * 0.5 * d1
    d1_new = m_new - m0
    if order == 1:
        return x_first - b_h * 0.5 * d1_new
    # UniC-2: solve [[1, 1], [r1, 1]]·ρ = b
    h_phi_1 = torch.expm1(hh)
    h_phi_k1 = h_phi_1 / hh - 1
    h_phi_k2 = h_phi_k1 / hh - 0.5
    b1, b2 = h_phi_k1 / b_h, 2 * h_phi_k2 / b_h
    rho0 = (b1 - b2) / (1 - r1)
    rho1 = (b2 - r1 * b1) / (1 - r1)
    return x_first - b_h * (rho0 * d1 + rho1 * d1_new)


def unipc_step(x, denoised, sigmas, i, state):
    """UniPC-bh2, order 2 (Zhao et al. 2023, arXiv 2302.04867), data prediction.
    1. UniC corrects x_i with the fresh D_i (no extra model call); 2. UniP predicts x_{i+1}.
    Order 1 at the first step of a run and at the last step, as diffusers' `UniPCMultistepScheduler`."""
    state = state or {}
    history = state.get("denoised", [])
    # 1. corrector: redo the step σ_{i−1} → σ_i from the previous (corrected) state
    if history:
        m1 = history[-2] if state["order"] == 2 else None
        x = _unipc_bh2_update(state["x_base"], history[-1], m1, denoised, sigmas, i - 1, state["order"], True)
    # 2. predictor
    n_steps = len(sigmas) - 1
    order = min(2, n_steps - i, len(history) + 1)
    m1 = history[-1] if order == 2 else None
    x_next = _unipc_bh2_update(x, denoised, m1, None, sigmas, i, order, False)
    return x_next, {"denoised": (history + [denoised])[-2:], "x_base": x, "order": order}


IPNDM_COEFFS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_step(x, denoised, sigmas, i, state):
    """Improved PNDM (Zhang & Chen 2023, DEIS, arXiv 2204.13902): Adams–Bashforth on dx/dσ = (x − D)/σ
    with orders 1–4 warming up over the first steps."""
    d = (x - denoised) / sigmas[i]
    derivs = ((state or {}).get("derivs", []) + [d])[-4:]
    coeffs = IPNDM_COEFFS[len(derivs) - 1]
    slope = sum(c * dk for c, dk in zip(coeffs, reversed(derivs)))
    return x + (sigmas[i + 1] - sigmas[i]) * slope, {"derivs": derivs}


_STEPS = {"dpmpp_2m": dpmpp_2m_step, "unipc": unipc_step, "ipndm": ipndm_step}


def step(solver: str, x, denoised, sigmas, i: int, state=None):
    """Advance x from sigmas[i] to sigmas[i+1] with the named solver; returns (x_next, state)."""
    solver = canonical_solver(solver)
    if solver == "euler":
        return first_order_step(x, sigmas[i], sigmas[i + 1], denoised), None
    return _STEPS[solver](x, denoised, sigmas, i, state)


def sample(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, solver: str = "euler",
           extra_args: Optional[dict] = None, callback: Optional[Callable] = None, disable: Optional[bool] = True):
    """Solve the probability-flow ODE from sigmas[0] to sigmas[-1] with one model call per step.

    Args:
        denoiser: `D(x, sigma, **extra_args)` in σ-space (e.g. :class:`SigmaDenoiser`).
        x: σ-space initial state, i.e. `noise * sigmas[0]`.
        sigmas: decreasing σ table; `len(sigmas) − 1` model evaluations.
        solver: one of `SOLVERS`.
        callback: called as `callback({"x", "i", "sigma", "denoised"})` after every step.
    """
    extra_args = extra_args or {}
    state = None
    for i in tqdm(range(len(sigmas) - 1), disable=disable, desc=f"{solver} sampling"):
        denoised = denoiser(x, sigmas[i], **extra_args)
        x, state = step(solver, x, denoised, sigmas, i, state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x
