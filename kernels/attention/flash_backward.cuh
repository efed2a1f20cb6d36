// Flash attention backward on tensor cores (FlashAttention-2 scheme), bf16 or f16 inputs, fp32
// accumulation; same head dims and packing as flash_forward.cuh.
//
//   1. flash_row_dot_kernel: row_dot_i = Σ_j P_ij·dP_ij, the softmax-backward term, from the same P and
//      dP (bit for bit) that step 2 computes: one CTA per 64 packed query rows, walking the visible key
//      tiles like the forward (S = Q·Kᵀ, dP = dO·Vᵀ, P = exp(logit − lse)). Not Σ_d dO·O: the output is
//      rounded to the input format, and that rounding enters every dS of the row as one common error
//      (dS_ij = P_ij (dP_ij − row_dot_i) cancels), several times larger than all other roundings.
//   2. flash_backward_kernel: one CTA per (64-key tile, batch · KV head, split of the query rows).
//      K_j and V_j stay in shared memory; the CTA walks the 64-row tiles of the packed query rows of
//      all query heads of its KV head (so dK/dV sum over the GQA group without atomics), with Q/dO/lse/
//      row_dot double-buffered by cp.async. Per tile:
//        dP = dO·Vᵀ, S = Q·Kᵀ                               (registers, fp32)
//        P  = exp(softcap(scale·S) − lse) on visible keys, else 0
//        dS = P·(dP − row_dot)·(1 − tanh²)·scale            (registers, fp32)
//        P, dS → shared memory as hi + lo pairs of the input format (x = hi + lo + O(2⁻¹⁷x))
//        dV += Pᵀ·dO, dK += dSᵀ·Q                           (registers, fp32, whole walk)
//        dQ += dS·K                                          (fp32 atomics into a zeroed scratch)
//      Each of those three products runs on hi and on lo: rounding P and dS once to bf16 (2⁻⁹) puts
//      errors of ~0.3% of the largest gradient element into elements that cancel, as large as the test
//      tolerance, so the products see P and dS to ~2⁻¹⁷ instead ("fp32 math inside, one rounding on
//      store"). dS_lo has its own buffer; P_lo reuses the P buffer after the hi pass (shared memory at
//      D = 256 holds one extra 64×64 tile, not two).
//   3. The launcher converts the fp32 dQ scratch (and dK/dV scratch when the query rows were split
//      over several CTAs, which then add with atomics) to the input format.
//
// Invariants: P is recomputed from q, k and the forward's lse, never stored in global memory; a row
// with lse = −inf (no visible key) and rows past the end contribute exactly 0; a row with one visible
// key has P = 1 and row_dot = dP exactly (see flash_forward.cuh), so its dS is exactly 0; dK, dV, dQ
// accumulate in fp32 and are rounded once.
#pragma once

#include "kernels/attention/flash_forward.cuh"
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
  static constexpr int kPTile = kRows * kPStride;          // elements of one P / dS tile
  // K, V, 2 × Q, 2 × dO, P (hi, then lo), dS hi, dS lo; 2 × lse, 2 × row_dot; the key records.
  static constexpr size_t kBytes = (size_t(6) * kTile + size_t(3) * kPTile) * sizeof(uint16_t) +
                                   size_t(4) * kRows * sizeof(float) + size_t(kKeys) * sizeof(int);
  static_assert(kRows == 64 && kKeys == 64, "4 warps of 16 rows (and of 16 keys) per tile");
  static_assert(kNTS % 2 == 0 && kNTD % 2 == 0, "B fragments are loaded for pairs of n-tiles");
  static_assert((kPStride / 8) % 2 == 1, "P / dS stride must be an odd number of 16-byte chunks");
  static_assert(kBytes <= 227 * 1024, "shared memory beyond the sm_90 per-block limit");
};

// Shared memory of flash_row_dot_kernel: Q and dO (kFwdRows each), K and V double-buffered.
template <int D>
constexpr size_t flash_row_dot_smem_bytes() {
  return size_t(2 * kFwdRows + 4 * kFwdKeys) * HeadDim<D>::kStride * sizeof(uint16_t);
}

