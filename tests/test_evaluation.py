"""Metric code: Fréchet distance, endpoint error, noise bank, generation, cost accounting."""
import gzip
import os

import numpy as np
import pytest
import torch

from diffusers_fewstep import evaluation as ev
from diffusers_fewstep.adapter import NoiseSchedule

from tiny_models import write_idx_images

DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "prediction_type": "epsilon"}


class GaussianDenoiser:
    """Exact D for data N(0, s²·I): D(x; σ) = s²/(s²+σ²)·x, so the ODE solution is known in closed form."""

    def __init__(self, std=0.5):
        self.schedule = NoiseSchedule(DDPM_CONFIG)
        self.std = std
        self.num_evals = 0

    def __call__(self, x, sigma):
        self.num_evals += 1
        return self.std**2 / (self.std**2 + torch.as_tensor(sigma) ** 2) * x


def test_fd_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 16))
    assert abs(ev.frechet_distance(feats, feats)) < 1e-6


def test_fd_of_two_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    var_a, var_b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    # FD of N(μa, diag a) and N(μb, diag b) = ‖μa − μb‖² + Σ (√a − √b)²
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    exact = ev.frechet_distance((mu_a, np.diag(var_a)), (mu_b, np.diag(var_b)))
    assert exact == pytest.approx(expected, rel=1e-9)
    # and from samples, within sampling noise
    a = mu_a + np.sqrt(var_a) * rng.normal(size=(200_000, d))
    b = mu_b + np.sqrt(var_b) * rng.normal(size=(200_000, d))
    assert ev.frechet_distance(a, b) == pytest.approx(expected, rel=0.02, abs=0.01)


def test_fd_full_covariance_closed_form():
    # commuting covariances: Σa = Q diag(a) Qᵀ, Σb = Q diag(b) Qᵀ -> tr term is Σ (√a − √b)²
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.2, 3, 5), rng.uniform(0.2, 3, 5)
    fd = ev.frechet_distance((np.zeros(5), q @ np.diag(a) @ q.T), (np.ones(5), q @ np.diag(b) @ q.T))
    assert fd == pytest.approx(5 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-8)


def test_endpoint_error_of_reference_against_itself_is_zero():
    denoiser = GaussianDenoiser()
    noise = ev.noise_bank(8, (1, 4, 4), seed=3)
    ref = ev.reference_samples(denoiser, noise, steps=20)
    assert ev.endpoint_rmse(ref, ref) == 0.0
    shifted = (ref + 0.1).clamp(-1, 1)
    errors = ev.endpoint_errors(shifted, ref)
    assert errors.shape == (8,) and float(errors.max()) <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="differ in shape"):
        ev.endpoint_rmse(ref, ref[:4])


def test_noise_bank_is_seeded_and_matches_generator():
    a = ev.noise_bank(5, (1, 8, 8), seed=1234)
    g = torch.Generator().manual_seed(1234)
    assert torch.equal(a, torch.randn(5, 1, 8, 8, generator=g))
    assert not torch.equal(a, ev.noise_bank(5, (1, 8, 8), seed=0))


def test_reference_matches_closed_form_ode_solution():
    # data N(0, s²): x(σ) = x_T·√(s²+σ²)/√(s²+σ_T²); at σ = 0 the native sample is x_T·s/√(s²+σ_T²)
    s = 0.5
    denoiser = GaussianDenoiser(s)
    noise = ev.noise_bank(16, (1, 4, 4), seed=5)
    sigma_max = denoiser.schedule.sigma_max
    x_t = noise / denoiser.schedule.native_scale(torch.tensor(sigma_max))
    exact = (x_t * s / (s**2 + sigma_max**2) ** 0.5).clamp(-1, 1)
    ref = ev.reference_samples(denoiser, noise, steps=200)
    assert ev.endpoint_rmse(ref, exact) < 2e-3
    # a 3-step first-order solve is much worse than the reference
    few = ev.generate(denoiser, noise, ev.reference_sigmas(denoiser.schedule, 3), "euler")
    assert ev.endpoint_rmse(few, exact) > 10 * ev.endpoint_rmse(ref, exact)


def test_generate_batches_consistently_and_clamps():
    denoiser = GaussianDenoiser(2.0)  # wide data: many values outside [-1, 1]
    noise = ev.noise_bank(10, (1, 4, 4), seed=6)
    sigmas = ev.reference_sigmas(denoiser.schedule, 5)
    whole = ev.generate(denoiser, noise, sigmas, "unipc", batch_size=10)
    parts = ev.generate(denoiser, noise, sigmas, "unipc", batch_size=3)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert float(whole.abs().max()) <= 1.0 and float((whole.abs() == 1).float().mean()) > 0.1


