#!/usr/bin/env bash
# One command on the lent GPU machine: build the CUDA configuration (sm_90a), run the GPU tests
# (tq_tests --gtest_filter='Gpu*') and the GEMM benchmark (ours vs cuBLASLt), print a table last.
#   TQ_PREBUILT=dir     use tq_tests/tq_bench from dir when they run here (skips the build)
#   TQ_BENCH_FILTER=re  benchmark filter (default: every gemm/ benchmark)
#   TQ_SKIP_TESTS=1     benchmark only
# Full logs and the benchmark JSON go to $OUT (the device tool returns them) or build-dev/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build-dev/out}
mkdir -p "$out"
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv,noheader || true
echo "commit: $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"

bin=""
if [[ -n "${TQ_PREBUILT:-}" && -x "$TQ_PREBUILT/tq_tests" ]] &&
   "$TQ_PREBUILT/tq_tests" --gtest_list_tests >/dev/null 2>&1 &&
   "$TQ_PREBUILT/tq_bench" --benchmark_list_tests >/dev/null 2>&1; then
  bin=$TQ_PREBUILT
  echo "== using prebuilt binaries from $bin"
else
  echo "== building (sm_${TQ_CUDA_ARCHITECTURES:-90a})"
  t0=$(date +%s)
  if cmake -S . -B build-dev -G Ninja -DTQ_CUDA=ON -DTQ_CUDA_ARCHITECTURES="${TQ_CUDA_ARCHITECTURES:-90a}" \
      -DTQ_TEST_DIRS=cuda -DTQ_BUILD_APPS=OFF -DCMAKE_BUILD_TYPE=Release >"$out/configure.log" 2>&1; then
    cmake --build build-dev -j "$(nproc)" --target tq_tests tq_bench >"$out/build.log" 2>&1 ||
      { grep -E "error|Error" "$out/build.log" | head -40; exit 1; }
    bin=build-dev/bin
  else
    # CMake too old to give nvcc 13 the C++20 dialect (seen with CMake 3.25): build directly.
    echo "   cmake configure failed ($(grep -m1 -E 'Error|error' "$out/configure.log")); plain nvcc build"
    mkdir -p build-dev/nvcc
    f="-std=c++20 -O3 -Iinclude -I. -gencode=arch=compute_90a,code=sm_90a"
    nvcc $f tests/cuda/*.cu -o build-dev/nvcc/tq_tests -lgtest -lgtest_main -lcublasLt -lpthread \
      >"$out/build.log" 2>&1 &
    nvcc $f bench/bench_gemm.cu -o build-dev/nvcc/tq_bench -lbenchmark -lbenchmark_main -lcublasLt \
      -lcublas -lpthread >"$out/build_bench.log" 2>&1 &
    wait %1 && wait %2 || { cat "$out"/build*.log | grep -E "error" | head -40; exit 1; }
    bin=build-dev/nvcc
  fi
  echo "   built in $(( $(date +%s) - t0 )) s"
fi

if command -v cuobjdump >/dev/null; then
  echo "HGMMA instructions in tq_bench: $(cuobjdump --dump-sass "$bin/tq_bench" | grep -c HGMMA)"
fi

status=0
if [[ -z "${TQ_SKIP_TESTS:-}" ]]; then
  echo "== GPU tests"
  "$bin/tq_tests" --gtest_filter='Gpu*' >"$out/tests.log" 2>&1 || status=1
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|worst|Expected|Which is|error" "$out/tests.log" | head -60
fi

echo "== GEMM benchmark"
"$bin/tq_bench" --benchmark_filter="${TQ_BENCH_FILTER:-^gemm/}" --benchmark_out="$out/bench_gemm.json" \
  --benchmark_out_format=json >"$out/bench.log" 2>&1 || { tail -20 "$out/bench.log"; status=1; }

# TQ_SWEEP="128 192 256": rerun our benchmarks (filter TQ_SWEEP_FILTER, default the M >= 1136 ones)
# with the sm90 tile width forced and no split-K, for calibrating the cost model; JSON per width.
if [[ -n "${TQ_SWEEP:-}" ]]; then
  for bn in $TQ_SWEEP; do
    TQ_GEMM_SM90_TILE_N=$bn TQ_GEMM_SM90_SPLIT=1 "$bin/tq_bench" \
      --benchmark_filter="${TQ_SWEEP_FILTER:-^gemm/tq/.*/(1136|4544)/}" \
      --benchmark_out="$out/sweep_$bn.json" --benchmark_out_format=json >"$out/sweep_$bn.log" 2>&1 ||
      { tail -5 "$out/sweep_$bn.log"; status=1; }
  done
  echo "== sweep done: $TQ_SWEEP"
fi

# TQ_NCU="re1 re2": profile one sm90 launch of each matching benchmark (kernel time, stalls).
# Benchmark names end in /iterations:7/manual_time: do not anchor the regex with $.
if [[ -n "${TQ_NCU:-}" ]] && command -v ncu >/dev/null; then
  for f in $TQ_NCU; do
    ncu --clock-control none -k regex:gemm_sm90 -s 40 -c 1 --section SpeedOfLight \
      --section WarpStateStats --section LaunchStats "$bin/tq_bench" --benchmark_filter="$f" \
      >"$out/ncu_$(echo "$f" | tr -c 'A-Za-z0-9' _).txt" 2>&1
    echo "-- ncu $f"
    grep -E "Duration|Compute \(SM\) Throughput|DRAM Throughput|Registers Per|Stall|Warp Cycles Per Issued" \
      "$out"/ncu_$(echo "$f" | tr -c 'A-Za-z0-9' _).txt | head -14
  done
fi

python3 - "$out/bench_gemm.json" <<'PY' | tee "$out/gemm_table.txt"
import json, math, sys
from collections import defaultdict
try:
    data = json.load(open(sys.argv[1]))
except Exception as e:
    print("no benchmark output:", e); sys.exit(0)
res = defaultdict(dict)
for b in data["benchmarks"]:
    parts = b["name"].split("/")
    if len(parts) < 6 or "TFLOPS" not in b: continue
    _, impl, op, M, K, N = parts[:6]
    res[(op, int(M), int(K), int(N))][impl] = b["TFLOPS"]
rows = sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][3]))
print(f"{'op':4} {'M':>5} {'K':>6} {'N':>6} {'tq TF/s':>8} {'cuBLAS':>8} {'ratio':>6}")
big = []
for (op, M, K, N), v in rows:
    if "tq" not in v or "cublas" not in v: continue
    r = v["tq"] / v["cublas"]
    if M >= 1136: big.append(((op, M, K, N), r))
    flag = "  <75%" if (M >= 1136 and r < 0.75) else ""
    print(f"{op:4} {M:5d} {K:6d} {N:6d} {v['tq']:8.1f} {v['cublas']:8.1f} {r:6.3f}{flag}")
if big:
    g = math.exp(sum(math.log(r) for _, r in big) / len(big))
    worst = min(big, key=lambda x: x[1])
    print(f"M>=1136: {len(big)} shapes, geometric mean ratio {g:.3f}, min {worst[1]:.3f} at {worst[0]}")
    small = [v["tq"] / v["cublas"] for (op, M, K, N), v in rows if M < 1136 and "tq" in v and "cublas" in v]
    if small:
        print(f"M<1136: {len(small)} shapes, geometric mean ratio {math.exp(sum(map(math.log, small))/len(small)):.3f}")
PY
grep -E "^\[  (PASSED|FAILED)" "$out/tests.log" 2>/dev/null | tail -3
exit $status
