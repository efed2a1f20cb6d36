// Flash attention backward on tensor cores (FlashAttention-2 scheme), bf16 or f16 inputs, fp32
// accumulation; same head dims and packing as flash_forward.cuh.
//
//   1. row_dot_kernel:  row_dot_i = Σ_d dO_id · O_id (fp32), the softmax-backward term Σ_j P_ij dP_ij.
//   2. flash_backward_kernel: one CTA per (64-key tile, batch · KV head, split of the query rows).
//      K_j and V_j stay in shared memory; the CTA walks the 64-row tiles of the packed query rows of
//      all query heads of its KV head (so dK/dV sum over the GQA group without atomics), with Q/dO/lse/
//      row_dot double-buffered by cp.async. Per tile:
//        dP = dO·Vᵀ, S = Q·Kᵀ                               (registers, fp32)
//        P  = exp(softcap(scale·S) − lse) on visible keys, else 0
//        dS = P·(dP − row_dot)·(1 − tanh²)·scale            (registers, fp32)
//        P, dS → shared memory (rounded to the input format once)
//        dV += Pᵀ·dO, dK += dSᵀ·Q                           (registers, fp32, whole walk)
//        dQ += dS·K                                          (fp32 atomics into a zeroed scratch)
//   3. The launcher converts the fp32 dQ scratch (and dK/dV scratch when the query rows were split
//      over several CTAs, which then add with atomics) to the input format.
//
// Invariants: P is recomputed from q, k and the forward's lse, never stored in global memory; a row
// with lse = −inf (no visible key) and rows past the end contribute exactly 0; dK, dV, dQ accumulate
// in fp32 and are rounded once.
#pragma once

#include "kernels/attention/flash_tiles.cuh"

