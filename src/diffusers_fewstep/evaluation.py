"""Evaluation: fixed noise bank, few-step generation, 200-step reference, endpoint error,
Fréchet distance on a pluggable feature network, and cost accounting.

The protocol is BENCHMARK.md's: every sampler starts from the same native noise ε (drawn on the
device with `torch.Generator(device).manual_seed(1234)`), the UNet runs under bf16 autocast on CUDA
for every row alike, samples are clamped to [-1, 1] before any metric, and

- **endpoint error** is the per-sample RMSE against a 200-step DPM-Solver++(2M) solution of the same
  ODE from the same noise (time-uniform "trailing" spacing), averaged over samples;
- **FD** is the Fréchet distance between feature statistics of the samples and of a reference image
  set, with the features of any network exposing `features(x)`: the FD-FMNIST classifier for the
  fixture, Inception-v3 (standard FID) when its weights are available locally.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import read_idx_images
from .reference import REFERENCE_SOLVER, REFERENCE_STEPS, autocast_context, reference_sigmas, solve, start_state  # noqa: F401
from .solvers import sample

NOISE_SEED = 1234


# --- noise and generation ---------------------------------------------------------------------
def sample_shape(denoiser) -> Tuple[int, ...]:
    """One sample's shape `(C, H, W)`: the denoiser's `sample_shape` where it states one (text-to-image latents, test
    models), else the `in_channels` and `sample_size` of its diffusers model's config (`denoiser` may be that model)."""
    shape = getattr(denoiser, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    config = getattr(getattr(denoiser, "model", denoiser), "config", None)
    if config is not None and "sample_size" in config and "in_channels" in config:
        size = config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config["in_channels"], *size)
    raise ValueError("cannot infer the sample shape from the denoiser; pass sample_shape=(C, H, W)")


def noise_bank(n: int, shape: Sequence[int] = (1, 32, 32), seed: int = NOISE_SEED, device="cpu") -> torch.Tensor:
    """Native initial noise ε ~ N(0, I) of shape (n, *shape), drawn on `device` from a seeded generator
    (so a CUDA bank equals BENCHMARK.md's peer noise bit for bit)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, *shape, device=device, generator=generator)


@torch.no_grad()
def generate(denoiser, noise: torch.Tensor, sigmas, solver: str = "euler", batch_size: int = 2500,
             extra_args: Optional[dict] = None, clamp: bool = True) -> torch.Tensor:
    """Samples in the model's native space, clamped to [-1, 1] (images; `clamp=False` for latents), from native
    noise and a σ table.

    Args:
        denoiser (`SigmaDenoiser`): the model in σ-space (`.schedule` is its `NoiseSchedule`).
        noise (`torch.Tensor`): native initial noise, e.g. from :func:`noise_bank`.
        sigmas (`Sequence[float]` or `torch.Tensor`): the table `[σ_0 … σ_N]` (N model evaluations).
        solver (`str`, *optional*, defaults to `"euler"`): one of `solvers.SOLVERS`.
        batch_size (`int`, *optional*, defaults to 2500): samples per model call.
        clamp (`bool`, *optional*, defaults to `True`): clamp to [-1, 1] (images); `False` for latents.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=noise.device)
    schedule = denoiser.schedule
    out = []
    for start in range(0, len(noise), batch_size):
        # 1. σ-space start: x = ε / a(σ_0)
        x = start_state(noise[start:start + batch_size], schedule, sigmas[0])
        # 2. solve; only the model call is autocast (solver arithmetic stays float32)
        with autocast_context(noise.device):
            x = sample(denoiser, x, sigmas, solver, extra_args=extra_args)
        # 3. back to native scale (a(0) = 1 for tables ending in 0)
        x = x.float() * schedule.native_scale(sigmas[-1])
        out.append(x.clamp(-1, 1) if clamp else x)
    return torch.cat(out)


def reference_samples(denoiser, noise: torch.Tensor, steps: int = REFERENCE_STEPS, batch_size: int = 2500):
    """The many-step reference samples from `noise` (:func:`diffusers_fewstep.reference.solve`), clamped to [-1, 1]."""
    return torch.cat([solve(denoiser, noise[k:k + batch_size], steps).clamp(-1, 1)
                      for k in range(0, len(noise), batch_size)])


# --- metrics --------------------------------------------------------------------------------------
def endpoint_errors(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE between few-step samples and the reference solutions from the same noise."""
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (samples.float() - reference.float()).pow(2).flatten(1).mean(1).sqrt()


def endpoint_rmse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Endpoint error: the mean over samples of the per-sample RMSE against the reference."""
    return float(endpoint_errors(samples, reference).mean())


@torch.no_grad()
def extract_features(net, images: torch.Tensor, batch_size: int = 2500) -> np.ndarray:
    """`net.features` of `images` in batches, as a float64 array (n, d)."""
    feats = [net.features(images[j:j + batch_size]).float() for j in range(0, len(images), batch_size)]
    return torch.cat(feats).double().cpu().numpy()


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature array."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(stats_a, stats_b) -> float:
    """Fréchet distance between Gaussians N(μ_a, Σ_a) and N(μ_b, Σ_b):
    ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Heusel et al. 2017, arXiv 1706.08500).

    Each argument is a `(mean, cov)` pair from :func:`feature_statistics` or a raw feature array.
    """
    from scipy import linalg

    mu_a, cov_a = stats_a if isinstance(stats_a, tuple) else feature_statistics(stats_a)
    mu_b, cov_b = stats_b if isinstance(stats_b, tuple) else feature_statistics(stats_b)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean.real))


