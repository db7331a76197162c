#!/usr/bin/env bash
# The benchmark on one GPU in one go (< 10 minutes on an H100):
#  1. learners (one process per solver and NFE group, sharing the GPU; gradient checkpointing keeps each
#     small: 12 learners without it ran an H100 out of memory) cache our tables in benchmarks/tables/;
#  2. meanwhile the measurement runs every peer row on 5,000 samples, then waits for the learners and
#     measures our rows; it writes benchmarks/results/ and docs/results.md with docs/figures/.
#   bash benchmarks/gpu_run.sh      # LEARN=0: measure cached tables only; LEARN_ARGS / BENCH_ARGS add options
# Needs .stage/fmnist-classifier and .stage/fashion-mnist (bash tools/gpu_stage.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/tables benchmarks/results
solvers=${SOLVERS:-"euler dpmpp_2m unipc ipndm"}
groups=${NFE_GROUPS:-"3,4,5,6,8,10"}
n_learners=$(( $(echo $solvers | wc -w) * $(echo $groups | wc -w) ))
if [ "${LEARN:-1}" = 1 ]; then
  rm -f benchmarks/tables/learned_*.json
  for s in $solvers; do
    for g in $groups; do
      tag="_nfe${g//,/-}"
      lock="benchmarks/tables/learned_${s}${tag}.lock"
      touch "$lock"
      ( OMP_NUM_THREADS=2 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${LEARN_TIMEOUT:-400}" python benchmarks/run_benchmark.py --learn-only \
          --solvers "$s" --nfes ${g//,/ } --tables-tag="$tag" --tables-dir benchmarks/tables \
          --learn-note "learned while $n_learners learner processes and the measurement shared the GPU" \
          --optimizer-kwargs "${OPTIMIZER_KWARGS:-{\"pool_size\":256,\"gradient_checkpointing\":true\}}" ${LEARN_ARGS:-} > "benchmarks/tables/learn_${s}${tag}.log" 2>&1; rm -f "$lock" ) &
    done
  done
fi
OMP_NUM_THREADS=2 python benchmarks/run_benchmark.py --n "${N:-5000}" --classifier .stage/fmnist-classifier \
  --data .stage/fashion-mnist --tables-dir benchmarks/tables --out-dir benchmarks/results --docs-dir docs \
  --wait-for-tables "${WAIT:-450}" ${BENCH_ARGS:-}
status=$?
wait
tail -n 3 benchmarks/tables/learn_*.log 2>/dev/null
exit $status
