"""benchmarks/t2i: the tiny text-to-image fixture trainer and the few-step evaluation, end to end on CPU (--tiny)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "benchmarks", "t2i")
sys.path.insert(0, T2I)

DATA = os.environ.get("FMNIST_DATA", "/usr/share/datasets/fashion-mnist")
CLASSIFIER = next((p for p in [os.environ.get("FMNIST_CLASSIFIER", ""),
                               os.path.join(ROOT, "..", "shared", "fixtures", "fmnist-classifier"),
                               "/work/shared/fixtures/fmnist-classifier",
                               os.path.join(ROOT, ".stage", "fixtures", "fmnist-classifier")]
                   if p and os.path.isfile(os.path.join(p, "arch.py"))), None)
needs_data = pytest.mark.skipif(not os.path.isfile(os.path.join(DATA, "train-labels-idx1-ubyte.gz")),
                                reason="needs the dataset-fashion-mnist Debian package (or $FMNIST_DATA)")
needs_classifier = pytest.mark.skipif(CLASSIFIER is None, reason="needs the fmnist-classifier fixture ($FMNIST_CLASSIFIER)")


def train(kind, out, seconds=2):
    import train_tiny_t2i

    train_tiny_t2i.main(["--kind", kind, "--data", DATA, "--out", str(out), "--seconds", str(seconds), "--tiny",
                         "--device", "cpu"])
    return str(out)


def fake_learned_folder(pipeline_dir, out, steps=(2, 3)):
    """A LearnedScheduleScheduler folder with (untrained) tables for this pipeline's noise schedule."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_models import learned_scheduler

    with open(os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    learned_scheduler(config, steps=steps).save_pretrained(os.path.join(out, "scheduler"))
    return str(out)


def check_results(result, rows, nfes):
    assert set(result) >= {"pipeline", "pipeline_class", "kind", "n", "guidance", "nfes", "reference", "rows", "grid",
                           "fd_reference", "classifier_test_accuracy", "device", "wall_seconds"}
    assert 0 <= result["reference"]["accuracy"] <= 1 and math.isfinite(result["reference"]["fd"])
    assert set(result["rows"]) == set(rows)
    for key, row in result["rows"].items():
        for nfe, scores in row["results"].items():
            assert int(nfe) in nfes
            assert 0 <= scores["accuracy"] <= 1 and math.isfinite(scores["fd"]) and scores["fd"] >= -1e-6
            assert 0 <= scores["rmse"] < 2
            assert 0 < scores["fd_std"] < max(1.0, scores["fd"])  # bootstrap noise: present, below the FD's scale


def test_captions_and_tokenizer(tmp_path):
    from t2i_common import CLASS_NAMES, caption, caption_table, eval_prompts
    from train_tiny_t2i import build_tokenizer

    assert caption(7) == "a photo of a sneaker" and caption(9) == "a photo of an ankle boot"
    table = caption_table()
    assert len(table) == 10 * 6 + 1 and table[-1] == ""
    prompts, labels = eval_prompts(23)
    assert prompts[12] == caption(2) and labels.tolist()[:11] == list(range(10)) + [0]
    tok = build_tokenizer(str(tmp_path))
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path))
    ids = tok("a photo of an ankle boot", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:7]) == ["a</w>", "photo</w>", "of</w>", "an</w>", "ankle</w>", "boot</w>"]
    assert ids[7] == tok.eos_token_id
    assert tok.unk_token_id not in tok("a zebra 42").input_ids[1:-1]  # unseen words still tokenize (bytes)
    assert all(len(tok(c).input_ids) <= 5 for c in CLASS_NAMES)  # "t-shirt": t, -, shirt


