// The fused linear + cross-entropy (CPU reference): against a float64 formula written here (loss,
// dh and dW, softcap on and off, both normalizer modes, ignored rows), against the unfused
// composition the model uses today (linear → softcap ops → .to(f32) → cross_entropy[_normalized]),
// gradcheck, chunking invariance, the optional weight gradient, and the error paths.
#include <tq/ops/linear_cross_entropy.hpp>

#include <cmath>
#include <random>

#include "../test_util.hpp"

namespace tq::test {
namespace {

std::mt19937_64& gen() {
  static std::mt19937_64 r(fresh_seed());
  return r;
}
int64_t pick(int64_t lo, int64_t hi) { return lo + int64_t(gen()() % uint64_t(hi - lo + 1)); }

// Targets in [0, V) with about a quarter of the rows ignored; row 0 always supervised.
std::vector<int64_t> random_targets(int64_t n, int64_t V, int64_t ignore = -100) {
  std::vector<int64_t> t;
  for (int64_t r = 0; r < n; ++r) t.push_back(pick(0, 3) == 0 ? ignore : pick(0, V - 1));
  if (n > 0) t[0] = pick(0, V - 1);
  return t;
}

struct Ref {
  double loss = 0;
  std::vector<double> dh, dw;  // for an incoming gradient of 1
  // Σ|g·w| and Σ|g·h| per element (definition only): the scale of the rounding error of sums whose
  // terms cancel, e.g. a bf16 g one ulp apart from ours after exp in float vs double.
  std::vector<double> dh_abs, dw_abs;
};

// float64: y = c·tanh(x/c) (or x), loss = Σ_r (lse_r − y_r[t_r]) / div, and its gradients.
Ref reference(const std::vector<double>& h, const std::vector<double>& w, const std::vector<int64_t>& t, int64_t n,
              int64_t D, int64_t V, double cap, double normalizer, int64_t ignore = -100) {
  int64_t count = 0;
  for (int64_t v : t) count += v != ignore;
  const double div = normalizer > 0 ? normalizer : double(count);
  Ref r;
  r.dh.assign(size_t(n * D), 0.0);
  r.dw.assign(size_t(V * D), 0.0);
  std::vector<double> y(static_cast<size_t>(V)), dy(static_cast<size_t>(V));
  for (int64_t i = 0; i < n; ++i) {
    if (t[size_t(i)] == ignore) continue;
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      double x = 0;
      for (int64_t k = 0; k < D; ++k) x += h[size_t(i * D + k)] * w[size_t(v * D + k)];
      y[size_t(v)] = cap > 0 ? cap * std::tanh(x / cap) : x;
      dy[size_t(v)] = cap > 0 ? 1 - std::tanh(x / cap) * std::tanh(x / cap) : 1.0;
      mx = std::max(mx, y[size_t(v)]);
    }
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(y[size_t(v)] - mx);
    const double lse = mx + std::log(z);
    r.loss += (lse - y[size_t(t[size_t(i)])]) / div;
    for (int64_t v = 0; v < V; ++v) {
      const double g = (std::exp(y[size_t(v)] - lse) - (v == t[size_t(i)])) * dy[size_t(v)] / div;
      for (int64_t k = 0; k < D; ++k) {
        r.dh[size_t(i * D + k)] += g * w[size_t(v * D + k)];
        r.dw[size_t(v * D + k)] += g * h[size_t(i * D + k)];
      }
    }
  }
  return r;
}

// The op's definition in a low-precision dtype T: logits as the CPU product gives them (rounded
// to T once), the softcap chain rounded to T at every step in fp32 as the unfused ops do, then the
// loss and dlogits = s·(p − onehot)·(1 − tanh²(a)) in float64, dlogits rounded once to T, and the
// products dh = dlogits·W, dW = dlogitsᵀ·h in float64.
template <class T>
Ref definition(const Tensor& h, const Tensor& w, const std::vector<int64_t>& t, double cap, double normalizer) {
  const int64_t n = h.size(0), D = h.size(1), V = w.size(0);
  const std::vector<double> x = ops::matmul(h, w, false, true).to_vector(), hv = h.to_vector(), wv = w.to_vector();
  int64_t count = 0;
  for (int64_t v : t) count += v != -100;
  const double div = normalizer > 0 ? normalizer : double(count);
  const float c = float(T(float(cap)));
  auto rt = [](float v) { return float(T(v)); };  // round to T
  Ref r;
  r.dh.assign(size_t(n * D), 0.0);
  r.dw.assign(size_t(V * D), 0.0);
  r.dh_abs.assign(size_t(n * D), 0.0);
  r.dw_abs.assign(size_t(V * D), 0.0);
  std::vector<double> y(static_cast<size_t>(V)), dy(static_cast<size_t>(V));
  for (int64_t i = 0; i < n; ++i) {
    if (t[size_t(i)] == -100) continue;
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      const float xv = float(x[size_t(i * V + v)]);
      const float a = cap > 0 ? rt(xv / c) : 0.0f;
      y[size_t(v)] = cap > 0 ? rt(rt(std::tanh(a)) * c) : xv;
      dy[size_t(v)] = cap > 0 ? 1 - std::tanh(double(a)) * std::tanh(double(a)) : 1.0;
      mx = std::max(mx, y[size_t(v)]);
    }
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(y[size_t(v)] - mx);
    const double lse = mx + std::log(z);
    r.loss += (lse - y[size_t(t[size_t(i)])]) / div;
    for (int64_t v = 0; v < V; ++v) {
      const double g = rt(float((std::exp(y[size_t(v)] - lse) - (v == t[size_t(i)])) / div * dy[size_t(v)]));
      for (int64_t k = 0; k < D; ++k) {
        r.dh[size_t(i * D + k)] += g * wv[size_t(v * D + k)];
        r.dw[size_t(v * D + k)] += g * hv[size_t(i * D + k)];
        r.dh_abs[size_t(i * D + k)] += std::abs(g * wv[size_t(v * D + k)]);
        r.dw_abs[size_t(v * D + k)] += std::abs(g * hv[size_t(i * D + k)]);
      }
    }
  }
  return r;
}

