#!/usr/bin/env bash
# The Phase-1 study on one GPU, in stages (WITH_TRAIN=1 bash tools/gpu_stage.sh first; carry .whl and .stage):
#   bash benchmarks/phase1_gpu.sh train fixture     # train the small v-prediction and flow models; Phase 1 on the fixture
#   bash benchmarks/phase1_gpu.sh vpred flow        # Phase 1 on those models (kept in .gpu_work/ or carried in .stage/models)
#   bash benchmarks/phase1_gpu.sh t2i-sd t2i-sd3    # train and score the tiny text-to-image fixtures (benchmarks/t2i)
#   bash benchmarks/phase1_gpu.sh t2i-learned-sd    # optimize on assets/fmnist-t2i-sd from its prompts, score beside stock
#   bash benchmarks/phase1_gpu.sh t2i-learned-sd3   # the same on assets/fmnist-t2i-sd3 (once vendored)
# Training stages read TRAIN_SUBSET (default .stage/train50k: train-images-idx3-ubyte.xz, train-labels-idx1-ubyte.gz);
# .stage/train16k (16,000 images, 6 MB) fits the 64 MiB carry beside .whl, the classifier and the test split.
#   bash benchmarks/phase1_gpu.sh bench-fixture diag-fixture   # benchmark / diagnostics of a run carried in .stage/runs
# A model stage runs, with default settings:
#   diffusers-fewstep optimize --model M --nfe 3 4 5 6 8 10 --output-dir RUN [--data TRAIN]
#     (--data with the 50k training split when .stage/train50k is carried: every candidate also gets its fd_data
#      score, the table is still kept by fd_self; the diagnostics' FD uses the t10k test split)
#   diffusers-fewstep benchmark --model M --learned RUN --n 5000   (every diffusers scheduler of the family, same noises)
#   python benchmarks/phase1_diagnostics.py                          (FD of every candidate: which measure picks best;
#     FEATURE_SIGMAS, default "0.1 0.3 1": also fd_self with the model's features read at these σ's)
# Outputs: .gpu_work/ on the GPU machine, packed into $OUT/<stage>.tar.gz (and $OUT/model-<name>.tar.gz for models).
set -uo pipefail
cd "$(dirname "$0")/.."
W=.gpu_work
FEATURE_SIGMAS=${FEATURE_SIGMAS:-0.1 0.3 1}
mkdir -p "$W/logs" "$W/models" "$W/runs" "$W/bench" "$W/diag" "${OUT:=$W/out}"
source tools/gpu_site.sh
export PYTHONUNBUFFERED=1
CLI="python3 -m diffusers_fewstep.cli"
NFES=${NFES:-"3 4 5 6 8 10"}
VP_ROWS="ddim_leading ddim_trailing euler_karras dpmpp2m_karras dpmpp2m_lu unipc_bh2 unipc_bh2_karras"
FLOW_ROWS="flow_euler flow_euler_karras flow_dpmpp2m flow_unipc"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

model_path() {  # the fixture is vendored; trained models live in .gpu_work/models or come carried in .stage/models
  case $1 in
    fixture) echo assets/fmnist-ddpm-eps ;;
    *) [ -d "$W/models/$1" ] && echo "$W/models/$1" || echo ".stage/models/$1" ;;
  esac
}

TRAIN_SUBSET=${TRAIN_SUBSET:-.stage/train50k}
train_data() {  # the carried training subset as the IDX .gz files the trainers read
  mkdir -p "$W/train"
  [ -f "$W/train/train-images-idx3-ubyte.gz" ] || python3 - "$W/train" "$TRAIN_SUBSET" <<'PY'
import gzip, lzma, os, shutil, sys
out, subset = sys.argv[1:]
with open(f"{subset}/train-images-idx3-ubyte.xz", "rb") as f, gzip.open(f"{out}/train-images-idx3-ubyte.gz", "wb", 1) as g:
    g.write(lzma.decompress(f.read()))
shutil.copy(f"{subset}/train-labels-idx1-ubyte.gz", out)
for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # absent where only fd_statistics.npz travels:
    if os.path.exists(f".stage/fashion-mnist/{name}"):                     # the DPM trainer reads the train split alone
        shutil.copy(f".stage/fashion-mnist/{name}", out)
PY
}

