// Flash attention forward on tensor cores: mma.sync m16n8k16 with bf16 or f16 inputs and fp32
// accumulation (sm_80+, runs on the H200), for head dims instantiated by the launcher (D = Dv, D % 8 == 0).
//
// Invariants:
// - One CTA = 64 packed query rows × one (batch, KV head). Packed row m = h_local·Tq + i covers every
//   query head sharing the KV head (GQA/MQA): those rows are contiguous in q and out, and each K/V tile
//   is loaded once for all of them. 4 warps, 16 rows each.
// - Keys stream through shared memory in tiles of 64 (K and V single-buffered, FA2-style overlap: V_t
//   loads during S = Q·K_tᵀ, K_{t+1} loads during O += P·V_t). The CTA only visits the key tiles that
//   some of its rows can see (causal / prefix reach, sliding window).
// - S, the running max and the row sums live in registers in fp32; P is rounded to the input format
//   only as the A operand of P·V. Neither S nor P is ever written to memory.
// - Softmax: logit = scale·(q·k), softcap·tanh(logit/softcap) when on, hidden keys = −inf; exp2 of
//   log2_scaled(x) − log2_scaled(max) (both products rounded, no FMA), so the row's largest logit gets
//   exactly 1 and an unchanged max rescales by exactly 1. A row that sees no key keeps max = −inf and
//   sum = 0: output 0, lse = −inf.
// - Output rounded once from fp32; lse = max + log(sum) in fp32 (natural log), saved for the backward.
//   A row with one visible key gets sum = 1 and lse = its logit exactly; the backward recomputes the
//   same logit bit for bit (same mma sequence per element, same scale/softcap ops), so its P is exactly
//   1 and its dS exactly 0 (an analytically zero gradient comes out as 0, not as rounding noise).
#pragma once

#include "kernels/attention/flash_tiles.cuh"

namespace tq::cuda::attention {

inline constexpr int kFwdRows = 64, kFwdKeys = 64, kFwdWarps = 4, kFwdThreads = kFwdWarps * 32;
static_assert(kFwdRows == 16 * kFwdWarps, "one 16-row mma tile per warp");

struct FlashForwardArgs {
  Params p;
  const uint16_t* q;  // (B, Hq, Tq, D) dense
  const uint16_t* k;  // (B, Hkv, Tk, D) dense
  const uint16_t* v;  // (B, Hkv, Tk, D) dense
  uint16_t* out;      // (B, Hq, Tq, D)
  float* lse;         // (B, Hq, Tq)
};

template <int D>
constexpr size_t flash_forward_smem_bytes() {
  return size_t(kFwdRows + 2 * kFwdKeys) * HeadDim<D>::kStride * sizeof(uint16_t);
}

// Turns one tile of raw scores s (this thread's two rows, keys j0..j0+63) into probabilities relative
// to the updated running max, rescaling the running sums and the output accumulators o.
template <int kNT, int kNO>
__device__ __forceinline__ void online_softmax_tile(float (&s)[kNT][4], float (&o)[kNO][4], float (&row_max)[2],
                                                    float (&row_sum)[2], const Params& p, int b,
                                                    const RowMask (&rows)[2], int j0, bool check, int t4) {
  const float scale = float(p.scale), softcap = float(p.softcap);
  int code[kNT][2];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) code[nt][e1] = check ? key_code(p.mask, b, j0 + nt * 8 + 2 * t4 + e1) : 1;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[nt][e] * scale;
      if (softcap > 0.f) x = softcap * tanhf(x / softcap);
      if (check && !visible(p.mask, rows[e >> 1], j0 + nt * 8 + 2 * t4 + (e & 1), code[nt][e & 1])) x = -INFINITY;
      s[nt][e] = x;
    }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(row_max[rr], mx);
    const float base = m_new == -INFINITY ? 0.f : log2_scaled(m_new);  // no key yet: keep everything at 0
    const float alpha = exp2f(log2_scaled(row_max[rr]) - base);       // 0 when the old max was −inf
    row_max[rr] = m_new;
    row_sum[rr] *= alpha;
#pragma unroll
    for (int n = 0; n < kNO; ++n) {
      o[n][2 * rr] *= alpha;
      o[n][2 * rr + 1] *= alpha;
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const float pv = exp2f(log2_scaled(s[nt][2 * rr + e1]) - base);  // exactly 1 at the max
        s[nt][2 * rr + e1] = pv;
        row_sum[rr] += pv;
      }
  }
}

