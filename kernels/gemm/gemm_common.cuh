// Shared pieces of the GEMM kernels: the parameter struct, the fused epilogue, the fp32
// split-K reduction, and a plain SIMT kernel for operands the vectorized paths cannot take.
//
// Convention (row-major throughout): C(M, N) = alpha * op(A) * op(B) [+ bias] [+ beta*C] [+ R]
//   op(A) is (M, K): A stored (M, K) with lda >= K      (trans_a = false, "K-major")
//                    or stored (K, M) with lda >= M     (trans_a = true,  "M-major")
//   op(B) is (K, N): B stored (K, N) with ldb >= N      (trans_b = false, "N-major")
//                    or stored (N, K) with ldb >= K     (trans_b = true,  "K-major")
// so y = x * W^T (x (M,K), W (N,K)) is trans_b = true; dX = dY * W is trans_b = false;
// dW = dY^T * X is trans_a = true, trans_b = false.
// Invariants: products accumulate in fp32; the epilogue runs in fp32 and rounds once at the store;
// C is read only when beta != 0 (so a poisoned C with beta = 0 never leaks into the result).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include <kernels/cuda_check.cuh>
#include <kernels/pdl.cuh>

namespace tq::kernels {

enum class GemmDType : int { bf16 = 0, f32 = 1 };

// Which kernel family runs. auto_select is the normal choice; the others exist so tests and
// benchmarks can exercise every path on one GPU. cublas is the explicit reference switch.
enum class GemmKernel : int { auto_select = 0, sm90 = 1, sm80 = 2, skinny = 3, simt = 4, cublas = 5 };

// How the sm90 kernel sums split-K partials: auto_select (the cost model's choice; it considers
// the cluster reduction only with TQ_GEMM_SM90_SPLIT_CLUSTER=1), global (fp32 workspace + a
// second kernel), cluster (distributed shared memory within a thread-block cluster; an error
// where it cannot launch). The GPU tests force each.
enum class GemmSplitReduce : int { auto_select = 0, global = 1, cluster = 2 };

// Cross-entropy statistics in place of C (the sm90 kernel, C = A·Bᵀ with K-major A and B, one
// split, a forced tile width; linear_cross_entropy's loss without gradients): for row r and tile
// column t (tile_n columns), stats[r·ld + t] = (m, Σ exp(y − m)) over the tile's y = softcap(bf16(
// alpha·acc)), every step rounded to bf16 as ops::softcap_logit does (m the largest y; a NaN y
// makes the sum NaN, as lce::absorb_all), and target_logit[r] = y at column targets[r] (untouched
// when the target is outside [0, N)). C is not written. Active when `stats` is set.
struct GemmRowStats {
  float2* stats = nullptr;           // (M, ld)
  int64_t ld = 0;                    // ≥ ceil(N / tile_n)
  float* target_logit = nullptr;     // (M)
  const int64_t* targets = nullptr;  // (M)
  float cap = 0.0f;                  // softcap, already a bf16 value; 0 = off
  bool fast_exp = true;              // __expf (else the library expf)
};

struct GemmParams {
  int M = 0, N = 0, K = 0;
  const __nv_bfloat16* A = nullptr;  // (M, K) row-major, or (K, M) when trans_a
  int64_t lda = 0;
  bool trans_a = false;
  const __nv_bfloat16* B = nullptr;  // (K, N) row-major, or (N, K) when trans_b
  int64_t ldb = 0;
  bool trans_b = false;
  void* C = nullptr;  // (M, N) row-major, dtype c_dtype; read too when beta != 0
  int64_t ldc = 0;
  GemmDType c_dtype = GemmDType::bf16;
  float alpha = 1.0f;
  float beta = 0.0f;
  const void* bias = nullptr;  // (N,) added to every row, dtype bias_dtype
  GemmDType bias_dtype = GemmDType::f32;
  const void* residual = nullptr;  // (M, N) row-major, dtype c_dtype, ld = ldr; added after alpha
  int64_t ldr = 0;
  // Optional scratch for split-K partial sums (fp32). When absent or too small the launcher
  // takes it from the stream-ordered allocator (cudaMallocAsync) and frees it on the stream.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  GemmKernel kernel = GemmKernel::auto_select;
  int split_k = 0;  // 0: heuristic; >0 forces the number of K splits (sm90 / skinny)
  int tile_n = 0;   // 0: heuristic; 128/192/256 forces the sm90 tile width
  GemmSplitReduce split_reduce = GemmSplitReduce::auto_select;  // sm90 split-K only
  GemmRowStats row_stats;  // sm90 only: row statistics instead of C (see GemmRowStats)
};

// Everything the epilogue needs, by value into the kernels.
struct Epilogue {
  void* C;
  int64_t ldc;
  const void* bias;
  const void* residual;
  int64_t ldr;
  float alpha, beta;
  int M, N;
  bool c_f32, bias_f32;
  bool pair_ok;  // two adjacent columns can be stored as one vector (even N, ldc, ldr, aligned)
  bool quad_ok;  // four adjacent columns likewise (N, ldc, ldr % 4 == 0, bias/C/R aligned)
  GemmRowStats rs;
};

inline Epilogue make_epilogue(const GemmParams& p) {
  Epilogue e{};
  e.C = p.C;
  e.ldc = p.ldc;
  e.bias = p.bias;
  e.residual = p.residual;
  e.ldr = p.ldr;
  e.alpha = p.alpha;
  e.beta = p.beta;
  e.M = p.M;
  e.N = p.N;
  e.c_f32 = p.c_dtype == GemmDType::f32;
  e.bias_f32 = p.bias_dtype == GemmDType::f32;
  const size_t vec = e.c_f32 ? 8 : 4;
  e.pair_ok = p.N % 2 == 0 && p.ldc % 2 == 0 && reinterpret_cast<uintptr_t>(p.C) % vec == 0 &&
              (p.residual == nullptr ||
               (p.ldr % 2 == 0 && reinterpret_cast<uintptr_t>(p.residual) % vec == 0));
  auto al = [](const void* q, size_t a) { return reinterpret_cast<uintptr_t>(q) % a == 0; };
  const size_t osz = e.c_f32 ? 4 : 2;
  e.quad_ok = p.N % 4 == 0 && p.ldc % 4 == 0 && al(p.C, 4 * osz) &&
              (p.residual == nullptr || (p.ldr % 4 == 0 && al(p.residual, 4 * osz))) &&
              (p.bias == nullptr || al(p.bias, e.bias_f32 ? 16 : 8));
  e.rs = p.row_stats;
  return e;
}

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// exp(y − m) as the fast path computes it: ex2.approx of y·log2e − m·log2e (one FFMA, one MUFU).
__device__ __forceinline__ float exp_shifted(float y, float m_log2e) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(fmaf(y, 1.4426950408889634f, -m_log2e)));
  return r;
}

