#!/usr/bin/env bash
# The benchmark on one GPU: (1) learn our tables, one process per solver sharing the GPU, cached in
# benchmarks/tables/; (2) measure every row on 5,000 samples and write benchmarks/results/ and docs/results.md.
#   bash benchmarks/gpu_run.sh            # LEARN=0 skips (1); LEARN_ARGS adds optimiser options
# Needs .stage/fmnist-classifier and .stage/fashion-mnist (bash tools/gpu_stage.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/tables benchmarks/results
solvers=${SOLVERS:-"euler dpmpp_2m unipc ipndm"}
if [ "${LEARN:-1}" = 1 ]; then
  for s in $solvers; do
    timeout "${LEARN_TIMEOUT:-420}" python benchmarks/run_benchmark.py --learn-only --solvers "$s" \
      --nfes 3 4 5 6 8 10 --tables-dir benchmarks/tables \
      --learn-note "learned while $(echo $solvers | wc -w) solver processes shared the GPU" ${LEARN_ARGS:-} \
      > "benchmarks/tables/learn_$s.log" 2>&1 &
  done
  wait
  tail -n 8 benchmarks/tables/learn_*.log
fi
python benchmarks/run_benchmark.py --n "${N:-5000}" --classifier .stage/fmnist-classifier \
  --data .stage/fashion-mnist --tables-dir benchmarks/tables --out-dir benchmarks/results --docs-dir docs ${BENCH_ARGS:-}