std::vector<double> scaled(std::vector<double> v, double s) {
  for (double& x : v) x *= s;
  return v;
}

// The unfused path of apps/paligemma (lm_head + cross_entropy[_normalized]).
Tensor unfused(const Tensor& h, const Tensor& w, const Tensor& targets, const LinearCrossEntropyOptions& o) {
  Tensor logits = linear(h, w);
  if (o.softcap > 0) logits = tanh(logits / o.softcap) * o.softcap;
  logits = logits.to(logits.dtype() == DType::f64 ? DType::f64 : DType::f32);
  return o.normalizer > 0 ? cross_entropy_normalized(logits, targets, o.normalizer, o.ignore_index)
                          : cross_entropy(logits, targets, {.ignore_index = o.ignore_index});
}


// Loss and gradients of the fused op with an incoming gradient `g` (h and, when asked, W require grad).
struct Outcome {
  Tensor loss, dh, dw;
};
Outcome run_fused(const Tensor& h, const Tensor& w, const Tensor& targets, const LinearCrossEntropyOptions& o, bool grad_w,
              double g = 1.0) {
  Tensor hl = h.detach().requires_grad_(true), wl = w.detach().requires_grad_(grad_w);
  Tensor loss = linear_cross_entropy(hl, wl, targets, o);
  loss.backward(Tensor::full({}, g, loss.dtype()));
  return {loss, hl.grad(), wl.grad()};
}
Outcome run_unfused(const Tensor& h, const Tensor& w, const Tensor& targets, const LinearCrossEntropyOptions& o,
                bool grad_w, double g = 1.0) {
  Tensor hl = h.detach().requires_grad_(true), wl = w.detach().requires_grad_(grad_w);
  Tensor loss = unfused(hl, wl, targets, o);
  loss.backward(Tensor::full({}, g, loss.dtype()));
  return {loss, hl.grad(), wl.grad()};
}

