#!/usr/bin/env python3
"""Short tables from a tq_bench JSON (Google Benchmark --benchmark_out): every benchmark with its time
and user counters, then the GEMM acceptance summary (ours vs cuBLASLt at M >= 1136, issue #3) and
the memory-bound kernels as a fraction of the device-to-device copy measured in the same run.

  python3 tools/bench_table.py bench.json
"""
import json
import math
import sys
from collections import defaultdict

STANDARD = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads", "iterations",
            "real_time", "cpu_time", "time_unit", "family_index", "per_family_instance_index",
            "aggregate_name", "aggregate_unit", "label", "error_occurred", "error_message"}


def load_runs(path):
    return [b for b in json.load(open(path))["benchmarks"] if b.get("run_type", "iteration") == "iteration"]


def gemm_pairs(runs):
    """{(op, M, K, N): {"tq": run, "cublas": run}} from the gemm/<impl>/<op>/M/K/N benchmarks."""
    gemm = defaultdict(dict)
    for b in runs:
        parts = b["name"].split("/")
        if parts[0] == "gemm" and len(parts) >= 6 and "TFLOPS" in b:
            _, impl, op, M, K, N = parts[:6]
            gemm[(op, int(M), int(K), int(N))][impl] = b
    return {k: v for k, v in gemm.items() if "tq" in v and "cublas" in v}


def main(path):
    runs = load_runs(path)
    copy = next((b["GB/s"] for b in runs if "GB/s" in b and "memcpy" in b["name"]), None)
    print(f"{'benchmark':64s} {'time':>10s}  counters")
    for b in runs:
        name = b["name"].split("/iterations")[0].replace("/manual_time", "")
        if b.get("error_occurred"):
            print(f"{name:64s} ERROR {b.get('error_message', '')}")
            continue
        extra = {k: v for k, v in b.items() if k not in STANDARD and isinstance(v, (int, float))}
        if copy and "GB/s" in extra:
            extra["%copy"] = 100 * extra["GB/s"] / copy
        cs = "  ".join(f"{k}={v:.4g}" for k, v in extra.items())
        print(f"{name:64s} {b['real_time']:9.1f}{b['time_unit']:>2s}  {cs}")
    big = [(k, v["tq"]["TFLOPS"] / v["cublas"]["TFLOPS"]) for k, v in gemm_pairs(runs).items() if k[1] >= 1136]
    if big:
        g = math.exp(sum(math.log(r) for _, r in big) / len(big))
        worst = min(big, key=lambda x: x[1])
        print(f"GEMM M>=1136: {len(big)} shapes, geometric mean tq/cuBLAS {g:.3f}, min {worst[1]:.3f} at {worst[0]}")


if __name__ == "__main__":
    main(sys.argv[1])
