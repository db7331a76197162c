"""hub.py: Hub-id shapes and the portable model reference that provenance records."""
import os

import pytest

from diffusers_fewstep.hub import looks_like_hub_id, portable_model_ref


@pytest.mark.parametrize("value, expected", [
    ("owner/name", True), ("stabilityai/stable-diffusion-3.5-medium", True), ("gpt2", False), ("./x", False),
    ("~/x", False), ("a/b/c", False), ("/abs/path", False), ("a--b/c", False), ("owner/name.", False)])
def test_looks_like_hub_id(value, expected):
    assert looks_like_hub_id(value) is expected


def test_portable_model_ref(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "models" / "fmnist").mkdir(parents=True)
    (tmp_path / "elsewhere" / "sd15").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert portable_model_ref("owner/name") == "owner/name"  # a Hub id, as given
    assert portable_model_ref("models/fmnist") == "models/fmnist"  # relative: as given
    assert portable_model_ref("../elsewhere/sd15") == "../elsewhere/sd15"
    assert portable_model_ref(str(work / "models" / "fmnist")) == os.path.join("models", "fmnist")  # under the cwd
    assert portable_model_ref(str(work / "models" / "fmnist") + "/") == os.path.join("models", "fmnist")
    assert portable_model_ref(str(work)) == "."
    # outside the cwd: only the folder name, flagged so it is read neither as a path nor as a Hub id
    assert portable_model_ref(str(tmp_path / "elsewhere" / "sd15")) == "…/sd15"
    assert portable_model_ref("/no/such/model") == "…/model"


def test_portable_model_ref_of_a_hub_cache_folder_is_its_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = "/home/alice/.cache/huggingface/hub/models--stabilityai--stable-diffusion-3.5-medium/snapshots/0a1b2c"
    assert portable_model_ref(snapshot) == "stabilityai/stable-diffusion-3.5-medium"
    assert portable_model_ref(snapshot + "/transformer") == "stabilityai/stable-diffusion-3.5-medium"


def test_portable_model_ref_follows_symlinks_to_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "real" / "m").mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.chdir(tmp_path / "link")
    assert portable_model_ref(str(tmp_path / "real" / "m")) == "m"
    assert portable_model_ref(str(tmp_path / "link" / "m")) == "m"


def test_snippet_of_a_pipeline_saved_without_t5_loads_it(tmp_path):
    """SD3 saved with `text_encoder_3=None`: plain `from_pretrained` fails in diffusers 0.42; the call the cards print
    passes the absent required components as None (optional ones such as `image_encoder` are left out) and loads."""
    import diffusers
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from diffusers_fewstep.hub import from_pretrained_call
    from tiny_models import tiny_sd, tiny_sd3

    StableDiffusion3Pipeline(**tiny_sd3()).save_pretrained(tmp_path / "sd3")
    folder = str(tmp_path / "sd3")
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(folder)
    call = from_pretrained_call("StableDiffusion3Pipeline", folder)
    assert call == f'StableDiffusion3Pipeline.from_pretrained("{folder}", text_encoder_3=None, tokenizer_3=None)'
    pipe = eval(call, {"StableDiffusion3Pipeline": diffusers.StableDiffusion3Pipeline})
    assert pipe.text_encoder_3 is None and pipe.transformer is not None

    StableDiffusionPipeline(**tiny_sd()).save_pretrained(tmp_path / "sd")
    assert from_pretrained_call("DiffusionPipeline", str(tmp_path / "sd")) == \
        f'DiffusionPipeline.from_pretrained("{tmp_path / "sd"}")'  # safety checker: optional, nothing to pass
