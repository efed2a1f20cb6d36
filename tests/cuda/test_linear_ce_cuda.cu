// The fused linear + cross-entropy on CUDA against the CPU reference op (itself tested against
// float64, its definition and the unfused model path in tests/ops/test_linear_cross_entropy.cpp):
// loss, dh and the optional dW through autograd, every float dtype, softcap on/off, both
// normalizer modes, ignored rows, forced small chunks, PaliGemma's 257216-way vocabulary, the
// production shape (n = 4576) with its memory bound, device-side invalid targets, and a CUDA graph
// capture. The allocator's cache is poisoned (NaN) before every CUDA run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <tuple>
#include <vector>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

std::mt19937_64& gen() {
  static std::mt19937_64 r(tq::test::fresh_seed());
  return r;
}
int64_t pick(int64_t lo, int64_t hi) { return lo + int64_t(gen()() % uint64_t(hi - lo + 1)); }

// About a quarter of the rows ignored (−100); row 0 always supervised.
Tensor random_targets(int64_t n, int64_t V) {
  std::vector<int64_t> t;
  for (int64_t r = 0; r < n; ++r) t.push_back(pick(0, 3) == 0 ? -100 : pick(0, V - 1));
  if (n > 0) t[0] = pick(0, V - 1);
  return Tensor::from_vector(t, {n});
}

struct Outcome {
  Tensor loss, dh, dw;
};

// Loss and gradients through autograd on `dev`, with an incoming gradient of 0.75. device_targets:
// the targets live on the GPU (never read by the host) rather than on the CPU.
Outcome run_on(const Device& dev, const Tensor& h, const Tensor& w, const Tensor& targets,
               const LinearCrossEntropyOptions& o, bool grad_w, bool device_targets = true) {
  Tensor hl = h.detach().to(dev).requires_grad_(true), wl = w.detach().to(dev).requires_grad_(grad_w);
  Tensor tg = device_targets ? targets.to(dev) : targets;
  if (dev.is_cuda())  // the chunk's logits, dh, dW and the small buffers all start as NaN
    poison_pool(std::min<size_t>(size_t(h.size(0)) * w.size(0) * 8, size_t(300) << 20) + h.nbytes() * 4 +
                (grad_w ? w.nbytes() * 4 : 0) + (1 << 20));
  Tensor loss = linear_cross_entropy(hl, wl, tg, o);
  loss.backward(Tensor::full({}, 0.75, loss.dtype(), dev));
  return {loss, hl.grad(), wl.grad()};
}

double loss_tol(DType dt) { return dt == DType::f64 ? 1e-10 : dt == DType::f32 ? 1e-5 : 1e-3; }

// dh and dW are sums over the vocabulary (or the rows) of products with bf16/f16-rounded dlogits:
// where the terms cancel, one flipped rounding moves a small element by much more than 1e-2 of
// itself. So in low precision an element may be off by 1e-2 of the tensor's largest value (and the
// tensor by 1e-2 in norm); fp32/f64 keep the strict elementwise bound of close().
::testing::AssertionResult close_sum(const Tensor& got, const Tensor& ref, DType dt) {
  if (dt == DType::f32 || dt == DType::f64) return close(got, ref, tol_for(dt));
  std::vector<double> g = got.to_vector<double>(), r = ref.to_vector<double>();
  if (g.size() != r.size()) return ::testing::AssertionFailure() << "size " << g.size() << " vs " << r.size();
  double maxref = 0, num = 0, den = 0;
  for (double v : r) maxref = std::max(maxref, std::abs(v));
  const double rtol = tol_for(dt);
  for (size_t i = 0; i < r.size(); ++i) {
    const double err = std::abs(g[i] - r[i]);
    if (!(err <= rtol * (std::abs(r[i]) + maxref)))
      return ::testing::AssertionFailure() << "element " << i << ": got " << g[i] << ", expected " << r[i]
                                           << " (max |ref| " << maxref << ")";
    num += err * err, den += r[i] * r[i];
  }
  if (num > rtol * rtol * den) return ::testing::AssertionFailure() << "relative norm error " << std::sqrt(num / den);
  return ::testing::AssertionSuccess();
}

void expect_same(const Outcome& got, const Outcome& ref, DType dt, bool grad_w) {
  EXPECT_EQ(got.loss.dtype(), ref.loss.dtype());
  const double l = ref.loss.item<double>();
  EXPECT_NEAR(got.loss.item<double>(), l, loss_tol(dt) * (1 + std::abs(l)));
  ASSERT_TRUE(got.dh.defined());
  EXPECT_TRUE(close_sum(got.dh.cpu(), ref.dh, dt)) << "dh";
  EXPECT_EQ(got.dw.defined(), grad_w);
  if (grad_w) EXPECT_TRUE(close_sum(got.dw.cpu(), ref.dw, dt)) << "dW";
}

