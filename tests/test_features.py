"""The model's own features: blur-aware measures that need no extra network."""
import os

import pytest
import torch
import torch.nn.functional as F

from diffusers_fewstep import DEFAULT_MODEL, SigmaDenoiser
from diffusers_fewstep.features import ModelFeatures, feature_distance, feature_layers, frechet_distance, pooled_features

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fixture_features():
    return ModelFeatures(SigmaDenoiser.from_pretrained(DEFAULT_MODEL).eval())


def _blur(x):
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16)[None, None]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)


def test_feature_layers_of_a_unet(fixture_features):
    # the fixture's three down blocks and its mid block
    assert len(fixture_features.layers) == 4
    with pytest.raises(ValueError, match="no feature layers"):
        feature_layers(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the dataset-fashion-mnist Debian package")
def test_fd_in_the_model_features_sees_blur_that_rmse_rewards(fixture_features):
    """Against a set of real images, a blurred copy has a small RMSE and other real images a large one, but in
    the model's own features the blurred set is the one far from the real images' distribution."""
    from diffusers_fewstep.evaluation import fmnist_images

    images = fmnist_images(FMNIST)[:160]
    ref, other = images[:80], images[80:]
    blurred = _blur(ref)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    rmse = lambda x: float((x - ref).pow(2).flatten(1).mean(1).sqrt().mean())  # noqa: E731
    with torch.no_grad():
        feats = {name: pooled_features(fixture_features, x, noise) for name, x in
                 (("ref", ref), ("blurred", blurred), ("other", other))}
        same = float(feature_distance(fixture_features, ref, ref, noise).max())
    assert rmse(blurred) < 0.5 * rmse(other)
    assert frechet_distance(feats["blurred"], feats["ref"]) > 2 * frechet_distance(feats["other"], feats["ref"])
    assert same < 1e-6


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 20, generator=g)
    same = frechet_distance(ref, ref)
    other = frechet_distance(torch.randn(400, 20, generator=g), ref)
    shifted = frechet_distance(torch.randn(400, 20, generator=g) + 0.5, ref)
    assert abs(same) < 1e-8 and other < shifted and shifted == pytest.approx(20 * 0.25 + other, rel=0.3)


def test_pooled_features_shape(fixture_features):
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        feats = pooled_features(fixture_features, x, torch.zeros_like(x))
    assert feats.shape == (3, 64 + 128 + 256 + 256)


def test_pooled_features_in_batches_equal_one_call(fixture_features):
    x, noise = torch.randn(5, 1, 32, 32), torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        whole = pooled_features(fixture_features, x, noise)
        parts = pooled_features(fixture_features, x, noise, batch_size=2)
    assert parts.shape == whole.shape and torch.allclose(parts, whole, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        pooled_features(fixture_features, x, noise, cond={"class_labels": torch.zeros(5)}, batch_size=2)
