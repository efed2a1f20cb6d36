#!/usr/bin/env bash
# The NF4 opt-in paths against the defaults on the lent device, in one call (after
# tools/device_build.sh staged .dev/ here):
#     run "bash tools/device_nf4_ab.sh"   carry [".dev"]
# 1. GpuNf4* tests (they run every path: TQ_NF4_GEMV_X=tc and TQ_NF4_DEQ_BULK=1 included);
# 2. NF4 dequantize (bf16 out) vs a same-size copy: per-thread stores (default) and bulk copies
#    through shared memory (TQ_NF4_DEQ_BULK=1);
# 3. the M = 1 product vs cuBLAS bf16: the x-stationary kernel (default), gemv_tc_kernel everywhere
#    (TQ_NF4_GEMV_X=tc; tc3: with TQ_NF4_TC_DEPTH=3) and where launch_tc_for takes the shape (auto);
# 4. Nsight Compute on gemv_tc_kernel at 2048 → 16384 and on dequantize_bulk_kernel at 2048 × 16384
#    (tools/device_ncu.sh; full reports under $OUT).
# Logs under $OUT; a short table last: vs_copy per dequantize shape, speedup per M = 1 shape and
# their geometric mean, and the geometric mean an ideal kernel would reach (bound_geomean).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$ROOT/.dev/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$PATH:/usr/local/cuda/bin"
[[ -x .dev/bin/tq_tests ]] || { echo "no .dev/bin: run tools/device_build.sh here first and carry .dev"; exit 2; }
src=$(cat .dev/SOURCE_DIR)
if [[ $src != "$ROOT" && ! -e $src ]]; then mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src"; fi
mkdir -p build-dev && ln -sfn "$ROOT/.dev/bin" build-dev/bin
B=$ROOT/.dev/bin
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "== $gpu, build $(tr '\n' ' ' <.dev/COMMIT)"

timeout 300 "$B/tq_tests" --gtest_filter='GpuNf4*' >"$OUT/nf4-tests.log" 2>&1
echo "== GpuNf4* tests: rc $?, $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$OUT/nf4-tests.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \] ' "$OUT/nf4-tests.log" | head -10

# name → counter value, from Google Benchmark's console lines (counters carry k/M suffixes).
counter() {  # counter LOG NAME_PREFIX COUNTER
  grep -E "^$2" "$1" | sed -E "s|.*$3=([0-9.]+[kM]?).*|\\1|" | tr '\n' ' '
}
for bulk in 0 1; do
  TQ_NF4_DEQ_BULK=$bulk "$B/tq_bench" --benchmark_filter='nf4_dequantize/bf16/' >"$OUT/nf4-deq-bulk$bulk.log" 2>&1
done
for x in reg tc tc3 auto; do  # tc3: gemv_tc_kernel with a 3-item ring (TQ_NF4_TC_DEPTH=3, 12 warps)
  TQ_NF4_GEMV_X=${x%3} TQ_NF4_TC_DEPTH=$([[ $x == tc3 ]] && echo 3 || echo 2) "$B/tq_bench" \
    --benchmark_filter='nf4_linear/1/|nf4_linear_geomean_m1|nf4_launch_floor/1' >"$OUT/nf4-m1-$x.log" 2>&1
done
timeout 120 bash tools/device_ncu.sh gemv_tc 'nf4_linear/1/2048/16384/' tc TQ_NF4_GEMV_X=tc | tail -22
timeout 120 bash tools/device_ncu.sh dequantize_bulk 'nf4_dequantize/bf16/2048/16384/' deq-bulk TQ_NF4_DEQ_BULK=1 | tail -22

echo "== $gpu: NF4 dequantize, bf16 out, vs same-size copy (2048x16384 16384x2048 2048x2048 1152x4304 4304x1152)"
echo "per-thread stores (default):    $(counter "$OUT/nf4-deq-bulk0.log" nf4_dequantize vs_copy)"
echo "bulk copies (TQ_NF4_DEQ_BULK=1): $(counter "$OUT/nf4-deq-bulk1.log" nf4_dequantize vs_copy)"
echo "memset GB/s (write-only rate):  $(counter "$OUT/nf4-deq-bulk0.log" nf4_dequantize write_GB/s)"
echo "== $gpu: NF4 M = 1 speedup over cuBLAS bf16 (same five shapes), then the geometric mean"
for x in reg tc tc3 auto; do
  echo "TQ_NF4_GEMV_X=$x: $(counter "$OUT/nf4-m1-$x.log" nf4_linear/1/ speedup) | $(counter "$OUT/nf4-m1-$x.log" nf4_linear_geomean geomean_speedup)"
done
echo "ideal kernel (bytes at the copy rate + launch floor): geometric mean $(counter "$OUT/nf4-m1-reg.log" nf4_linear_geomean bound_geomean)"
