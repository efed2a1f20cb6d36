#!/usr/bin/env python3
"""GEMM ratios (ours / cuBLASLt, same run) of two or more tq_bench JSON files side by side, e.g. the
same binary with and without a kernel option (TQ_GEMM_SM90_SPLIT_CLUSTER=1) in one device call:

  python3 tools/bench_compare.py cluster=a.json global=b.json [--min-m 1136] [--all]

Prints the shapes whose ratio differs by more than 3% between the files or is below 0.75 in any
(every shape with --all), then the geometric mean and minimum of each file over M >= --min-m.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_table import gemm_pairs, load_runs  # noqa: E402


def ratios(path):
    """{(op, M, K, N): (tq / cuBLAS, tq us, cuBLAS us)} of one JSON."""
    return {k: (v["tq"]["TFLOPS"] / v["cublas"]["TFLOPS"], v["tq"].get("us", 0.0), v["cublas"].get("us", 0.0))
            for k, v in gemm_pairs(load_runs(path)).items()}


def main(argv):
    min_m, show_all, files = 1136, False, []
    it = iter(argv)
    for a in it:
        if a == "--min-m":
            min_m = int(next(it))
        elif a == "--all":
            show_all = True
        else:
            label, _, path = a.rpartition("=")
            files.append((label or path, ratios(path)))
    if not files:
        sys.exit(__doc__)
    keys = sorted(set().union(*[r.keys() for _, r in files]), key=lambda k: (k[1], k[0], k[2], k[3]))
    keys = [k for k in keys if k[1] >= min_m]
    print(f"{'op/M/K/N':22s} " + " ".join(f"{l[:14]:>22s}" for l, _ in files) + "   (ratio, tq us, cuBLAS us)")
    for k in keys:
        vals = [r.get(k) for _, r in files]
        rs = [v[0] for v in vals if v]
        if not show_all and rs and max(rs) / min(rs) < 1.03 and min(rs) >= 0.75:
            continue
        cells = " ".join(f"{v[0]:6.3f} {v[1]:7.1f} {v[2]:6.1f}" if v else f"{'-':>22s}" for v in vals)
        print(f"{'/'.join(map(str, k)):22s} {cells}")
    for label, r in files:
        big = [(k, r[k][0]) for k in keys if k in r]
        if big:
            gm = math.exp(sum(math.log(x) for _, x in big) / len(big))
            worst = min(big, key=lambda x: x[1])
            print(f"{label}: {len(big)} shapes M >= {min_m}, geometric mean {gm:.3f}, min {worst[1]:.3f} at "
                  f"{'/'.join(map(str, worst[0]))}, below 0.75: {sum(1 for _, x in big if x < 0.75)}")


if __name__ == "__main__":
    main(sys.argv[1:])