struct FlashRowDotArgs {
  Params p;
  const uint16_t* q;     // (B, Hq, Tq, D) dense
  const uint16_t* k;     // (B, Hkv, Tk, D)
  const uint16_t* v;     // (B, Hkv, Tk, D)
  const uint16_t* dout;  // (B, Hq, Tq, D)
  const float* lse;      // (B, Hq, Tq)
  float* row_dot;        // (B, Hq, Tq), every row written
};

// The probability of one logit x (after scale and softcap) of a row with log-sum-exp lse2 = log2_scaled
// (lse): exactly the arithmetic of the forward, so a row's only visible key gets exactly 1.
__device__ __forceinline__ float prob_from_lse(float x, float lse2) { return exp2f(log2_scaled(x) - lse2); }

// row_dot (B, Hq, Tq) = Σ_j P_ij·dP_ij over the visible keys; one CTA = kFwdRows packed rows × one
// (batch, KV head), as the forward. S and dP come from warp_gemm_rows over the whole head dim, the
// same mma sequence per element as in flash_backward_kernel, so both kernels see identical values.
template <class Tag, int D>
__global__ void __launch_bounds__(kFwdThreads, 2) flash_row_dot_kernel(FlashRowDotArgs a) {
  using H = HeadDim<D>;
  constexpr int kNT = kFwdKeys / 8;  // S / dP n-tiles per warp
  constexpr int kTile = kFwdKeys * H::kStride;
  extern __shared__ __align__(16) uint16_t flash_smem[];
  uint16_t* sQ = flash_smem;                   // (kFwdRows, kStride)
  uint16_t* sdO = sQ + kFwdRows * H::kStride;  // (kFwdRows, kStride)
  uint16_t* sK2 = sdO + kFwdRows * H::kStride; // 2 × (kFwdKeys, kStride)
  uint16_t* sV2 = sK2 + 2 * kTile;             // 2 × (kFwdKeys, kStride)

  const Params& p = a.p;
  const int M = p.rep * p.Tq;
  const int m0 = int(blockIdx.x) * kFwdRows;
  const int group = blockIdx.y, b = group / p.Hkv;
  const uint16_t* qg = a.q + int64_t(group) * M * D;      // (M, D)
  const uint16_t* dog = a.dout + int64_t(group) * M * D;  // (M, D)
  const uint16_t* kg = a.k + int64_t(group) * p.Tk * D;   // (Tk, D)
  const uint16_t* vg = a.v + int64_t(group) * p.Tk * D;   // (Tk, D)
  const float* lseg = a.lse + int64_t(group) * M;         // (M)
  float* dotg = a.row_dot + int64_t(group) * M;           // (M)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t4 = lane % 4;
  const float scale = float(p.scale), softcap = float(p.softcap);

  int t_begin, t_end;
  visible_key_tiles<kFwdRows, kFwdKeys>(p, b, m0, M, t_begin, t_end);

  RowMask rows[2];
  float lse2[2], acc[2] = {0.f, 0.f};
  bool ok[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int m = m0 + warp * 16 + g + rr * 8;
    rows[rr] = row_mask(p.mask, b, m % p.Tq);
    const float L = m < M ? lseg[m] : -INFINITY;
    ok[rr] = L != -INFINITY;
    lse2[rr] = ok[rr] ? log2_scaled(L) : 0.f;
  }
  const bool masked = p.mask.any();

  if (t_begin < t_end) {
    load_tile_async<kFwdRows, D, kFwdThreads>(sQ, qg, m0, M);
    load_tile_async<kFwdRows, D, kFwdThreads>(sdO, dog, m0, M);
    load_tile_async<kFwdKeys, D, kFwdThreads>(sK2, kg, int64_t(t_begin) * kFwdKeys, p.Tk);
    load_tile_async<kFwdKeys, D, kFwdThreads>(sV2, vg, int64_t(t_begin) * kFwdKeys, p.Tk);
    cp_async_commit();
  }
  for (int t = t_begin; t < t_end; ++t) {
    const int buf = (t - t_begin) & 1, j0 = t * kFwdKeys;
    if (t + 1 < t_end) {  // the other buffer was released by the previous iteration's last barrier
      load_tile_async<kFwdKeys, D, kFwdThreads>(sK2 + (buf ^ 1) * kTile, kg, int64_t(j0) + kFwdKeys, p.Tk);
      load_tile_async<kFwdKeys, D, kFwdThreads>(sV2 + (buf ^ 1) * kTile, vg, int64_t(j0) + kFwdKeys, p.Tk);
      cp_async_commit();
      cp_async_wait<1>();  // Q, dO and this tile's K, V have landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float s[kNT][4], dp[kNT][4];
    zero(s);
    zero(dp);
    warp_gemm_rows<Tag, D, kNT>(s, sQ, warp * 16, sK2 + buf * kTile, 0, lane);
    warp_gemm_rows<Tag, D, kNT>(dp, sdO, warp * 16, sV2 + buf * kTile, 0, lane);
    const bool check = masked || j0 + kFwdKeys > p.Tk;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1, j = j0 + nt * 8 + 2 * t4 + (e & 1);
        float x = s[nt][e] * scale;
        if (softcap > 0.f) x = softcap * tanhf(x / softcap);
        const bool vis = ok[rr] && (!check || visible(p.mask, rows[rr], j, key_code(p.mask, b, j)));
        if (vis) acc[rr] = fmaf(prob_from_lse(x, lse2[rr]), dp[nt][e], acc[rr]);
      }
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float d = acc[rr];
    d += __shfl_xor_sync(0xffffffffu, d, 1);  // the 4 lanes of a row
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    const int m = m0 + warp * 16 + g + rr * 8;
    if (m < M && t4 == 0) dotg[m] = d;
  }
}