// Uniform on the grid k·step in [-r, r], step the power of two at or below r/16 (|k| < 32). Every
// product and partial sum of a logit is then exact in fp32 (at most 10 + 12 significant bits for
// D ≤ 4096), whatever order the GEMM sums in, so the device and the CPU round the same logits to
// bf16. With continuous inputs the two fp32 sums differ in their last bits; at |logit| ≈ 100 (no
// softcap) one bf16 ulp is 0.5, and a flipped rounding of a row's top logit moves that row's softmax,
// and so its dh, by tens of percent: at n = 4576, V = 1001 about one run in four failed on an H100
// (2026-12-07), and a numpy model of the test with 2e-7 relative noise on the fp32 logits fails alike.
Tensor grid_rnd(const Shape& shape, DType dt, double r) {
  const double step = std::exp2(std::floor(std::log2(r / 16))), kmax = std::floor(r / step);
  std::vector<double> v = test::random(shape, DType::f64, -1.0, 1.0).to_vector<double>();
  for (double& x : v) x = std::round(x * kmax) * step;
  return Tensor::from_vector(v, shape).to(dt);
}

// Inputs of realistic scale per dtype: bf16/f16 logits of a few tens (so the softcap of 30
// bends them), f32/f64 logits of a few units (fp32's own lse rounding then stays below 1e-5).
std::pair<Tensor, Tensor> inputs(int64_t n, int64_t D, int64_t V, DType dt) {
  const double hr = dt == DType::f32 || dt == DType::f64 ? 1.0 : 3.0;
  const double wr = (dt == DType::f32 || dt == DType::f64 ? 2.0 : 24.0) / std::sqrt(double(D));
  return {grid_rnd({n, D}, dt, hr), grid_rnd({V, D}, dt, wr)};
}

TEST(GpuLinearCrossEntropy, MatchesCpuAcrossDtypesShapesAndOptions) {
  TQ_REQUIRE_GPU();
  struct Shape3 {
    int64_t n, D, V;
  };
  const Shape3 shapes[] = {{1, 72, 4304}, {7, 264, 1000}, {416, 72, 4304}, {4576, 64, 1001}};
  for (DType dt : {DType::bf16, DType::f32, DType::f16, DType::f64})
    for (const Shape3& s : shapes)
      for (double cap : {0.0, 30.0})
        for (double normalizer : {0.0, 91.0}) {
          const int64_t chunk = pick(0, 1) ? 0 : pick(1, s.n);  // 0: automatic (one chunk at these V)
          const bool grad_w = pick(0, 2) == 0, device_targets = pick(0, 3) != 0;
          SCOPED_TRACE(str_cat(dt, " n=", s.n, " D=", s.D, " V=", s.V, " cap=", cap, " normalizer=", normalizer,
                               " chunk=", chunk, " grad_w=", grad_w, " device_targets=", device_targets));
          const auto [h, w] = inputs(s.n, s.D, s.V, dt);
          const Tensor t = random_targets(s.n, s.V);
          const LinearCrossEntropyOptions o{.softcap = cap, .normalizer = normalizer, .chunk_rows = chunk};
          const Outcome ref = run_on(Device::cpu(), h, w, t, o, grad_w);
          expect_same(run_on(kCuda, h, w, t, o, grad_w, device_targets), ref, dt, grad_w);
        }
}

// dW accumulates over chunks (beta = 1 after the first) — several chunks, both GEMM paths.
TEST(GpuLinearCrossEntropy, WeightGradientAccumulatesOverChunks) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32})
    for (int64_t chunk : {1, 100, 416}) {
      SCOPED_TRACE(str_cat(dt, " chunk=", chunk));
      const auto [h, w] = inputs(416, 72, 4304, dt);
      const Tensor t = random_targets(416, 4304);
      const LinearCrossEntropyOptions o{.softcap = 30.0, .chunk_rows = chunk};
      expect_same(run_on(kCuda, h, w, t, o, true), run_on(Device::cpu(), h, w, t, o, true), dt, true);
    }
}

