// cuBLASLt reference for GemmParams: the benchmark baseline and the explicit `TQ_GEMM=cublas`
// switch. Never used as a silent fallback. Row-major C(M, N) = op(A) op(B) is computed as the
// column-major C^T(N, M) = op(B)^T op(A)^T, i.e. cuBLAS sees B first.
// Epilogue: alpha, beta*C and bias go to cuBLASLt (CUBLASLT_EPILOGUE_BIAS with the bias dtype
// set); cuBLASLt has no residual input, so a residual is added by a small extra kernel.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <kernels/cuda_check.cuh>
#include <kernels/gemm/gemm_common.cuh>

#define TQ_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                         \
    cublasStatus_t tq_cublas_st_ = (expr);                                                     \
    if (tq_cublas_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                   \
      ::tq::fail(::tq::str_cat("cuBLAS error at ", __FILE__, ":", __LINE__, ": ", #expr, ": ", \
                               static_cast<int>(tq_cublas_st_)));                              \
  } while (0)

namespace tq::kernels {

template <class = void>  // a template: see gemm_common.cuh (headers included by several TUs)
__global__ void gemm_add_residual_kernel(Epilogue e) {
  const int64_t total = static_cast<int64_t>(e.M) * e.N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / e.N), c = static_cast<int>(i % e.N);
    const float v = epi_load(e.C, r * e.ldc + c, e.c_f32) + epi_load(e.residual, r * e.ldr + c, e.c_f32);
    if (e.c_f32)
      static_cast<float*>(e.C)[r * e.ldc + c] = v;
    else
      static_cast<__nv_bfloat16*>(e.C)[r * e.ldc + c] = __float2bfloat16(v);
  }
}

// One cuBLASLt handle and workspace; create one per thread/stream user.
class CublasLtGemm {
 public:
  explicit CublasLtGemm(size_t workspace_bytes = size_t(64) << 20) : ws_bytes_(workspace_bytes) {
    TQ_CUBLAS_CHECK(cublasLtCreate(&handle_));
    TQ_CUDA_CHECK(cudaMalloc(&ws_, ws_bytes_));
  }
  ~CublasLtGemm() {
    cudaFree(ws_);
    cublasLtDestroy(handle_);
  }
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  void run(const GemmParams& p, cudaStream_t stream) {
    TQ_CHECK(p.M > 0 && p.N > 0 && p.K > 0, "cublas gemm: empty shape");
    TQ_CHECK(p.bias == nullptr || p.bias_dtype == p.c_dtype || p.c_dtype == GemmDType::bf16,
             "cublas gemm: fp32 output needs an fp32 bias");
    const cudaDataType_t ct = p.c_dtype == GemmDType::f32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    TQ_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // first operand (cuBLAS "A") = our B seen column-major; second = our A
    const cublasOperation_t ta = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    TQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    TQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (p.bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      const cudaDataType_t bt = p.bias_dtype == GemmDType::f32 ? CUDA_R_32F : CUDA_R_16BF;
      TQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
      TQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)));
      TQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
    }
    // column-major shapes: first operand (N, K) after op, stored (N, K) if !trans_b else (K, N)
    TQ_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, p.trans_b ? p.K : p.N,
                                               p.trans_b ? p.N : p.K, p.ldb));
    TQ_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, p.trans_a ? p.M : p.K,
                                               p.trans_a ? p.K : p.M, p.lda));
    TQ_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, ct, p.N, p.M, p.ldc));
    TQ_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    TQ_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes_, sizeof(ws_bytes_)));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    TQ_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle_, op, la, lb, lc, lc, pref, 1, &heur, &found));
    TQ_CHECK(found > 0, "cublas gemm: no algorithm for M=", p.M, " N=", p.N, " K=", p.K);
    TQ_CUBLAS_CHECK(cublasLtMatmul(handle_, op, &p.alpha, p.B, la, p.A, lb, &p.beta, p.C, lc, p.C,
                                   lc, &heur.algo, ws_, ws_bytes_, stream));
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatmulDescDestroy(op);
    if (p.residual) {
      gemm_add_residual_kernel<><<<264, 256, 0, stream>>>(make_epilogue(p));
      TQ_CUDA_CHECK_LAUNCH();
    }
  }

 private:
  cublasLtHandle_t handle_ = nullptr;
  void* ws_ = nullptr;
  size_t ws_bytes_;
};

}  // namespace tq::kernels