def test_measure_cost_counts_model_calls():
    denoiser = GaussianDenoiser()
    noise = ev.noise_bank(10, (1, 4, 4))
    with ev.measure_cost("cpu", denoiser) as cost:
        ev.generate(denoiser, noise, ev.reference_sigmas(denoiser.schedule, 4), "euler", batch_size=5)
    assert cost.model_calls == 8  # 4 steps × 2 batches
    assert cost.seconds > 0 and cost.gpu_seconds == 0.0
    assert set(cost.to_dict()) == {"seconds", "gpu_seconds", "model_calls"}


def test_fmnist_images_pad_and_scale(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 255
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    x = ev.fmnist_images(str(tmp_path))
    assert x.shape == (3, 1, 32, 32)
    assert float(x[0, 0, 2, 2]) == 1.0 and float(x[0, 0, 0, 0]) == -1.0 and float(x[0, 0, 10, 10]) == -1.0
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ev.fmnist_images(str(tmp_path), "train")


def test_feature_network_loader(tmp_path):
    (tmp_path / "arch.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def features(self, x):\n"
        "        return x.flatten(1)[:, :3] * 2\n"
        "def load_classifier(folder):\n"
        "    return Net()\n")
    net = ev.load_fmnist_classifier(str(tmp_path))
    feats = ev.extract_features(net, torch.ones(5, 1, 4, 4), batch_size=2)
    assert feats.shape == (5, 3) and feats.dtype == np.float64 and np.all(feats == 2)
    with pytest.raises(FileNotFoundError, match="arch.py"):
        ev.load_fmnist_classifier(str(tmp_path / "missing"))


def test_inception_is_skipped_with_a_message_when_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "none.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    messages = []
    assert ev.inception_feature_extractor(log=messages.append) is None
    assert len(messages) == 1 and "Inception FID skipped" in messages[0]


@pytest.mark.skipif(not os.path.isdir("../shared/fixtures/fmnist-classifier"), reason="FD fixture not present")
def test_fmnist_classifier_fixture_features():
    net = ev.load_fmnist_classifier("../shared/fixtures/fmnist-classifier")
    feats = ev.extract_features(net, torch.zeros(4, 1, 32, 32))
    assert feats.shape == (4, 256)


def test_load_images_reads_idx_files_folders_and_tensors(tmp_path):
    from diffusers_fewstep.data import load_images

    images = np.zeros((5, 28, 28), dtype=np.uint8)
    images[:, 14, 14] = 255
    write_idx_images(tmp_path / "train-images-idx3-ubyte.gz", images)
    x = load_images(str(tmp_path), (1, 32, 32))  # a Fashion-MNIST folder: the train file, padded with −1
    assert x.shape == (5, 1, 32, 32) and float(x[0, 0, 16, 16]) == 1.0 and float(x[0, 0, 0, 0]) == -1.0
    assert load_images(str(tmp_path / "train-images-idx3-ubyte.gz"), (3, 16, 16), limit=2).shape == (2, 3, 16, 16)
    torch.save(x[:2], tmp_path / "x.pt")
    assert torch.equal(load_images(str(tmp_path / "x.pt"), (1, 32, 32)), x[:2])

    (tmp_path / "not_idx.gz").write_bytes(gzip.compress(b"\x00" * 32))
    with pytest.raises(ValueError, match="not an IDX file"):
        load_images(str(tmp_path / "not_idx.gz"), (1, 32, 32))
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        load_images(str(tmp_path / "empty"), (1, 8, 8))


def test_saved_reference_statistics_stand_in_for_the_images_of_their_network(tmp_path):
    """fd_statistics.npz (what a GPU run can carry instead of the test images) gives the statistics computed from the
    images, for the network it was written with; with another network it is ignored beside images and refused
    without them."""
    import shutil

    rng = np.random.default_rng(0)
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 6))
    net.features = net.forward
    from_images = ev.feature_statistics(ev.extract_features(net, ev.fmnist_images(str(tmp_path))))
    ev.save_reference_statistics(net, str(tmp_path))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / ev.FD_STATISTICS, alone)
    mu, cov = ev.reference_statistics(net, str(alone))
    assert np.abs(mu - from_images[0]).max() < 1e-9 and np.abs(cov - from_images[1]).max() < 1e-9

    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 6))
    other.features = other.forward
    mu_other, _ = ev.reference_statistics(other, str(tmp_path))  # recomputed from the images, for this network
    assert np.abs(mu_other - mu).max() > 1e-3
    with pytest.raises(ValueError, match="another feature network"):
        ev.reference_statistics(other, str(alone))
