// Small-M GEMM (M <= 16: decoding, tiny batches). Memory-bound on B, so the kernels stream B once
// with 16-byte loads, keep all M rows' partial sums in registers, split K across CTAs to fill the
// GPU, and reduce with fp32 atomics into a zeroed (M, N) workspace; gemm_splitk_epilogue_kernel
// then applies the epilogue. (Summation order across CTAs is therefore not fixed.)
//   B K-major (N, K): a warp owns 4 columns; lanes stride K by 8 elements; shuffle reduction.
//   B N-major (K, N): a lane owns 8 adjacent columns; the 8 warps of a CTA take every 8th k row;
//                     reduction across warps through shared memory.
// Preconditions (checked by the launcher): 16-byte aligned A, B; lda, ldb % 8 == 0; K % 8 == 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <kernels/cuda_check.cuh>
#include <kernels/gemm/gemm_common.cuh>

namespace tq::kernels::skinny {

constexpr int kThreads = 256;

__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// A element (m, k) of op(A) (M, K).
template <bool kAMajorM>
__device__ __forceinline__ float a_at(const __nv_bfloat16* A, int64_t lda, int m, int k) {
  return __bfloat162float(kAMajorM ? A[k * lda + m] : A[m * lda + k]);
}

// B (N, K) K-major. grid (ceil(N / 32), splits); each warp: 4 columns, K range of its split.
template <int MT, bool kAMajorM>
__global__ void __launch_bounds__(kThreads)
    skinny_kmajor_kernel(const __nv_bfloat16* __restrict__ A, int64_t lda,
                         const __nv_bfloat16* __restrict__ B, int64_t ldb, int M, int N, int K,
                         int k_per_split, float* __restrict__ ws) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * (kThreads / 32) + warp) * 4;
  const int kb = blockIdx.y * k_per_split, ke = min(K, kb + k_per_split);
  float acc[MT][4] = {};
  for (int k = kb + lane * 8; k < ke; k += 256) {
    float b[4][8];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (n0 + c < N)
        unpack8(__ldg(reinterpret_cast<const uint4*>(B + (n0 + c) * ldb + k)), b[c]);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) b[c][j] = 0.0f;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= M) break;
      float a[8];
      if constexpr (!kAMajorM) {
        unpack8(__ldg(reinterpret_cast<const uint4*>(A + m * lda + k)), a);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = a_at<true>(A, lda, m, k + j);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][c] = fmaf(a[j], b[c][j], acc[m][c]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= M) break;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v = acc[m][c];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == c && n0 + c < N) atomicAdd(ws + m * static_cast<int64_t>(N) + n0 + c, v);
    }
  }
}

// B (K, N) N-major. grid (ceil(N / 256), splits); lane owns columns [n0 + 8 lane, +8).
template <int MT, bool kAMajorM>
__global__ void __launch_bounds__(kThreads)
    skinny_nmajor_kernel(const __nv_bfloat16* __restrict__ A, int64_t lda,
                         const __nv_bfloat16* __restrict__ B, int64_t ldb, int M, int N, int K,
                         int k_per_split, float* __restrict__ ws) {
  __shared__ float red[kThreads / 32][256];  // (warp, column of the CTA) for one row m
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * 256 + lane * 8;
  const int kb = blockIdx.y * k_per_split, ke = min(K, kb + k_per_split);
  float acc[MT][8] = {};
  if (n < N) {
    for (int k = kb + warp; k < ke; k += kThreads / 32) {
      float b[8];
      unpack8(__ldg(reinterpret_cast<const uint4*>(B + k * ldb + n)), b);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= M) break;
        const float a = a_at<kAMajorM>(A, lda, m, k);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][j] = fmaf(a, b[j], acc[m][j]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= M) break;
#pragma unroll
    for (int j = 0; j < 8; ++j) red[warp][lane * 8 + j] = acc[m][j];
    __syncthreads();
    {  // thread t sums column t of the CTA over the 8 warps
      const int col = blockIdx.x * 256 + threadIdx.x;
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) v += red[w][threadIdx.x];
      if (col < N) atomicAdd(ws + m * static_cast<int64_t>(N) + col, v);
    }
    __syncthreads();
  }
}

inline bool operands_fit(const GemmParams& p) {
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.M <= 16 && al(p.A) && al(p.B) && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.K % 8 == 0;
}

template <int MT>
void launch_mt(const GemmParams& p, float* ws, int sms, cudaStream_t stream) {
  const bool am = p.trans_a;
  if (p.trans_b) {  // B (N, K) K-major
    const int gx = (p.N + 31) / 32;
    int splits = p.split_k ? p.split_k : std::max(1, (4 * sms + gx - 1) / gx);
    splits = std::min(splits, std::max(1, p.K / 256));
    const int kps = ((p.K + splits - 1) / splits + 7) / 8 * 8;
    splits = (p.K + kps - 1) / kps;
    dim3 grid(gx, splits);
    if (am)
      skinny_kmajor_kernel<MT, true><<<grid, kThreads, 0, stream>>>(p.A, p.lda, p.B, p.ldb, p.M,
                                                                   p.N, p.K, kps, ws);
    else
      skinny_kmajor_kernel<MT, false><<<grid, kThreads, 0, stream>>>(p.A, p.lda, p.B, p.ldb, p.M,
                                                                    p.N, p.K, kps, ws);
  } else {  // B (K, N) N-major
    const int gx = (p.N + 255) / 256;
    int splits = p.split_k ? p.split_k : std::max(1, (4 * sms + gx - 1) / gx);
    splits = std::min(splits, std::max(1, p.K / 64));
    const int kps = (p.K + splits - 1) / splits;
    splits = (p.K + kps - 1) / kps;
    dim3 grid(gx, splits);
    if (am)
      skinny_nmajor_kernel<MT, true><<<grid, kThreads, 0, stream>>>(p.A, p.lda, p.B, p.ldb, p.M,
                                                                   p.N, p.K, kps, ws);
    else
      skinny_nmajor_kernel<MT, false><<<grid, kThreads, 0, stream>>>(p.A, p.lda, p.B, p.ldb, p.M,
                                                                    p.N, p.K, kps, ws);
  }
  TQ_CUDA_CHECK_LAUNCH();
}

inline void gemm_skinny(const GemmParams& p, int sms, cudaStream_t stream) {
  TQ_CHECK(operands_fit(p), "gemm skinny: needs M <= 16, 16-byte aligned A, B, lda % 8 == 0, ",
           "ldb % 8 == 0, K % 8 == 0 (M=", p.M, " K=", p.K, ")");
  const size_t bytes = sizeof(float) * static_cast<size_t>(p.M) * p.N;
  GemmScratch scratch(p, bytes, stream);
  float* ws = scratch.f32();
  TQ_CUDA_CHECK(cudaMemsetAsync(ws, 0, bytes, stream));
  if (p.M <= 1) launch_mt<1>(p, ws, sms, stream);
  else if (p.M <= 2) launch_mt<2>(p, ws, sms, stream);
  else if (p.M <= 4) launch_mt<4>(p, ws, sms, stream);
  else if (p.M <= 8) launch_mt<8>(p, ws, sms, stream);
  else launch_mt<16>(p, ws, sms, stream);
  launch_splitk_epilogue(ws, 1, make_epilogue(p), stream);
}

}  // namespace tq::kernels::skinny
