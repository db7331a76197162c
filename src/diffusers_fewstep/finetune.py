"""Phase 2: tune the model on the learned steps (DESIGN.md §4).

With the σ table fixed, the first-order step from σ_i lands exactly on the teacher's trajectory
when D(x_i; σ_i) equals the interval average of the frozen teacher's D over [u_i, u_{i+1}]
(u = 1/σ). Since dy/du = D along the trajectory (y = x/σ, DESIGN.md §2), that average is
exactly (y(u_{i+1}) − y(u_i)) / (u_{i+1} − u_i): it follows from the teacher's trajectory
states at the scheduled σ's, which :func:`teacher_states` computes with a fine reference solve
(a quadrature with `num_steps` teacher calls; the Monte Carlo is over the initial noises).

Three targets, all at the scheduled σ_i only:

- ``"interval_average"`` (the paper's): the model sees the teacher's own trajectory states
  x(σ_i) and learns the interval average there, optionally mixed with the ordinary denoising
  loss ``λ_i·‖D(x0 + σ_i·ε; σ_i) − x0‖²`` (:func:`denoising_loss`).
- ``"trajectory"``: the model sees the states its own few-step solver visits, x̂_i, and learns
  the D that makes each step from x̂_i land on the teacher's x(σ_{i+1}) — the solver's states
  and their error propagation matter (DESIGN.md §3, lesson 3).
- ``"endpoint"``: the student's whole few-step solve, back-propagated through every step, should end on the
  teacher's endpoint; the intermediate states are free (each step learns what helps the image, not where the
  teacher's trajectory passes), at the memory of N calls with gradients (:func:`endpoint_loss_through_solve`).

Both targets come from one function, :func:`step_target`: every solver step is affine in the
fresh D, so the D that lands the step on a given point is found from two evaluations of the
shared step of :mod:`diffusers_fewstep.solvers`.

LoRA adapters (peft) and the frozen teacher (a copy, or the same model with the adapter
disabled) are built by :func:`add_lora` and :func:`make_teacher`; :func:`adapter_only_checkpoints` keeps a
LoRA run's checkpoints to the adapter. A guided student (text-to-image) takes `uncond` next to `cond` in
every loss.
"""
from __future__ import annotations

import copy
import contextlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import solvers
from .adapter import _bcast
from .objectives import endpoint_loss
from .reference import trajectory

PHASE2_TARGETS = ("interval_average", "trajectory", "endpoint")
# --phase2_target auto: the endpoint target up to this many steps, the trajectory target above (docs/results.md: at
# 4 steps trajectory was as good or better on all three families; at 2 steps endpoint won by 3.6× on the fixture and
# lost by 5–7% on the v-prediction and flow models)
ENDPOINT_TARGET_MAX_STEPS = 2
PHASE2_LOSSES = ("l2", "pseudo_huber")
# layers of diffusers UNets that get LoRA adapters: attention projections, resnet convolutions,
# time-embedding projections (peft matches these as suffixes of module names)
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj", "proj_in", "proj_out")
LORA_ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections only
# text-to-image models (SD, SDXL, SD3, Flux): the attention projections, as diffusers' train_text_to_image_lora.py
TEXT_TO_IMAGE_LORA_MODULES = LORA_ATTENTION_MODULES


def auto_target(nfe: int, reference_scheduler: str = "ode") -> str:
    """The Phase-2 target `--phase2_target auto` trains `nfe` steps with: `endpoint` when the teacher gives
    endpoints only (`reference_scheduler="pipeline"`) or at most :data:`ENDPOINT_TARGET_MAX_STEPS` steps, where
    the student must choose its own intermediate states; else `trajectory`, the teacher's state at every σ."""
    if reference_scheduler == "pipeline" or nfe <= ENDPOINT_TARGET_MAX_STEPS:
        return "endpoint"
    return "trajectory"


# --- teacher trajectories ------------------------------------------------------------------
def teacher_states(teacher: Callable, noise: torch.Tensor, sigmas: torch.Tensor, num_steps: int = 200,
                   cond: Optional[dict] = None, uncond: Optional[dict] = None) -> torch.Tensor:
    """The frozen teacher's trajectory at every scheduled σ, `(N + 1, B, …)` in σ-space: the one reference
    solve (:func:`diffusers_fewstep.reference.trajectory`, `num_steps` time-uniform steps merged with the table).
    `uncond` (the negative-prompt kwargs) makes a guided teacher's trajectory guided."""
    return trajectory(teacher, noise, sigmas, num_steps, extra_args=_kwargs(cond, uncond) or None)