// Each element within rtol of max(|ref|, mag) (mag: the element's Σ|terms| where given) plus a
// tenth of rtol·max|ref|, and the whole within rtol in norm.
::testing::AssertionResult near(const Tensor& got, const std::vector<double>& ref, double rtol,
                                const std::vector<double>& mag = {}) {
  if (!got.defined()) return ::testing::AssertionFailure() << "no tensor";
  const std::vector<double> v = got.to_vector<double>();
  if (v.size() != ref.size()) return ::testing::AssertionFailure() << "size " << v.size() << " vs " << ref.size();
  double mx = 0, num = 0, den = 0;
  for (double x : ref) mx = std::max(mx, std::abs(x));
  for (size_t i = 0; i < v.size(); ++i) {
    const double e = std::abs(v[i] - ref[i]);
    const double scale = std::max(std::abs(ref[i]), mag.empty() ? 0.0 : mag[i]);
    if (!(e <= rtol * scale + 0.1 * rtol * mx))
      return ::testing::AssertionFailure() << "element " << i << ": got " << v[i] << ", expected " << ref[i];
    num += e * e;
    den += ref[i] * ref[i];
  }
  if (num > rtol * rtol * den) return ::testing::AssertionFailure() << "relative norm error " << std::sqrt(num / den);
  return ::testing::AssertionSuccess();
}

// ‖got − ref‖ / ‖ref‖, or / ‖mag‖ where given and larger (mag: per-element Σ|terms|, the scale of
// a sum's rounding error when its terms cancel).
double norm_error(const Tensor& got, const Tensor& ref, const std::vector<double>& mag = {}) {
  const std::vector<double> a = got.to_vector(), b = ref.to_vector();
  double num = 0, den = 0, dmag = 0;
  for (double m : mag) dmag += m * m;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  den = std::max(den, dmag);
  return std::sqrt(num / den);
}

}  // namespace

TEST(LinearCrossEntropy, MatchesFloat64Reference) {
  const int64_t shapes[][3] = {{1, 5, 7}, {7, 3, 13}, {416, 8, 37}, {4576, 4, 9}};  // n, D, V
  for (const auto& s : shapes) {
    const int64_t n = s[0], D = s[1], V = s[2];
    for (double cap : {0.0, 2.5})
      for (double normalizer : {0.0, 37.0}) {
        const std::vector<int64_t> t = random_targets(n, V);
        const int64_t chunk = pick(0, 1) ? 0 : pick(1, n);
        SCOPED_TRACE(str_cat("n=", n, " D=", D, " V=", V, " cap=", cap, " normalizer=", normalizer, " chunk=", chunk));
        Tensor h = random({n, D}, DType::f64, -1.5, 1.5), w = random({V, D}, DType::f64, -1.5, 1.5);
        const LinearCrossEntropyOptions o{.softcap = cap, .normalizer = normalizer, .chunk_rows = chunk};
        const double g = 1.75;  // the incoming gradient scales dh and dW
        const Outcome f = run_fused(h, w, Tensor::from_vector(t, {n}), o, true, g);
        const Ref r = reference(h.to_vector(), w.to_vector(), t, n, D, V, cap, normalizer);
        EXPECT_EQ(f.loss.dtype(), DType::f64);
        EXPECT_NEAR(f.loss.item<double>(), r.loss, 1e-12 * (1 + std::abs(r.loss)));
        EXPECT_TRUE(near(f.dh, scaled(r.dh, g), 1e-10));
        EXPECT_TRUE(near(f.dw, scaled(r.dw, g), 1e-10));
      }
  }
}

