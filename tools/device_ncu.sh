#!/usr/bin/env bash
# Profiles one kernel of a benchmark with Nsight Compute on the lent device (after
# tools/device_build.sh staged .dev/ here):
#     run "bash tools/device_ncu.sh KERNEL_REGEX BENCH_FILTER [LABEL] [ENV=VALUE ...]"  carry [".dev"]
# e.g. bash tools/device_ncu.sh gemv 'nf4_linear/1/2048/16384/' gemv64 TQ_NF4_GEMV_X=global
# (benchmark names need a trailing '/' to stop at one shape). The 21st launch of a kernel matching
# KERNEL_REGEX is profiled (past warm-up); the full report goes to $OUT/ncu-LABEL.txt and a short
# summary (time, DRAM rate, issue activity, L1/shared wavefronts, the stall reasons per issued
# instruction) to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
kernel=$1 filter=$2 label=${3:-profile}
shift $(($# < 3 ? $# : 3))
export LD_LIBRARY_PATH="$ROOT/.dev/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$PATH:/usr/local/cuda/bin"
src=$(cat .dev/SOURCE_DIR)
if [[ $src != "$ROOT" && ! -e $src ]]; then mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src"; fi
report=$OUT/ncu-$label.txt
env "$@" ncu --kernel-name "regex:$kernel" --launch-skip 20 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section MemoryWorkloadAnalysis_Tables \
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio',smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum \
  .dev/bin/tq_bench --benchmark_filter="$filter" >"$report" 2>&1
rc=$?
echo "== ncu $label ($kernel, $filter${*:+, $*}): rc $rc"
grep -E "^  [a-z_]+.*(void|<<<)|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Issued Warp Per Scheduler|Eligible Warps|Active Warps Per Scheduler|Achieved Occupancy|Registers Per Thread|inst_executed.sum|wavefronts_mem_shared|sectors_pipe_lsu|requests_pipe_lsu|Warp Cycles Per Issued" "$report" | head -24
# The stall reasons worth reading (≥ 0.3 cycles per issued instruction), largest first.
grep -E "issue_stalled_.*ratio" "$report" | awk '{v=$NF; if (v+0 >= 0.3) print v, $1}' | sort -rn | head -10
