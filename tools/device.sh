#!/usr/bin/env bash
# The one command for the lent H200 (after tools/device_build.sh staged .dev/ here):
#     run "bash tools/device.sh"   with carry [".dev"]
# Steps (TQ_STEPS, default "tests bench model"), logs and JSON under $OUT, a short table last:
#   tests   every GPU test (tq_tests --gtest_filter='Gpu*': CUDA ops vs the CPU, GEMM, attention, NF4,
#           the PaliGemma model vs the HF/peft fixtures on CUDA)
#   bench   Google Benchmark: GEMM vs cuBLASLt, memory-bound kernels vs a D2D copy, attention vs a
#           cuBLAS composite, NF4 GEMV vs cuBLAS, fused linear+CE (TQ_BENCH_FILTER narrows it)
#   model   full-size random-init PaliGemma-3B / PaliGemma 2 3B (`paligemma init`): generate in bf16
#           and NF4 (tokens/s, peak memory), the full QLoRA recipe for TQ_TRAIN_STEPS (default 50)
#           steps (gradient checkpointing on, as the notebook; TQ_TRAIN_FLAGS adds flags, e.g.
#           --no-grad-checkpointing), then `eval --limit 500` with the adapter
#   hf      (not by default) the HF transformers+peft+bitsandbytes reference training loop on the model
#           step's PaliGemma-3B (tools/bench_hf_train.py): samples/s for the ratio
# TQ_GTEST_FILTER overrides the test filter; TQ_ARCHS (default "pg1 pg2") the model step's models
# (train and eval need pg1); TQ_PROFILE=1 makes train print where a step's time goes.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
STEPS=${TQ_STEPS:-tests bench model}
export LD_LIBRARY_PATH="$ROOT/.dev/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0
[[ -x .dev/bin/tq_tests ]] || { echo "no .dev/bin: run tools/device_build.sh here first and carry .dev"; exit 2; }
src=$(cat .dev/SOURCE_DIR)
if [[ $src != "$ROOT" && ! -e $src ]]; then mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src"; fi
mkdir -p build-dev && ln -sfn "$ROOT/.dev/bin" build-dev/bin  # the tests' TQ_BIN_DIR
B=$ROOT/.dev/bin
{
  echo "== $(date -u +%FT%TZ) commit $(tr '\n' ' ' <.dev/COMMIT)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  echo "libnccl: $(ldconfig -p | grep -o 'libnccl.so[^ ]*' | head -1) $(ls /usr/local/cuda/lib*/libnccl.so* 2>/dev/null | head -1)"
} 2>&1 | tee "$OUT/env.log"
summary=()

if [[ " $STEPS " == *" tests "* ]]; then
  echo "== GPU tests"
  timeout "${TQ_TEST_TIMEOUT:-420}" "$B/tq_tests" --gtest_filter="${TQ_GTEST_FILTER:-Gpu*}" >"$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^\[  FAILED  \]|Failure|Expected|Which is|actual|\[ info \]" "$OUT/tests.log" | head -80
  summary+=("tests: $(grep -E '^\[  PASSED  \]|^\[  FAILED  \] [0-9]+ test' "$OUT/tests.log" | tr '\n' ' ') (rc $rc)")
fi

if [[ " $STEPS " == *" bench "* ]]; then
  echo "== benchmarks"
  [[ -x $B/tq_bench ]] || B_BENCH=$ROOT/.devb
  timeout "${TQ_BENCH_TIMEOUT:-540}" "${B_BENCH:-$B}/tq_bench" --benchmark_filter="${TQ_BENCH_FILTER:-.}" --benchmark_out="$OUT/bench.json" \
    --benchmark_out_format=json >"$OUT/bench.log" 2>&1 || tail -20 "$OUT/bench.log"
  python3 tools/bench_table.py "$OUT/bench.json" | tee "$OUT/bench_table.txt"
  summary+=("bench: $(grep -c . "$OUT/bench_table.txt") lines in bench_table.txt")
fi

if [[ " $STEPS " == *" model "* ]]; then
  echo "== model (full-size random-init)"
  M=/tmp/tq_model
  mkdir -p $M
  python3 tools/sample_data.py $M/risc 5000 $M/img 16 >/dev/null
  for arch in ${TQ_ARCHS:-pg1 pg2}; do
    "$B/paligemma" init --arch $arch --out $M/$arch 2>&1 | tail -1
    "$B/paligemma" preprocess --model $M/$arch --input $M/img/batch.jsonl --out $M/batch_$arch.safetensors --padding left \
      >/dev/null
    for q in none nf4; do
      line=$(timeout 120 "$B/paligemma" generate --model $M/$arch --batch $M/batch_$arch.safetensors --max-new-tokens 64 \
        --device cuda --dtype bf16 --quant $q 2>&1 >/dev/null | grep "^generate:")
      echo "$arch $q: ${line:-(failed: rerun by hand for the error)}" | tee -a "$OUT/model.log"
      summary+=("generate $arch bf16/$q: $line")
    done
  done
  if [[ " ${TQ_ARCHS:-pg1 pg2} " == *" pg1 "* ]]; then
    t0=$(date +%s)
    timeout "${TQ_TRAIN_TIMEOUT:-240}" "$B/paligemma" train --model $M/pg1 --data $M/risc --out $M/run --device cuda --max-steps "${TQ_TRAIN_STEPS:-50}" \
      --log-every 10 ${TQ_TRAIN_FLAGS:-} >"$OUT/train.log" 2>&1
    echo "train rc $? in $(( $(date +%s) - t0 )) s"
    grep -E "^train:|^step" "$OUT/train.log" | tail -8 | tee -a "$OUT/model.log"
    cp $M/run/log.csv "$OUT/train_log.csv" 2>/dev/null
    summary+=("train pg1: $(grep -E '^train: .*trainable' "$OUT/train.log" | head -1)")
    summary+=("train pg1: $(grep -E '^step' "$OUT/train.log" | tail -1)")
    summary+=("train pg1: $(grep -E '^train: done' "$OUT/train.log")")
    t0=$(date +%s)
    timeout "${TQ_EVAL_TIMEOUT:-240}" "$B/paligemma" eval --model $M/pg1 --adapter $M/run/adapter --data $M/risc --limit 500 --batch-size 50 \
      --device cuda --dtype bf16 --quant nf4 --max-new-tokens 64 --out $M/eval --no-progress >"$OUT/eval.log" 2>&1
    echo "eval rc $? in $(( $(date +%s) - t0 )) s"
    tail -3 "$OUT/eval.log"
    summary+=("eval pg1 500: $(grep -E '^eval:' "$OUT/eval.log")")
  fi
fi

if [[ " $STEPS " == *" hf "* ]]; then
  # The Python reference (transformers + peft + bitsandbytes, the notebook's recipe) on the same GPU,
  # model and data: its samples/s for the ratio in bench/RESULTS.md. Needs the model step's pg1 and
  # bitsandbytes (carry a folder holding it and set PYTHONPATH, e.g. .whl/site).
  echo "== HF reference training throughput"
  line=$(timeout "${TQ_HF_TIMEOUT:-300}" python3 tools/bench_hf_train.py /tmp/tq_model/pg1 /tmp/tq_model/risc "${TQ_HF_STEPS:-12}" 2>"$OUT/hf.err" | tail -1)
  echo "${line:-(failed: see hf.err)}" | tee "$OUT/hf.log"
  tail -5 "$OUT/hf.err"
  summary+=("hf reference: ${line:-failed}")
fi

echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