// acc (16 keys, kNTD n-tiles) += Xᵀ·B over the kRows rows of a tile: X (kRows, kPStride) = P or dS in
// shared memory (keys k0.. of this warp are its columns), B (kRows, kStride) = dO or Q, columns d0...
template <class Tag, int D, int kNTD>
__device__ __forceinline__ void accumulate_pt_b(float (&acc)[kNTD][4], const uint16_t* sX, const uint16_t* sB, int k0,
                                                int d0, int lane) {
  using C = BackwardTiles<D>;
#pragma unroll
  for (int ks = 0; ks < C::kRows / 16; ++ks) {
    uint32_t a[4];
    load_a_trans(a, sX, C::kPStride, ks * 16, k0, lane);
#pragma unroll
    for (int np = 0; np < kNTD / 2; ++np) {
      uint32_t bb[4];
      load_b_trans(bb, sB, HeadDim<D>::kStride, ks * 16, d0 + np * 16, lane);
      Tag::mma(acc[2 * np], a, bb[0], bb[1]);
      Tag::mma(acc[2 * np + 1], a, bb[2], bb[3]);
    }
  }
}

// One warp's 16 rows × 8·kNTS keys in place: s (logits before scale) ← P = exp(logit − lse) on visible
// keys (else 0), dp ← dS = P·(dP − row_dot)·(1 − tanh²)·scale. rows/ok/lse2/dot: the warp's two rows of
// this thread (g and g + 8); j0/codes: the warp's first key and its key records.
template <int kNTS>
__device__ __forceinline__ void probabilities_and_ds(float (&s)[kNTS][4], float (&dp)[kNTS][4], const Params& p,
                                                     int b, const RowMask (&rows)[2], const bool (&ok)[2],
                                                     const float (&lse2)[2], const float (&dot)[2], int j0,
                                                     const int* codes, int t4) {
  const float scale = float(p.scale), softcap = float(p.softcap);
#pragma unroll
  for (int nt = 0; nt < kNTS; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rr = e >> 1;
      const int jl = nt * 8 + 2 * t4 + (e & 1);  // key within the warp's keys
      float x = s[nt][e] * scale, th = 0.f;
      if (softcap > 0.f) {
        th = tanhf(x / softcap);
        x = softcap * th;
      }
      const bool vis = ok[rr] && visible(p.mask, rows[rr], j0 + jl, codes[jl]);
      const float pv = vis ? prob_from_lse(x, lse2[rr]) : 0.f;
      float ds = pv * (dp[nt][e] - dot[rr]);
      if (softcap > 0.f) ds *= 1.f - th * th;
      s[nt][e] = pv;
      dp[nt][e] = ds * scale;
    }
}

