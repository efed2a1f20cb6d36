// Bandwidth of the memory-bound CUDA kernels against a device-to-device cudaMemcpyAsync measured in
// the same run. GB/s counts the bytes each op must read plus write (each input read once, each
// output written once), over the median time of a launch. Inputs are random (never zeros) and
// 512 MiB per tensor, several times the H200's 60 MB L2.
//
// The CUDA backend itself comes from the tq_cuda_backend object linked into tq_bench.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <functional>
#include <vector>

#include <tq/tq.hpp>

#include "kernels/copy.cuh"
#include "kernels/device.cuh"

namespace {

using namespace tq;

const Device kCuda = Device::cuda(0);
constexpr int64_t kBytes = int64_t(512) << 20;  // per operand
constexpr int kRepsPerIteration = 10;

bool have_gpu() {
  static const int n = tq::cuda::device_count();
  return n > 0;
}

Tensor random_device(const Shape& shape, DType dt, uint64_t offset) {
  return random_tensor(Distribution::normal, shape, 42, offset, 0.0, 1.0, dt, kCuda);
}

// Times `fn` with CUDA events (kRepsPerIteration launches per iteration, after a warm-up) and
// reports GB/s = bytes / median launch time.
void time_device(benchmark::State& state, double bytes, const std::function<void()>& fn) {
  if (!have_gpu()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  cudaStream_t s = tq::cuda::current_stream();
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t start, stop;
  TQ_CUDA_CHECK(cudaEventCreate(&start));
  TQ_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> seconds;
  for (auto _ : state) {
    TQ_CUDA_CHECK(cudaEventRecord(start, s));
    for (int r = 0; r < kRepsPerIteration; ++r) fn();
    TQ_CUDA_CHECK(cudaEventRecord(stop, s));
    TQ_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    TQ_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    const double t = double(ms) / 1e3 / kRepsPerIteration;
    seconds.push_back(t);
    state.SetIterationTime(t);
  }
  TQ_CUDA_CHECK(cudaEventDestroy(start));
  TQ_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  state.counters["GB/s"] = bytes / median / 1e9;
  state.counters["us"] = median * 1e6;
  state.counters["MB"] = bytes / 1e6;
}

void BM_memcpy_d2d(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Tensor a = random_device({kBytes / 4}, DType::f32, 1), b = Tensor::empty({kBytes / 4}, DType::f32, kCuda);
  time_device(state, 2.0 * kBytes, [&] {
    TQ_CUDA_CHECK(cudaMemcpyAsync(b.data_ptr(), a.data_ptr(), size_t(kBytes), cudaMemcpyDeviceToDevice,
                                  tq::cuda::current_stream()));
  });
}

void BM_copy_kernel_f32(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / 4;
  Tensor a = random_device({n}, DType::f32, 2), b = Tensor::empty({n}, DType::f32, kCuda);
  time_device(state, 2.0 * kBytes, [&] {
    tq::cuda::convert_contiguous<float, float>(b.data<float>(), a.data<float>(), n, 0, tq::cuda::current_stream());
  });
}

void BM_convert_f32_to_bf16(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / 4;
  Tensor a = random_device({n}, DType::f32, 3), b = Tensor::empty({n}, DType::bf16, kCuda);
  time_device(state, double(n) * 6, [&] { b.copy_(a); });
}

void BM_copy_transpose_f32(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Tensor a = random_device({8192, 16384}, DType::f32, 4), b = Tensor::empty({16384, 8192}, DType::f32, kCuda);
  time_device(state, 2.0 * double(a.nbytes()), [&] { b.copy_(a.t()); });
}

// Attention-style head permute (B, T, H, D) -> (B, H, T, D): the generic strided path, D contiguous.
void BM_copy_permute_bf16(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t B = 64, T = 286, H = 8, D = 256;
  Tensor a = random_device({B, T, H, D}, DType::bf16, 15), b = Tensor::empty({B, H, T, D}, DType::bf16, kCuda);
  time_device(state, 2.0 * double(a.nbytes()), [&] { b.copy_(a.permute({0, 2, 1, 3})); });
}

void BM_unary(benchmark::State& state, UnaryOp op, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / int64_t(dtype_size(dt));
  Tensor x = random_device({n}, dt, 5);
  time_device(state, 2.0 * kBytes, [&] { Tensor y = ops::unary(op, x); });
}

void BM_unary_backward(benchmark::State& state, UnaryOp op, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / int64_t(dtype_size(dt));
  Tensor x = random_device({n}, dt, 6), g = random_device({n}, dt, 7);
  time_device(state, 3.0 * kBytes, [&] { Tensor y = ops::unary_backward(op, g, x); });
}

void BM_binary_same_shape(benchmark::State& state, BinaryOp op, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / int64_t(dtype_size(dt));
  Tensor a = random_device({n}, dt, 8), b = random_device({n}, dt, 9);
  time_device(state, 3.0 * kBytes, [&] { Tensor y = ops::binary(op, a, b); });
}

void BM_binary_scalar(benchmark::State& state, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / int64_t(dtype_size(dt));
  Tensor a = random_device({n}, dt, 10), s = Tensor::full({}, 0.5, dt, kCuda);
  time_device(state, 2.0 * kBytes, [&] { Tensor y = ops::binary(BinaryOp::mul, a, s); });
}

// Bias-style broadcast: (rows, cols) + (cols): the strided path.
void BM_binary_row_broadcast(benchmark::State& state, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t cols = 8192, rows = kBytes / int64_t(dtype_size(dt)) / cols;
  Tensor a = random_device({rows, cols}, dt, 11), b = random_device({cols}, dt, 12);
  time_device(state, 2.0 * kBytes, [&] { Tensor y = ops::binary(BinaryOp::add, a, b); });
}

void BM_reduce_sum_rows(benchmark::State& state, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t cols = 8192, rows = kBytes / int64_t(dtype_size(dt)) / cols;
  Tensor a = random_device({rows, cols}, dt, 13);
  time_device(state, double(kBytes), [&] { Tensor y = ops::reduce(ops::ReduceKind::sum, a, {1}, false, "bench"); });
}

void BM_reduce_sum_all(benchmark::State& state, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Tensor a = random_device({kBytes / int64_t(dtype_size(dt))}, dt, 14);
  time_device(state, double(kBytes), [&] { Tensor y = ops::reduce(ops::ReduceKind::sum, a, {}, false, "bench"); });
}

void BM_random_normal(benchmark::State& state, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / int64_t(dtype_size(dt));
  uint64_t offset = 100;
  time_device(state, double(kBytes), [&] { Tensor y = random_device({n}, dt, offset++); });
}

void BM_random_bernoulli(benchmark::State& state, DType dt) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t n = kBytes / int64_t(dtype_size(dt));
  uint64_t offset = 100;
  time_device(state, double(kBytes), [&] {
    Tensor y = random_tensor(Distribution::bernoulli, {n}, 42, offset++, 0.9, 0.0, dt, kCuda);
  });
}

#define TQ_MEM_BENCH(...) BENCHMARK_CAPTURE(__VA_ARGS__)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond)

BENCHMARK(BM_memcpy_d2d)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_kernel_f32)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_convert_f32_to_bf16)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_transpose_f32)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_permute_bf16)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
TQ_MEM_BENCH(BM_unary, gelu_tanh_f32, UnaryOp::gelu_tanh, DType::f32);
TQ_MEM_BENCH(BM_unary, gelu_tanh_bf16, UnaryOp::gelu_tanh, DType::bf16);
TQ_MEM_BENCH(BM_unary, exp_bf16, UnaryOp::exp, DType::bf16);
TQ_MEM_BENCH(BM_unary_backward, gelu_tanh_bf16, UnaryOp::gelu_tanh, DType::bf16);
TQ_MEM_BENCH(BM_binary_same_shape, add_f32, BinaryOp::add, DType::f32);
TQ_MEM_BENCH(BM_binary_same_shape, mul_bf16, BinaryOp::mul, DType::bf16);
TQ_MEM_BENCH(BM_binary_scalar, mul_bf16, DType::bf16);
TQ_MEM_BENCH(BM_binary_row_broadcast, add_bf16, DType::bf16);
TQ_MEM_BENCH(BM_reduce_sum_rows, f32, DType::f32);
TQ_MEM_BENCH(BM_reduce_sum_all, bf16, DType::bf16);
TQ_MEM_BENCH(BM_random_normal, f32, DType::f32);
TQ_MEM_BENCH(BM_random_bernoulli, bf16, DType::bf16);

}  // namespace