// The GemmRowStats epilogue of one (64, BN) wgmma accumulator fragment: this thread holds rows
// `row` and row + 8 (global), columns c0 + 8q + {0, 1} (c0 = tile column start + 2·(lane % 4)) in
// acc[4q + 2h + {0, 1}] for row + 8h. The four lanes of a quad share a row and merge by shuffles;
// every lane of the warp runs every shuffle (rows past M compute and store nothing).
// Cost per logit (it is not hidden behind the next tile's mainloop): the logit y = v(acc) is
// non-decreasing in acc (alpha > 0, round-to-nearest, tanh), so the row's max is v(max acc), one
// FMNMX per logit; then one v and one exp per logit. Columns past N (the last tile only) are -inf
// in the max and left out of the sum.
template <int BN>
__device__ __forceinline__ void row_stats_fragment(float (&acc)[BN / 2], const Epilogue& e, int row, int tile_col,
                                                   int tn, int lane) {
  const GemmRowStats& rs = e.rs;
  const int c0 = tile_col + 2 * (lane % 4);
  const bool partial = tile_col + BN > e.N;  // the same in every thread of the CTA
  auto value = [&](float x) {
    float y = bf16_round(x * e.alpha);
    if (rs.cap > 0.0f) y = bf16_round(bf16_round(tanhf(bf16_round(y / rs.cap))) * rs.cap);
    return y;
  };
  if (partial) {
#pragma unroll
    for (int q = 0; q < BN / 8; ++q)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        if (c0 + 8 * q + j >= e.N) acc[4 * q + j] = acc[4 * q + 2 + j] = -INFINITY;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row + 8 * h;
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < BN / 8; ++q) mx = fmaxf(mx, fmaxf(acc[4 * q + 2 * h], acc[4 * q + 2 * h + 1]));  // NaN ignored
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m = value(mx);  // finite unless a logit is ±inf (or every one NaN)
    float s = 0.0f;
    const float m_log2e = m * 1.4426950408889634f;
    auto sum = [&](auto masked, auto fast) {
#pragma unroll
      for (int q = 0; q < BN / 8; ++q)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (decltype(masked)::value && c0 + 8 * q + j >= e.N) continue;
          const float y = value(acc[4 * q + 2 * h + j]);
          if constexpr (decltype(fast)::value) s += exp_shifted(y, m_log2e);
          else s += y == m ? 1.0f : expf(y - m);  // as lce::absorb_all: a +inf max counts once, NaN spreads
        }
    };
    const bool fast = rs.fast_exp && isfinite(m);
    if (partial) {
      if (fast) sum(std::true_type{}, std::true_type{});
      else sum(std::true_type{}, std::false_type{});
    } else {
      if (fast) sum(std::false_type{}, std::true_type{});
      else sum(std::false_type{}, std::false_type{});
    }
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    const int64_t target = r < e.M ? rs.targets[r] : -1;
    if (r < e.M && lane % 4 == 0) rs.stats[int64_t(r) * rs.ld + tn] = make_float2(m, s);
    if (r < e.M && target >= tile_col && target < tile_col + BN) {  // one tile of the row, one lane of its quad
#pragma unroll
      for (int q = 0; q < BN / 8; ++q)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          if (c0 + 8 * q + j == target) rs.target_logit[r] = value(acc[4 * q + 2 * h + j]);
    }
  }
}