train_model() {  # name, then the fixture builder's options
  local name=$1; shift
  OUT="$W/models/$name" python3 benchmarks/family_models/train_small_dpm.py --tool .stage/tools/train_reference_dpm.py \
    dpm --out "$W/models/$name" --data "$W/train" --seconds "${TRAIN_SECONDS:-240}" "$@" > "$W/logs/train-$name.log" 2>&1
  stamp "trained $name: $(tail -1 "$W/logs/train-$name.log")"
  python3 -c "import sys, torch; from diffusers import UNet2DModel as U; p = sys.argv[1] + '/unet'; \
U.from_pretrained(p).to(torch.float16).save_pretrained(p)" "$W/models/$name"  # fp16 weights, as the fixture's
  tar czf "$OUT/model-$name.tar.gz" -C "$W/models" "$name"
}

phase1() {  # one model: optimize (defaults), benchmark, diagnostics
  local name=$1 model rows data=""
  model=$(model_path "$name")
  rows=$VP_ROWS; [ "$name" = flow ] && rows=$FLOW_ROWS
  [ -f "$W/train/train-images-idx3-ubyte.gz" ] && data="$W/train"
  stamp "optimize $name"
  $CLI optimize --model "$model" --nfe $NFES --output-dir "$W/runs/$name" --quiet ${data:+--data "$data"} ${OPT_ARGS:-} \
    > "$W/logs/optimize-$name.log" 2>&1
  stamp "optimize $name done: rc $?"; tail -8 "$W/logs/optimize-$name.log"
  if [ -z "${SKIP_BENCH:-}" ]; then
    $CLI benchmark --model "$model" --learned "$W/runs/$name" --n "${N:-5000}" --nfes $NFES --rows $rows sigma_ddim_trailing \
      --classifier .stage/fmnist-classifier --data .stage/fashion-mnist --out-dir "$W/bench/$name" > "$W/logs/benchmark-$name.log" 2>&1
    stamp "benchmark $name done: rc $?"; tail -12 "$W/bench/$name/results.md"
  fi
  python3 benchmarks/phase1_diagnostics.py --model "$model" --run "$W/runs/$name" --classifier .stage/fmnist-classifier \
    --data .stage/fashion-mnist --n "${DIAG_N:-2000}" --feature-sigmas $FEATURE_SIGMAS --out "$W/diag/$name.json" \
    > "$W/logs/diag-$name.log" 2>&1
  stamp "diagnostics $name done: rc $?"; cat "$W/logs/diag-$name.log"
  pack "$name"
}

t2i() {  # train one tiny text-to-image fixture (benchmarks/t2i) and score the stock schedulers on it
  local kind=$1 dir="$W/t2i"
  [ -f "$W/train/t10k-images-idx3-ubyte.gz" ] || { stamp "t2i $kind: needs the test split (carry .stage/fashion-mnist, not fd_statistics.npz alone)"; return 1; }
  mkdir -p "$dir"
  python3 benchmarks/t2i/train_tiny_t2i.py --kind "$kind" --data "$W/train" --out "$dir/fmnist-t2i-$kind" \
    --seconds "${T2I_SECONDS:-300}" --classifier .stage/fmnist-classifier > "$W/logs/t2i-train-$kind.log" 2>&1
  stamp "t2i $kind trained: rc $?"
  python3 benchmarks/t2i/evaluate_t2i.py --pipeline "$dir/fmnist-t2i-$kind" --classifier .stage/fmnist-classifier \
    --data "$W/train" --n "${T2I_N:-2000}" --guidance 5 --out "$dir/eval-$kind" > "$W/logs/t2i-eval-$kind.log" 2>&1
  stamp "t2i $kind evaluated: rc $?"; cat "$dir/eval-$kind/results.md" 2>/dev/null | head -30
  tar czf "$OUT/t2i-$kind.tar.gz" -C "$dir" "fmnist-t2i-$kind" "eval-$kind" -C "$PWD/$W/logs" "t2i-train-$kind.log" "t2i-eval-$kind.log"
}

bench() {  # benchmark only, on a run carried in .stage/runs/<name> (EXTRA_ROWS: e.g. the GITS/AYS rows)
  local name=$1 model rows
  model=$(model_path "$name")
  rows=$VP_ROWS; [ "$name" = flow ] && rows=$FLOW_ROWS
  $CLI benchmark --model "$model" --learned ".stage/runs/$name" --n "${N:-5000}" --nfes $NFES --rows $rows sigma_ddim_trailing \
    ${EXTRA_ROWS:-} --classifier .stage/fmnist-classifier --data .stage/fashion-mnist \
    --out-dir "$W/bench/${W_BENCH:-$name}" > "$W/logs/benchmark-${W_BENCH:-$name}.log" 2>&1
  stamp "benchmark ${W_BENCH:-$name} done: rc $?"; tail -9 "$W/bench/${W_BENCH:-$name}/results.md"
  pack "${W_BENCH:-$name}" "bench-${W_BENCH:-$name}"
}

