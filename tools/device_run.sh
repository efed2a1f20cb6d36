#!/usr/bin/env bash
# One-command recipe for the lent GPU machine (the device tool of this workplace): configure and
# build the CUDA configuration for the H200 (sm_90a), run the GPU tests, run the memory-bound
# kernel benchmarks, copy the logs to $OUT and print a short table last.
#
#   run tool command:  cd .dev/cuda && bash tools/device_run.sh      (carry: [".dev"])
#   environment:       TQ_BENCH_FILTER (Google Benchmark regex), TQ_GTEST_FILTER (default Gpu*),
#                      TQ_SKIP_BENCH=1, TQ_JOBS,
#                      TQ_PREBUILT=dir: run dir/tq_tests and dir/tq_bench (built elsewhere with
#                      nvcc, libraries beside them) when they start here, skipping the ~1 min build
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
jobs=${TQ_JOBS:-$(nproc)}
export PATH="$PATH:/usr/local/cuda/bin"

{
  echo "== $(date -u +%FT%TZ)  commit $(cat .commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.log"

bin=build-dev/bin
if [[ -n "${TQ_PREBUILT:-}" ]] && LD_LIBRARY_PATH="$TQ_PREBUILT" "$TQ_PREBUILT/tq_tests" --gtest_list_tests >/dev/null 2>&1; then
  bin=$TQ_PREBUILT
  export LD_LIBRARY_PATH="$TQ_PREBUILT${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== using prebuilt binaries from $bin"
else
echo "== configure"
if ! cmake -S . -B build-dev -G Ninja -DTQ_CUDA=ON -DTQ_CUDA_ARCHITECTURES=90a -DTQ_BUILD_APPS=OFF \
    -DTQ_TEST_DIRS="core;ops;autograd;cuda" -DCMAKE_BUILD_TYPE=Release >"$OUT/configure.log" 2>&1; then
  tail -40 "$OUT/configure.log"
  echo "configure FAILED (full log in configure.log)"
  exit 2
fi

echo "== build (-j$jobs)"
start=$(date +%s)
if ! cmake --build build-dev -j "$jobs" >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  echo "build FAILED (full log in build.log)"
  exit 3
fi
echo "built in $(( $(date +%s) - start )) s"
fi

echo "== GPU tests"
test_rc=0
"$bin/tq_tests" --gtest_filter="${TQ_GTEST_FILTER:-Gpu*}" 2>&1 | tee "$OUT/gpu_tests.log" | \
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[==========\]|Failure|error|device 0" || true
test_rc=${PIPESTATUS[0]}

bench_rc=0
if [[ "${TQ_SKIP_BENCH:-0}" != 1 && -x "$bin/tq_bench" ]]; then
  echo "== benchmarks"
  "$bin/tq_bench" --benchmark_filter="${TQ_BENCH_FILTER:-BM_(memcpy|copy|convert|unary|binary|reduce|random)}" \
    --benchmark_out="$OUT/bench_memory.json" --benchmark_out_format=json >"$OUT/bench.log" 2>&1
  bench_rc=$?
  tail -5 "$OUT/bench.log"
fi

echo "== summary"
grep -E "^\[  (PASSED|FAILED) " "$OUT/gpu_tests.log" || echo "(no test summary)"
if [[ -f "$OUT/bench_memory.json" ]]; then
  python3 - "$OUT/bench_memory.json" <<'EOF'
import json, sys
runs = [b for b in json.load(open(sys.argv[1]))["benchmarks"] if "GB/s" in b]
ref = next((b["GB/s"] for b in runs if b["name"].startswith("BM_memcpy_d2d")), None)
print(f"{'benchmark':52s} {'us':>9s} {'GB/s':>8s} {'% memcpy':>9s}")
for b in runs:
    pct = f"{100 * b['GB/s'] / ref:8.1f}%" if ref else ""
    name = b["name"].split("/iterations")[0]
    print(f"{name:52s} {b['us']:9.1f} {b['GB/s']:8.0f} {pct:>9s}")
EOF
fi
echo "tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 ? 1 : (bench_rc != 0 ? 4 : 0) ))