__device__ __forceinline__ float epi_load(const void* base, int64_t idx, bool f32) {
  return f32 ? static_cast<const float*>(base)[idx]
             : __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
}

// One output element: v is the fp32 sum of products at (row, col), both in range.
__device__ __forceinline__ float epi_value(const Epilogue& e, int row, int col, float v) {
  v *= e.alpha;
  if (e.bias) v += epi_load(e.bias, col, e.bias_f32);
  if (e.beta != 0.0f) v += e.beta * epi_load(e.C, row * e.ldc + col, e.c_f32);
  if (e.residual) v += epi_load(e.residual, row * e.ldr + col, e.c_f32);
  return v;
}

__device__ __forceinline__ void epi_store1(const Epilogue& e, int row, int col, float v) {
  if (row >= e.M || col >= e.N) return;
  v = epi_value(e, row, col, v);
  if (e.c_f32)
    static_cast<float*>(e.C)[row * e.ldc + col] = v;
  else
    static_cast<__nv_bfloat16*>(e.C)[row * e.ldc + col] = __float2bfloat16(v);
}

// Columns col and col + 1 of one row (col even).
__device__ __forceinline__ void epi_store2(const Epilogue& e, int row, int col, float v0, float v1) {
  if (row >= e.M) return;
  if (e.pair_ok && col + 1 < e.N) {
    v0 = epi_value(e, row, col, v0);
    v1 = epi_value(e, row, col + 1, v1);
    const int64_t idx = row * e.ldc + col;
    if (e.c_f32)
      *reinterpret_cast<float2*>(static_cast<float*>(e.C) + idx) = make_float2(v0, v1);
    else
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(e.C) + idx) =
          __floats2bfloat162_rn(v0, v1);
  } else {
    epi_store1(e, row, col, v0);
    epi_store1(e, row, col + 1, v1);
  }
}

// Columns col .. col + 3 of one row (col % 4 == 0).
__device__ __forceinline__ void epi_store4(const Epilogue& e, int row, int col, float4 v) {
  if (row >= e.M) return;
  if (!(e.quad_ok && col + 3 < e.N)) {
    epi_store2(e, row, col, v.x, v.y);
    epi_store2(e, row, col + 2, v.z, v.w);
    return;
  }
  float4 x = make_float4(v.x * e.alpha, v.y * e.alpha, v.z * e.alpha, v.w * e.alpha);
  auto add4 = [&](const void* base, int64_t idx, bool f32, float scale) {
    float4 t;
    if (f32) {
      t = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + idx);
    } else {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(base) + idx);
      const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      t = make_float4(lo.x, lo.y, hi.x, hi.y);
    }
    x.x += scale * t.x, x.y += scale * t.y, x.z += scale * t.z, x.w += scale * t.w;
  };
  if (e.bias) add4(e.bias, col, e.bias_f32, 1.0f);
  if (e.beta != 0.0f) add4(e.C, row * e.ldc + col, e.c_f32, e.beta);
  if (e.residual) add4(e.residual, row * e.ldr + col, e.c_f32, 1.0f);
  const int64_t idx = row * e.ldc + col;
  if (e.c_f32) {
    *reinterpret_cast<float4*>(static_cast<float*>(e.C) + idx) = x;
  } else {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y), hi = __floats2bfloat162_rn(x.z, x.w);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&lo);
    raw.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(e.C) + idx) = raw;
  }
}

// The plain (non-template) kernels of these headers are templates on an unused parameter so that
// every translation unit that includes them (<tq/cuda.hpp>'s and the GEMM tests/benchmarks) can
// instantiate them: a plain __global__ definition in a header is a duplicate symbol at link time.

