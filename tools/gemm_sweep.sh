#!/usr/bin/env bash
# Calibration sweep for the sm_90a GEMM's cost model (kernels/gemm/gemm_sm90.cuh `choose`): runs the
# GEMM benchmarks matching FILTER once per forced (tile width, K splits) through the kernel's tuning
# knobs TQ_GEMM_SM90_TILE_N / TQ_GEMM_SM90_SPLIT, cuBLASLt re-measured in every run, and prints
# tq / cuBLAS per shape and configuration, the model's own choice ("auto") first.
#
#   bash tools/gemm_sweep.sh ['gemm/(tq|cublas)/dw/4544/2048/256$']     on the device, after tools/device.sh's setup
#   TQ_SWEEP_BN="128 256" TQ_SWEEP_SPLITS="1 2 4"                          narrow the grid
set -uo pipefail
cd "$(dirname "$0")/.."
FILTER=${1:-'gemm/(tq|cublas)/(fwd|dx|dw)/(1136|4544)/2048/256$'}
B=${TQ_BENCH_BIN:-.dev/bin/tq_bench}
export LD_LIBRARY_PATH="$PWD/.dev/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
tmp=$(mktemp -d)
run() {  # label, then env assignments
  local label=$1
  shift
  env "$@" "$B" --benchmark_filter="$FILTER" --benchmark_out="$tmp/$label.json" --benchmark_out_format=json \
    >/dev/null 2>&1 || echo "sweep: $label failed" >&2
}
run auto
for bn in ${TQ_SWEEP_BN:-128 192 256}; do
  for s in ${TQ_SWEEP_SPLITS:-1 2 3 4 6 8}; do run "bn${bn}_s${s}" TQ_GEMM_SM90_TILE_N=$bn TQ_GEMM_SM90_SPLIT=$s; done
done
python3 - "$tmp" <<'EOF'
import json, os, sys
d = sys.argv[1]
rows = {}
labels = ["auto"] + sorted((f[:-5] for f in os.listdir(d) if f != "auto.json"), key=lambda s: (int(s[2:].split("_")[0]), int(s.split("_s")[1])))
for lab in labels:
    try:
        runs = json.load(open(os.path.join(d, lab + ".json")))["benchmarks"]
    except Exception:
        continue
    t = {}
    for b in runs:
        p = b["name"].split("/")
        if "us" in b:
            t[(p[1], "/".join(p[2:6]))] = b["us"]
    for (impl, shape), us in t.items():
        if impl == "tq" and ("cublas", shape) in t:
            rows.setdefault(shape, []).append((lab, t[("cublas", shape)] / us, us))
for shape, rs in rows.items():
    best = max(rs, key=lambda r: r[1])
    print(f"{shape:22s} auto {rs[0][1]:.3f} ({rs[0][2]:.1f} us) | best {best[0]} {best[1]:.3f} ({best[2]:.1f} us) | " +
          " ".join(f"{l}:{r:.2f}" for l, r, _ in rs[1:]))
EOF
rm -rf "$tmp"