// The three-kernel path (the default) and the one-read cluster kernel (sm_90, rows of whole 16-byte
// vectors; forced by TQ_LCE_TWO_PASS=0) against the CPU and against each other, at the model's
// vocabulary.
TEST(GpuLinearCrossEntropy, ClusterAndThreeKernelPathsAgree) {
  TQ_REQUIRE_GPU();
  struct Cluster {  // scoped: later tests see the default path again
    Cluster() { setenv("TQ_LCE_TWO_PASS", "0", 1); }
    ~Cluster() { unsetenv("TQ_LCE_TWO_PASS"); }
  };
  for (DType dt : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(str_cat(dt));
    const auto [h, w] = inputs(300, 72, 4304, dt);
    const Tensor t = random_targets(300, 4304);
    const LinearCrossEntropyOptions o{.softcap = 30.0, .normalizer = 250.0, .chunk_rows = 128};
    const Outcome ref = run_on(Device::cpu(), h, w, t, o, true);
    expect_same(run_on(kCuda, h, w, t, o, true), ref, dt, true);
    Cluster forced;
    expect_same(run_on(kCuda, h, w, t, o, true), ref, dt, true);
  }
  const auto [h, w] = inputs(600, 2048, 257216, DType::bf16);  // two chunks of the automatic size
  const Tensor t = random_targets(600, 257216).to(kCuda), hd = h.to(kCuda), wd = w.to(kCuda);
  const LinearCrossEntropyOptions o{.softcap = 30.0};
  const ops::LinearCrossEntropyResult a = ops::linear_cross_entropy_forward(hd, wd, t, o, true, false);
  Cluster forced;
  poison_pool(size_t(600) << 20);
  const ops::LinearCrossEntropyResult b = ops::linear_cross_entropy_forward(hd, wd, t, o, true, false);
  const double la = a.loss.item<double>();
  EXPECT_NEAR(b.loss.item<double>(), la, 1e-5 * (1 + std::abs(la)));
  EXPECT_TRUE(close(b.grad_h.cpu(), a.grad_h.cpu(), 1e-2));
}

// PaliGemma's vocabulary (V = 257216) with its hidden sizes: D = 2048 (PG1, no softcap) and
// D = 2304 (PG2, final softcap 30).
TEST(GpuLinearCrossEntropy, PaliGemmaVocabularyMatchesCpu) {
  TQ_REQUIRE_GPU();
  for (int64_t n : {1, 7})
    for (auto [D, cap] : {std::pair<int64_t, double>{2048, 0.0}, std::pair<int64_t, double>{2304, 30.0}}) {
      SCOPED_TRACE(str_cat("n=", n, " D=", D, " cap=", cap));
      const auto [h, w] = inputs(n, D, 257216, DType::bf16);
      const Tensor t = random_targets(n, 257216);
      const LinearCrossEntropyOptions o{.softcap = cap};
      expect_same(run_on(kCuda, h, w, t, o, false), run_on(Device::cpu(), h, w, t, o, false), DType::bf16, false);
    }
}

