// tq GEMM entry point: gemm(params, stream) validates the parameters and picks a kernel.
//   - sm_90 and the sm_90a build   -> TMA + wgmma persistent kernel, any M (split-K and tile
//                                     width by a cost model; small M is memory-bound there too)
//   - elsewhere, M <= 16           -> skinny (GEMV-like, split-K with fp32 atomics)
//   - elsewhere                    -> mma.sync sm_80 kernel
//   - operands the vector paths cannot take (unaligned, ld % 8 != 0, K % 8 != 0) -> SIMT kernel
// `TQ_GEMM=cublas` in the environment routes every call to cuBLASLt (the benchmark reference);
// nothing else ever does. See gemm_common.cuh for the layout convention.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include <kernels/cuda_check.cuh>
#include <kernels/gemm/cublas_ref.cuh>
#include <kernels/gemm/gemm_common.cuh>
#include <kernels/gemm/gemm_skinny.cuh>
#include <kernels/gemm/gemm_sm80.cuh>
#include <kernels/gemm/gemm_sm90.cuh>

namespace tq::kernels {

inline bool gemm_env_cublas() {
  static const bool on = [] {
    const char* v = std::getenv("TQ_GEMM");
    return v != nullptr && std::strcmp(v, "cublas") == 0;
  }();
  return on;
}

inline bool gemm_sm90_available_compiled();

// True when this device is sm_90 and the sm_90a wgmma kernel was compiled into this binary.
inline bool gemm_sm90_available() {
  constexpr int kMaxDevices = 64;
  static signed char is_sm90[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no (looked up once)
  int dev = 0;
  TQ_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= kMaxDevices || is_sm90[dev] == 0) {
    int major = 0, minor = 0;
    TQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    TQ_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (dev >= kMaxDevices) return major == 9 && minor == 0 && gemm_sm90_available_compiled();
    is_sm90[dev] = major == 9 && minor == 0 ? 1 : -1;
  }
  if (is_sm90[dev] < 0) return false;
  return gemm_sm90_available_compiled();
}

inline bool gemm_sm90_available_compiled() {
  static const bool compiled = [] {
    cudaFuncAttributes a{};
    TQ_CUDA_CHECK(cudaFuncGetAttributes(&a, sm90::gemm_sm90_kernel<128, false, false>));
    return a.binaryVersion == 90;
  }();
  return compiled;
}

inline void gemm_validate(const GemmParams& p) {
  TQ_CHECK(p.M >= 0 && p.N >= 0 && p.K >= 1, "gemm: bad shape M=", p.M, " N=", p.N, " K=", p.K);
  const bool stats = p.row_stats.stats != nullptr;
  TQ_CHECK(p.A && p.B && (p.C || stats), "gemm: null operand (A, B and C are required)");
  TQ_CHECK(p.lda >= (p.trans_a ? p.M : p.K) && p.lda >= 1, "gemm: lda=", p.lda, " too small for ",
           p.trans_a ? "(K, M)" : "(M, K)", " M=", p.M, " K=", p.K);
  TQ_CHECK(p.ldb >= (p.trans_b ? p.K : p.N) && p.ldb >= 1, "gemm: ldb=", p.ldb, " too small for ",
           p.trans_b ? "(N, K)" : "(K, N)", " N=", p.N, " K=", p.K);
  TQ_CHECK(stats || p.ldc >= p.N, "gemm: ldc=", p.ldc, " < N=", p.N);
  if (stats) {
    const bool width = p.tile_n == 128 || p.tile_n == 192 || p.tile_n == 256;
    TQ_CHECK(!p.trans_a && p.trans_b && p.split_k == 1 && p.alpha > 0.0f && width && p.row_stats.target_logit &&
                 p.row_stats.targets && p.row_stats.ld >= (int64_t(p.N) + p.tile_n - 1) / p.tile_n,
             "gemm: row statistics need C = A·Bᵀ (K-major A and B), alpha > 0, split_k = 1, a forced tile width, "
             "targets, target_logit and ld ≥ the tile columns (got trans_a=", p.trans_a, " trans_b=", p.trans_b,
             " alpha=", p.alpha, " split_k=", p.split_k, " tile_n=", p.tile_n, " ld=", p.row_stats.ld, ")");
  }
  TQ_CHECK(p.residual == nullptr || p.ldr >= p.N, "gemm: ldr=", p.ldr, " < N=", p.N);
  TQ_CHECK(static_cast<int64_t>(p.M) * p.ldc < (int64_t(1) << 31) &&
               static_cast<int64_t>(p.trans_a ? p.K : p.M) * p.lda < (int64_t(1) << 31) &&
               static_cast<int64_t>(p.trans_b ? p.N : p.K) * p.ldb < (int64_t(1) << 31),
           "gemm: operands over 2^31 elements are not supported");
}

// Whether gemm() can produce GemmRowStats for p here: the sm90 kernel, not replaced by cuBLAS.
inline bool gemm_row_stats_available(const GemmParams& p) {
  return !gemm_env_cublas() && (p.kernel == GemmKernel::auto_select || p.kernel == GemmKernel::sm90) &&
         gemm_sm90_available() && sm90::operands_fit(p);
}

inline void gemm(const GemmParams& p, cudaStream_t stream) {
  gemm_validate(p);
  if (p.M == 0 || p.N == 0) return;
  if (p.row_stats.stats != nullptr) {
    TQ_CHECK(gemm_row_stats_available(p), "gemm: row statistics need the sm90 kernel (an sm_90 device, 16-byte "
             "aligned operands, no TQ_GEMM=cublas)");
    sm90::gemm_sm90(p, stream);
    return;
  }
  GemmKernel k = p.kernel;
  if (gemm_env_cublas()) k = GemmKernel::cublas;
  if (k == GemmKernel::auto_select) {
    if (sm90::operands_fit(p) && gemm_sm90_available()) k = GemmKernel::sm90;
    else if (skinny::operands_fit(p)) k = GemmKernel::skinny;
    else if (sm80::operands_fit(p)) k = GemmKernel::sm80;
    else k = GemmKernel::simt;
  }
  switch (k) {
    case GemmKernel::sm90:
      TQ_CHECK(gemm_sm90_available(), "gemm: sm90 kernel requested but not available here");
      sm90::gemm_sm90(p, stream);
      break;
    case GemmKernel::sm80: sm80::gemm_sm80(p, stream); break;
    case GemmKernel::skinny: skinny::gemm_skinny(p, sm90::num_sms(), stream); break;
    case GemmKernel::simt: launch_gemm_simt(p, stream); break;
    case GemmKernel::cublas: {
      thread_local std::unique_ptr<CublasLtGemm> lt;
      if (!lt) lt = std::make_unique<CublasLtGemm>();
      lt->run(p, stream);
      break;
    }
    default: TQ_CHECK(false, "gemm: unknown kernel ", static_cast<int>(k));
  }
}

}  // namespace tq::kernels
