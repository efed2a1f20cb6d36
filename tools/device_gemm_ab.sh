#!/usr/bin/env bash
# A/B of the GEMM benchmarks on the lent device (after tools/device_build.sh staged .dev/ here): the
# same tq_bench binary run twice in one call, as built (A) and with one environment setting (B),
# then tools/bench_compare.py side by side (ratios to cuBLASLt measured in each run):
#     run "bash tools/device_gemm_ab.sh TQ_GEMM_SM90_SPLIT_CLUSTER=1 '^gemm/.*/(1136|4544)/'"  carry [".dev"]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
setting=$1 filter=${2:-'^gemm/.*/(1136|4544)/'}
export LD_LIBRARY_PATH="$ROOT/.dev/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
B=$ROOT/.dev/bin
timeout "${TQ_AB_TIMEOUT:-240}" "$B/tq_bench" --benchmark_filter="$filter" --benchmark_out="$OUT/ab-A.json" \
  --benchmark_out_format=json >"$OUT/ab-A.log" 2>&1 || tail -5 "$OUT/ab-A.log"
env "$setting" timeout "${TQ_AB_TIMEOUT:-240}" "$B/tq_bench" --benchmark_filter="$filter" \
  --benchmark_out="$OUT/ab-B.json" --benchmark_out_format=json >"$OUT/ab-B.log" 2>&1 || tail -5 "$OUT/ab-B.log"
python3 tools/bench_compare.py "${TQ_AB_LABEL_A:-built}=$OUT/ab-A.json" "$setting=$OUT/ab-B.json" \
  --min-m "${TQ_AB_MIN_M:-1136}" ${TQ_AB_ALL:+--all}