// The production shape: n = 4576 supervised rows of a 16 × 286 batch, V = 257216, D = 2048, bf16.
// (1) The extra memory is one chunk's logits plus dh and GEMM scratch, far below even the bf16
// logits of all rows (2.35 GB). (2) With all but a few rows ignored, those rows' loss and dh equal
// the CPU's on just those rows, and every other dh row is exactly 0. (3) Fully supervised, the
// result does not depend on the chunk boundaries.
TEST(GpuLinearCrossEntropy, ProductionShapeIsChunkedAndBounded) {
  TQ_REQUIRE_GPU();
  const int64_t n = 4576, D = 2048, V = 257216;
  const auto [h, w] = inputs(n, D, V, DType::bf16);
  const Tensor hd = h.to(kCuda), wd = w.to(kCuda);
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < 12; ++i) rows.push_back(pick(0, n - 1));
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  std::vector<int64_t> tv(size_t(n), -100), sub_t;
  for (int64_t r : rows) sub_t.push_back(tv[size_t(r)] = pick(0, V - 1));
  const Tensor t = Tensor::from_vector(tv, {n}), td = t.to(kCuda);
  const LinearCrossEntropyOptions o{.normalizer = double(rows.size())};

  poison_pool(size_t(600) << 20);  // every buffer the op allocates below starts as NaN
  tq::cuda::synchronize();
  tq::cuda::reset_peak_memory_stats();
  const uint64_t before = tq::cuda::pool_stats().used_current;
  ops::LinearCrossEntropyResult r = ops::linear_cross_entropy_forward(hd, wd, td, o, true, false);
  tq::cuda::synchronize();
  const double extra = double(tq::cuda::pool_stats().used_high - before);
  const double chunk = double(ops::linear_ce_chunk_rows(n, V, DType::bf16)) * V * 2;
  const double bound = chunk + double(n * D * 4) + double(64 << 20) + double(16 << 20);
  std::printf("n=%lld: extra device memory %.1f MiB (chunk %.1f MiB, bound %.1f MiB; all rows' bf16 logits %.1f MiB)\n",
              (long long)n, extra / (1 << 20), chunk / (1 << 20), bound / (1 << 20), double(n) * V * 2 / (1 << 20));
  EXPECT_LE(chunk, double(ops::kLinearCeChunkBytes));
  EXPECT_LE(extra, bound);

  // (2) the supervised rows against the CPU on just those rows
  const Tensor idx = Tensor::from_vector(rows, {int64_t(rows.size())});
  const Tensor hs = index_select(h, 0, idx);
  const ops::LinearCrossEntropyResult ref =
      ops::linear_cross_entropy_forward(hs, w, Tensor::from_vector(sub_t, {int64_t(sub_t.size())}), o, true, false);
  EXPECT_NEAR(r.loss.item<double>(), ref.loss.item<double>(), 1e-3 * (1 + std::abs(ref.loss.item<double>())));
  const Tensor dh = r.grad_h.cpu();
  EXPECT_TRUE(close(index_select(dh, 0, idx), ref.grad_h, 1e-2));
  const std::vector<double> all = dh.to_vector();
  size_t nonzero_elsewhere = 0, k = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool supervised = k < rows.size() && rows[k] == i;
    if (supervised) ++k;
    for (int64_t j = 0; j < D && !supervised; ++j) nonzero_elsewhere += all[size_t(i * D + j)] != 0.0;
  }
  EXPECT_EQ(nonzero_elsewhere, 0u);

  // (3) every row supervised; automatic chunks (512 rows) vs chunks of 333 rows
  const Tensor full_t = random_targets(n, V).to(kCuda);
  const ops::LinearCrossEntropyResult a = ops::linear_cross_entropy_forward(hd, wd, full_t, {.softcap = 30.0}, true, false);
  poison_pool(size_t(512) * V * 2);
  const ops::LinearCrossEntropyResult b =
      ops::linear_cross_entropy_forward(hd, wd, full_t, {.softcap = 30.0, .chunk_rows = 333}, true, false);
  const double la = a.loss.item<double>();
  EXPECT_TRUE(std::isfinite(la));
  EXPECT_NEAR(b.loss.item<double>(), la, 1e-4 * (1 + std::abs(la)));
  EXPECT_TRUE(close(b.grad_h.cpu(), a.grad_h.cpu(), 1e-2));
}

// The loss without gradients: on sm_90 in bf16 the GEMM's epilogue reduces each 256-column tile of
// logits to (max, Σexp) and the logits never reach memory; TQ_LCE_EPILOGUE=0 forces the logits
// chunk and the three-kernel path. Both against the CPU and against each other, with softcap on and
// off, ignored rows, a vocabulary that is not a tile multiple (4304 = 16·256 + 208), row counts across
// the 128-row tile, PaliGemma's vocabulary, and a device target outside [0, V) (the loss is NaN).
TEST(GpuLinearCrossEntropy, LossWithoutGradientsOnBothPaths) {
  TQ_REQUIRE_GPU();
  struct NoEpilogue {
    NoEpilogue() { setenv("TQ_LCE_EPILOGUE", "0", 1); }
    ~NoEpilogue() { unsetenv("TQ_LCE_EPILOGUE"); }
  };
  struct Shape3 {
    int64_t n, D, V;
  };
  for (const Shape3& s : {Shape3{1, 72, 4304}, Shape3{7, 264, 1000}, Shape3{130, 64, 257216}, Shape3{416, 72, 4304}})
    for (double cap : {0.0, 30.0})
      for (double normalizer : {0.0, 91.0}) {
        SCOPED_TRACE(str_cat("n=", s.n, " D=", s.D, " V=", s.V, " cap=", cap, " normalizer=", normalizer));
        const auto [h, w] = inputs(s.n, s.D, s.V, DType::bf16);
        const Tensor t = random_targets(s.n, s.V);
        const LinearCrossEntropyOptions o{.softcap = cap, .normalizer = normalizer};
        const double ref = ops::linear_cross_entropy_forward(h, w, t, o, false, false).loss.item<double>();
        const Tensor hd = h.to(kCuda), wd = w.to(kCuda), td = t.to(kCuda);
        poison_pool(size_t(s.n) * size_t(s.V) * 8 + (1 << 20));
        const ops::LinearCrossEntropyResult a = ops::linear_cross_entropy_forward(hd, wd, td, o, false, false);
        EXPECT_FALSE(a.grad_h.defined());
        const double la = a.loss.item<double>();
        EXPECT_NEAR(la, ref, loss_tol(DType::bf16) * (1 + std::abs(ref)));
        NoEpilogue forced;
        poison_pool(size_t(s.n) * size_t(s.V) * 8 + (1 << 20));
        const double lb = ops::linear_cross_entropy_forward(hd, wd, td, o, false, false).loss.item<double>();
        EXPECT_NEAR(lb, ref, loss_tol(DType::bf16) * (1 + std::abs(ref)));
        EXPECT_NEAR(la, lb, 1e-5 * (1 + std::abs(lb)));
      }
  const auto [h, w] = inputs(5, 72, 1000, DType::bf16);
  const Tensor bad = Tensor::from_vector<int64_t>({3, 1000, -100, 7, -5}, {5}).to(kCuda);
  const Tensor hd = h.to(kCuda), wd = w.to(kCuda);
  EXPECT_TRUE(std::isnan(ops::linear_cross_entropy_forward(hd, wd, bad, {}, false, false).loss.item<double>()));
  const Tensor good = Tensor::from_vector<int64_t>({3, 999, -100, 7, 0}, {5});
  const double ref = ops::linear_cross_entropy_forward(h, w, good, {}, false, false).loss.item<double>();
  const double got = ops::linear_cross_entropy_forward(hd, wd, good.to(kCuda), {}, false, false).loss.item<double>();
  EXPECT_NEAR(got, ref, loss_tol(DType::bf16) * (1 + std::abs(ref)));
}