def _kwargs(cond: Optional[dict], uncond: Optional[dict]) -> dict:
    """The denoiser's conditioning keyword arguments (`uncond` only when given: guidance)."""
    return {k: v for k, v in (("cond", cond), ("uncond", uncond)) if v is not None}


def _repeat_rows(kwargs: Optional[dict], n: int) -> Optional[dict]:
    """Every tensor of `kwargs` repeated `n` times along its batch rows (the N steps of one batch)."""
    if kwargs is None:
        return None
    return {k: v.repeat(n, *([1] * (v.ndim - 1))) if torch.is_tensor(v) and v.ndim else v for k, v in kwargs.items()}


# --- targets and losses ---------------------------------------------------------------------
def step_target(solver: str, x: torch.Tensor, sigmas: torch.Tensor, i: int, state, x_to: torch.Tensor) -> torch.Tensor:
    """The D that makes `solver`'s step from (x, σ_i) land exactly on `x_to` at σ_{i+1}.

    Every supported step is affine in the fresh D: x_{i+1} = a + c·D, so D = (x_to − a)/c with
    a = step(D=0) and c = step(D=1) − a. For the first-order solver this is the interval
    average of D over [u_i, u_{i+1}] along any path from x to x_to (DESIGN.md §2).
    """
    zero = torch.zeros_like(x)
    a, _ = solvers.step(solver, x, zero, sigmas, i, state)
    c, _ = solvers.step(solver, x, zero + 1, sigmas, i, state)
    return (x_to - a) / (c - a)


def step_loss_weights(sigmas: torch.Tensor, weighting: str = "propagated", sigma_data: float = 0.5) -> torch.Tensor:
    """Weights of the N per-step D losses.

    `propagated`: ((1 − σ_{i+1}/σ_i)·p_i)², the squared factor by which an error in D_i moves x_{i+1}
    and then reaches the last σ (p_i = √((σ_d² + σ_N²)/(σ_d² + σ_{i+1}²)), DESIGN.md §3 lesson 2;
    1 for a final step to 0). Without it the D loss at σ_max (≈ 157² times the ε-space loss on the
    fixture) dominates every gradient. `uniform`: all ones.
    """
    from .objectives import propagation_factors

    n = len(sigmas) - 1
    if weighting == "uniform":
        return torch.ones(n, dtype=sigmas.dtype, device=sigmas.device)
    if weighting != "propagated":
        raise ValueError(f"unknown step weighting {weighting!r}; choose 'propagated' or 'uniform'")
    return ((1 - sigmas[1:] / sigmas[:-1]) * propagation_factors(sigmas, sigma_data)) ** 2


