// Shared-memory tiles and warp-level mma.sync GEMM fragments for the flash attention kernels.
//
// Invariants:
// - A tile is (rows, kStride) 16-bit elements in shared memory, row-major, holding rows of a dense
//   (nrows, D) global matrix. Columns [D, kPad) and rows past nrows are zero-filled by cp.async, so
//   the k = 16 contraction steps over kPad and the n = 8 output tiles never see garbage; the columns
//   [kPad, kStride) are padding that nothing reads.
// - kStride is an odd number of 16-byte chunks, so the 8 row addresses of one ldmatrix phase fall in
//   8 distinct bank groups (no conflicts).
// - Fragment layouts are those of mma.sync.m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"):
//   lane = 4·g + t holds C/D elements (row g, cols 2t, 2t+1) and (row g + 8, cols 2t, 2t+1).
#pragma once

#include "kernels/attention/attention_common.cuh"

namespace tq::cuda::attention {

template <int D>
struct HeadDim {
  static constexpr int kD = D;
  static constexpr int kPad = (D + 15) / 16 * 16;  // contraction in k-steps of 16
  static constexpr int kStride = kPad + 8;         // shared-memory row, elements
  static constexpr int kKSteps = kPad / 16;
  static constexpr int kNTiles = kPad / 8;
  static_assert(D % 8 == 0, "tiles move 16-byte chunks: the head dim must be a multiple of 8");
  static_assert((kStride / 8) % 2 == 1, "row stride must be an odd number of 16-byte chunks");
  static_assert(kNTiles % 2 == 0, "B fragments are loaded for pairs of n-tiles");
};

// Issues the cp.async copies of rows [row0, row0 + kRows) of g (nrows, D) row-major into s (kRows,
// kStride); zero-fills what lies outside the matrix. All kThreads threads of the block take part.
template <int kRows, int D, int kThreads>
__device__ __forceinline__ void load_tile_async(uint16_t* s, const uint16_t* __restrict__ g, int64_t row0,
                                                int64_t nrows) {
  using H = HeadDim<D>;
  constexpr int kChunks = H::kPad / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t row = row0 + r;
    const bool ok = row < nrows && c * 8 < D;
    cp_async16(s + r * H::kStride + c * 8, ok ? g + row * D + c * 8 : g, ok);
  }
}

// A fragment, A(m, k) = s[m0 + m][k0 + k] (row-major A).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* s, int stride, int m0, int k0, int lane) {
  ldmatrix_x4(a, s + (m0 + (lane & 15)) * stride + k0 + (lane >> 4) * 8);
}
// A fragment of a transposed block, A(m, k) = s[k0 + k][m0 + m].
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const uint16_t* s, int stride, int k0, int m0, int lane) {
  ldmatrix_x4_trans(a, s + (k0 + (lane & 7) + ((lane >> 4) << 3)) * stride + m0 + ((lane >> 3) & 1) * 8);
}
// B fragments of the n-tiles n0 and n0 + 8 when B(k, n) = s[n0 + n][k0 + k] (rows of s are columns
// of B: K in Q·Kᵀ, V in dO·Vᵀ). b[0..1] belong to the first n-tile, b[2..3] to the second.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const uint16_t* s, int stride, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + k0 + ((lane >> 3) & 1) * 8);
}
// B fragments of the n-tiles n0 and n0 + 8 when B(k, n) = s[k0 + k][n0 + n] (row-major B: V in P·V,
// dO in Pᵀ·dO, Q in dSᵀ·Q, K in dS·K).
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const uint16_t* s, int stride, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * stride + n0 + (lane >> 4) * 8);
}

// acc (16, 8·kNT) += A·Bᵀ-style product over the whole padded head dim: A rows a0.. of sa, B columns =
// rows b0.. of sb (both tiles of HeadDim<D>). Used for S = Q·Kᵀ and dP = dO·Vᵀ.
template <class Tag, int D, int kNT>
__device__ __forceinline__ void warp_gemm_rows(float (&acc)[kNT][4], const uint16_t* sa, int a0, const uint16_t* sb,
                                               int b0, int lane) {
  using H = HeadDim<D>;
  static_assert(kNT % 2 == 0);
#pragma unroll
  for (int ks = 0; ks < H::kKSteps; ++ks) {
    uint32_t a[4];
    load_a(a, sa, H::kStride, a0, ks * 16, lane);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      load_b_rows(b, sb, H::kStride, b0 + np * 16, ks * 16, lane);
      Tag::mma(acc[2 * np], a, b[0], b[1]);
      Tag::mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The key tiles [t_begin, t_end) of width kKeys that some of the packed query rows [m0, m0 + kRows)
// (of M, batch row b) can see through the positional masks (causal / prefix reach, sliding window);
// t_begin == t_end when none. Every thread of the block calls it (it holds two barriers).
template <int kRows, int kKeys>
__device__ __forceinline__ void visible_key_tiles(const Params& p, int b, int m0, int M, int& t_begin, int& t_end) {
  static_assert(kRows <= 128, "one thread per row among the first warps");
  __shared__ int s_lo, s_hi;
  const int tid = threadIdx.x;
  if (tid == 0) s_lo = p.Tk, s_hi = 0;
  __syncthreads();
  if (tid < kRows && m0 + tid < M) {
    int lo, hi;
    key_range(p.mask, b, row_mask(p.mask, b, (m0 + tid) % p.Tq), lo, hi);
    if (lo < hi) {
      atomicMin(&s_lo, lo);
      atomicMax(&s_hi, hi);
    }
  }
  __syncthreads();
  t_begin = s_lo / kKeys;
  t_end = s_lo < s_hi ? (s_hi + kKeys - 1) / kKeys : t_begin;
}

// Zeroes an accumulator array.
template <int kNT>
__device__ __forceinline__ void zero(float (&acc)[kNT][4]) {
#pragma unroll
  for (int n = 0; n < kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
}

}  // namespace tq::cuda::attention