@needs_data
@needs_classifier
def test_sd_tiny_trains_loads_and_evaluates(tmp_path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    folder = train("sd", tmp_path / "sd")
    recipe = json.load(open(os.path.join(folder, "training.json")))
    assert recipe["kind"] == "sd" and recipe["denoiser_steps"] > 0 and recipe["files"]["total_mb"] < 12
    assert os.path.isfile(os.path.join(folder, "samples.png"))
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(folder, "tokenizer")))
    config = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert config["_class_name"] == "PNDMScheduler" and config["clip_sample"] is False
    assert config["skip_prk_steps"] and config["steps_offset"] == 1 and config["set_alpha_to_one"] is False
    assert config["beta_schedule"] == "scaled_linear" and config["prediction_type"] == "epsilon"

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.safety_checker is None
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a bag", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and 0 <= images.min() and images.max() <= 1

    import evaluate_t2i

    learned = fake_learned_folder(folder, tmp_path / "learned-sd")
    out = tmp_path / "eval-sd"
    evaluate_t2i.main(["--pipeline", folder, "--classifier", CLASSIFIER, "--data", DATA, "--n", "20",
                       "--batch", "10", "--out", str(out), "--nfes", "2", "4", "--rows", "ddim_trailing",
                       "--reference-steps", "5", "--fd-ref-limit", "200", "--scheduler-folder", learned,
                       "--device", "cpu"])
    result = json.load(open(out / "results.json"))
    check_results(result, {"ddim_trailing", "learned:learned-sd"}, {2, 4})
    assert result["kind"] == "sd" and result["n"] == 20 and result["reference"]["steps"] == 5
    assert result["rows"]["learned:learned-sd"]["missing_nfes"] == [4]
    assert {"results.md", "grid.png"} <= set(os.listdir(out))
    table = open(out / "results.md").read()
    assert "| DDIM trailing |" in table
    assert f"{result['rows']['ddim_trailing']['results']['2']['fd']:.2f} ± " in table

    # a train_fewstep.py output folder (tables + LoRA): its row samples with the LoRA, the others without it
    tuned = fake_learned_folder(folder, tmp_path / "tuned-sd")
    save_random_lora(pipe, tuned)
    out2 = tmp_path / "eval-tuned"
    evaluate_t2i.main(["--pipeline", folder, "--classifier", CLASSIFIER, "--data", DATA, "--n", "20", "--batch", "10",
                       "--out", str(out2), "--nfes", "2", "--rows", "ddim_trailing", "--reference-steps", "5",
                       "--fd-ref-limit", "200", "--scheduler-folder", tuned, "--scheduler-folder", learned,
                       "--device", "cpu"])
    rows = json.load(open(out2 / "results.json"))["rows"]
    assert rows["learned:tuned-sd"]["tuned"] == "LoRA" and rows["learned:learned-sd"]["tuned"] is None
    assert rows["learned:tuned-sd"]["label"].endswith(", LoRA)")
    plain, with_lora = rows["learned:learned-sd"]["results"]["2"], rows["learned:tuned-sd"]["results"]["2"]
    assert plain == {**result["rows"]["learned:learned-sd"]["results"]["2"], "seconds": plain["seconds"]}
    assert abs(with_lora["rmse"] - plain["rmse"]) > 1e-3  # same tables, other model


def save_random_lora(pipe, folder):
    """A rank-4 LoRA on the attention projections of `pipe`'s UNet with random (non-zero) weights, saved in diffusers'
    format into `folder`; `pipe` itself is left without it."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from diffusers_fewstep.finetune import TEXT_TO_IMAGE_LORA_MODULES, add_lora

    unet = add_lora(copy.deepcopy(pipe.unet), rank=4, target_modules=TEXT_TO_IMAGE_LORA_MODULES, in_place=True)
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)


@pytest.mark.slow
@needs_data
@needs_classifier
def test_sd3_tiny_cli_trains_loads_and_evaluates(tmp_path):
    """The command lines the GPU runs, at tiny settings: SD3 with every stock row."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])}
    folder = str(tmp_path / "sd3")
    subprocess.run([sys.executable, os.path.join(T2I, "train_tiny_t2i.py"), "--kind", "sd3", "--data", DATA,
                    "--out", folder, "--seconds", "4", "--tiny", "--classifier", CLASSIFIER], check=True, env=env)
    recipe = json.load(open(os.path.join(folder, "training.json")))
    norm = recipe["latent_normalisation"]
    assert set(norm) == {"shift_factor", "scaling_factor"} and 0 <= recipe["first_look"]["class_accuracy"] <= 1
    vae_config = json.load(open(os.path.join(folder, "vae", "config.json")))
    assert vae_config["scaling_factor"] == pytest.approx(norm["scaling_factor"])
    assert vae_config["shift_factor"] == pytest.approx(norm["shift_factor"])

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a photo of a bag", "a sneaker"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 32, 32)

    out = tmp_path / "eval-sd3"
    subprocess.run([sys.executable, os.path.join(T2I, "evaluate_t2i.py"), "--pipeline", folder, "--classifier",
                    CLASSIFIER, "--data", DATA, "--n", "20", "--batch", "20", "--out", str(out),
                    "--fd-ref-limit", "200", "--scheduler-folder", fake_learned_folder(folder, tmp_path / "l3")],
                   check=True, env=env)
    result = json.load(open(out / "results.json"))
    check_results(result, {"flow_euler", "dpmpp_2m_flow", "unipc_flow", "learned:l3"}, {2, 3, 4, 6, 8})
    assert result["kind"] == "sd3" and result["reference"]["steps"] == 50
    assert len(result["rows"]["unipc_flow"]["results"]) == 5