def _per_step_weights(weights, n: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return like.new_ones(n)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() == 1:
        return w.expand(n)
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} per-step weights for a table with {n} steps; give 1 or {n}")
    return w


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def _distance(a: torch.Tensor, b: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample distance of the Phase-2 target losses: `l2` or `pseudo_huber` (:func:`objectives.endpoint_loss`)."""
    if loss not in PHASE2_LOSSES:
        raise ValueError(f"unknown Phase-2 loss {loss!r}; choose one of {list(PHASE2_LOSSES)}")
    return endpoint_loss(a.float(), b.float(), loss)


def _batched_loss(student: Callable, xs: torch.Tensor, targets: torch.Tensor, sigmas: torch.Tensor,
                  cond: Optional[dict], uncond: Optional[dict], step_weights, loss: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The N per-step losses ‖D_θ(x_i; σ_i) − target_i‖ with all N steps through the student in one batch
    (`xs`, `targets`: `(N, B, …)`). Returns (weighted loss, per-step losses)."""
    n, batch = xs.shape[:2]
    sigma = sigmas[:n].repeat_interleave(batch)
    denoised = student(xs.flatten(0, 1), sigma, **_kwargs(_repeat_rows(cond, n), _repeat_rows(uncond, n)))
    per_step = _distance(denoised, targets.flatten(0, 1), loss).view(n, batch).mean(1)
    return (_per_step_weights(step_weights, n, per_step) * per_step).sum() / n, per_step.detach()


def interval_average_loss(student: Callable, states: torch.Tensor, sigmas: torch.Tensor,
                          cond: Optional[dict] = None, step_weights=None,
                          uncond: Optional[dict] = None, loss: str = "l2") -> Tuple[torch.Tensor, torch.Tensor]:
    """Target (a): at the teacher's states x(σ_i), D_θ should equal the teacher's interval average.

    All N steps go through the student in one batch. Returns (loss, per-step losses).
    """
    n = len(sigmas) - 1
    targets = torch.stack([step_target("euler", states[i], sigmas, i, None, states[i + 1]) for i in range(n)])
    return _batched_loss(student, states[:n], targets, sigmas, cond, uncond, step_weights, loss)


def trajectory_loss(student: Callable, states: torch.Tensor, sigmas: torch.Tensor, solver: str = "euler",
                    cond: Optional[dict] = None, step_weights=None,
                    uncond: Optional[dict] = None, loss: str = "l2",
                    batch_steps: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Target (b): along the student's own few-step solve x̂_0 → … → x̂_N, D_θ(x̂_i; σ_i) should
    make the step land on the teacher's x(σ_{i+1}). The solve itself is not back-propagated
    through (each step's D is detached before advancing). Returns (loss, per-step losses).

    `batch_steps=True` computes the same loss in two passes: the solve without gradients (N − 1 student
    calls), then all N steps through the student in one batch with gradients. Where a step is bound by the
    per-call overhead (kernel launches of a small model), one big call costs about what one small one does.
    """
    kwargs = _kwargs(cond, uncond)
    if batch_steps:
        with torch.no_grad():
            xs, targets, _ = zip(*_student_solve(student, states, sigmas, solver, kwargs, last=False))
        return _batched_loss(student, torch.stack(xs), torch.stack(targets), sigmas, cond, uncond, step_weights, loss)
    n = len(sigmas) - 1
    per_step = torch.stack([_distance(denoised, target, loss).mean()
                            for _, target, denoised in _student_solve(student, states, sigmas, solver, kwargs)])
    return (_per_step_weights(step_weights, n, per_step) * per_step).sum() / n, per_step.detach()


def endpoint_loss_through_solve(student: Callable, states: torch.Tensor, sigmas: torch.Tensor, solver: str = "euler",
                                cond: Optional[dict] = None, uncond: Optional[dict] = None,
                                loss: str = "l2") -> Tuple[torch.Tensor, torch.Tensor]:
    """Target (c): the student's few-step solve from the teacher's x(σ_0), with gradients through every step, should
    end on the teacher's x(σ_N); where it passes in between is free. Returns (loss, the loss as a 1-entry tensor)."""
    x = solvers.sample(student, states[0], sigmas, solver, extra_args=_kwargs(cond, uncond))
    total = _distance(x, states[-1], loss).mean()
    return total, total.detach().reshape(1)


def _student_solve(student: Callable, states: torch.Tensor, sigmas: torch.Tensor, solver: str, kwargs: dict,
                   last: bool = True):
    """The student's own few-step solve from the teacher's x(σ_0): yields, per step i, (x̂_i, the D that lands the
    step on the teacher's x(σ_{i+1}), the student's D_θ(x̂_i; σ_i)). Each step advances with D_θ detached;
    `last=False` leaves out the last step's model call (its D moves nothing: None)."""
    n = len(sigmas) - 1
    x, state = states[0], None
    for i in range(n):
        target = step_target(solver, x, sigmas, i, state, states[i + 1])
        denoised = student(x, sigmas[i], **kwargs) if last or i < n - 1 else None
        yield x, target, denoised
        if i < n - 1:
            x, state = solvers.step(solver, x, denoised.detach().to(x.dtype), sigmas, i, state)


def denoising_loss(student: Callable, x0: torch.Tensor, sigmas: torch.Tensor, generator: Optional[torch.Generator] = None,
                   cond: Optional[dict] = None, step_weights=None,
                   uncond: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ordinary denoising loss at the scheduled σ_i only: λ_i·‖D_θ(x0 + σ_i·ε; σ_i) − x0‖².

    Each sample gets one scheduled σ_i (i cycling over the batch) and fresh noise from `generator`.
    Returns (loss, per-step losses).
    """
    n = len(sigmas) - 1
    positive = sigmas[:n]
    i = torch.arange(x0.shape[0], device=x0.device) % n
    eps = torch.randn(x0.shape, generator=generator, device="cpu" if generator is None else generator.device)
    eps = eps.to(device=x0.device, dtype=x0.dtype)
    sigma = positive[i]
    per_sample = _mse(student(x0 + _bcast(sigma, x0) * eps, sigma, **_kwargs(cond, uncond)), x0)
    per_step = torch.zeros(n, device=x0.device).index_add(0, i, per_sample) / torch.bincount(i, minlength=n).clamp(min=1)
    return (_per_step_weights(step_weights, n, per_step) * per_step).sum() / n, per_step.detach()


def phase2_loss(student: Callable, states: torch.Tensor, sigmas: torch.Tensor, target: str = "trajectory",
                solver: str = "euler", x0: Optional[torch.Tensor] = None, denoising_weights=None,
                step_weights=None, step_weighting: str = "propagated", generator: Optional[torch.Generator] = None,
                cond: Optional[dict] = None, uncond: Optional[dict] = None,
                loss: str = "l2", batch_steps: bool = False) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The Phase-2 loss for one batch of teacher trajectories.

    Args:
        student: the model being tuned, as a σ-space denoiser `D(x, sigma, cond=...)`.
        states (`torch.Tensor`): `(N + 1, B, …)` teacher states at the scheduled σ's (:func:`teacher_states`).
        sigmas (`torch.Tensor`): the table `[σ_0, …, σ_N]`.
        target (`str`, *optional*, defaults to `"trajectory"`): `"interval_average"`, `"trajectory"` or `"endpoint"`.
        solver (`str`, *optional*, defaults to `"euler"`): the few-step solver (targets `"trajectory"`, `"endpoint"`).
        x0 (`torch.Tensor`, *optional*): clean samples for the denoising loss (data, or the teacher's
            samples `states[-1]`); needed when `denoising_weights` is given.
        denoising_weights (`float` or `list[float]`, *optional*): λ_i of the denoising loss, one
            value or one per step; `None` or 0 turns it off.
        step_weights (`list[float]`, *optional*): weights of the N per-step target losses; default
            from `step_weighting` (squared propagation factors; their square roots under `pseudo_huber`, whose
            distance grows like the RMS error, not its square). Target `"endpoint"` has one term and no weights.
        step_weighting (`str`, *optional*, defaults to `"propagated"`): see :func:`step_loss_weights`.
        generator (`torch.Generator`, *optional*): noise for the denoising loss.
        cond (`dict`, *optional*): conditioning kwargs for the model.
        uncond (`dict`, *optional*): the unconditional kwargs of a guided student (text-to-image: the negative
            prompts); every student call, the denoising loss's included, is then guided as the teacher is.
        loss (`str`, *optional*, defaults to `"l2"`): per-sample distance of the target losses, `"l2"` (mean
            squared error) or `"pseudo_huber"` (√(MSE + c²) − c, arXiv 2310.14189).
        batch_steps (`bool`, *optional*, defaults to `False`): target `"trajectory"`: the solve without
            gradients first, then all N steps through the student in one batch (:func:`trajectory_loss`).

    Returns:
        (loss, logs) with per-step losses `step_i` (target `"endpoint"`: `step_0`, the endpoint loss) and the
        denoising term as detached 0-dim tensors: reading one
        (`float`) waits for the device, so read them after the backward pass.
    """
    if step_weights is None:
        step_weights = step_loss_weights(sigmas, step_weighting) ** (0.5 if loss == "pseudo_huber" else 1.0)
    if target == "interval_average":
        total, per_step = interval_average_loss(student, states, sigmas, cond, step_weights, uncond, loss)
    elif target == "trajectory":
        total, per_step = trajectory_loss(student, states, sigmas, solver, cond, step_weights, uncond, loss,
                                          batch_steps)
    elif target == "endpoint":
        total, per_step = endpoint_loss_through_solve(student, states, sigmas, solver, cond, uncond, loss)
    else:
        raise ValueError(f"unknown Phase-2 target {target!r}; choose one of {list(PHASE2_TARGETS)}")
    logs = {f"step_{i}": v for i, v in enumerate(per_step)}
    if denoising_weights is not None and torch.as_tensor(denoising_weights).abs().sum() > 0:
        if x0 is None:
            raise ValueError("denoising_weights needs x0 (data, or the teacher's samples)")
        dn, _ = denoising_loss(student, x0, sigmas, generator, cond, denoising_weights, uncond)
        total = total + dn
        logs["denoising"] = dn.detach()
    logs["target_loss"] = per_step.mean()
    return total, logs


# --- LoRA and the frozen teacher -------------------------------------------------------------
def lora_target_modules(model: nn.Module, candidates: Sequence[str] = LORA_TARGET_MODULES,
                        layer_types: Tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list:
    """The names in `candidates` that match a `layer_types` module of `model` and no other Linear/Conv2d
    module (peft matches names as suffixes); `layer_types=(nn.Linear,)` leaves the convolutions out."""
    found, other = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hits = {c for c in candidates if name == c or name.endswith("." + c)}
            (found if isinstance(module, layer_types) else other).update(hits)
    found -= other
    if not found:
        raise ValueError(f"no {'/'.join(t.__name__ for t in layer_types)} layer of {type(model).__name__} matches "
                         f"the LoRA targets {list(candidates)}; pass other target_modules (train: --lora_layers)")
    return sorted(found)


def add_lora(model: nn.Module, rank: int = 16, alpha: Optional[float] = None, dropout: float = 0.0,
             target_modules: Optional[Sequence[str]] = None, in_place: bool = False):
    """A LoRA adapter (peft) on `model`'s attention, convolution and time-embedding layers (or `target_modules`);
    only the adapter is trainable.

    By default `model` is wrapped in a peft `PeftModel` (save with `save_pretrained(dir)`, load with
    `peft.PeftModel.from_pretrained(base_model, dir)`). `in_place=True` adds the adapter with the diffusers model's
    own `add_adapter`, as diffusers' LoRA training scripts do: the model keeps its class, and
    `peft.utils.get_peft_model_state_dict(model)` is what `<Pipeline>.save_lora_weights` writes and
    `pipe.load_lora_weights` reads. Returns the model with the adapter.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=list(target_modules or lora_target_modules(model)))
    if not in_place:
        return get_peft_model(model, config)
    if not hasattr(model, "add_adapter"):
        raise ValueError(f"{type(model).__name__} has no add_adapter (diffusers' PeftAdapterMixin); pass in_place=False")
    model.add_adapter(config)
    return model


class AdapterDisabled(nn.Module):
    """The base model under a LoRA adapter: calls run with the adapter switched off (the LoRA teacher). Works
    for a peft `PeftModel` and for a diffusers model with an adapter added by `add_adapter`."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, *args, **kwargs):
        if hasattr(self.peft_model, "disable_adapter"):  # PeftModel: a context manager
            with self.peft_model.disable_adapter():
                return self.peft_model(*args, **kwargs)
        self.peft_model.disable_adapters()  # diffusers' PeftAdapterMixin
        try:
            return self.peft_model(*args, **kwargs)
        finally:
            self.peft_model.enable_adapters()


def make_teacher(model: nn.Module, use_lora: bool) -> nn.Module:
    """The frozen teacher: the base model under the adapter (LoRA), else a frozen copy of `model`."""
    if use_lora:
        return AdapterDisabled(model)
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


@contextlib.contextmanager
def ema_weights(ema, parameters):
    """Temporarily load the EMA weights into `parameters` (diffusers `EMAModel`; no-op when `ema` is None)."""
    if ema is None:
        yield
        return
    parameters = list(parameters)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def adapter_only_checkpoints(accelerator, model: nn.Module) -> None:
    """Checkpoints of a LoRA run hold the adapter only, as diffusers' LoRA scripts save them: `save_state` writes the
    trainable weights of `model` (megabytes, where the frozen base model of SDXL is gigabytes) and `load_state`
    loads them back, refusing a checkpoint whose weights do not fit the adapter."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    strip = lambda key: key[len("module."):] if key.startswith("module.") else key  # noqa: E731  (DDP's prefix)

    def save(models, weights, output_dir):
        for state_dict in weights:
            for key in [k for k in state_dict if strip(k) not in trainable]:
                del state_dict[key]

    def load(models, input_dir):
        import os

        from safetensors.torch import load_file

        models.pop(0)  # the tuned model, the only one the accelerator holds: loaded here, not by accelerate
        saved = {strip(k): v for k, v in load_file(os.path.join(input_dir, "model.safetensors")).items()}
        try:
            _, unexpected = model.load_state_dict(saved, strict=False)
        except RuntimeError:  # a weight of another shape
            unexpected = ["(shapes differ)"]
        if unexpected or trainable - set(saved):
            raise ValueError(f"{input_dir} does not hold this model's LoRA adapter ({len(trainable - set(saved))} of "
                             f"its weights missing, {len(unexpected)} others); resume with the run's --lora_rank and model")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