// P → sP (hi) and p_lo (registers, packed), dS → sdS (hi) and sdSlo (lo); tiles (kRows, kPStride),
// this thread's element (row g, key 2·t4) of n-tile 0 at `off`, row g + 8 at off + 8·kPStride.
template <class Tag, int D, int kNTS>
__device__ __forceinline__ void store_hi_lo(const float (&pr)[kNTS][4], const float (&ds)[kNTS][4],
                                            uint32_t (&p_lo)[kNTS][2], uint16_t* sP, uint16_t* sdS, uint16_t* sdSlo,
                                            int off) {
  constexpr int kPStride = BackwardTiles<D>::kPStride;
#pragma unroll
  for (int nt = 0; nt < kNTS; ++nt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int o = off + rr * 8 * kPStride + nt * 8;
      const float p0 = pr[nt][2 * rr], p1 = pr[nt][2 * rr + 1], d0 = ds[nt][2 * rr], d1 = ds[nt][2 * rr + 1];
      const float p0h = Tag::rounded(p0), p1h = Tag::rounded(p1), d0h = Tag::rounded(d0), d1h = Tag::rounded(d1);
      *reinterpret_cast<uint32_t*>(sP + o) = Tag::pack(p0h, p1h);
      *reinterpret_cast<uint32_t*>(sdS + o) = Tag::pack(d0h, d1h);
      *reinterpret_cast<uint32_t*>(sdSlo + o) = Tag::pack(d0 - d0h, d1 - d1h);
      p_lo[nt][rr] = Tag::pack(p0 - p0h, p1 - p1h);
    }
}

// The packed pairs of store_hi_lo back into a (kRows, kPStride) tile at the same places.
template <int D, int kNTS>
__device__ __forceinline__ void store_packed(const uint32_t (&v)[kNTS][2], uint16_t* sX, int off) {
  constexpr int kPStride = BackwardTiles<D>::kPStride;
#pragma unroll
  for (int nt = 0; nt < kNTS; ++nt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) *reinterpret_cast<uint32_t*>(sX + off + rr * 8 * kPStride + nt * 8) = v[nt][rr];
}

// dq (M, D) fp32 += (dS_hi + dS_lo)·K for 16 rows (tile rows r0.., global rows m0..) × kDPerWarp
// columns from d0; dS tiles (kRows, kPStride) over the CTA's kKeys keys, K tile (kKeys, kStride).
template <class Tag, int D>
__device__ __forceinline__ void accumulate_dq(float* dq, const uint16_t* sdS, const uint16_t* sdSlo, const uint16_t* sK,
                                              int m0, int M, int r0, int d0, int lane) {
  using C = BackwardTiles<D>;
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int np = 0; np < C::kNTD / 2; ++np) {
    float acc[2][4];
    zero(acc);
#pragma unroll
    for (int ks = 0; ks < C::kKeys / 16; ++ks) {
      uint32_t bb[4], ah[4], al[4];
      load_b_trans(bb, sK, HeadDim<D>::kStride, ks * 16, d0 + np * 16, lane);
      load_a(ah, sdS, C::kPStride, r0, ks * 16, lane);
      load_a(al, sdSlo, C::kPStride, r0, ks * 16, lane);
      Tag::mma(acc[0], ah, bb[0], bb[1]);
      Tag::mma(acc[1], ah, bb[2], bb[3]);
      Tag::mma(acc[0], al, bb[0], bb[1]);
      Tag::mma(acc[1], al, bb[2], bb[3]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int m = m0 + g + rr * 8;
        const int d = d0 + np * 16 + h * 8 + 2 * t4;
        if (m < M && d < D) atomic_add2(dq + int64_t(m) * D + d, acc[h][2 * rr], acc[h][2 * rr + 1]);
      }
  }
}

struct FlashBackwardArgs {
  Params p;
  const uint16_t* q;     // (B, Hq, Tq, D) dense
  const uint16_t* k;     // (B, Hkv, Tk, D)
  const uint16_t* v;     // (B, Hkv, Tk, D)
  const uint16_t* dout;  // (B, Hq, Tq, D)
  const float* lse;      // (B, Hq, Tq)
  const float* row_dot;  // (B, Hq, Tq), from flash_row_dot_kernel
  float* dq_acc;         // (B, Hq, Tq, D) fp32, zeroed
  uint16_t* dk;          // (B, Hkv, Tk, D), written when splits == 1
  uint16_t* dv;          // (B, Hkv, Tk, D), written when splits == 1
  float* dk_acc;         // (B, Hkv, Tk, D) fp32, zeroed, used when splits > 1
  float* dv_acc;         // (B, Hkv, Tk, D) fp32, zeroed, used when splits > 1
  int splits = 1;        // CTAs sharing one key tile (each takes a contiguous range of query tiles)
};

