// Fused linear + cross-entropy (ops::linear_cross_entropy_forward: chunked logits, loss and the
// unit-gradient dh in one forward) against the unfused baseline: our GEMM writes the full (n, V)
// bf16 logits, then a separate softmax-cross-entropy kernel (written here: one block per row, an
// online max/Σexp pass, then a pass writing dlogits = (softmax − onehot)/n in place), then our
// GEMM for dh = dlogits·W. PaliGemma's lm_head: V = 257216, D = 2048, bf16, for n = 416 and
// n = 4576 supervised rows (a micro-batch of 16 × 286 tokens); every row supervised.
//
// Modes: "loss" (forward only; the baseline skips the gradient pass and the dh GEMM, the fused op
// runs no gradient kernel) and "loss_dh" (a training step's lm_head work). Counters: ms (median per
// call, CUDA events) and extra_MiB (peak device-pool usage during one call above what was in use
// before it: the logits, the GEMM split-K scratch and the outputs).
// Names: linear_ce/<fused|unfused>/<mode>/<n>.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cfloat>
#include <functional>
#include <vector>

#include <tq/tq.hpp>

#include "kernels/linear_cross_entropy.cuh"  // kernels/matmul.cuh's run_product_2d (our GEMM)

namespace {

using namespace tq;

const Device kCuda = Device::cuda(0);
constexpr int64_t kVocab = 257216, kHidden = 2048;
constexpr int kCeThreads = 512;

bool have_gpu() {
  static const int n = tq::cuda::device_count();
  return n > 0;
}

// The baseline's cross-entropy, one block per row of logits (n, V) bf16, V % 8 == 0 and 16-byte
// aligned rows (checked by the caller). row_loss (n) f32; with `grad`, dlogits overwrite the row.
__global__ void __launch_bounds__(kCeThreads)
    baseline_ce_kernel(bf16* __restrict__ logits, int64_t V, const int64_t* __restrict__ targets, float scale,
                       bool grad, float* __restrict__ row_loss) {
  using tq::cuda::Vec;
  __shared__ float sm[kCeThreads / 32], ss[kCeThreads / 32];
  __shared__ float lse_shared;
  const int64_t row = blockIdx.x, t = targets[row], nv = V / 8;
  Vec<bf16, 8>* x = reinterpret_cast<Vec<bf16, 8>*>(logits + row * V);  // (V / 8) vectors
  float m = -FLT_MAX, s = 0.0f;
  for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
    const Vec<bf16, 8> v = x[k];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float y = tq::cuda::as_float(v.v[e]);
      if (y > m) {
        s = s * __expf(m - y) + 1.0f;
        m = y;
      } else {
        s += __expf(y - m);
      }
    }
  }
  auto merge = [](float& m0, float& s0, float m1, float s1) {
    const float mm = fmaxf(m0, m1);
    s0 = s0 * __expf(m0 - mm) + s1 * __expf(m1 - mm);
    m0 = mm;
  };
  for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) sm[warp] = m, ss[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < kCeThreads / 32 ? sm[lane] : -FLT_MAX;
    s = lane < kCeThreads / 32 ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) {
      lse_shared = m + __logf(s);
      row_loss[row] = lse_shared - tq::cuda::as_float(logits[row * V + t]);
    }
  }
  __syncthreads();
  if (!grad) return;
  const float lse = lse_shared;
  for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
    Vec<bf16, 8> v = x[k];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float p = __expf(tq::cuda::as_float(v.v[e]) - lse);
      v.v[e] = tq::cuda::float_to<bf16>(scale * (p - (k * 8 + e == t ? 1.0f : 0.0f)));
    }
    x[k] = v;
  }
}

struct Inputs {
  Tensor h, w, targets;
};
Inputs make_inputs(int64_t n) {
  Inputs in;
  in.h = random_tensor(Distribution::normal, {n, kHidden}, 42, 1, 0.0, 1.0, DType::bf16, kCuda);
  in.w = random_tensor(Distribution::normal, {kVocab, kHidden}, 42, 2, 0.0, 0.02, DType::bf16, kCuda);
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = (i * 7919 + 13) % kVocab;
  in.targets = Tensor::from_vector(t, {n}).to(kCuda);
  return in;
}