// Low-precision dtypes against the op's definition (every rounding it specifies, float64 elsewhere).
TEST(LinearCrossEntropy, MatchesItsDefinitionInLowPrecision) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (double cap : {0.0, 30.0})
      for (double normalizer : {0.0, 53.0}) {
        const int64_t n = pick(1, 40), D = pick(1, 72), V = pick(2, 300);
        const std::vector<int64_t> t = random_targets(n, V);
        SCOPED_TRACE(str_cat(dt, " n=", n, " D=", D, " V=", V, " cap=", cap, " normalizer=", normalizer));
        // bf16/f16: logits of a few tens, so that the softcap of 30 bends them. f32: logits of a
        // few units, so that fp32's own lse rounding (ulp(lse)·p) stays below the 1e-5 tolerance.
        const double range = dt == DType::f32 ? 0.5 : 3.0;
        Tensor h = random({n, D}, dt, -range, range), w = random({V, D}, dt, -range, range);
        const LinearCrossEntropyOptions o{.softcap = cap, .normalizer = normalizer, .chunk_rows = pick(0, n)};
        const Outcome f = run_fused(h, w, Tensor::from_vector(t, {n}), o, true, 0.5);
        Ref r = dt == DType::bf16 ? definition<bf16>(h, w, t, cap, normalizer)
                : dt == DType::f16 ? definition<f16>(h, w, t, cap, normalizer)
                                   : definition<float>(h, w, t, cap, normalizer);
        ASSERT_EQ(f.dh.dtype(), dt);
        ASSERT_EQ(f.dw.dtype(), dt);
        EXPECT_NEAR(f.loss.item<double>(), r.loss, 1e-5 * (1 + std::abs(r.loss)));
        const double rtol = dt == DType::f32 ? 1e-5 : 1e-2;
        EXPECT_TRUE(near(f.dh, scaled(r.dh, 0.5), rtol, scaled(r.dh_abs, 0.5)));
        EXPECT_TRUE(near(f.dw, scaled(r.dw, 0.5), rtol, scaled(r.dw_abs, 0.5)));
      }
}

// Against the unfused composition the model uses today: the forward is the same sequence of
// roundings (equal up to summation order); the unfused gradient rounds dlogits to T several times,
// so low-precision gradients agree to the dtype's precision in norm.
TEST(LinearCrossEntropy, MatchesTheUnfusedModelPath) {
  for (DType dt : {DType::f32, DType::bf16})
    for (double cap : {0.0, 30.0})
      for (double normalizer : {0.0, 53.0}) {
        const int64_t n = pick(1, 40), D = pick(1, 72), V = pick(2, 300);
        const std::vector<int64_t> t = random_targets(n, V);
        SCOPED_TRACE(str_cat(dt, " n=", n, " D=", D, " V=", V, " cap=", cap, " normalizer=", normalizer));
        const double range = dt == DType::f32 ? 0.5 : 3.0;  // as above
        Tensor h = random({n, D}, dt, -range, range), w = random({V, D}, dt, -range, range);
        const LinearCrossEntropyOptions o{.softcap = cap, .normalizer = normalizer, .chunk_rows = pick(0, n)};
        const Tensor tg = Tensor::from_vector(t, {n});
        const Outcome f = run_fused(h, w, tg, o, true, 0.5), u = run_unfused(h, w, tg, o, true, 0.5);
        EXPECT_EQ(f.loss.dtype(), DType::f32);
        EXPECT_NEAR(f.loss.item<double>(), u.loss.item<double>(), 2e-6 * (1 + std::abs(u.loss.item<double>())));
        ASSERT_EQ(f.dh.dtype(), dt);
        if (dt == DType::f32) {
          EXPECT_TRUE(near(f.dh, u.dh.to_vector(), 1e-5));
          EXPECT_TRUE(near(f.dw, u.dw.to_vector(), 1e-5));
        } else {
          // In norm against the gradient's own scale: with few elements (n = 1, D = 3 drew a 1.2 %
          // error in ‖dh‖) each one is a sum over the vocabulary whose terms cancel.
          const Ref r = definition<bf16>(h, w, t, cap, normalizer);
          EXPECT_LT(norm_error(f.dh, u.dh, scaled(r.dh_abs, 0.5)), 1e-2);
          EXPECT_LT(norm_error(f.dw, u.dw, scaled(r.dw_abs, 0.5)), 1e-2);
        }
      }
}

