"""Phase 2 (finetune.py): teacher trajectories, step targets, both losses, LoRA teacher/student."""
import copy
import math

import pytest
import torch
from torch import nn

from diffusers_fewstep import solvers
from diffusers_fewstep.adapter import NoiseSchedule, SigmaDenoiser
from diffusers_fewstep.finetune import (add_lora, denoising_loss, endpoint_loss_through_solve, make_teacher, phase2_loss,
                                        step_loss_weights, step_target, teacher_states)
from diffusers_fewstep.schedules import time_uniform_sigmas

CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
          "beta_schedule": "linear", "prediction_type": "epsilon"}


def tiny_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)


class GaussianDenoiser(nn.Module):
    """Exact D for data x0 ~ N(0, s²·I): D(x; σ) = s²/(s²+σ²)·x; its ODE trajectory is x(σ) ∝ √(s²+σ²)."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s
        self.schedule = NoiseSchedule(CONFIG)

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.s**2 / (self.s**2 + sigma**2) * x


def four_step_table(schedule):
    return time_uniform_sigmas(4, schedule, "trailing").float()


def test_teacher_states_follow_the_exact_trajectory_of_gaussian_data():
    teacher = GaussianDenoiser(0.5)
    table = four_step_table(teacher.schedule)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    states = teacher_states(teacher, noise, table, num_steps=200)
    x_t = noise / teacher.schedule.native_scale(table[0])
    exact = torch.stack([x_t * math.sqrt((0.25 + float(s) ** 2) / (0.25 + float(table[0]) ** 2)) for s in table])
    assert states.shape == (5, 3, 1, 4, 4)
    assert torch.allclose(states[0], x_t)
    rel = (states - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert float(rel.max()) < 2e-3


def test_teacher_states_endpoint_is_the_reference_solve():
    teacher = SigmaDenoiser(tiny_unet(), CONFIG).eval()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = time_uniform_sigmas(20, teacher.schedule, "trailing").float()
    states = teacher_states(teacher, noise, four_step_table(teacher.schedule), num_steps=20)
    x_t = noise / teacher.schedule.native_scale(grid[0])
    with torch.no_grad():
        reference = solvers.sample(teacher, x_t, grid, "dpmpp_2m")
    assert torch.allclose(states[-1], reference, atol=1e-5)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "ipndm", "unipc"])
def test_step_target_lands_the_step(solver):
    gen = torch.Generator().manual_seed(2)
    sigmas = torch.tensor([80.0, 9.0, 1.5, 0.3, 0.0])
    x = torch.randn(2, 1, 4, 4, generator=gen) * 80
    state = None
    for i in range(len(sigmas) - 1):
        x_to = torch.randn(2, 1, 4, 4, generator=gen) * float(sigmas[i + 1]) + 0.3
        target = step_target(solver, x, sigmas, i, state, x_to)
        x_next, state = solvers.step(solver, x, target, sigmas, i, state)
        assert torch.allclose(x_next, x_to, atol=1e-4 * (1 + float(sigmas[i + 1]))), (solver, i)
        x = x_next


def test_euler_step_target_is_the_interval_average_on_gaussian_data():
    # along the exact trajectory, the target equals (1/(u'-u))∫D du, here by a fine quadrature
    teacher = GaussianDenoiser(0.5)
    sigma, sigma_next = torch.tensor(2.0), torch.tensor(0.4)
    x = torch.full((1, 1, 2, 2), 3.0)
    along = lambda s: x * math.sqrt((0.25 + s**2) / (0.25 + 4.0))  # noqa: E731
    target = step_target("euler", x, torch.stack([sigma, sigma_next]), 0, None, along(0.4))
    u = torch.linspace(1 / 2.0, 1 / 0.4, 20001, dtype=torch.float64)
    d = torch.stack([teacher(along(float(1 / ui)), 1 / ui).double().mean() for ui in u[::100]])
    average = float(torch.trapezoid(d, u[::100]) / (u[-1] - u[0]))
    assert float(target.mean()) == pytest.approx(average, rel=1e-3)


def test_propagated_step_weights():
    sigmas = torch.tensor([157.4, 17.25, 3.424, 0.953, 0.0], dtype=torch.float64)
    w = step_loss_weights(sigmas, "propagated", sigma_data=0.5)
    # ((1 − σ'/σ)·σ_d/√(σ_d² + σ'²))², and exactly 1 for the final step to 0
    expected = [((1 - b / a) * 0.5 / math.sqrt(0.25 + b * b)) ** 2 for a, b in zip(sigmas[:-2].tolist(), sigmas[1:-1].tolist())]
    assert w[:-1].tolist() == pytest.approx(expected) and float(w[-1]) == 1.0
    assert float(w[0]) < 1e-3 < float(w[1]) < float(w[2]) < 1.0
    assert step_loss_weights(sigmas, "uniform").tolist() == [1.0] * 4


def test_denoising_loss_per_step_bookkeeping():
    zero_student = lambda x, sigma, cond=None: torch.zeros_like(x)  # noqa: E731
    x0 = torch.arange(8, dtype=torch.float32).reshape(8, 1, 1, 1).expand(8, 1, 2, 2)
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    loss, per_step = denoising_loss(zero_student, x0, sigmas, torch.Generator().manual_seed(0), step_weights=[1.0, 0.0])
    # samples 0,2,4,6 go to step 0 (mean x0² = 14), samples 1,3,5,7 to step 1 (mean 21)
    assert per_step.tolist() == pytest.approx([14.0, 21.0])
    assert float(loss) == pytest.approx(14.0 / 2)


def _endpoint_error(student, noise, table, reference):
    x = noise / student.schedule.native_scale(table[0])
    with torch.no_grad():
        return float((solvers.sample(student, x, table, "euler") - reference).pow(2).mean().sqrt())


def test_pseudo_huber_phase2_loss_and_its_step_weights():
    """pseudo_huber: per step √(MSE + c²) − c of the same D errors as l2, weighted by the square roots of the
    propagated weights (the distance grows like the RMS error)."""
    table = torch.tensor([10.0, 2.0, 0.5, 0.0])
    states = torch.randn(4, 6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    student = lambda x, sigma, cond=None: 0.5 * x  # noqa: E731
    _, l2 = phase2_loss(student, states, table, "interval_average", step_weighting="uniform")
    _, ph = phase2_loss(student, states, table, "interval_average", step_weighting="uniform", loss="pseudo_huber")
    targets = [step_target("euler", states[i], table, i, None, states[i + 1]) for i in range(3)]
    mse = [(0.5 * states[i] - targets[i]).pow(2).flatten(1).mean(1) for i in range(3)]
    c = 0.00054
    for i in range(3):
        assert float(l2[f"step_{i}"]) == pytest.approx(float(mse[i].mean()), rel=1e-5)
        assert float(ph[f"step_{i}"]) == pytest.approx(float(((mse[i] + c * c).sqrt() - c).mean()), rel=1e-5)
    total, _ = phase2_loss(student, states, table, "interval_average", loss="pseudo_huber")
    w = step_loss_weights(table).sqrt()
    assert float(total) == pytest.approx(sum(float(w[i] * ph[f"step_{i}"]) for i in range(3)) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="unknown Phase-2 loss 'l1'"):
        phase2_loss(student, states, table, loss="l1")


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_batched_trajectory_loss_is_the_sequential_one(solver):
    """batch_steps=True: the solve without gradients, then the N steps in one call: the same per-step losses and
    the same gradient as the step-by-step loss (a dropout-free model; N − 1 no-grad calls and one batched call)."""
    student = SigmaDenoiser(tiny_unet(), CONFIG)
    table = four_step_table(student.schedule)
    teacher = SigmaDenoiser(make_teacher(tiny_unet(1), use_lora=False), CONFIG)
    states = teacher_states(teacher, torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4)), table, 10)
    results = []
    for batch_steps in (False, True):
        student.zero_grad()
        calls = []
        hook = student.model.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], torch.is_grad_enabled())))
        total, logs = phase2_loss(student, states, table, solver=solver, batch_steps=batch_steps)
        hook.remove()
        total.backward()
        results.append((float(total), {k: float(v) for k, v in logs.items()}, torch.cat([p.grad.flatten() for p in student.parameters()]), calls))
    (seq, seq_logs, seq_grad, seq_calls), (bat, bat_logs, bat_grad, bat_calls) = results
    assert seq_calls == [(6, True)] * 4 and bat_calls == [(6, False)] * 3 + [(24, True)]
    assert bat == pytest.approx(seq, rel=1e-5)
    for i in range(4):
        assert bat_logs[f"step_{i}"] == pytest.approx(seq_logs[f"step_{i}"], rel=1e-4)
    assert float((bat_grad - seq_grad).norm() / seq_grad.norm()) < 1e-4


@pytest.mark.parametrize("target,loss", [("interval_average", "l2"), ("trajectory", "l2"), ("trajectory", "pseudo_huber"),
                                         ("endpoint", "l2")])
def test_phase2_learns_its_target_and_cuts_the_few_step_error(target, loss):
    """25 Adam steps of either target (and either distance) cut its held-out loss and the 4-step endpoint error
    against the teacher's reference."""
    teacher = SigmaDenoiser(make_teacher(tiny_unet(), use_lora=False), CONFIG)
    student = SigmaDenoiser(tiny_unet(), CONFIG)
    table = four_step_table(teacher.schedule)
    gen = torch.Generator().manual_seed(3)
    pool = teacher_states(teacher, torch.randn(128, 1, 8, 8, generator=gen), table, num_steps=10)
    held_noise = torch.randn(32, 1, 8, 8, generator=gen)
    held = teacher_states(teacher, held_noise, table, num_steps=10)

    def held_loss():
        with torch.no_grad():
            return float(phase2_loss(student, held, table, target, loss=loss)[0])

    loss_before, error_before = held_loss(), _endpoint_error(student, held_noise, table, held[-1])
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for step in range(25):
        pick = torch.randint(128, (32,), generator=gen)
        value, logs = phase2_loss(student, pool[:, pick], table, target, denoising_weights=None, loss=loss)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert set(logs) >= {"step_0", "target_loss"} and ("step_3" in logs) == (target != "endpoint")
    assert held_loss() < 0.7 * loss_before
    error_after = _endpoint_error(student, held_noise, table, held[-1])
    assert error_after < 0.8 * error_before, (error_before, error_after)


