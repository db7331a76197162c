#!/usr/bin/env bash
# Stage what a GPU run needs inside the checkout, in git-ignored folders, for a GPU machine that
# receives only the checkout (64 MiB in all) and has no diffusers:
#   bash tools/gpu_stage.sh            # WITH_TRAIN=1 also stages 50k training images and the fixture builder
# -> .whl/site.tar.xz (packages), .stage/fmnist-classifier (FD feature network), .stage/fashion-mnist (test set and
#    its fd_statistics.npz: carry that file alone where the 64 MiB is tight);
#    WITH_TRAIN=1: .stage/train50k (the first 50,000 training images, xz: the whole set does not fit beside the
#    rest; TRAIN_IMAGES=16000 stages .stage/train16k, which fits beside a larger working tree: pass
#    TRAIN_SUBSET=.stage/train16k to benchmarks/phase1_gpu.sh) and .stage/tools/train_reference_dpm.py
#    (../shared/tools, which does not travel).
# The fixture DPM is not staged: it is vendored in assets/fmnist-ddpm-eps.
# A GPU command that runs none of the benchmarks' scripts starts with `source tools/gpu_site.sh`.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
shared=$(cd "$root/../shared" && pwd)
for p in /.whl/ /.stage/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
mkdir -p .whl .stage

# 1. Packages: diffusers and the two small packages it needs (the GPU machine has huggingface_hub 1.33 and
#    safetensors), unpacked and packed as .whl/site.tar.xz for tools/gpu_site.sh (2 MB against 6.5 MB of wheels).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp/wheels" \
  diffusers==0.42.1 "click>=8.4.2" importlib_metadata 2>&1 | { grep -v WARNING || true; }
mkdir -p "$tmp/site" && for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
rm -rf .whl && mkdir -p .whl && tar cJf .whl/site.tar.xz -C "$tmp/site" .

# 2. The FD feature network.
rm -rf .stage/fmnist-classifier && cp -r "$shared/fixtures/fmnist-classifier" .stage/fmnist-classifier
chmod -R u+w .stage/fmnist-classifier

# 3. Fashion-MNIST IDX files.
data=/usr/share/datasets/fashion-mnist
if [ -d "$data" ]; then
  rm -rf .stage/fashion-mnist && mkdir -p .stage/fashion-mnist
  cp "$data"/t10k-* .stage/fashion-mnist/
  if [ "${WITH_TRAIN:-0}" = 1 ]; then
    mkdir -p .stage/tools && cp "$shared/tools/train_reference_dpm.py" .stage/tools/
    n=${TRAIN_IMAGES:-50000}
    python3 benchmarks/stage_train_subset.py "$n" ".stage/train$((n / 1000))k" --source "$data"
  fi
  # FD's reference statistics of the test images for the fixture classifier (0.5 MB): a run that carries
  # .stage/fashion-mnist/fd_statistics.npz alone, instead of the folder (4.4 MB), still scores FD-FMNIST.
  PYTHONPATH=src python3 -c "import sys; from diffusers_fewstep.evaluation import load_fmnist_classifier as L, \
save_reference_statistics as S; S(L(sys.argv[1]), sys.argv[2])" .stage/fmnist-classifier .stage/fashion-mnist
else
  echo "note: apt-get install dataset-fashion-mnist for the FD test set" >&2
fi

du -sh .whl .stage/*
# 4. The GPU machine receives the working tree plus the carried folders, 64 MiB in all.
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
staged=$(du -sbc .whl .stage | tail -1 | cut -f1)
echo "working tree $((tree / 1048576)) MiB + staged $((staged / 1048576)) MiB (limit 64 MiB); pass carry=[\".whl\", \".stage\"]"
[ $((tree + staged)) -le $((64 * 1048576)) ] || echo "warning: over 64 MiB; the GPU run will not receive it all" >&2
echo 'install line: source tools/gpu_site.sh'
