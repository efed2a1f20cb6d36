// The fused CUDA optimizer against a device-to-device copy measured in the same run, on the
// adapter set of the reference recipe: PaliGemma-3B with r = 16 LoRA on Gemma's q,k,v,o,gate,up,
// down (18 layers) and SigLIP's q,k,v (27 layers) — 414 fp32 tensors, 22,597,632 parameters
// (plus 207 DoRA magnitude vectors in the /dora variant).
//   adamw_step/<variant>      one AdamW step: GB/s over the bytes it must move (θ, g, m, v read;
//                             θ, m, v written: 28 bytes per parameter) and `vs_copy`, the ratio to
//                             a cudaMemcpyAsync moving as many bytes in the same call.
//   clip_grad_norm/<variant>  the fused norm + scale over all gradients, including its one host read.
// Steps are captured into a CUDA graph (host launch overhead is not measured); the figure is the
// median of 9 graph launches of `kReps` steps.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include <tq/tq.hpp>

#include "kernels/device.cuh"
#include "bench/bench_cuda_util.cuh"

namespace {

using namespace tq;

const Device kCuda = Device::cuda(0);
constexpr int kReps = 10;

bool have_gpu() {
  static const int n = tq::cuda::device_count();
  return n > 0;
}

// (rows, cols) of every adapter tensor of the reference recipe.
std::vector<Shape> adapter_shapes(bool dora) {
  struct Target {
    int64_t in, out;
  };
  const Target gemma[] = {{2048, 2048}, {2048, 256}, {2048, 256}, {2048, 2048}, {2048, 16384}, {2048, 16384}, {16384, 2048}};
  const Target siglip[] = {{1152, 1152}, {1152, 1152}, {1152, 1152}};
  std::vector<Shape> out;
  auto add = [&](const Target& t) {
    out.push_back({16, t.in});   // lora_A
    out.push_back({t.out, 16});  // lora_B
    if (dora) out.push_back({t.out});
  };
  for (int l = 0; l < 27; ++l)
    for (const Target& t : siglip) add(t);
  for (int l = 0; l < 18; ++l)
    for (const Target& t : gemma) add(t);
  return out;
}

struct Params {
  std::vector<Tensor> p;
  int64_t count = 0;
  explicit Params(bool dora) {
    uint64_t off = 0;
    for (const Shape& s : adapter_shapes(dora)) {
      Tensor t = random_tensor(Distribution::normal, s, 3, off++, 0.0, 0.02, DType::f32, kCuda).requires_grad_();
      t.set_grad(random_tensor(Distribution::normal, s, 4, off++, 0.0, 1e-3, DType::f32, kCuda));
      count += t.numel();
      p.push_back(t);
    }
  }
};

// Seconds per call: the median of 9 graph launches of kReps calls (bench_cuda_util.cuh), or, for
// ops that read back to the host and so cannot be captured, the median wall time of kReps calls.
double time_call(const std::function<void()>& call, bool capture = true) {
  if (capture) return tq::bench::graph_time(kReps, [&](int) { call(); });
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  call();
  stream.synchronize();
  std::vector<double> v;
  for (int it = 0; it < 9; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kReps; ++r) call();
    stream.synchronize();
    v.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kReps);
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds of a device-to-device copy moving `bytes` in total (half read, half written), timed as
// the other benchmarks' vs_copy references are (two rotating buffer pairs: each far above the L2).
double copy_seconds(double bytes) { return tq::bench::copy_time(int64_t(bytes / 2) / 16 * 16, 2); }

void bm_adamw(benchmark::State& state, bool dora) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Params ps(dora);
  optim::ParamGroup a{.name = "A", .lr = 1e-4, .weight_decay = 1e-6}, b{.name = "B", .lr = 1.6e-3, .weight_decay = 1e-6};
  for (size_t i = 0; i < ps.p.size(); ++i) (i % 2 ? b : a).params.push_back(ps.p[i]);
  optim::AdamW opt({a, b});
  const double t = time_call([&] { opt.step(); });
  const double bytes = 28.0 * double(ps.count);
  const double tc = copy_seconds(bytes);
  for (auto _ : state) state.SetIterationTime(t);
  state.counters["tensors"] = double(ps.p.size());
  state.counters["params"] = double(ps.count);
  state.counters["GB/s"] = bytes / t * 1e-9;
  state.counters["copy_GB/s"] = bytes / tc * 1e-9;
  state.counters["vs_copy"] = tc / t;
  state.counters["us"] = t * 1e6;
}

void bm_clip(benchmark::State& state, bool dora) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Params ps(dora);
  const double t = time_call([&] { optim::clip_grad_norm(ps.p, 1e9); }, false);
  const double bytes = 8.0 * double(ps.count);  // each gradient read and written once
  for (auto _ : state) state.SetIterationTime(t);
  state.counters["GB/s"] = bytes / t * 1e-9;
  state.counters["us"] = t * 1e6;
}

BENCHMARK_CAPTURE(bm_adamw, lora, false)->Name("adamw_step/lora")->UseManualTime()->Iterations(3)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(bm_adamw, dora, true)->Name("adamw_step/dora")->UseManualTime()->Iterations(3)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(bm_clip, lora, false)->Name("clip_grad_norm/lora")->UseManualTime()->Iterations(3)->Unit(benchmark::kMicrosecond);

}  // namespace