def test_lora_student_and_adapter_off_teacher():
    base = tiny_unet()
    reference = copy.deepcopy(base)
    model = add_lora(base, rank=4)
    teacher = make_teacher(model, use_lora=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    same = reference(x, t).sample
    assert torch.allclose(model(x, timestep=t).sample, same, atol=1e-6)  # B = 0 at init
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    assert (model(x, timestep=t).sample - same).abs().max() > 1e-3
    assert torch.allclose(teacher(x, timestep=t).sample, same, atol=1e-6)
    assert (model(x, timestep=t).sample - same).abs().max() > 1e-3  # adapter back on afterwards


def test_lora_target_sets_by_name_and_layer_type():
    from diffusers_fewstep.finetune import LORA_ATTENTION_MODULES, lora_target_modules

    unet = tiny_unet()
    assert lora_target_modules(unet) == ["conv1", "conv2", "time_emb_proj", "to_k", "to_out.0", "to_q", "to_v"]
    assert lora_target_modules(unet, layer_types=(nn.Linear,)) == ["time_emb_proj", "to_k", "to_out.0", "to_q", "to_v"]
    assert lora_target_modules(unet, LORA_ATTENTION_MODULES) == ["to_k", "to_out.0", "to_q", "to_v"]
    # a name shared by a Linear and a Conv2d is left out of the Linear-only set (peft would wrap both)
    both = nn.ModuleDict({"a": nn.ModuleDict({"proj": nn.Linear(2, 2)}), "b": nn.ModuleDict({"proj": nn.Conv2d(2, 2, 1)})})
    assert lora_target_modules(both, ["proj"]) == ["proj"]
    with pytest.raises(ValueError, match="no Linear layer of ModuleDict matches the LoRA targets"):
        lora_target_modules(both, ["proj"], layer_types=(nn.Linear,))
    model = add_lora(unet, rank=2, target_modules=lora_target_modules(unet, layer_types=(nn.Linear,)))
    wrapped = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped and not any(n.endswith(("conv1", "conv2")) for n in wrapped)
    assert any(n.endswith("time_emb_proj") for n in wrapped)


def test_endpoint_target_scores_only_where_the_solve_ends_and_reaches_every_step():
    """Target "endpoint": the distance between the student's own few-step solve and the teacher's endpoint, whatever
    the teacher's intermediate states; its gradient reaches the first step's model call through the later ones."""
    student = SigmaDenoiser(tiny_unet(), CONFIG)
    table = four_step_table(student.schedule)
    states = teacher_states(SigmaDenoiser(tiny_unet(1), CONFIG), torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
                            table, 10)
    with torch.no_grad():
        own = solvers.sample(student, states[0], table, "euler")
    own_end = states.clone()
    own_end[-1] = own
    own_end[1:-1] = torch.randn_like(own_end[1:-1]) * 10  # intermediate states nowhere near the student's path
    assert float(phase2_loss(student, own_end, table, "endpoint")[0]) < 1e-10
    assert float(phase2_loss(student, own_end, table, "trajectory")[0]) > 1.0
    expected = float((own - states[-1]).pow(2).mean())
    outputs = []
    hook = student.model.register_forward_hook(lambda m, i, o: outputs.append(o.sample) or o.sample.retain_grad())
    total, per_step = endpoint_loss_through_solve(student, states, table)
    hook.remove()
    assert float(total) == pytest.approx(expected, rel=1e-5) and per_step.shape == (1,)
    total.backward()
    assert len(outputs) == 4 and all(float(o.grad.abs().sum()) > 0 for o in outputs)