// A device target outside [0, V) cannot be checked without a host read: its row turns NaN (no
// crash, no out-of-bounds read). CPU targets are checked and throw, naming the row.
TEST(GpuLinearCrossEntropy, InvalidTargets) {
  TQ_REQUIRE_GPU();
  const auto [h, w] = inputs(5, 72, 1000, DType::bf16);
  const Tensor bad = Tensor::from_vector<int64_t>({3, 1000, -100, 7, -5}, {5});
  const ops::LinearCrossEntropyResult r =
      ops::linear_cross_entropy_forward(h.to(kCuda), w.to(kCuda), bad.to(kCuda), {}, true, false);
  EXPECT_TRUE(std::isnan(r.loss.item<double>()));
  const std::vector<double> dh = r.grad_h.to_vector();
  EXPECT_TRUE(std::isnan(dh[72]));        // row 1 (target = V)
  EXPECT_EQ(dh[2 * 72], 0.0);             // row 2 is ignored
  EXPECT_TRUE(std::isfinite(dh[0]));      // row 0 is fine
  EXPECT_THROW(ops::linear_cross_entropy_forward(h.to(kCuda), w.to(kCuda), bad, {}, true, false), Error);
}

// The fused op inside a CUDA graph capture: no hidden host synchronization.
TEST(GpuGraph, LinearCrossEntropyCapturesAndReplays) {
  TQ_REQUIRE_GPU();
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  const int64_t n = 300, D = 72, V = 4304;
  Tensor h = Tensor::empty({n, D}, DType::bf16, kCuda), w = Tensor::empty({V, D}, DType::bf16, kCuda);
  Tensor t = Tensor::empty({n}, DType::i64, kCuda);
  Tensor loss = Tensor::empty({}, DType::f32, kCuda), dh = Tensor::empty({n, D}, DType::f32, kCuda);
  const LinearCrossEntropyOptions o{.softcap = 30.0, .chunk_rows = 128};
  auto step = [&] {
    ops::LinearCrossEntropyResult r = ops::linear_cross_entropy_forward(h, w, t, o, true, false);
    loss.copy_(r.loss);
    dh.copy_(r.grad_h);
  };
  Tensor hc, wc, tc;
  auto fill = [&] {
    std::tie(hc, wc) = inputs(n, D, V, DType::bf16);
    tc = random_targets(n, V);
    h.copy_(hc), w.copy_(wc), t.copy_(tc);
  };
  fill();
  step();  // warm-up outside the capture
  stream.synchronize();
  const CapturedGraph graph(stream.get(), [&] { step(); });
  for (int replay = 0; replay < 2; ++replay) {
    SCOPED_TRACE(str_cat("replay ", replay));
    fill();
    loss.fill_(NAN), dh.fill_(NAN);
    graph.launch();
    stream.synchronize();
    const ops::LinearCrossEntropyResult ref = ops::linear_cross_entropy_forward(hc, wc, tc, o, true, false);
    EXPECT_NEAR(loss.item<double>(), ref.loss.item<double>(), 1e-3 * (1 + std::abs(ref.loss.item<double>())));
    EXPECT_TRUE(close(dh.cpu(), ref.grad_h, 1e-2));
  }
}

}  // namespace
