// Bandwidth of the memory-bound CUDA kernels against a device-to-device cudaMemcpyAsync measured in
// the same run. GB/s counts the bytes each op must read plus write (each input read once, each
// output written once), over the median time of a launch. Inputs are random (never zeros) and
// 512 MiB per tensor, several times the H200's 60 MB L2 — except the model-shaped op benchmarks
// (norms, RoPE, GeGLU, cross-entropy), which use the PaliGemma training shapes; their `of_copy`
// counter is GB/s as a fraction of BM_memcpy_d2d's in the same run (acceptance: ≥ 0.70 for the
// norms, RoPE and GeGLU). The norms, RoPE and GeGLU rotate over input copies and run as CUDA graphs
// (time_op_sets) and also report `vs_copy`, the fraction of a same-size copy timed the same way.
//
// The CUDA backend itself comes from the tq_cuda_backend object linked into tq_bench.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <functional>
#include <vector>

#include <tq/tq.hpp>

#include "kernels/copy.cuh"
#include "kernels/device.cuh"
#include "bench/bench_cuda_util.cuh"

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

// GB/s of BM_memcpy_d2d in this run (0 until it has run): the reference of the `of_copy` counters.
double& copy_gbps() {
  static double v = 0;
  return v;
}

void BM_memcpy_d2d(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Tensor a = random_device({kBytes / 4}, DType::f32, 1), b = Tensor::empty({kBytes / 4}, DType::f32, kCuda);
  time_device(state, 2.0 * kBytes, [&] {
    TQ_CUDA_CHECK(cudaMemcpyAsync(b.data_ptr(), a.data_ptr(), size_t(kBytes), cudaMemcpyDeviceToDevice,
                                  tq::cuda::current_stream()));
  });
  copy_gbps() = state.counters["GB/s"];
}

// time_device plus the fraction of the copy bandwidth.
void time_op(benchmark::State& state, double bytes, const std::function<void()>& fn) {
  time_device(state, bytes, fn);
  if (copy_gbps() > 0 && state.counters.count("GB/s")) state.counters["of_copy"] = state.counters["GB/s"] / copy_gbps();
}

// The model-shaped ops, timed as training runs them: `sets` copies of the inputs rotate (together
// at least 256 MiB, so each call streams from HBM rather than re-reading a 20-40 MB input from the
// 60 MB L2), the calls of one pass captured as a CUDA graph (host dispatch and allocation are not
// in the figure), median of 9 graph launches. The same-size reference: a device-to-device copy of
// `bytes` (half read, half written), over as many rotating buffers, timed the same way in the same
// call (`vs_copy`); `of_copy` stays the fraction of BM_memcpy_d2d's 1 GiB copy.
void time_op_sets(benchmark::State& state, double bytes, int sets, const std::function<void(int)>& call) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const double t = tq::bench::graph_time(sets, call);
  const int64_t half = int64_t(bytes / 2) / 16 * 16;
  const double tc = tq::bench::copy_time(half, sets);
  for (auto _ : state) state.SetIterationTime(t);
  state.counters["GB/s"] = bytes / t / 1e9;
  state.counters["us"] = t * 1e6;
  state.counters["MB"] = bytes / 1e6;
  state.counters["copy_us"] = tc * 1e6;
  state.counters["vs_copy"] = (bytes / t) / (2.0 * double(half) / tc);
  if (copy_gbps() > 0) state.counters["of_copy"] = state.counters["GB/s"] / copy_gbps();
}

// `sets` random tensors of one shape (seeds offset, offset + 1, ...).
std::vector<Tensor> random_sets(int sets, const Shape& shape, DType dt, uint64_t offset) {
  std::vector<Tensor> v;
  for (int c = 0; c < sets; ++c) v.push_back(random_device(shape, dt, offset + 1000 * uint64_t(c)));
  return v;
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

// ---- the model's memory-bound ops, at PaliGemma training shapes ----

constexpr double kBf16 = 2, kF32 = 4;

// Gemma RMSNorm: (B·T = 4576, 2048) bf16 activations, fp32 (1 + w) weight (QLoRA keeps norms fp32).
void BM_rms_norm_fwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t rows = 4576, D = 2048;
  const int sets = tq::bench::rotating_copies(kBf16 * double(rows * D));
  const std::vector<Tensor> x = random_sets(sets, {rows, D}, DType::bf16, 20);
  const Tensor w = random_device({D}, DType::f32, 21);
  time_op_sets(state, 2 * kBf16 * double(rows * D) + kF32 * double(D), sets,
               [&](int i) { Tensor y = ops::rms_norm(x[size_t(i)], w, 1e-6, 1.0); });
}

// Reads g and x (and w), writes dx and dw.
void BM_rms_norm_bwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t rows = 4576, D = 2048;
  const int sets = tq::bench::rotating_copies(2 * kBf16 * double(rows * D));
  const std::vector<Tensor> x = random_sets(sets, {rows, D}, DType::bf16, 22), g = random_sets(sets, {rows, D}, DType::bf16, 23);
  const Tensor w = random_device({D}, DType::f32, 24);
  time_op_sets(state, 3 * kBf16 * double(rows * D) + 2 * kF32 * double(D), sets, [&](int i) {
    ops::NormGrads r = ops::norm_backward(g[size_t(i)], x[size_t(i)], w, Tensor(), 1e-6, false, 1.0);
  });
}

