#!/usr/bin/env bash
# Phase-2 runs on one GPU (bash tools/gpu_stage.sh first; carry .whl and .stage). Stages run one after another:
# on 2026-11-23 four runs in parallel on one H100 starved each other (none reached step 250 in 6 minutes); two runs of
# the small SD fixture did share one H100 well on 2026-12-07 (1.5× the throughput of one: benchmarks/t2i/results/sd-lora-conv-dpm-gpu/).
#   bash benchmarks/phase2_gpu.sh profile                       # benchmarks/profile_phase2.py on the fixture (alone, first)
#   bash benchmarks/phase2_gpu.sh "fixture:4:l2:2e-5" ...      # MODEL:NFES:LOSS:LR[:EXTRA] -> scripts/train_fewstep.py
#   bash benchmarks/phase2_gpu.sh "t2i:2-4:1e-4"              # LoRA Phase 2 on the SD fixture, then evaluate_t2i.py
#                                                              # (T2I_MODEL: another text-to-image pipeline folder;
#                                                              #  T2I_NFES: the counts evaluated, default "2 3 4 6")
# MODEL is fixture, or a model folder name under .stage/models (vpred, flow). NFES: steps joined by '-' (2-4-8).
# Every run: the DDIM-trailing table held fixed (--phase1_iters 0 --rounds 1), batch 128, pool 8192, EMA, bf16,
# the training script's default target (--phase2_target auto: endpoint at ≤ 2 steps, trajectory above) unless EXTRA names another,
# channels-last, fused AdamW, FD-FMNIST on FD_SAMPLES (5,000) samples every EVAL_STEPS (250) steps; runs of one call
# that need the same teacher pool (model, table, pool settings) build it once (--pool_cache_dir .gpu_work/pools).
# NPROC (default 1) processes, one GPU each, under `accelerate launch` (throughput of several GPUs: the logs' samples_per_s;
# the deadline's SIGTERM reaches the launcher only, so give such runs STEPS that end in time);
# GPUS=2 runs stage k on GPU k mod 2 (two single-GPU runs side by side on nvidia-h200-x2; timings are then the H200's);
# STEPS (default 1000) optimiser steps; DEADLINE (seconds from the start) stops runs with SIGTERM (they checkpoint).
# RESUME=1 continues each run from its latest checkpoint (same stage arguments, same output folder; a finished run
# given more STEPS trains on); a text-to-image run cut before its end is not evaluated.
# COMPILE=1 (the default) adds --compile_mode reduce-overhead (CUDA graphs: the fixture's step 2.3x faster after about
# 135 s of compilation, 2026-11-24); COMPILE=0 leaves it out (short runs, or timings to compare with uncompiled ones).
# Outputs: logs, metrics and (with KEEP_MODEL=1) the fp16 tuned unet under $OUT (in 15 MiB parts where larger).
set -uo pipefail
cd "$(dirname "$0")/.."
W=.gpu_work
mkdir -p "$W/logs" "$W/runs" "${OUT:=$W/out}"
source tools/gpu_site.sh
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - T0) )); }

model_path() { [ "$1" = fixture ] && echo assets/fmnist-ddpm-eps || echo ".stage/models/$1"; }

profile() {
  timeout "${PROFILE_SECONDS:-150}" python3 benchmarks/profile_phase2.py --steps "${PROFILE_STEPS:-10}" --warmup 3 \
    --pool_size 1024 --out "$OUT/profile_phase2.json" ${PROFILE_ARGS:-} > "$OUT/profile.log" 2>&1
  stamp "profile rc=$? $(tail -3 "$OUT/profile.log" | tr '\n' ' ')"
}

split_large() {  # files come back from the GPU machine at most 16 MiB each: cut larger ones into 15 MiB parts
  # (the fixture's tuned UNet alone is 29.5 MB in fp16); here: cat F.part-* > F
  [ "$(stat -c %s "$1")" -gt $((15 * 1048576)) ] && split -b 15M -d "$1" "$1.part-" && rm "$1"
  return 0
}