def test_staged_training_subset_is_the_first_n_images_and_labels(tmp_path):
    """benchmarks/stage_train_subset.py (what tools/gpu_stage.sh stages for the GPU): IDX files cut to the first N
    items, the count in their headers, images xz-compressed and labels gzip-compressed; asking for more fails."""
    import gzip
    import lzma

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from stage_train_subset import main

    src = tmp_path / "src"
    src.mkdir()
    images = bytes(range(256)) * 31  # 7,936 bytes: ten 28×28 images and a spare tail
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images[: 10 * 784])
    with gzip.open(src / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(range(10)))
    main(["3", str(tmp_path / "out"), "--source", str(src)])
    got = lzma.open(tmp_path / "out" / "train-images-idx3-ubyte.xz").read()
    assert int.from_bytes(got[4:8], "big") == 3 and got[8:16] == (28).to_bytes(4, "big") * 2
    assert got[16:] == images[: 3 * 784]
    labels = gzip.open(tmp_path / "out" / "train-labels-idx1-ubyte.gz").read()
    assert int.from_bytes(labels[4:8], "big") == 3 and labels[8:] == bytes([0, 1, 2])
    with pytest.raises(SystemExit, match="holds 10 items"):
        main(["11", str(tmp_path / "more"), "--source", str(src)])


@needs_classifier
def test_vendored_sd3_fixture_follows_prompts_with_its_learned_tables():
    """assets/fmnist-t2i-sd3 (trained on an H200, benchmarks/t2i/results/sd3) loads with StableDiffusion3Pipeline and
    the tables learned for it (benchmarks/t2i/results/sd3-learned) load with LearnedScheduleScheduler; 4-step prompted
    samples through the stock pipeline are classified as their prompt's class, and the learned table stays closer to
    the 50-step image than FlowMatch Euler at 4 steps, as measured on 2,000 samples on the GPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from evaluate_t2i import generate, initial_latents
    from t2i_common import eval_prompts, load_pipeline

    from diffusers_fewstep import LearnedScheduleScheduler
    from diffusers_fewstep.evaluation import endpoint_rmse, extract_features, load_fmnist_classifier

    pipe = load_pipeline(os.path.join(ROOT, "assets", "fmnist-t2i-sd3"))
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    stock = pipe.scheduler
    assert isinstance(stock, FlowMatchEulerDiscreteScheduler) and stock.config.shift == 3.0
    learned = LearnedScheduleScheduler.from_pretrained(os.path.join(ROOT, "benchmarks", "t2i", "results",
                                                                    "sd3-learned"), subfolder="scheduler")
    assert learned.available_nfes == [3, 4, 6, 8]

    prompts, labels = eval_prompts(20)
    latents = initial_latents(pipe, 20, 0, "cpu")
    images = {name: generate(pipe, s, steps, prompts, latents, 5.0, 20)
              for name, s, steps in [("reference", stock, 50), ("euler", stock, 4), ("learned", learned, 4)]}
    net = load_fmnist_classifier(CLASSIFIER, "cpu")
    logits = net.head(torch.from_numpy(extract_features(net, images["learned"])).float())
    assert (logits.argmax(1) == labels).float().mean() >= 0.8
    assert endpoint_rmse(images["learned"], images["reference"]) < endpoint_rmse(images["euler"], images["reference"])


def test_reference_distances_pairs_every_row_with_every_other(tmp_path):
    """benchmarks/t2i/reference_distances.py on the vendored SD3 fixture (4 prompts): symmetric pixel RMSE between a
    stock row, the same row at more steps, and the learned tables, through the stock pipeline."""
    out = tmp_path / "d.json"
    learned = os.path.join(T2I, "results", "sd3-learned")
    subprocess.run([sys.executable, os.path.join(T2I, "reference_distances.py"), "--pipeline",
                    os.path.join(ROOT, "assets", "fmnist-t2i-sd3"), "--n", "4", "--rows", "flow_euler:3",
                    "flow_euler:12", f"{learned}:3", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    rmse = json.loads(out.read_text())["rmse"]
    rows = ["flow_euler:3", "flow_euler:12", f"{learned}:3"]
    assert set(rmse) == set(rows) and all(set(rmse[a]) == set(rows) - {a} for a in rows)
    assert all(rmse[a][b] == rmse[b][a] > 0 for a in rows for b in rows if a != b)
    assert rmse["flow_euler:3"]["flow_euler:12"] < 0.5  # images of one model from one latent, in [-1, 1]
    median = json.loads(out.read_text())["median_rmse"]
    assert all(median[a][b] == median[b][a] > 0 for a in rows for b in rows if a != b)
