// Portable tensor-core GEMM (sm_80+): cp.async multi-stage shared-memory pipeline, ldmatrix
// fragments (.trans for MN-major operands), mma.sync m16n8k16 bf16 -> fp32.
//
// CTA tile 128 x 128 x 32, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 mma tiles.
// Shared-memory tiles keep the global orientation, rows padded by 8 elements (16 bytes) so that
// the 8 row addresses of one ldmatrix fall in distinct bank groups:
//   A K-major: (BM, BK + 8)   A M-major: (BK, BM + 8)
//   B K-major: (BN, BK + 8)   B N-major: (BK, BN + 8)
// Out-of-range 16-byte chunks are zero-filled (cp.async src-size 0), so tails in M, N and K need
// K % 8 == 0, 16-byte aligned bases and lda, ldb % 8 == 0 (the launcher checks).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <kernels/cuda_check.cuh>
#include <kernels/gemm/gemm_common.cuh>

namespace tq::kernels::sm80 {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3, kThreads = 256;
constexpr int kPad = 8;

template <bool kMN, int kRows>  // kRows: the M or N extent of the tile
struct TileShape {
  // K-major: (kRows, BK + pad); MN-major: (BK, kRows + pad)
  static constexpr int kOuter = kMN ? kBK : kRows;
  static constexpr int kInner = kMN ? kRows + kPad : kBK + kPad;
  static constexpr int kElems = kOuter * kInner;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// Loads one (rows x BK) operand tile (global orientation given by kMN) into shared memory.
// Operand view: K-major: rows along dim 0 (extent `rows`), K along dim 1; MN-major: transposed.
template <bool kMN, int kRows>
__device__ __forceinline__ void load_tile(__nv_bfloat16* s, const __nv_bfloat16* g, int64_t ld,
                                          int row0, int rows, int k0, int K) {
  using T = TileShape<kMN, kRows>;
  constexpr int kChunksPerLine = (kMN ? kRows : kBK) / 8;
  constexpr int kChunks = T::kOuter * kChunksPerLine;
  static_assert(kChunks % kThreads == 0);
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int line = idx / kChunksPerLine, chunk = idx % kChunksPerLine;
    int r, k;  // element (row r of the operand, k)
    if constexpr (kMN) {
      k = k0 + line;
      r = row0 + chunk * 8;
    } else {
      r = row0 + line;
      k = k0 + chunk * 8;
    }
    const bool valid = r < rows && k < K;
    const __nv_bfloat16* src = valid ? (kMN ? g + k * ld + r : g + r * ld + k) : g;
    cp_async16(smem_addr(s + line * T::kInner + chunk * 8), src, valid);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <bool kAMajorM, bool kBMajorN>
__global__ void __launch_bounds__(kThreads)
    gemm_sm80_kernel(const __nv_bfloat16* __restrict__ A, int64_t lda,
                     const __nv_bfloat16* __restrict__ B, int64_t ldb, int K, Epilogue epi) {
  using TA = TileShape<kAMajorM, kBM>;
  using TB = TileShape<kBMajorN, kBN>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // kStages x A tile
  __nv_bfloat16* sB = sA + kStages * TA::kElems;                   // kStages x B tile

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp tile rows [64wm, +64), cols [32wn, +32)
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int k_tiles = (K + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    load_tile<kAMajorM, kBM>(sA + stage * TA::kElems, A, lda, m0, epi.M, kt * kBK, K);
    load_tile<kBMajorN, kBN>(sB + stage * TB::kElems, B, ldb, n0, epi.N, kt * kBK, K);
  };

  float acc[4][4][4] = {};  // [m tile][n tile][mma C fragment]
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }

  const int mat = lane / 8, r8 = lane % 8;
  for (int kt = 0; kt < k_tiles; ++kt) {
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 2) : "memory");
    __syncthreads();
    {  // refill the stage consumed in the previous iteration
      const int nk = kt + kStages - 1;
      if (nk < k_tiles) load_stage(nk % kStages, nk);
      asm volatile("cp.async.commit_group;" ::: "memory");
    }
    const __nv_bfloat16* a = sA + (kt % kStages) * TA::kElems;
    const __nv_bfloat16* b = sB + (kt % kStages) * TB::kElems;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int mr = wm * 64 + i * 16;
        if constexpr (!kAMajorM) {  // (m, k): lanes 0-15 rows, lanes 16-31 the k + 8 half
          ldmatrix_x4(af[i], smem_addr(a + (mr + lane % 16) * TA::kInner + kk + (lane / 16) * 8));
        } else {  // (k, m): matrix j = (m + 8 (j & 1), k + 8 (j >> 1)), rows along k
          ldmatrix_x4_trans(af[i], smem_addr(a + (kk + r8 + (mat / 2) * 8) * TA::kInner + mr +
                                             (mat % 2) * 8));
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // two n8 tiles per ldmatrix.x4
        const int nc = wn * 32 + j * 16;
        if constexpr (!kBMajorN) {  // (n, k): matrix j = (n + 8 (j >> 1), k + 8 (j & 1))
          ldmatrix_x4(bf[j], smem_addr(b + (nc + r8 + (mat / 2) * 8) * TB::kInner + kk +
                                       (mat % 2) * 8));
        } else {  // (k, n): matrix j = (k + 8 (j & 1), n + 8 (j >> 1)), rows along k
          ldmatrix_x4_trans(bf[j], smem_addr(b + (kk + r8 + (mat % 2) * 8) * TB::kInner + nc +
                                             (mat / 2) * 8));
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mma_bf16(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");

  // C fragment: d0, d1 at (g, 2t + {0,1}); d2, d3 at (g + 8, ...), g = lane / 4, t = lane % 4
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = m0 + wm * 64 + i * 16 + lane / 4;
      const int c = n0 + wn * 32 + j * 8 + 2 * (lane % 4);
      epi_store2(epi, r, c, acc[i][j][0], acc[i][j][1]);
      epi_store2(epi, r + 8, c, acc[i][j][2], acc[i][j][3]);
    }
}

inline bool operands_fit(const GemmParams& p) {
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return al(p.A) && al(p.B) && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.K % 8 == 0;
}

template <bool AM, bool BN_MAJOR>
void launch(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem =
      kStages * (TileShape<AM, kBM>::kElems + TileShape<BN_MAJOR, kBN>::kElems) * 2;
  auto kernel = gemm_sm80_kernel<AM, BN_MAJOR>;
  static const bool attr_set = [&] {
    TQ_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)attr_set;
  dim3 grid((p.N + kBN - 1) / kBN, (p.M + kBM - 1) / kBM);
  kernel<<<grid, kThreads, smem, stream>>>(p.A, p.lda, p.B, p.ldb, p.K, make_epilogue(p));
  TQ_CUDA_CHECK_LAUNCH();
}

inline void gemm_sm80(const GemmParams& p, cudaStream_t stream) {
  TQ_CHECK(operands_fit(p),
           "gemm sm80: needs 16-byte aligned A, B, lda % 8 == 0, ldb % 8 == 0, K % 8 == 0");
  const bool am = p.trans_a, bn_major = !p.trans_b;
  if (!am && !bn_major) launch<false, false>(p, stream);
  else if (!am && bn_major) launch<false, true>(p, stream);
  else if (am && !bn_major) launch<true, false>(p, stream);
  else launch<true, true>(p, stream);
}

}  // namespace tq::kernels::sm80