TEST(LinearCrossEntropy, Gradcheck) {
  for (int rep = 0; rep < 4; ++rep) {
    const int64_t n = pick(1, 5), D = pick(1, 4), V = pick(1, 6);
    const std::vector<int64_t> t = random_targets(n, V);
    const LinearCrossEntropyOptions o{.softcap = rep % 2 ? 1.5 : 0.0, .normalizer = rep < 2 ? 0.0 : 3.0,
                                      .chunk_rows = pick(0, n)};
    SCOPED_TRACE(str_cat("n=", n, " D=", D, " V=", V, " targets=", t));
    Tensor tg = Tensor::from_vector(t, {n});
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return linear_cross_entropy(in[0], in[1], tg, o); },
                                  {random({n, D}), random({V, D})})));
  }
}

// Chunk boundaries change nothing but the summation order of dW.
TEST(LinearCrossEntropy, ChunkingIsInvisible) {
  const int64_t n = 61, D = 12, V = 29;
  const std::vector<int64_t> t = random_targets(n, V);
  Tensor h = random({n, D}, DType::f32, -2, 2), w = random({V, D}, DType::f32, -2, 2), tg = Tensor::from_vector(t, {n});
  const Outcome whole = run_fused(h, w, tg, {.softcap = 4.0}, true);
  for (int64_t chunk : {1, 3, 16, 60}) {
    SCOPED_TRACE(str_cat("chunk=", chunk));
    const Outcome c = run_fused(h, w, tg, {.softcap = 4.0, .chunk_rows = chunk}, true);
    EXPECT_EQ(c.loss.item<double>(), whole.loss.item<double>());
    EXPECT_EQ(c.dh.to_vector(), whole.dh.to_vector());
    EXPECT_TRUE(near(c.dw, whole.dw.to_vector(), 1e-5));
  }
  EXPECT_EQ(ops::linear_ce_chunk_rows(4576, 257216, DType::bf16), 512);  // 251 MiB of bf16 logits
  EXPECT_EQ(ops::linear_ce_chunk_rows(4576, 257216, DType::f32), 256);
  EXPECT_EQ(ops::linear_ce_chunk_rows(416, 257216, DType::bf16), 416);
  EXPECT_EQ(ops::linear_ce_chunk_rows(7, 29, DType::f32), 7);
  EXPECT_EQ(ops::linear_ce_chunk_rows(70, 29, DType::f32, 16), 16);
  EXPECT_LE(ops::linear_ce_chunk_rows(1 << 20, 257216, DType::bf16) * 257216 * 2, ops::kLinearCeChunkBytes);
}

// dW only when W requires grad; nothing at all under no_grad.
TEST(LinearCrossEntropy, WeightGradientIsOptional) {
  const int64_t n = 9, D = 6, V = 11;
  Tensor h = random({n, D}), w = random({V, D}), tg = Tensor::from_vector(random_targets(n, V), {n});
  const Outcome frozen = run_fused(h, w, tg, {}, false), trained = run_fused(h, w, tg, {}, true);
  EXPECT_FALSE(frozen.dw.defined());
  ASSERT_TRUE(trained.dw.defined());
  EXPECT_EQ(frozen.dh.to_vector(), trained.dh.to_vector());
  const ops::LinearCrossEntropyResult r = ops::linear_cross_entropy_forward(h, w, tg, {}, false, false);
  EXPECT_FALSE(r.grad_h.defined());
  EXPECT_FALSE(r.grad_w.defined());
  EXPECT_EQ(r.loss.item<double>(), frozen.loss.item<double>());
  Tensor hl = h.detach().requires_grad_(true);
  NoGradGuard ng;
  EXPECT_FALSE(linear_cross_entropy(hl, w, tg).requires_grad());
}