// o (16, kPad) += P (16, 64 keys, in registers as the S accumulators) · V tile (64, kPad) in smem.
template <class Tag, int D, int kNT>
__device__ __forceinline__ void accumulate_pv(float (&o)[HeadDim<D>::kNTiles][4], const float (&s)[kNT][4],
                                              const uint16_t* sV, int lane) {
  using H = HeadDim<D>;
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {  // 16 keys per k-step: S n-tiles 2kk and 2kk + 1
    const uint32_t a[4] = {Tag::pack(s[2 * kk][0], s[2 * kk][1]), Tag::pack(s[2 * kk][2], s[2 * kk][3]),
                           Tag::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), Tag::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < H::kNTiles / 2; ++dp) {
      uint32_t bb[4];
      load_b_trans(bb, sV, H::kStride, kk * 16, dp * 16, lane);
      Tag::mma(o[2 * dp], a, bb[0], bb[1]);
      Tag::mma(o[2 * dp + 1], a, bb[2], bb[3]);
    }
  }
}

template <class Tag, int D>
__global__ void __launch_bounds__(kFwdThreads, 2) flash_forward_kernel(FlashForwardArgs a) {
  using H = HeadDim<D>;
  constexpr int kNT = kFwdKeys / 8;  // S n-tiles per warp
  extern __shared__ __align__(16) uint16_t flash_smem[];
  uint16_t* sQ = flash_smem;                        // (kFwdRows, kStride)
  uint16_t* sK = sQ + kFwdRows * H::kStride;  // (kFwdKeys, kStride)
  uint16_t* sV = sK + kFwdKeys * H::kStride;  // (kFwdKeys, kStride)

  const Params& p = a.p;
  const int M = p.rep * p.Tq;                                           // packed rows of the group
  const int m0 = int(gridDim.x - 1 - blockIdx.x) * kFwdRows;            // latest (heaviest causal) tiles first
  const int group = blockIdx.y;                                         // b · Hkv + KV head
  const int b = group / p.Hkv;
  const uint16_t* qg = a.q + int64_t(group) * M * D;                    // (M, D)
  const uint16_t* kg = a.k + int64_t(group) * p.Tk * D;                 // (Tk, D)
  const uint16_t* vg = a.v + int64_t(group) * p.Tk * D;                 // (Tk, D)
  uint16_t* og = a.out + int64_t(group) * M * D;                        // (M, D)
  float* lseg = a.lse + int64_t(group) * M;                             // (M)
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;

  int t_begin, t_end;  // the key tiles some row of this CTA can see
  visible_key_tiles<kFwdRows, kFwdKeys>(p, b, m0, M, t_begin, t_end);

  RowMask rows[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) rows[rr] = row_mask(p.mask, b, (m0 + warp * 16 + g + rr * 8) % p.Tq);
  float o[H::kNTiles][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const bool masked = p.mask.any();

  if (t_begin < t_end) {
    load_tile_async<kFwdRows, D, kFwdThreads>(sQ, qg, m0, M);
    load_tile_async<kFwdKeys, D, kFwdThreads>(sK, kg, int64_t(t_begin) * kFwdKeys, p.Tk);
    cp_async_commit();
  }
  for (int t = t_begin; t < t_end; ++t) {
    const int j0 = t * kFwdKeys;
    load_tile_async<kFwdKeys, D, kFwdThreads>(sV, vg, j0, p.Tk);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K_t have landed (V_t may still be in flight)
    __syncthreads();
    float s[kNT][4];
    zero(s);
    warp_gemm_rows<Tag, D, kNT>(s, sQ, warp * 16, sK, 0, lane);
    online_softmax_tile(s, o, row_max, row_sum, p, b, rows, j0, masked || j0 + kFwdKeys > p.Tk, t4);
    __syncthreads();  // every warp is done with K_t
    if (t + 1 < t_end) {
      load_tile_async<kFwdKeys, D, kFwdThreads>(sK, kg, int64_t(j0) + kFwdKeys, p.Tk);
      cp_async_commit();
      cp_async_wait<1>();  // V_t has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    accumulate_pv<Tag, D, kNT>(o, s, sV, lane);
    __syncthreads();  // every warp is done with V_t before the next tile overwrites it
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = row_sum[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int m = m0 + warp * 16 + g + rr * 8;
    if (m >= M) continue;
    uint16_t* orow = og + int64_t(m) * D;  // (D)
#pragma unroll
    for (int nt = 0; nt < H::kNTiles; ++nt) {
      const int d = nt * 8 + 2 * t4;
      if (d < D) *reinterpret_cast<uint32_t*>(orow + d) = Tag::pack(o[nt][2 * rr] * inv, o[nt][2 * rr + 1] * inv);
    }
    if (t4 == 0) lseg[m] = l > 0.f ? row_max[rr] + logf(l) : -INFINITY;
  }
}

}  // namespace tq::cuda::attention