// ws: (splits, M, N) fp32 partial sums, contiguous. Sums the splits and applies the epilogue.
template <class = void>
__global__ void gemm_splitk_epilogue_kernel(const float* __restrict__ ws, int splits, Epilogue e) {
  tq::cuda::grid_dependency_wait();  // a programmatic dependent of the kernel that wrote ws
  const int64_t total = static_cast<int64_t>(e.M) * e.N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += ws[s * total + i];
    epi_store1(e, static_cast<int>(i / e.N), static_cast<int>(i % e.N), v);
  }
}

// The same, four adjacent columns per thread (e.quad_ok: N % 4 == 0, aligned operands): 16-byte
// loads of every split's partials, all issued before the sums.
template <class = void>
__global__ void gemm_splitk_epilogue4_kernel(const float* __restrict__ ws, int splits, Epilogue e) {
  tq::cuda::grid_dependency_wait();  // a programmatic dependent of the kernel that wrote ws
  const int64_t total = static_cast<int64_t>(e.M) * e.N, quads = total / 4;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < quads;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      const float4 t = __ldcs(reinterpret_cast<const float4*>(ws + s * total) + i);  // read once
      v.x += t.x, v.y += t.y, v.z += t.z, v.w += t.w;
    }
    const int64_t idx = 4 * i;
    epi_store4(e, static_cast<int>(idx / e.N), static_cast<int>(idx % e.N), v);
  }
}

// `programmatic` (sm_90 only): launched as a programmatic dependent of the kernel that wrote ws, so
// its blocks take the SMs as that kernel's leave instead of after a launch gap.
inline void launch_splitk_epilogue(const float* ws, int splits, const Epilogue& e, cudaStream_t stream,
                                   bool programmatic = false) {
  const int64_t total = static_cast<int64_t>(e.M) * e.N;
  const bool quad = e.quad_ok && reinterpret_cast<uintptr_t>(ws) % 16 == 0;
  const int blocks = static_cast<int>(std::min<int64_t>(((quad ? total / 4 : total) + 255) / 256, 132 * 16));
  cudaLaunchAttribute attr = tq::cuda::programmatic_attribute();
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(256);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  if (quad) TQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemm_splitk_epilogue4_kernel<>, ws, splits, e));
  else TQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemm_splitk_epilogue_kernel<>, ws, splits, e));
}

// Any strides, any alignment: one thread per output element, 16x16 tiles staged in shared memory.
template <class = void>
__global__ void gemm_simt_kernel(const __nv_bfloat16* __restrict__ A, int64_t lda, bool trans_a,
                                 const __nv_bfloat16* __restrict__ B, int64_t ldb, bool trans_b,
                                 int K, Epilogue e) {
  __shared__ float sA[16][17];  // (16 rows of C, 16 of K)
  __shared__ float sB[16][17];  // (16 of K, 16 columns of C)
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * 16 + ty, col = blockIdx.x * 16 + tx;
  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += 16) {
    {  // A element (row0 + ty, k0 + tx)
      const int r = blockIdx.y * 16 + ty, k = k0 + tx;
      float v = 0.0f;
      if (r < e.M && k < K) v = __bfloat162float(trans_a ? A[k * lda + r] : A[r * lda + k]);
      sA[ty][tx] = v;
    }
    {  // B element (k0 + ty, col0 + tx)
      const int k = k0 + ty, c = blockIdx.x * 16 + tx;
      float v = 0.0f;
      if (c < e.N && k < K) v = __bfloat162float(trans_b ? B[c * ldb + k] : B[k * ldb + c]);
      sB[ty][tx] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) acc += sA[ty][kk] * sB[kk][tx];
    __syncthreads();
  }
  epi_store1(e, row, col, acc);
}

inline void launch_gemm_simt(const GemmParams& p, cudaStream_t stream) {
  dim3 block(16, 16), grid((p.N + 15) / 16, (p.M + 15) / 16);
  gemm_simt_kernel<><<<grid, block, 0, stream>>>(p.A, p.lda, p.trans_a, p.B, p.ldb, p.trans_b, p.K,
                                               make_epilogue(p));
  TQ_CUDA_CHECK_LAUNCH();
}

// Scratch for split-K: the caller's buffer when it is big enough, else stream-ordered memory.
class GemmScratch {
 public:
  GemmScratch(const GemmParams& p, size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (p.workspace && p.workspace_bytes >= bytes) {
      ptr_ = p.workspace;
    } else if (bytes > 0) {
      TQ_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
      owned_ = true;
    }
  }
  ~GemmScratch() {
    if (owned_) cudaFreeAsync(ptr_, stream_);  // errors resurface at the next checked call
  }
  GemmScratch(const GemmScratch&) = delete;
  GemmScratch& operator=(const GemmScratch&) = delete;
  float* f32() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  bool owned_ = false;
  cudaStream_t stream_;
};

}  // namespace tq::kernels