diag() {  # diagnostics only, on a run carried in .stage/runs/<name>
  local name=$1
  python3 benchmarks/phase1_diagnostics.py --model "$(model_path "$name")" --run ".stage/runs/$name" \
    --classifier .stage/fmnist-classifier --data .stage/fashion-mnist --n "${DIAG_N:-2000}" \
    --feature-sigmas $FEATURE_SIGMAS --out "$W/diag/$name.json" \
    > "$W/logs/diag-$name.log" 2>&1
  stamp "diagnostics $name done: rc $?"; cat "$W/logs/diag-$name.log"
  pack "$name" "diag-$name"
}

t2i_learned() {  # learn tables for a vendored text-to-image fixture (sd, sd3) from its prompts, score them beside stock
  local kind=$1 dir="$W/t2i" nfes=${T2I_NFES:-"3 4 6 8"} model="assets/fmnist-t2i-$1"
  mkdir -p "$dir"
  [ -d "$model" ] || model="$dir/fmnist-t2i-$kind"  # trained earlier in this call
  $CLI optimize --model "$model" --prompts-file examples/prompts/fmnist_t2i.txt --guidance-scale 5 \
    --nfe $nfes --output-dir "$dir/learned-$kind" --quiet ${OPT_ARGS:-} > "$W/logs/t2i-optimize-$kind.log" 2>&1
  stamp "t2i optimize $kind: rc $?"; tail -8 "$W/logs/t2i-optimize-$kind.log"
  python3 benchmarks/t2i/evaluate_t2i.py --pipeline "$model" --scheduler-folder "$dir/learned-$kind" \
    --classifier .stage/fmnist-classifier --data .stage/fashion-mnist --n "${T2I_N:-2000}" --guidance 5 --nfes $nfes \
    --out "$dir/eval-learned-$kind" > "$W/logs/t2i-eval-learned-$kind.log" 2>&1
  stamp "t2i learned $kind evaluated: rc $?"; cat "$dir/eval-learned-$kind/results.md" 2>/dev/null | head -40
  pack_t2i_learned "$kind"
}

pack_t2i_learned() { tar czf "$OUT/t2i-learned-$1.tar.gz" -C "$W" "t2i/learned-$1" "t2i/eval-learned-$1" logs 2>/dev/null; }

pack() {  # this stage's runs, benchmark, diagnostics and logs, as far as they got
  tar czf "$OUT/phase1-${2:-$1}.tar.gz" -C "$W" $(cd "$W" && ls -d runs/$1 bench/$1 diag/$1.json 2>/dev/null) logs
}

case " $* " in
  *" train "*|*" t2i-sd "*|*" t2i-sd3 "*) train_data ;;
  *) [ -f "$TRAIN_SUBSET/train-images-idx3-ubyte.xz" ] && train_data ;;  # optimize --data (fd_data scores)
esac
for stage in "$@"; do
  case $stage in
    train)
      train_model vpred --beta squaredcos_cap_v2 --pred v_prediction &
      train_model flow --pred flow --shift 3.0 &
      ;;
    t2i-learned-sd|t2i-learned-sd3) t2i_learned "${stage#t2i-learned-}" & ;;
    t2i-sd|t2i-sd3) t2i "${stage#t2i-}" & ;;
    bench-*) bench "${stage#bench-}" & ;;
    peers-fixture)  # the re-implemented optimisers beside two diffusers rows, in their own process
      (VP_ROWS="ddim_trailing unipc_bh2" EXTRA_ROWS="gits_ipndm gits_euler ays_dpmpp_2m ays_euler" W_BENCH=peers \
        bench fixture) & ;;
    diag-*) diag "${stage#diag-}" & ;;
    *) phase1 "$stage" & ;;
  esac
done
# wait, but pack whatever exists before the call's 600 s run out (DEADLINE seconds after the start)
while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - T0 )) -lt "${DEADLINE:-560}" ]; do sleep 5; done
if [ -n "$(jobs -rp)" ]; then
  stamp "deadline: stopping $(jobs -rp | wc -l) stage(s) and packing what they wrote"
  for stage in "$@"; do case $stage in t2i-learned-*) pack_t2i_learned "${stage#t2i-learned-}" ;; train|t2i-*) ;; bench-*|diag-*) pack "${stage#*-}" "$stage" ;; *) pack "$stage" ;; esac; done
  kill $(jobs -rp) 2>/dev/null
fi
stamp "done"
ls -la "$OUT"