// Ignored rows add nothing and get zero gradient; all ignored under the mean: 0, not NaN.
TEST(LinearCrossEntropy, IgnoredRowsAndEmptyInputs) {
  const int64_t n = 8, D = 5, V = 7;
  Tensor h = random({n, D}), w = random({V, D});
  std::vector<int64_t> t(size_t(n), 3);
  t[2] = t[5] = -1;  // a custom ignore_index that is not a valid class
  const LinearCrossEntropyOptions o{.ignore_index = -1};
  const Outcome f = run_fused(h, w, Tensor::from_vector(t, {n}), o, true);
  const Ref r = reference(h.to_vector(), w.to_vector(), t, n, D, V, 0.0, 0.0, -1);
  EXPECT_NEAR(f.loss.item<double>(), r.loss, 1e-12);
  const std::vector<double> dh = f.dh.to_vector();
  for (int64_t k = 0; k < D; ++k) EXPECT_EQ(dh[size_t(2 * D + k)], 0.0);
  const Outcome none = run_fused(h, w, Tensor::full({n}, -100.0, DType::i64), {}, true);
  EXPECT_EQ(none.loss.item<double>(), 0.0);
  for (double g : none.dh.to_vector()) EXPECT_EQ(g, 0.0);
  for (double g : none.dw.to_vector()) EXPECT_EQ(g, 0.0);
  const Outcome empty = run_fused(Tensor::zeros({0, D}), w, Tensor::zeros({0}, DType::i64), {}, true);
  EXPECT_EQ(empty.loss.item<double>(), 0.0);
  EXPECT_EQ(empty.dh.shape(), (Shape{0, D}));
  // i32 targets work like i64.
  EXPECT_EQ(linear_cross_entropy(h, w, Tensor::from_vector(t, {n}).to(DType::i32), o).item<double>(),
            f.loss.item<double>());
}

TEST(LinearCrossEntropy, ErrorPaths) {
  Tensor h = random({3, 4}), w = random({5, 4});
  auto tg = [](std::vector<int64_t> v) { return Tensor::from_vector(v, {int64_t(v.size())}); };
  EXPECT_THROW(linear_cross_entropy(h, w, tg({0, 5, 1})), Error);                       // target = V
  EXPECT_THROW(linear_cross_entropy(h, w, tg({0, -1, 1})), Error);                      // not ignore_index
  EXPECT_THROW(linear_cross_entropy(h, w, tg({0, 1})), Error);                          // n mismatch
  EXPECT_THROW(linear_cross_entropy(h, random({5, 3}), tg({0, 1, 2})), Error);          // D mismatch
  EXPECT_THROW(linear_cross_entropy(h.reshape({12}), w, tg({0})), Error);               // h not 2-D
  EXPECT_THROW(linear_cross_entropy(h, w, Tensor::zeros({3}, DType::f32)), Error);      // float targets
  EXPECT_THROW(linear_cross_entropy(h, w, tg({0, 1, 2}), {.normalizer = -1.0}), Error);  // negative normalizer
  EXPECT_THROW(linear_cross_entropy(h, w, tg({0, 1, 2}), {.softcap = -30.0}), Error);   // negative softcap
  EXPECT_THROW(linear_cross_entropy(h, Tensor::zeros({5, 4}, DType::i64), tg({0, 1, 2})), Error);  // integer W
  try {
    linear_cross_entropy(h, w, tg({0, 1, 9}));
    FAIL() << "expected a tq::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 2"), std::string::npos) << e.what();
  }
}

}  // namespace tq::test