// SigLIP LayerNorm: (16 images · 256 patches, 1152) bf16 with bf16 weight and bias.
void BM_layer_norm_fwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t rows = 4096, D = 1152;
  const int sets = tq::bench::rotating_copies(kBf16 * double(rows * D));
  const std::vector<Tensor> x = random_sets(sets, {rows, D}, DType::bf16, 25);
  const Tensor w = random_device({D}, DType::bf16, 26), b = random_device({D}, DType::bf16, 27);
  time_op_sets(state, 2 * kBf16 * double(rows * D) + 2 * kBf16 * double(D), sets,
               [&](int i) { Tensor y = ops::layer_norm(x[size_t(i)], w, b, 1e-6); });
}

// Reads g, x, w; writes dx, dw, db.
void BM_layer_norm_bwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t rows = 4096, D = 1152;
  const int sets = tq::bench::rotating_copies(2 * kBf16 * double(rows * D));
  const std::vector<Tensor> x = random_sets(sets, {rows, D}, DType::bf16, 28), g = random_sets(sets, {rows, D}, DType::bf16, 29);
  const Tensor w = random_device({D}, DType::bf16, 30), b = random_device({D}, DType::bf16, 31);
  time_op_sets(state, 3 * kBf16 * double(rows * D) + 3 * kBf16 * double(D), sets, [&](int i) {
    ops::NormGrads r = ops::norm_backward(g[size_t(i)], x[size_t(i)], w, b, 1e-6, true, 0.0);
  });
}

// Gemma MLP: gelu_tanh(gate) ⊙ up over (4576, 16384) bf16.
void BM_geglu_fwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t rows = 4576, F = 16384;
  const int sets = tq::bench::rotating_copies(2 * kBf16 * double(rows * F));
  const std::vector<Tensor> gate = random_sets(sets, {rows, F}, DType::bf16, 32), up = random_sets(sets, {rows, F}, DType::bf16, 33);
  time_op_sets(state, 3 * kBf16 * double(rows * F), sets,
               [&](int i) { Tensor y = ops::geglu(gate[size_t(i)], up[size_t(i)]); });
}

// Reads g, gate, up; writes d gate, d up.
void BM_geglu_bwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t rows = 4576, F = 16384;
  const int sets = tq::bench::rotating_copies(3 * kBf16 * double(rows * F));
  const std::vector<Tensor> gate = random_sets(sets, {rows, F}, DType::bf16, 34), up = random_sets(sets, {rows, F}, DType::bf16, 35);
  const std::vector<Tensor> g = random_sets(sets, {rows, F}, DType::bf16, 36);
  time_op_sets(state, 5 * kBf16 * double(rows * F), sets, [&](int i) {
    ops::GegluGrads r = ops::geglu_backward(g[size_t(i)], gate[size_t(i)], up[size_t(i)]);
  });
}

// Gemma queries (B, H, T, D) = (16, 8, 286, 256) bf16 at 1-based positions.
void BM_rope(benchmark::State& state, bool backward) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t B = 16, H = 8, T = 286, D = 256;
  const int sets = tq::bench::rotating_copies(kBf16 * double(B * H * T * D));
  const std::vector<Tensor> x = random_sets(sets, {B, H, T, D}, DType::bf16, 37);
  const Tensor pos = (Tensor::arange(T, DType::i64).reshape({1, T}).expand({B, T}).contiguous() + 1.0).to(kCuda);
  time_op_sets(state, 2 * kBf16 * double(B * H * T * D) + 8.0 * double(B * T), sets, [&](int i) {
    Tensor y = backward ? ops::rope_backward(x[size_t(i)], pos, 10000.0) : ops::rope(x[size_t(i)], pos, 10000.0);
  });
}

// The loss over (4576, 257216) bf16 logits: forward reads the logits once (plus targets).
void BM_cross_entropy_fwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t N = 4576, V = 257216;
  Tensor logits = random_device({N, V}, DType::bf16, 38);
  Tensor targets = random_tensor(Distribution::uniform, {N}, 42, 39, 0, double(V), DType::f64, kCuda).to(DType::i64);
  time_op(state, kBf16 * double(N * V) + 8.0 * double(N), [&] {
    ops::CrossEntropyCudaResult r =
        ops::cuda_cross_entropy_kernels().forward(logits, targets, -100, ops::CrossEntropyDivisor::count, 1.0);
  });
}

// Backward reads the logits and writes dlogits.
void BM_cross_entropy_bwd(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const int64_t N = 4576, V = 257216;
  Tensor logits = random_device({N, V}, DType::bf16, 40);
  Tensor targets = random_tensor(Distribution::uniform, {N}, 42, 41, 0, double(V), DType::f64, kCuda).to(DType::i64);
  ops::CrossEntropyCudaResult fwd =
      ops::cuda_cross_entropy_kernels().forward(logits, targets, -100, ops::CrossEntropyDivisor::count, 1.0);
  Tensor grad = Tensor::full({}, 1.0, DType::f32, kCuda);
  time_op(state, 2 * kBf16 * double(N * V) + 8.0 * double(N), [&] {
    Tensor d = ops::cuda_cross_entropy_kernels().backward(grad, fwd.divisor, logits, targets, fwd.lse, -100);
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
BENCHMARK(BM_rms_norm_fwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_rms_norm_bwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_layer_norm_fwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_layer_norm_bwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_geglu_fwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_geglu_bwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
TQ_MEM_BENCH(BM_rope, fwd, false);
TQ_MEM_BENCH(BM_rope, bwd, true);
BENCHMARK(BM_cross_entropy_fwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_cross_entropy_bwd)->UseManualTime()->Iterations(15)->Unit(benchmark::kMicrosecond);

}  // namespace
