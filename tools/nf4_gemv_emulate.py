#!/usr/bin/env python3
"""Host emulation of kernels/nf4.cuh's gemv_kernel (the M <= 4 NF4 product): its launch choices
(launch_gemv: lanes per row G, rows per group R, CTAs) and every lane's chunk, row and 64-block
indexing, the per-chunk sums scaled by the block's absmax and the G-lane reduction, lane by lane as
the kernel runs them, against x @ dequant(W).T in numpy. It checks the indexing (which codes, scales
and x each lane reads; that every row is summed once), not the GPU itself: the GPU tests
(GpuNf4Linear.FusedSmallM*, TQ_NF4_GEMV=1) do that on the device.

  python3 tools/nf4_gemv_emulate.py        # prints max relative error per case; exits 1 above 1e-5
"""
import sys

import numpy as np

CODE = np.array([-1, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0, 0.080, 0.161, 0.246, 0.338, 0.441,
                 0.563, 0.723, 1], dtype=np.float32)  # stand-in values: the emulation checks indexing
WARPS = 8  # kGemvWarps


def launch_params(C, N, M, sms):
    G = 1
    for g in (32, 16, 8, 4, 2, 1):
        it = (C + g - 1) // g
        if C >= 0.85 * g * it:
            G = g
            break
    iters = (C + G - 1) // G

    def ctas_for(r):
        groups = (N + r - 1) // r
        warps = (groups + (32 // G) - 1) // (32 // G)
        return (warps + WARPS - 1) // WARPS

    R = 4 if (M == 1 and iters <= 2) else 2
    while R > 1 and ctas_for(R) < 2 * sms:
        R //= 2
    return G, R, (N + R - 1) // R, min(ctas_for(R), sms * 4)


def emulate(K, N, M, sms, rng):
    VEC = 16 if K % 32 == 0 else 8
    packed = rng.integers(0, 256, size=(N * K + 1) // 2, dtype=np.uint8)
    absmax = rng.random((N * K + 63) // 64).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    C = K // (2 * VEC)
    G, R, groups, ctas = launch_params(C, N, M, sms)
    D, per_warp, iters, warps = 8 // R, 32 // G, (C + G - 1) // G, ctas * WARPS
    y = np.full((M, N), np.nan)
    written = np.zeros(N, dtype=int)
    for warp in range(warps):
        q0 = warp * per_warp
        while q0 < groups:
            acc = {}
            for lane in range(32):
                sub, q = lane % G, q0 + lane // G
                a = np.zeros((R, M))
                for it0 in range(0, iters, D):
                    for d in range(D):
                        c = sub + (it0 + d) * G
                        if c >= C:
                            break
                        for r in range(R):
                            n = q * R + r
                            if not (q < groups and n < N):
                                continue
                            chunk = packed[n * (K // 2) + c * VEC: n * (K // 2) + c * VEC + VEC]
                            k0 = c * 2 * VEC
                            s = CODE[chunk >> 4] @ x[:, k0:k0 + 2 * VEC:2].T + CODE[chunk & 15] @ x[:, k0 + 1:k0 + 2 * VEC:2].T
                            a[r] += absmax[(n * K + k0) >> 6] * s
                acc[lane] = a
            for lane in range(0, 32, G):
                q = q0 + lane // G
                total = sum(acc[lane + o] for o in range(G))
                for r in range(R):
                    n = q * R + r
                    if q < groups and n < N:
                        y[:, n] = total[r]
                        written[n] += 1
            q0 += warps * per_warp
    i = np.arange(N * K)
    byte = packed[i >> 1]
    w = (CODE[np.where(i & 1, byte & 15, byte >> 4)] * absmax[i >> 6]).reshape(N, K)
    ref = x @ w.T
    assert (written == 1).all(), "a row written other than once"
    return float(np.abs(y - ref).max() / np.abs(ref).max()), VEC, G, R


def main():
    rng = np.random.default_rng(0)
    worst = 0.0
    # K % 32 == 0 (16-byte chunks) and K % 32 == 16 (8-byte), blocks straddling rows (4304, 2080),
    # one chunk per row (K = 16), partial groups and CTAs; sms = 1 forces R = 4 and 2.
    for K, N, M, sms in [(1152, 64, 1, 132), (4304, 72, 1, 132), (2080, 257, 3, 132), (16, 1, 1, 132),
                         (2048, 40, 2, 132), (1152, 9, 4, 132), (4304, 72, 1, 1), (2080, 257, 3, 1),
                         (2048, 43, 1, 1), (1024, 50, 1, 1), (4304, 5, 2, 1)]:
        err, vec, G, R = emulate(K, N, M, sms, rng)
        worst = max(worst, err)
        print(f"K {K:5d} N {N:4d} M {M} sms {sms:3d}: VEC {vec:2d} G {G:2d} R {R}  max rel err {err:.2e}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
