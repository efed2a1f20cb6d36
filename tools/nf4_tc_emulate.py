#!/usr/bin/env python3
"""Host emulation of kernels/nf4.cuh's gemv_tc_kernel (the M = 1 NF4 product on tensor cores): its
launch shape (launch_tc: segments per tile, tiles per round, CTAs, TQ_NF4_GEMV_CTAS), each CTA's
tile range and rounds, each warp's item range, and, lane by lane, the code pieces, x words and raw
scales every lane reads, the m16n8k16 fragments it forms from them (a0..a3 from the PRMT table, b0 and
b1 from x), the mma as the PTX ISA defines the fragment layout, the quad shuffle of the block scales
and the per-round reduction, against x @ dequant(W).T in float64. It checks the indexing and the
fragment layout (which bytes, scales and x meet in which mma, that every row is stored once), not
the GPU: the GPU tests (GpuNf4Linear.FusedSmallM*, DecodeKernelsAreIndependentOfTheirGrid,
TQ_NF4_GEMV_X=tc) do that on the device.

  python3 tools/nf4_tc_emulate.py        # prints the max relative error per case; exits 1 above 1e-9
"""
import math
import sys

import numpy as np

CODE = np.array([-1, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0, 0.080, 0.161, 0.246, 0.338, 0.441,
                 0.563, 0.723, 1], dtype=np.float64)  # stand-in values: the emulation checks indexing
SEG_UNITS, ROUND_ITEMS = 4, 256  # kTcSegUnits, kTcRoundItems


