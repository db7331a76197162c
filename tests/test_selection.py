"""Held-out measures of the Phase-1 selection (`selection.py`): the data-aware `fd_data` against the data-free ones."""
import os

import pytest
import torch
import torch.nn.functional as F

from diffusers import DDPMScheduler

from diffusers_fewstep import DEFAULT_MODEL, NoiseSchedule, SigmaDenoiser
from diffusers_fewstep.features import ModelFeatures
from diffusers_fewstep.selection import MEASURES, Candidate, Paths, best, check_measure, score

FMNIST = "/usr/share/datasets/fashion-mnist"
N = 64  # held-out paths (and data images in fd_data's reference set)


class _Returns:
    """A stand-in model whose D is a fixed set of images: a table ending in 0 samples exactly those images."""

    def __init__(self, images, schedule):
        self.images, self.schedule = images, schedule

    def __call__(self, x, sigma, **extra):
        return self.images


def _blur(x, passes=2):
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16)[None, None]
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return x


def test_fd_data_is_the_measure_that_needs_data_and_no_conditioning():
    assert MEASURES == ("rmse", "feature", "fd_self", "fd_data")
    check_measure("fd_data", has_data=True)
    with pytest.raises(ValueError, match=r"^fd_data compares samples with clean data images; pass them \(optimize "
                                         r"--data: .*\) or select by one of \['rmse', 'feature', 'fd_self'\]$"):
        check_measure("fd_data", has_data=False)
    with pytest.raises(ValueError, match="fd_data is for unconditional models"):
        check_measure("fd_data", has_data=True, conditional=True)
    check_measure("fd_self", has_data=False, conditional=True)  # the data-free measures need neither
    with pytest.raises(ValueError, match="unknown selection measure 'fid'"):
        check_measure("fid")


def test_best_keeps_the_lowest_fd_data_and_says_when_none_has_it():
    a = Candidate("a", "euler", [1.0, 0.0], "stock", scores={"rmse": 0.1, "fd_self": 1.0, "fd_data": 3.0})
    b = Candidate("b", "unipc", [1.0, 0.0], "stock", scores={"rmse": 0.2, "fd_self": 2.0, "fd_data": 2.5})
    c = Candidate("c", "ipndm", [1.0, 0.0], "stock", scores={"rmse": 0.3, "fd_self": 0.5})  # scored without data
    assert best([a, b, c], "fd_data") is b and best([a, b, c], "fd_self") is c and best([a, b, c], "rmse") is a
    with pytest.raises(ValueError, match="`fd_data` also clean data images"):
        best([c], "fd_data")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the dataset-fashion-mnist Debian package")
def test_fd_data_prefers_samples_like_the_data_where_fd_self_prefers_samples_like_blurry_references():
    """A model whose own many-step references are blurred: fd_self keeps the candidate that reproduces the blur,
    fd_data the one whose samples are real images (other images than the data set it is measured against)."""
    from diffusers_fewstep.evaluation import fmnist_images

    denoiser = SigmaDenoiser.from_pretrained(DEFAULT_MODEL).eval()
    features, schedule = ModelFeatures(denoiser), denoiser.schedule
    test = fmnist_images(FMNIST)[: 2 * N]
    data = fmnist_images(FMNIST, split="train")[:1000]
    paths = Paths(N, (1, 32, 32), "cpu", torch.Generator().manual_seed(0))
    paths.reference = _blur(test[:N])  # the blurry references
    paths.featurize_references(features, N)
    table = [schedule.sigma_max, 1.0, 0.0]
    samples = {"real": test[N:], "blurred": _blur(test[N:])}
    paths.featurize_data(features, data, N, torch.Generator().manual_seed(1))
    assert paths.data_features.shape == (N, 64 + 128 + 256 + 256)
    cands = [Candidate(name, "euler", table, "stock", scores=score(_Returns(x, schedule), paths, table, "euler", N,
                                                                   features)) for name, x in samples.items()]
    fd_data = {c.name: c.scores["fd_data"] for c in cands}
    fd_self = {c.name: c.scores["fd_self"] for c in cands}
    assert fd_data["real"] < 0.5 * fd_data["blurred"] and fd_self["blurred"] < 0.5 * fd_self["real"]
    assert best(cands, "fd_data").name == "real" and best(cands, "fd_self").name == "blurred"


def test_rmse_compares_decoded_images_when_the_paths_have_a_decoder():
    """Latent pipelines score fidelity on decoded images: a decoder that discards what the latent RMSE counts
    (here negative values) reverses the ranking of two candidates."""
    schedule = NoiseSchedule(DDPMScheduler().config)
    table = [schedule.sigma_max, 1.0, 0.0]
    paths = Paths(4, (1, 4, 4), "cpu", torch.Generator().manual_seed(0))
    paths.reference = torch.zeros(4, 1, 4, 4)
    samples = {"negative": -torch.ones(4, 1, 4, 4), "positive": torch.full((4, 1, 4, 4), 0.5)}
    latent = {name: score(_Returns(x, schedule), paths, table, "euler", 4)["rmse"] for name, x in samples.items()}
    paths.decode_references(lambda z: z.clamp(min=0))
    decoded = {name: score(_Returns(x, schedule), paths, table, "euler", 4)["rmse"] for name, x in samples.items()}
    assert latent == pytest.approx({"negative": 1.0, "positive": 0.5})
    assert decoded == pytest.approx({"negative": 0.0, "positive": 0.5})