# --- feature networks and reference images -----------------------------------------------------
def load_fmnist_classifier(folder: str, device="cpu"):
    """The FD-FMNIST feature network: `load_classifier` from `arch.py` in `folder` (eval mode)."""
    arch = os.path.join(folder, "arch.py")
    if not os.path.isfile(arch):
        raise FileNotFoundError(f"no arch.py in {folder!r}; pass the fmnist-classifier fixture folder "
                                "(../shared/fixtures/fmnist-classifier, or .stage/fmnist-classifier on the GPU)")
    spec = importlib.util.spec_from_file_location("fmnist_classifier_arch", arch)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_classifier(folder).to(device).eval()


def fmnist_images(folder: str, split: str = "test") -> torch.Tensor:
    """Fashion-MNIST IDX images as float (n, 1, 32, 32) in [-1, 1], padded with −1 (the fixture's space)."""
    prefix = "t10k" if split == "test" else "train"
    path = os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; install dataset-fashion-mnist (Debian) or pass --data")
    x = torch.from_numpy(read_idx_images(path).copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


FD_STATISTICS = "fd_statistics.npz"  # beside the test images, or instead of them on a machine that receives only it


def network_fingerprint(net) -> float:
    """A number that changes with the feature network's weights (which network reference statistics belong to)."""
    return float(sum(p.detach().double().sum() for p in net.parameters()))


def save_reference_statistics(net, folder: str, device="cpu") -> str:
    """Write `folder/fd_statistics.npz`: the feature network's mean and covariance of the test images in `folder`,
    with the network's fingerprint (about 0.5 MB against 4.4 MB of images for FD-FMNIST)."""
    mu, cov = feature_statistics(extract_features(net, fmnist_images(folder).to(device)))
    path = os.path.join(folder, FD_STATISTICS)
    np.savez_compressed(path, mu=mu, cov=cov, fingerprint=network_fingerprint(net))
    return path


def reference_statistics(net, folder: str, device="cpu", batch_size: int = 2500) -> Tuple[np.ndarray, np.ndarray]:
    """FD's reference statistics for `net`: `folder/fd_statistics.npz` where it was written for this network,
    else computed from the test images in `folder`."""
    path = os.path.join(folder, FD_STATISTICS)
    if os.path.isfile(path):
        saved = np.load(path)
        if np.isclose(float(saved["fingerprint"]), network_fingerprint(net), rtol=1e-9, atol=1e-9):
            return saved["mu"], saved["cov"]
        if not os.path.isfile(os.path.join(folder, "t10k-images-idx3-ubyte.gz")):
            raise ValueError(f"{path} was written for another feature network, and {folder} has no test images")
    return feature_statistics(extract_features(net, fmnist_images(folder).to(device), batch_size))


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception-v3


def inception_weights_path() -> Optional[str]:
    """Local path of the FID Inception-v3 weights (torch hub cache or $FID_INCEPTION_WEIGHTS), or None."""
    candidates = [os.environ.get("FID_INCEPTION_WEIGHTS", "")]
    with contextlib.suppress(Exception):
        candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS))
    return next((p for p in candidates if p and os.path.isfile(p)), None)


class InceptionFeatures(torch.nn.Module):
    """Standard FID features (2048-d pool3 of the TF-ported Inception-v3) through torchmetrics.

    Images in [-1, 1] with 1 or 3 channels are mapped to uint8 RGB; the network resizes to 299.
    Build it with :func:`inception_feature_extractor`, which checks that the weights exist locally.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).reshape(len(x), -1)


def inception_feature_extractor(device="cpu", log: Callable[[str], None] = print):
    """Standard FID's feature network when torchmetrics and the Inception weights are available locally;
    otherwise logs why FID is skipped and returns None (nothing is downloaded)."""
    if importlib.util.find_spec("torchmetrics") is None or importlib.util.find_spec("torch_fidelity") is None:
        log("Inception FID skipped: torchmetrics with torch-fidelity is not installed "
            "(pip install torchmetrics[image])")
        return None
    path = inception_weights_path()
    if path is None:
        log(f"Inception FID skipped: {INCEPTION_WEIGHTS} not found in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints) or $FID_INCEPTION_WEIGHTS")
        return None
    return InceptionFeatures(path).to(device).eval()


# --- cost accounting -------------------------------------------------------------------------------
@dataclass
class Cost:
    """What a piece of work cost: wall seconds, GPU-seconds (wall × GPUs in use) and model calls."""

    seconds: float = 0.0
    gpu_seconds: float = 0.0
    model_calls: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measure_cost(device="cpu", denoiser=None, num_gpus: int = 1):
    """Context manager yielding a :class:`Cost` filled in on exit (CUDA work is synchronised first).

    `model_calls` is the increase of `denoiser.num_evals` (batched model calls) when a denoiser is given.
    """
    cost = Cost()
    start_calls = getattr(denoiser, "num_evals", 0)
    _synchronize(device)
    start = time.perf_counter()
    try:
        yield cost
    finally:
        _synchronize(device)
        cost.seconds = time.perf_counter() - start
        cost.gpu_seconds = cost.seconds * num_gpus if torch.device(device).type == "cuda" else 0.0
        cost.model_calls = getattr(denoiser, "num_evals", 0) - start_calls