// The unfused baseline: returns the loss (and dh when asked), like the fused op.
std::pair<Tensor, Tensor> unfused(const Inputs& in, bool want_dh) {
  const int64_t n = in.h.size(0);
  cudaStream_t st = tq::cuda::current_stream();
  Tensor logits = Tensor::empty({n, kVocab}, DType::bf16, kCuda);  // (n, V): every row at once
  tq::cuda::Product2d p;
  p.M = n, p.N = kVocab, p.K = kHidden, p.ab_dtype = DType::bf16;
  p.a = {in.h.data_ptr(), kHidden, 1};
  p.b = {in.w.data_ptr(), 1, kHidden};  // Wᵀ
  p.c = logits.data_ptr(), p.ldc = kVocab, p.c_dtype = DType::bf16;
  tq::cuda::run_product_2d(p, st);
  Tensor row_loss = Tensor::empty({n}, DType::f32, kCuda);
  baseline_ce_kernel<<<unsigned(n), kCeThreads, 0, st>>>(logits.data<bf16>(), kVocab, in.targets.data<int64_t>(),
                                                         1.0f / float(n), want_dh, row_loss.data<float>());
  tq::cuda::check_launch();
  Tensor loss = ops::binary(BinaryOp::div, ops::reduce(ops::ReduceKind::sum, row_loss, {}, false, "bench"),
                            Tensor::full({}, double(n), DType::f32, kCuda));
  Tensor dh;
  if (want_dh) {
    dh = Tensor::empty({n, kHidden}, DType::f32, kCuda);
    tq::cuda::Product2d q;  // dh (n, D) = dlogits (n, V) · W (V, D)
    q.M = n, q.N = kHidden, q.K = kVocab, q.ab_dtype = DType::bf16;
    q.a = {logits.data_ptr(), kVocab, 1};
    q.b = {in.w.data_ptr(), kHidden, 1};
    q.c = dh.data_ptr(), q.ldc = kHidden, q.c_dtype = DType::f32;
    tq::cuda::run_product_2d(q, st);
  }
  return {loss, dh};
}

std::pair<Tensor, Tensor> fused(const Inputs& in, bool want_dh) {
  const LinearCrossEntropyOptions o{.normalizer = double(in.h.size(0))};
  ops::LinearCrossEntropyResult r = ops::linear_cross_entropy_forward(in.h, in.w, in.targets, o, want_dh, false);
  return {r.loss, r.grad_h};
}

void run(benchmark::State& state, bool use_fused, bool want_dh, int64_t n) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  static_assert(kVocab % 8 == 0, "the baseline kernel reads 16-byte vectors");
  const Inputs in = make_inputs(n);
  auto call = [&] { return use_fused ? fused(in, want_dh) : unfused(in, want_dh); };
  for (int i = 0; i < 2; ++i) call();  // warm-up: module loading, GEMM attributes, pool growth
  // Peak extra memory of one call (the pool's high-water mark counts the GEMM scratch too).
  tq::cuda::synchronize();
  tq::cuda::reset_peak_memory_stats();
  const uint64_t before = tq::cuda::pool_stats().used_current;
  { auto out = call(); }
  tq::cuda::synchronize();
  const double extra = double(tq::cuda::pool_stats().used_high - before);
  cudaStream_t st = tq::cuda::current_stream();
  cudaEvent_t e0, e1;
  TQ_CUDA_CHECK(cudaEventCreate(&e0));
  TQ_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> seconds;
  for (auto _ : state) {
    TQ_CUDA_CHECK(cudaEventRecord(e0, st));
    { auto out = call(); }
    TQ_CUDA_CHECK(cudaEventRecord(e1, st));
    TQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    TQ_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    seconds.push_back(double(ms) / 1e3);
    state.SetIterationTime(double(ms) / 1e3);
  }
  TQ_CUDA_CHECK(cudaEventDestroy(e0));
  TQ_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(seconds.begin(), seconds.end());
  state.counters["ms"] = seconds[seconds.size() / 2] * 1e3;
  state.counters["extra_MiB"] = extra / double(1 << 20);
}

struct Registrar {
  Registrar() {
    for (int64_t n : {416, 4576})
      for (bool want_dh : {false, true})
        for (bool use_fused : {true, false}) {
          const std::string name = str_cat("linear_ce/", use_fused ? "fused" : "unfused", "/",
                                           want_dh ? "loss_dh" : "loss", "/", n);
          benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { run(st, use_fused, want_dh, n); })
              ->UseManualTime()
              ->Iterations(7)
              ->Unit(benchmark::kMillisecond);
        }
  }
} registrar;

}  // namespace
