// Helpers for the tensor-level GPU tests (tests/cuda/*.cu): the GPU-presence skip, pool
// poisoning (new tensors start as NaN), fresh random inputs and a CPU-reference comparison.
// Suites are named Gpu* (ctest label gpu) and skip when no CUDA device is present.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/device.cuh"
#include "tests/test_util.hpp"

namespace tq::gpu_test {

using namespace tq;

inline const Device kCuda = Device::cuda(0);

inline bool have_gpu() {
  static const int n = tq::cuda::device_count();
  return n > 0;
}

#define TQ_REQUIRE_GPU()                                          \
  do {                                                            \
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device available"; \
  } while (0)

const std::vector<int64_t> kSizes = {1, 72, 4304, 257216};
const std::vector<DType> kAllDtypes = {DType::f32, DType::f64, DType::bf16, DType::f16,
                                       DType::i32, DType::i64, DType::u8,   DType::boolean};

// Overwrites `bytes` of the allocator's cache with 0xFF so the next allocations start poisoned.
// The pool is trimmed first so that the poisoned block is the only cached memory left.
inline void poison_pool(size_t bytes) {
  tq::cuda::release_cached_memory();
  Tensor t = Tensor::empty({int64_t(bytes)}, DType::u8, kCuda);
  TQ_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, bytes, tq::cuda::current_stream()));
}
inline void poison_for(const Tensor& like, int copies = 4) { poison_pool(std::max<size_t>(like.nbytes(), 256) * copies); }

// Random CPU tensor: floats in [lo, hi); integers drawn in [lo, hi) and truncated.
inline Tensor rnd(const Shape& shape, DType dt, double lo = -3.0, double hi = 3.0) {
  return test::random(shape, DType::f64, lo, hi).to(dt);
}

inline double tol_for(DType dt) {
  switch (dt) {
    case DType::f32: return 1e-5;
    case DType::f64: return 1e-10;
    case DType::bf16:
    case DType::f16: return 1e-2;
    default: return 0.0;
  }
}

// One call of `step` on `stream`, captured as a CUDA graph and instantiated (warm up outside the
// capture first: module loading, kernel attributes, pool growth). An op that breaks the capture (a
// hidden synchronization, a host read) ends it and throws with the op's message: the test fails.
class CapturedGraph {
 public:
  template <class F>
  CapturedGraph(cudaStream_t stream, F&& step) : stream_(stream) {
    TQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    try {
      step();
    } catch (const std::exception& e) {
      (void)cudaStreamEndCapture(stream, &graph_);
      throw std::runtime_error(std::string("an op broke the CUDA-graph capture (a hidden synchronization?): ") +
                               e.what());
    }
    TQ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph_));
    TQ_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  ~CapturedGraph() {
    if (exec_) (void)cudaGraphExecDestroy(exec_);
    if (graph_) (void)cudaGraphDestroy(graph_);
  }
  void launch() const { TQ_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }
  size_t nodes() const {
    size_t n = 0;
    TQ_CUDA_CHECK(cudaGraphGetNodes(graph_, nullptr, &n));
    return n;
  }

 private:
  cudaStream_t stream_;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

// got (any device) vs ref (CPU): same shape and dtype, no NaN where the reference has none,
// |got - ref| <= rtol·|ref| + 0.1·rtol·max|ref| elementwise and ‖got - ref‖ <= rtol·‖ref‖.
inline ::testing::AssertionResult close(const Tensor& got, const Tensor& ref, double rtol) {
  if (got.shape() != ref.shape())
    return ::testing::AssertionFailure() << "shape " << str_cat(got.shape()) << " vs " << str_cat(ref.shape());
  if (got.dtype() != ref.dtype())
    return ::testing::AssertionFailure() << "dtype " << dtype_name(got.dtype()) << " vs " << dtype_name(ref.dtype());
  std::vector<double> g = got.to_vector<double>(), r = ref.to_vector<double>();
  double maxref = 0, num = 0, den = 0;
  for (double v : r)
    if (std::isfinite(v)) maxref = std::max(maxref, std::abs(v));
  for (size_t i = 0; i < r.size(); ++i) {
    if (std::isnan(r[i]) || std::isnan(g[i])) {
      if (std::isnan(r[i]) && std::isnan(g[i])) continue;
      return ::testing::AssertionFailure() << "element " << i << " of " << r.size() << ": got " << g[i] << ", expected "
                                           << r[i];
    }
    if (std::isinf(r[i]) || std::isinf(g[i])) {
      if (g[i] == r[i]) continue;
      return ::testing::AssertionFailure() << "element " << i << ": got " << g[i] << ", expected " << r[i];
    }
    const double err = std::abs(g[i] - r[i]);
    if (err > rtol * std::abs(r[i]) + 0.1 * rtol * maxref)
      return ::testing::AssertionFailure() << "element " << i << " of " << r.size() << ": got " << g[i] << ", expected "
                                           << r[i] << " (rtol " << rtol << ")";
    num += err * err;
    den += r[i] * r[i];
  }
  if (num > rtol * rtol * den)
    return ::testing::AssertionFailure() << "relative norm error " << std::sqrt(num / den) << " > " << rtol;
  return ::testing::AssertionSuccess();
}

}  // namespace tq::gpu_test
