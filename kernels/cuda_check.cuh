// TQ_CUDA_CHECK(expr): every CUDA runtime call goes through this; a failure throws tq::Error with
// the call, file:line and the runtime's error string. TQ_CUDA_CHECK_LAUNCH() checks the last
// launch (configuration errors surface there, not at the <<<>>> line).
#pragma once

#include <cuda_runtime.h>

#include <tq/core/error.hpp>

#define TQ_CUDA_CHECK(expr)                                                                   \
  do {                                                                                        \
    cudaError_t tq_cuda_err_ = (expr);                                                        \
    if (tq_cuda_err_ != cudaSuccess) [[unlikely]]                                             \
      ::tq::fail(::tq::str_cat("CUDA error at ", __FILE__, ":", __LINE__, ": ", #expr, ": ", \
                               cudaGetErrorName(tq_cuda_err_), ": ",                         \
                               cudaGetErrorString(tq_cuda_err_)));                           \
  } while (0)

#define TQ_CUDA_CHECK_LAUNCH() TQ_CUDA_CHECK(cudaGetLastError())