def plan(N, K, sms, cap):
    P = 64 // math.gcd(K, 64)
    tpc = ((N + P - 1) // P + 15) // 16
    tiles = P * tpc
    U = max(((r * K) % 64 + K + 63) // 64 for r in range(P))
    nseg = (U + SEG_UNITS - 1) // SEG_UNITS
    ctas = min(tiles, sms)
    if cap:
        ctas = min(ctas, cap)
    return P, tpc, tiles, nseg, ROUND_ITEMS // nseg, ctas


def tile_rows(N, K, P, tpc, tile, g):
    r = tile // tpc
    tau = tile - r * tpc
    class_rows = (N - r + P - 1) // P if r < N else 0
    iA, iB = 16 * tau + g, 16 * tau + g + 8
    okA, okB = iA < class_rows, iB < class_rows
    nA, nB = r + P * iA, r + P * iB
    psi = (r * K) & 63
    units = (psi + K + 63) // 64
    return dict(okA=okA, okB=okB, nA=nA, nB=nB, psi=psi, units=units,
                b0A=(nA * K) >> 6 if okA else 0, b0B=(nB * K) >> 6 if okB else 0)


def emulate(K, N, sms, cap, warps, rng):
    packed = rng.integers(0, 256, size=(N * K + 1) // 2, dtype=np.uint8)
    absmax = rng.random((N * K + 63) // 64)
    x = rng.standard_normal(K)
    bias = rng.standard_normal(N)
    P, tpc, T, nseg, round_tiles, ctas = plan(N, K, sms, cap)
    y = np.full(N, np.nan)
    stored = np.zeros(N, dtype=int)

    def piece(ok, b0, j, t, kl):  # the lane's 8 code bytes of one row, zeros as the kernel loads them
        if not (0 <= kl and kl + 16 <= K and ok):
            return np.zeros(8, dtype=np.uint8)
        at = 32 * (b0 + j) + 8 * t
        return packed[at:at + 8]

    def pair(byte):  # code_pair_bf16x2: the element first in memory, then the next
        return CODE[byte >> 4], CODE[byte & 15]

    for cta in range(ctas):
        tile_begin, tile_end = cta * T // ctas, (cta + 1) * T // ctas
        r0 = tile_begin
        while r0 < tile_end:
            nt = min(tile_end - r0, round_tiles)
            items = nt * nseg
            buf = np.full((items, 16), np.nan)
            for warp in range(warps):
                for item in range(warp * items // warps, (warp + 1) * items // warps):
                    tile = r0 + item // nseg
                    seg = item - (tile - r0) * nseg
                    j0 = seg * SEG_UNITS
                    rows = [tile_rows(N, K, P, tpc, tile, g) for g in range(8)]
                    # Lane (g, t)'s raw scales: unit j0 + t of rows g and g + 8 (finish_scale: the absmax).
                    amA4 = np.zeros((8, 4))
                    amB4 = np.zeros((8, 4))
                    for g in range(8):
                        tr = rows[g]
                        for t in range(4):
                            jt = j0 + t
                            amA4[g, t] = absmax[tr["b0A"] + jt] if tr["okA"] and jt < tr["units"] else 0.0
                            amB4[g, t] = absmax[tr["b0B"] + jt] if tr["okB"] and jt < tr["units"] else 0.0
                    sA = np.zeros((8, 4))
                    sB = np.zeros((8, 4))
                    for u in range(SEG_UNITS):
                        j = j0 + u
                        C = np.zeros((16, 8))
                        lane_x = {}
                        lane_pieces = {}
                        for g in range(8):
                            tr = rows[g]
                            for t in range(4):
                                kl = 64 * j - tr["psi"] + 16 * t
                                lane_pieces[g, t] = (piece(tr["okA"], tr["b0A"], j, t, kl),
                                                     piece(tr["okB"], tr["b0B"], j, t, kl))
                                lane_x[g, t] = x[kl:kl + 16] if 0 <= kl and kl + 16 <= K else np.zeros(16)
                        for s in range(4):
                            A = np.full((16, 16), np.nan)
                            B = np.full((16, 8), np.nan)
                            for g in range(8):
                                for t in range(4):
                                    pa, pb = lane_pieces[g, t]
                                    xl = lane_x[g, t]
                                    # a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][..]
                                    A[g, 2 * t:2 * t + 2] = pair(pa[2 * s])
                                    A[g, 2 * t + 8:2 * t + 10] = pair(pa[2 * s + 1])
                                    A[g + 8, 2 * t:2 * t + 2] = pair(pb[2 * s])
                                    A[g + 8, 2 * t + 8:2 * t + 10] = pair(pb[2 * s + 1])
                                    # b0 = B[2t, 2t+1][g] = x[kl + 4s, +1], b1 = B[2t+8, 2t+9][g] = x[kl + 4s + 2, +3]
                                    B[2 * t:2 * t + 2, g] = xl[4 * s:4 * s + 2]
                                    B[2 * t + 8:2 * t + 10, g] = xl[4 * s + 2:4 * s + 4]
                            assert not np.isnan(A).any() and not np.isnan(B).any(), "a fragment element unset"
                            C = A @ B + (C if s else 0.0)
                        for g in range(8):
                            for t in range(4):
                                # d0 = D[g][2t], d2 = D[g+8][2t]; the scale of unit j0 + u from lane (g, u)
                                sA[g, t] += amA4[g, u] * C[g, 2 * t]
                                sB[g, t] += amB4[g, u] * C[g + 8, 2 * t]
                    buf[item, 0:8] = sA[:, 0]
                    buf[item, 8:16] = sB[:, 0]
            for tl in range(nt):
                for i in range(16):
                    tr = tile_rows(N, K, P, tpc, r0 + tl, i & 7)
                    ok, n = (tr["okA"], tr["nA"]) if i < 8 else (tr["okB"], tr["nB"])
                    if not ok:
                        continue
                    segs = buf[tl * nseg:(tl + 1) * nseg, i]
                    assert not np.isnan(segs).any(), "a segment sum never written"
                    y[n] = segs.sum() + bias[n]
                    stored[n] += 1
            r0 += round_tiles
    i = np.arange(N * K)
    byte = packed[i >> 1]
    w = (CODE[np.where(i & 1, byte & 15, byte >> 4)] * absmax[i >> 6]).reshape(N, K)
    ref = w @ x + bias
    assert (stored == 1).all(), "a row stored other than once"
    return float(np.abs(y - ref).max() / np.abs(ref).max()), P, T, nseg, round_tiles, ctas


def main():
    rng = np.random.default_rng(0)
    worst = 0.0
    # One block phase (1152, 2048, 16384), four (4304), two (2080), one unit per row (16); partial
    # tiles; capped grids (several rounds per CTA: K 16384 has 4 tiles per round); 128 segments (32768).
    # Warps per CTA: 16 (ring depth 2) and 12 (depth 3, tc_warps): the ring's order does not change
    # which items a warp owns or how they are summed, so it is not emulated.
    for warps in (16, 12):
        for K, N, sms, cap in [(1152, 37, 132, 0), (4304, 72, 132, 0), (2080, 57, 132, 0), (16, 20, 132, 0),
                               (2048, 100, 2, 0), (16384, 70, 132, 1), (4304, 300, 132, 1), (1152, 999, 132, 3),
                               (32768, 5, 132, 1)]:
            err, P, T, nseg, rt, ctas = emulate(K, N, sms, cap, warps, rng)
            worst = max(worst, err)
            print(f"warps {warps} K {K:5d} N {N:4d}: P {P} tiles {T:3d} segments {nseg:3d} tiles/round {rt:3d}"
                  f" CTAs {ctas:3d}  max rel err {err:.2e}")
    sys.exit(0 if worst <= 1e-9 else 1)


if __name__ == "__main__":
    main()
