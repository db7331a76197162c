"""Train a small Fashion-MNIST DPM of any family with the shared fixture builder (train_reference_dpm.py),
architecture "S" (3.7M parameters, 7.4 MB in fp16, so that two such models travel to a GPU call beside the rest):

    python benchmarks/family_models/train_small_dpm.py --tool .stage/tools/train_reference_dpm.py \
        dpm --out M --data D --seconds 240 --beta squaredcos_cap_v2 --pred v_prediction

Every argument after --tool's goes to the shared tool unchanged; only `--arch S` is added here.
"""
import argparse
import importlib.util
import sys


def small_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(32, 64, 128),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, dropout=0.1)


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tool", required=True, help="path of ../shared/tools/train_reference_dpm.py")
    known, rest = parser.parse_known_args()
    spec = importlib.util.spec_from_file_location("train_reference_dpm", known.tool)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    original = tool.unet_for
    tool.unet_for = lambda variant: small_unet() if variant == "S" else original(variant)
    sys.argv = [known.tool] + rest + ["--arch", "S"]
    tool.main()


if __name__ == "__main__":
    main()
