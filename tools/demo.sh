#!/usr/bin/env bash
# The end-to-end demo on the bundled sample (data/sample, made by tools/make_sample.py): installs what
# is missing, builds, then zero-shot eval -> QLoRA-style fine-tune -> fine-tuned eval on the sample's
# seed-42 test split, and prints the metric table. No network is needed once the packages are there;
# the GPU is used when one is present and the model runs on it, the CPU otherwise.
#
#   ./tools/demo.sh            outputs under runs/demo/
#   OUT=/tmp/x ./tools/demo.sh
# Knobs (environment): STEPS (train steps), JOBS (build jobs), DEVICE (cpu|cuda: skip the probe).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/runs/demo}
JOBS=${JOBS:-$(nproc)}
STEPS=${STEPS:-1200}
MODEL=$ROOT/data/sample/model
DATA=$ROOT/data/sample/risc
start=$(date +%s)
say() { printf '\n== %s (%ds)\n' "$*" $(( $(date +%s) - start )); }

say "setup"
./tools/setup.sh

cuda=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; then
  cuda=ON
fi
BUILD=$ROOT/build-demo
say "build (TQ_CUDA=$cuda)"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQ_CUDA=$cuda -DTQ_BUILD_TESTS=OFF \
  -DTQ_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD" -j "$JOBS" --target paligemma
PG=$BUILD/bin/paligemma

# The device: CUDA when the build has it and the model runs there (one caption as the probe).
if [[ -z ${DEVICE:-} ]]; then
  DEVICE=cpu
  if [[ $cuda == ON ]]; then
    probe=$(mktemp -d)
    "$PG" eval --model "$MODEL" --data "$DATA" --limit 1 --max-new-tokens 2 --out "$probe" --device cuda \
      --no-progress >/dev/null 2>&1 && DEVICE=cuda
    rm -rf "$probe"
  fi
fi
echo "device: $DEVICE"

rm -rf "$OUT"
mkdir -p "$OUT"
EVAL_FLAGS=(--data "$DATA" --split test --batch-size 8 --max-new-tokens 24 --device "$DEVICE")

say "zero-shot eval"
"$PG" eval --model "$MODEL" "${EVAL_FLAGS[@]}" --out "$OUT/zero_shot" >/dev/null

say "fine-tune ($STEPS steps)"
# The tiny model's activations are a few MB: gradient checkpointing (the recipe's default, same losses)
# would only cost time here.
"$PG" train --model "$MODEL" --data "$DATA" --out "$OUT/train" --device "$DEVICE" --dtype f32 --quant none \
  --max-steps "$STEPS" --batch-size 16 --grad-accum 1 --lr 2e-3 --lora-plus-ratio 16 --warmup-ratio 0.05 \
  --caption-strategy random --log-every 50 --save-every 0 --no-grad-checkpointing

say "fine-tuned eval"
"$PG" eval --model "$MODEL" --adapter "$OUT/train/adapter" "${EVAL_FLAGS[@]}" --compare "$OUT/zero_shot" \
  --out "$OUT/fine_tuned" >/dev/null

say "done"
python_free_table() {  # results.csv -> an aligned table, with awk only
  awk -F, 'NR==1{printf "%-10s", "run"; for(i=2;i<=NF;i++) printf " %8s", $i; printf "\n"; next}
           {printf "%-10s", $1; for(i=2;i<=NF;i++) printf " %8s", ($i==""?"n/a":sprintf("%.4f",$i)); printf "\n"}' "$1"
}
python_free_table "$OUT/fine_tuned/results.csv"
zs=$(awk -F, '$1=="baseline"{print $8}' "$OUT/fine_tuned/results.csv")
ft=$(awk -F, '$1=="finetuned"{print $8}' "$OUT/fine_tuned/results.csv")
awk -v z="$zs" -v f="$ft" 'BEGIN{ if (z > 0) printf "CIDEr: %.4f -> %.4f (%.1fx)\n", z, f, f/z;
                                  else printf "CIDEr: %.4f -> %.4f (zero-shot scores 0)\n", z, f }'
echo
echo "results:     $OUT/fine_tuned/results.json (both runs), $OUT/fine_tuned/results.csv"
echo "predictions: $OUT/zero_shot/predictions.jsonl, $OUT/fine_tuned/predictions.jsonl"
echo "figure:      $OUT/fine_tuned/qualitative.png"
curves=$(ls "$OUT"/train/*.png 2>/dev/null | tr '\n' ' ' || true)
echo "curves:      ${curves:-(none written)} logs: $OUT/train/log.csv"
echo "adapter:     $OUT/train/adapter"
echo "total: $(( $(date +%s) - start ))s"