train() {  # MODEL:NFES:LOSS:LR[:EXTRA words joined by ',']
  IFS=: read -r model nfes loss lr extra <<< "$1"
  local name="$model-${nfes}-$loss-$lr${extra:+-${extra//[ ,=\/]/_}}"
  local out="$W/runs/$name" launch=python3
  [ "${NPROC:-1}" -gt 1 ] && name="$name-x$NPROC" && out="$W/runs/$name" && \
    launch="accelerate launch --num_processes $NPROC --num_machines 1 --dynamo_backend no --mixed_precision bf16"
  timeout -s TERM "$(left)" $launch scripts/train_fewstep.py --pretrained_model_name_or_path "$(model_path "$model")" \
    --nfe ${nfes//-/ } --rounds 1 --phase1_iters 0 --phase2_steps "${STEPS:-1000}" --train_batch_size 128 \
    --pool_size 8192 --pool_batch_size 1024 --use_ema --mixed_precision bf16 --channels_last --use_fused_adamw \
    --phase2_loss "$loss" --learning_rate "$lr" $([ "${COMPILE:-1}" = 1 ] && echo --compile_mode reduce-overhead) ${extra//,/ } \
    --fd_classifier .stage/fmnist-classifier --fd_data .stage/fashion-mnist --fd_samples "${FD_SAMPLES:-5000}" \
    --eval_samples 1024 --eval_steps "${EVAL_STEPS:-250}" --compare_nfe --no-compare_reference \
    --checkpointing_steps 100000 --pool_cache_dir "$W/pools" ${RESUME:+--resume_from_checkpoint latest} \
    --output_dir "$out" >> "$W/logs/$name.log" 2>&1
  local rc=$?
  stamp "$name rc=$rc: $(grep -o "'samples_per_s\(_recent\)\?': [0-9.]*" "$W/logs/$name.log" | tail -2 | tr '\n' ' ')" \
    "$(grep -o "'fd_nfe[0-9]*': [0-9.]*" "$W/logs/$name.log" | tail -${#nfes} | tr '\n' ' ')"
  grep -o "'global_step': [0-9]*\|'samples_per_s_recent': [0-9.]*\|'loss_max': [0-9.e+-]*\|'\(fd\|rmse\|rmse_pool\)_nfe[0-9]*': [0-9.]*" "$W/logs/$name.log" \
    | tr -d "'" | awk '/global_step/ {if (line) print line; line = $0; next} {line = line ", " $0} END {print line}'
  cp "$W/logs/$name.log" "$OUT/" 2>/dev/null
  if [ "${KEEP_MODEL:-0}" = 1 ] && [ -d "$out/unet" ]; then
    python3 -c "import sys, torch; from diffusers import UNet2DModel as U; p = sys.argv[1] + '/unet'; \
U.from_pretrained(p).to(torch.float16).save_pretrained(p)" "$out"
    tar czf "$OUT/tuned-$name.tar.gz" -C "$W/runs" --exclude='checkpoint-*' "$name"
    split_large "$OUT/tuned-$name.tar.gz"
  fi
}

t2i_train() {  # t2i:NFES:LR[:EXTRA]: LoRA (the default for these pipelines) on the fixture's prompts, guidance 5,
  # then every stock row and the output folder (its tables with its LoRA) through the pipeline
  IFS=: read -r _ nfes lr extra <<< "$1"
  local model=${T2I_MODEL:-assets/fmnist-t2i-sd}
  local name="t2i-$(basename "$model" | sed 's/^fmnist-t2i-//')-${nfes}-$lr${extra:+-${extra//[ ,=]/_}}"
  local out="$W/runs/$name"
  timeout -s TERM "$(( $(left) - ${T2I_EVAL_SECONDS:-120} ))" python3 scripts/train_fewstep.py \
    --pretrained_model_name_or_path "$model" --prompts_file examples/prompts/fmnist_t2i.txt \
    --guidance_scale 5 --nfe ${nfes//-/ } --rounds 1 --phase1_iters 0 --phase2_steps "${STEPS:-1000}" \
    --train_batch_size 128 --pool_size 8192 --pool_batch_size 1024 --use_ema --mixed_precision bf16 \
    --learning_rate "$lr" ${extra//,/ } --eval_samples 1024 --eval_steps "${EVAL_STEPS:-250}" \
    --checkpointing_steps 100000 ${RESUME:+--resume_from_checkpoint latest} --output_dir "$out" >> "$W/logs/$name.log" 2>&1
  local rc=$?
  stamp "$name rc=$rc: $(grep -o "'rmse_nfe[0-9]*': [0-9.]*" "$W/logs/$name.log" | tail -3 | tr '\n' ' ')"
  cp "$W/logs/$name.log" "$OUT/"
  [ "$rc" = 0 ] || { stamp "$name stopped before its end: not evaluated (RESUME=1 continues it)"; return; }
  timeout "$(left)" python3 benchmarks/t2i/evaluate_t2i.py --pipeline "$model" --scheduler-folder "$out" \
    --classifier .stage/fmnist-classifier --data .stage/fashion-mnist --n "${T2I_N:-2000}" --guidance 5 \
    --nfes ${T2I_NFES:-2 3 4 6} --out "$W/eval-$name" > "$W/logs/eval-$name.log" 2>&1
  stamp "eval $name rc=$?"; cat "$W/eval-$name/results.md" 2>/dev/null | head -40
  tar czf "$OUT/$name.tar.gz" -C "$W" "eval-$name" "logs/eval-$name.log" \
    $(cd "$W" && ls -d runs/$name/scheduler runs/$name/*.safetensors runs/$name/*.json runs/$name/README.md 2>/dev/null)
}

run_stage() {
  case $1 in
    profile) profile ;;  # alone: its timings must not share the GPU
    t2i:*) t2i_train "$1" ;;
    *) train "$1" ;;
  esac
}

if [ "${GPUS:-1}" -gt 1 ]; then  # stage k on GPU k mod GPUS; the stages of one GPU one after another
  [ "${NPROC:-1}" -gt 1 ] && { echo "GPUS and NPROC exclude each other" >&2; exit 2; }
  for g in $(seq 0 $((GPUS - 1))); do
    (export CUDA_VISIBLE_DEVICES=$g; k=0
     for stage in "$@"; do [ $((k % GPUS)) -eq "$g" ] && run_stage "$stage"; k=$((k + 1)); done) &
  done
  wait
else
  for stage in "$@"; do run_stage "$stage"; done
fi
stamp "done"
