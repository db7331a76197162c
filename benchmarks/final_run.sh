#!/usr/bin/env bash
# The run behind docs/results.md, in one GPU call (bash tools/gpu_stage.sh first; carry .whl and .stage):
#   1. learn our tables (trajectory matching, training noise seed 0, σ_0 learnable) for UniPC-bh2, starting
#      from diffusers' own UniPC table, and for the first-order solver, starting from DDIM trailing;
#   2. measure every row side by side on the 5,000-sample evaluation bank (seed 1234).
set -euo pipefail
cd "$(dirname "$0")/.."
NFES="3 4 5 6 8 10"
common=(--nfes $NFES --tables-dir benchmarks/tables --num-iters "${ITERS:-60}" --learn-batch-size 128)
python benchmarks/run_benchmark.py --learn-only --solvers unipc --init peer:unipc_bh2 "${common[@]}" \
  --optimizer-kwargs '{"pool_size": 512, "learn_start": true}'
python benchmarks/run_benchmark.py --learn-only --solvers euler --init ddim_trailing "${common[@]}" \
  --optimizer-kwargs '{"pool_size": 512, "learn_start": true}'
python benchmarks/run_benchmark.py --n "${N:-5000}" --nfes $NFES --classifier .stage/fmnist-classifier \
  --data .stage/fashion-mnist --tables-dir benchmarks/tables --out-dir benchmarks/results --docs-dir docs \
  --rows ddim_leading ddim_trailing euler_karras dpmpp2m_karras dpmpp2m_lu unipc_bh2 unipc_bh2_karras \
         gits_ipndm gits_euler ays_dpmpp_2m ays_euler learned_unipc learned_euler
