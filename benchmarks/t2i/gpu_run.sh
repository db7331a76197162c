#!/usr/bin/env bash
# Train one tiny text-to-image fixture on one GPU and score its schedulers (≈ 6–7 minutes on an H100):
#   bash benchmarks/t2i/gpu_run.sh sd     # or sd3
# Needs (git-ignored, carried to the GPU machine): .whl/ (diffusers 0.42.1 wheel set), .stage/fashion-mnist with the
# train split and .stage/fixtures/fmnist-classifier — `WITH_TRAIN=1 bash ../shared/tools/gpu_stage.sh` stages them.
# Writes $OUT/t2i/ (or outputs/t2i/): fmnist-t2i-<kind>/ (the pipeline, ≈ 10 MB), eval-<kind>/, train-<kind>.log.
# TRAIN_SECONDS (default 300), N (evaluation samples, default 2000), TRAIN_ARGS and EVAL_ARGS (e.g.
# --scheduler-folder F) adjust it.
set -euo pipefail
kind=${1:?usage: gpu_run.sh sd|sd3}
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then source tools/gpu_site.sh; else export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}; fi
out=${OUT:-outputs}/t2i
mkdir -p "$out"
data=.stage/fashion-mnist
classifier=.stage/fixtures/fmnist-classifier
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
start=$(date +%s)
timeout $(( ${TRAIN_SECONDS:-300} + 180 )) python3 benchmarks/t2i/train_tiny_t2i.py --kind "$kind" --data "$data" \
  --out "$out/fmnist-t2i-$kind" --seconds "${TRAIN_SECONDS:-300}" --classifier "$classifier" ${TRAIN_ARGS:-} \
  2>&1 | grep -v "torchvision\|Loading\|Writing model shards" | tee "$out/train-$kind.log"
echo "training wall $(( $(date +%s) - start ))s"
timeout 300 python3 benchmarks/t2i/evaluate_t2i.py --pipeline "$out/fmnist-t2i-$kind" --classifier "$classifier" \
  --data "$data" --n "${N:-2000}" --guidance 5 --out "$out/eval-$kind" ${EVAL_ARGS:-} \
  2>&1 | grep -v "torchvision\|Loading" | tee "$out/eval-$kind.log"
cat "$out/eval-$kind/results.md"
echo "total wall $(( $(date +%s) - start ))s"