template <class Tag, int D>
__global__ void __launch_bounds__(BackwardTiles<D>::kThreads, BackwardTiles<D>::kMinBlocks)
    flash_backward_kernel(FlashBackwardArgs a) {
  using C = BackwardTiles<D>;
  constexpr int kRows = C::kRows, kKeys = C::kKeys, kNTS = C::kNTS, kNTD = C::kNTD;
  extern __shared__ __align__(16) uint16_t flash_smem[];
  uint16_t* sK = flash_smem;                      // (kKeys, kStride)
  uint16_t* sV = sK + C::kTile;                   // (kKeys, kStride)
  uint16_t* sQ2 = sV + C::kTile;                  // 2 × (kRows, kStride), double buffer
  uint16_t* sdO2 = sQ2 + 2 * C::kTile;            // 2 × (kRows, kStride)
  uint16_t* sP = sdO2 + 2 * C::kTile;             // (kRows, kPStride) P_hi, then P_lo of the current tile
  uint16_t* sdS = sP + C::kPTile;                 // (kRows, kPStride) dS_hi of the current tile
  uint16_t* sdSlo = sdS + C::kPTile;              // (kRows, kPStride) dS_lo of the current tile
  float* sLse2 = reinterpret_cast<float*>(sdSlo + C::kPTile);  // 2 × (kRows)
  float* sDot2 = sLse2 + 2 * kRows;                             // 2 × (kRows)
  int* s_code = reinterpret_cast<int*>(sDot2 + 2 * kRows);      // (kKeys) key records (0 = hidden, also past Tk)

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

  load_tile_async<kKeys, D, C::kThreads>(sK, a.k + kv_base * D, j0, p.Tk);
  load_tile_async<kKeys, D, C::kThreads>(sV, a.v + kv_base * D, j0, p.Tk);
  cp_async_commit();

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

    // P and dS (16 rows × kKeysPerWarp keys of this warp): hi parts of both and dS_lo to shared memory,
    // P_lo kept packed in registers for the second dV pass.
    uint32_t p_lo[kNTS][2];
    {
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
        lse2[rr] = ok[rr] ? log2_scaled(L) : 0.f;
        dot[rr] = sDot[local];
      }
      const int k0 = wc * C::kKeysPerWarp;  // the warp's first key within the tile
      probabilities_and_ds(s, dp, p, b, rows, ok, lse2, dot, j0 + k0, s_code + k0, t4);
      store_hi_lo<Tag, D>(s, dp, p_lo, sP, sdS, sdSlo, (wr * 16 + g) * C::kPStride + k0 + 2 * t4);
    }
    __syncthreads();

    // dV += P_hiᵀ·dO on this warp's 16 keys × kDPerWarp columns; then P_lo replaces P_hi in the P tile.
    const int d0 = wc * C::kDPerWarp;
    accumulate_pt_b<Tag, D, kNTD>(dv, sP, sdO, wr * 16, d0, lane);
    __syncthreads();  // every warp is done with P_hi
    store_packed<D>(p_lo, sP, (wr * 16 + g) * C::kPStride + wc * C::kKeysPerWarp + 2 * t4);
    __syncthreads();

    // dV += P_loᵀ·dO, dK += dS_hiᵀ·Q + dS_loᵀ·Q (16 keys × kDPerWarp columns).
    accumulate_pt_b<Tag, D, kNTD>(dv, sP, sdO, wr * 16, d0, lane);
    accumulate_pt_b<Tag, D, kNTD>(dk, sdS, sQ, wr * 16, d0, lane);
    accumulate_pt_b<Tag, D, kNTD>(dk, sdSlo, sQ, wr * 16, d0, lane);

    // dQ (this warp's 16 rows × kDPerWarp columns) += (dS_hi + dS_lo)·K, added to the fp32 scratch.
    accumulate_dq<Tag, D>(dqg, sdS, sdSlo, sK, m0 + wr * 16, M, wr * 16, d0, lane);
    __syncthreads();  // sP, sdS, sdSlo and this buffer are rewritten by the next tile
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