namespace tq::cuda::attention {

template <int D>
struct BackwardTiles {
  using H = HeadDim<D>;
  static constexpr int kRows = 64;                         // query rows per tile
  static constexpr int kKeys = 64;                         // keys per CTA
  static constexpr int kSplitD = H::kPad >= 128 ? 2 : 1;   // warps across the head dim (dK/dV registers)
  static constexpr int kWarps = 4 * kSplitD;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocks = kSplitD == 1 ? 2 : 1;
  static constexpr int kKeysPerWarp = kKeys / kSplitD;     // S / dP columns of one warp
  static constexpr int kNTS = kKeysPerWarp / 8;
  static constexpr int kDPerWarp = H::kPad / kSplitD;      // dK / dV / dQ columns of one warp
  static constexpr int kNTD = kDPerWarp / 8;
  static constexpr int kPStride = kKeys + 8;               // P and dS rows (odd number of 16-byte chunks)
  static constexpr int kTile = kRows * H::kStride;         // elements of one Q / dO / K / V tile
  static constexpr size_t kBytes =
      (size_t(6) * kTile + size_t(2) * kRows * kPStride) * sizeof(uint16_t) + size_t(4) * kRows * sizeof(float);
  static_assert(kRows == 64 && kKeys == 64, "4 warps of 16 rows (and of 16 keys) per tile");
  static_assert(kNTS % 2 == 0 && kNTD % 2 == 0, "B fragments are loaded for pairs of n-tiles");
  static_assert((kPStride / 8) % 2 == 1, "P / dS stride must be an odd number of 16-byte chunks");
  static_assert(kBytes <= 227 * 1024, "shared memory beyond the sm_90 per-block limit");
};

struct FlashBackwardArgs {
  Params p;
  const uint16_t* q;     // (B, Hq, Tq, D) dense
  const uint16_t* k;     // (B, Hkv, Tk, D)
  const uint16_t* v;     // (B, Hkv, Tk, D)
  const uint16_t* dout;  // (B, Hq, Tq, D)
  const float* lse;      // (B, Hq, Tq)
  const float* row_dot;  // (B, Hq, Tq)
  float* dq_acc;         // (B, Hq, Tq, D) fp32, zeroed
  uint16_t* dk;          // (B, Hkv, Tk, D), written when splits == 1
  uint16_t* dv;          // (B, Hkv, Tk, D), written when splits == 1
  float* dk_acc;         // (B, Hkv, Tk, D) fp32, zeroed, used when splits > 1
  float* dv_acc;         // (B, Hkv, Tk, D) fp32, zeroed, used when splits > 1
  int splits = 1;        // CTAs sharing one key tile (each takes a contiguous range of query tiles)
};

// One warp per row: row_dot (rows) = Σ_d dout·out over D (dense (rows, D), D even).
template <class Tag>
__global__ void __launch_bounds__(256) row_dot_kernel(const uint16_t* __restrict__ dout, const uint16_t* __restrict__ out,
                                                      float* __restrict__ row_dot, int64_t rows, int D) {
  const int64_t r = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const uint32_t* a = reinterpret_cast<const uint32_t*>(dout + r * D);  // (D / 2) pairs
  const uint32_t* o = reinterpret_cast<const uint32_t*>(out + r * D);
  float s = 0.f;
  for (int i = lane; i < D / 2; i += 32) {
    const uint32_t x = a[i], y = o[i];
    s += Tag::to_float(uint16_t(x & 0xffffu)) * Tag::to_float(uint16_t(y & 0xffffu));
    s += Tag::to_float(uint16_t(x >> 16)) * Tag::to_float(uint16_t(y >> 16));
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (lane == 0) row_dot[r] = s;
}

template <class Tag, int D>
__global__ void __launch_bounds__(BackwardTiles<D>::kThreads, BackwardTiles<D>::kMinBlocks)
    flash_backward_kernel(FlashBackwardArgs a) {
  using H = HeadDim<D>;
  using C = BackwardTiles<D>;
  constexpr int kRows = C::kRows, kKeys = C::kKeys, kNTS = C::kNTS, kNTD = C::kNTD;
  extern __shared__ __align__(16) uint16_t flash_smem[];
  uint16_t* sK = flash_smem;                      // (kKeys, kStride)
  uint16_t* sV = sK + C::kTile;                   // (kKeys, kStride)
  uint16_t* sQ2 = sV + C::kTile;                  // 2 × (kRows, kStride), double buffer
  uint16_t* sdO2 = sQ2 + 2 * C::kTile;            // 2 × (kRows, kStride)
  uint16_t* sP = sdO2 + 2 * C::kTile;             // (kRows, kPStride) P of the current tile
  uint16_t* sdS = sP + kRows * C::kPStride;       // (kRows, kPStride) dS of the current tile
  float* sLse2 = reinterpret_cast<float*>(sdS + kRows * C::kPStride);  // 2 × (kRows)
  float* sDot2 = sLse2 + 2 * kRows;                                     // 2 × (kRows)

  const Params& p = a.p;
  const int M = p.rep * p.Tq;  // packed query rows of the group
  const int j0 = blockIdx.x * kKeys;
  const int group = blockIdx.y, b = group / p.Hkv;
  const int nq = (M + kRows - 1) / kRows;
  const int per = (nq + a.splits - 1) / a.splits;
  const int q_begin = int(blockIdx.z) * per, q_end = ::min(nq, q_begin + per);
  const uint16_t* qg = a.q + int64_t(group) * M * D;      // (M, D)
  const uint16_t* dog = a.dout + int64_t(group) * M * D;  // (M, D)
  const float* lseg = a.lse + int64_t(group) * M;         // (M)
  const float* dotg = a.row_dot + int64_t(group) * M;     // (M)
  float* dqg = a.dq_acc + int64_t(group) * M * D;         // (M, D)
  const int64_t kv_base = int64_t(group) * p.Tk;          // first key row of the group in k, v, dk, dv
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;
  const int wr = warp % 4, wc = warp / 4;  // 16-row (or 16-key) group, head-dim / key half
  const float scale = float(p.scale), softcap = float(p.softcap);

  load_tile_async<kKeys, D, C::kThreads>(sK, a.k + kv_base * D, j0, p.Tk);
  load_tile_async<kKeys, D, C::kThreads>(sV, a.v + kv_base * D, j0, p.Tk);
  cp_async_commit();

  __shared__ int s_code[kKeys];  // key records of the CTA's keys (0 = hidden, also past Tk)
  if (tid < kKeys) s_code[tid] = key_code(p.mask, b, j0 + tid);  // read after the first tile's barrier
  float dk[kNTD][4], dv[kNTD][4];
  zero(dk);
  zero(dv);

  // Whether some row of query tile qt may see some key of this CTA (a block-wide vote).
  const bool masked = p.mask.any();
  auto live = [&](int qt) -> bool {
    if (!masked) return true;
    bool pred = false;
    if (tid < kRows) {
      const int m = qt * kRows + tid;
      if (m < M) {
        int lo, hi;
        key_range(p.mask, b, row_mask(p.mask, b, m % p.Tq), lo, hi);
        pred = lo < hi && lo < j0 + kKeys && hi > j0;
      }
    }
    return __syncthreads_or(pred) != 0;
  };
  auto load_rows = [&](int buf, int qt) {
    const int64_t r0 = int64_t(qt) * kRows;
    load_tile_async<kRows, D, C::kThreads>(sQ2 + buf * C::kTile, qg, r0, M);
    load_tile_async<kRows, D, C::kThreads>(sdO2 + buf * C::kTile, dog, r0, M);
    if (tid < kRows) {
      const int64_t m = r0 + tid;
      const bool ok = m < M;
      cp_async4(sLse2 + buf * kRows + tid, ok ? lseg + m : lseg, ok);
      cp_async4(sDot2 + buf * kRows + tid, ok ? dotg + m : dotg, ok);
    }
  };

  int cur = q_begin;
  while (cur < q_end && !live(cur)) ++cur;
  if (cur < q_end) {
    load_rows(0, cur);
    cp_async_commit();
  }
  for (int buf = 0; cur < q_end; buf ^= 1) {
    int next = cur + 1;
    while (next < q_end && !live(next)) ++next;
    if (next < q_end) {
      load_rows(buf ^ 1, next);
      cp_async_commit();
      cp_async_wait<1>();  // K, V and this tile have landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* sQ = sQ2 + buf * C::kTile;   // (kRows, kStride)
    const uint16_t* sdO = sdO2 + buf * C::kTile; // (kRows, kStride)
    const float* sLse = sLse2 + buf * kRows;     // (kRows)
    const float* sDot = sDot2 + buf * kRows;     // (kRows)
    const int m0 = cur * kRows;

    // dP = dO·Vᵀ and S = Q·Kᵀ on this warp's 16 rows × kKeysPerWarp keys.
    float dp[kNTS][4], s[kNTS][4];
    zero(dp);
    zero(s);
    warp_gemm_rows<Tag, D, kNTS>(dp, sdO, wr * 16, sV, wc * C::kKeysPerWarp, lane);
    warp_gemm_rows<Tag, D, kNTS>(s, sQ, wr * 16, sK, wc * C::kKeysPerWarp, lane);

    // P and dS in place (s ← P, dp ← dS), then both to shared memory.
    RowMask rows[2];
    float lse2[2], dot[2];
    bool ok[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int local = wr * 16 + g + rr * 8;
      const int m = m0 + local;
      rows[rr] = row_mask(p.mask, b, m % p.Tq);
      const float L = sLse[local];
      ok[rr] = m < M && L != -INFINITY;
      lse2[rr] = ok[rr] ? L * kLog2e : 0.f;
      dot[rr] = sDot[local];
    }
#pragma unroll
    for (int nt = 0; nt < kNTS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int jl = wc * C::kKeysPerWarp + nt * 8 + 2 * t4 + (e & 1);  // key within the tile
        float x = s[nt][e] * scale, th = 0.f;
        if (softcap > 0.f) {
          th = tanhf(x / softcap);
          x = softcap * th;
        }
        const bool vis = ok[rr] && visible(p.mask, rows[rr], j0 + jl, s_code[jl]);
        const float pv = vis ? exp2f(fmaf(x, kLog2e, -lse2[rr])) : 0.f;
        float ds = pv * (dp[nt][e] - dot[rr]);
        if (softcap > 0.f) ds *= 1.f - th * th;
        s[nt][e] = pv;
        dp[nt][e] = ds * scale;
      }
#pragma unroll
    for (int nt = 0; nt < kNTS; ++nt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int off = (wr * 16 + g + rr * 8) * C::kPStride + wc * C::kKeysPerWarp + nt * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(sP + off) = Tag::pack(s[nt][2 * rr], s[nt][2 * rr + 1]);
        *reinterpret_cast<uint32_t*>(sdS + off) = Tag::pack(dp[nt][2 * rr], dp[nt][2 * rr + 1]);
      }
    __syncthreads();

    // dV += Pᵀ·dO and dK += dSᵀ·Q on this warp's 16 keys × kDPerWarp columns.
    const int d0 = wc * C::kDPerWarp;
#pragma unroll
    for (int ks = 0; ks < kRows / 16; ++ks) {
      uint32_t ap[4], ads[4];
      load_a_trans(ap, sP, C::kPStride, ks * 16, wr * 16, lane);
      load_a_trans(ads, sdS, C::kPStride, ks * 16, wr * 16, lane);
#pragma unroll
      for (int np = 0; np < kNTD / 2; ++np) {
        uint32_t bb[4];
        load_b_trans(bb, sdO, H::kStride, ks * 16, d0 + np * 16, lane);
        Tag::mma(dv[2 * np], ap, bb[0], bb[1]);
        Tag::mma(dv[2 * np + 1], ap, bb[2], bb[3]);
        load_b_trans(bb, sQ, H::kStride, ks * 16, d0 + np * 16, lane);
        Tag::mma(dk[2 * np], ads, bb[0], bb[1]);
        Tag::mma(dk[2 * np + 1], ads, bb[2], bb[3]);
      }
    }

    // dQ (this warp's 16 rows × kDPerWarp columns) += dS·K, added to the fp32 scratch.
    uint32_t adq[kKeys / 16][4];
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) load_a(adq[ks], sdS, C::kPStride, wr * 16, ks * 16, lane);
#pragma unroll
    for (int np = 0; np < kNTD / 2; ++np) {
      float acc[2][4];
      zero(acc);
#pragma unroll
      for (int ks = 0; ks < kKeys / 16; ++ks) {
        uint32_t bb[4];
        load_b_trans(bb, sK, H::kStride, ks * 16, d0 + np * 16, lane);
        Tag::mma(acc[0], adq[ks], bb[0], bb[1]);
        Tag::mma(acc[1], adq[ks], bb[2], bb[3]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int m = m0 + wr * 16 + g + rr * 8;
          const int d = d0 + np * 16 + h * 8 + 2 * t4;
          if (m < M && d < D) atomic_add2(dqg + int64_t(m) * D + d, acc[h][2 * rr], acc[h][2 * rr + 1]);
        }
    }
    __syncthreads();  // sP, sdS and this buffer are rewritten by the next tile
    cur = next;
  }
  cp_async_wait<0>();  // the K/V copies when no tile was live

#pragma unroll
  for (int nt = 0; nt < kNTD; ++nt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int j = j0 + wr * 16 + g + rr * 8;
      const int d = wc * C::kDPerWarp + nt * 8 + 2 * t4;
      if (j >= p.Tk || d >= D) continue;
      const int64_t off = (kv_base + j) * D + d;
      if (a.splits == 1) {
        *reinterpret_cast<uint32_t*>(a.dk + off) = Tag::pack(dk[nt][2 * rr], dk[nt][2 * rr + 1]);
        *reinterpret_cast<uint32_t*>(a.dv + off) = Tag::pack(dv[nt][2 * rr], dv[nt][2 * rr + 1]);
      } else {
        atomic_add2(a.dk_acc + off, dk[nt][2 * rr], dk[nt][2 * rr + 1]);
        atomic_add2(a.dv_acc + off, dv[nt][2 * rr], dv[nt][2 * rr + 1]);
      }
    }
}

}  // namespace tq::cuda::attention
