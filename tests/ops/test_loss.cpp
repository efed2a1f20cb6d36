// Cross-entropy against a float64 reference written here (log-sum-exp per row, mean over the rows
// whose target is not ignore_index), gradcheck, the all-ignored and error behaviours.
#include <tq/ops/loss.hpp>

#include <cmath>
#include <random>

#include "../test_util.hpp"

namespace tq::test {
namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(fresh_seed());
  return r;
}
int64_t pick(int64_t lo, int64_t hi) { return lo + int64_t(rng()() % uint64_t(hi - lo + 1)); }

// Targets in [0, V) with about a third of the rows ignored (−100).
std::vector<int64_t> random_targets(int64_t N, int64_t V, int64_t ignore = -100) {
  std::vector<int64_t> t;
  for (int64_t r = 0; r < N; ++r) t.push_back(pick(0, 2) == 0 ? ignore : pick(0, V - 1));
  return t;
}

// Σ over supervised rows of −log softmax(x_r)[t_r], and how many rows that was.
std::pair<double, int64_t> ref_sum(const std::vector<double>& x, const std::vector<int64_t>& t, int64_t V,
                                   int64_t ignore = -100) {
  double sum = 0;
  int64_t n = 0;
  for (size_t r = 0; r < t.size(); ++r) {
    if (t[r] == ignore) continue;
    double z = 0;
    for (int64_t c = 0; c < V; ++c) z += std::exp(x[r * size_t(V) + size_t(c)]);
    sum += std::log(z) - x[r * size_t(V) + size_t(t[r])];
    ++n;
  }
  return {sum, n};
}

TEST(CrossEntropy, MatchesFloat64Reference) {
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t N = pick(1, 7), V = pick(1, 13);
    auto t = random_targets(N, V);
    if (rep == 0) t.assign(size_t(N), 0);  // no ignored row
    SCOPED_TRACE(str_cat("N=", N, " V=", V, " targets=", t));
    Tensor targets = Tensor::from_vector(t, {N});
    for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
      Tensor x = random({N, V}, dt, -4.0, 4.0);
      const auto [sum, n] = ref_sum(x.to_vector<double>(), t, V);
      const double tol = dt == DType::f64 ? 1e-12 : 1e-5;  // math is fp32 even for bf16/f16 logits
      Tensor mean = cross_entropy(x, targets);
      EXPECT_EQ(mean.dtype(), dt == DType::f64 ? DType::f64 : DType::f32);
      EXPECT_EQ(mean.numel(), 1);
      EXPECT_NEAR(mean.item<double>(), n ? sum / double(n) : 0.0, tol * (1 + std::abs(sum))) << dtype_name(dt);
      EXPECT_NEAR(cross_entropy(x, targets, {.reduction = Reduction::sum}).item<double>(), sum, tol * (1 + std::abs(sum)));
      EXPECT_NEAR(cross_entropy_normalized(x, targets, 37.0).item<double>(), sum / 37.0, tol * (1 + std::abs(sum)));
    }
  }
}

// Large logits: the log-sum-exp must be max-shifted (exp(300) overflows).
TEST(CrossEntropy, LargeLogitsStayFinite) {
  Tensor x = random({3, 5}, DType::f64, 290.0, 310.0);
  auto t = std::vector<int64_t>{1, 4, 0};
  const double got = cross_entropy(x.to(DType::f32), Tensor::from_vector(t, {3})).item<double>();
  // Reference on shifted values (softmax is shift-invariant).
  auto xv = x.to(DType::f32).to_vector<double>();
  for (double& v : xv) v -= 300.0;
  const auto [sum, n] = ref_sum(xv, t, 5);
  EXPECT_NEAR(got, sum / double(n), 1e-4);
}

TEST(CrossEntropy, CustomIgnoreIndex) {
  const int64_t N = 6, V = 4;
  auto t = random_targets(N, V, /*ignore=*/3);  // 3 is also a valid class: ignoring must win
  Tensor x = random({N, V});
  const auto [sum, n] = ref_sum(x.to_vector<double>(), t, V, 3);
  EXPECT_NEAR(cross_entropy(x, Tensor::from_vector(t, {N}), {.ignore_index = 3}).item<double>(),
              n ? sum / double(n) : 0.0, 1e-12);
}

TEST(CrossEntropy, Gradcheck) {
  for (int rep = 0; rep < 10; ++rep) {
    const int64_t N = pick(1, 6), V = pick(1, 9);
    auto t = random_targets(N, V);
    t[size_t(pick(0, N - 1))] = pick(0, V - 1);  // at least one supervised row
    SCOPED_TRACE(str_cat("N=", N, " V=", V, " targets=", t));
    Tensor targets = Tensor::from_vector(t, {N});
    Tensor x = random({N, V}, DType::f64, -3.0, 3.0);
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], in[1]); },
                                  {x, targets})));
    EXPECT_TRUE(grad_ok(gradcheck(
        [&](const std::vector<Tensor>& in) { return cross_entropy(in[0], in[1], {.reduction = Reduction::sum}); },
        {x, targets})));
    EXPECT_TRUE(grad_ok(gradcheck(
        [&](const std::vector<Tensor>& in) { return cross_entropy_normalized(in[0], in[1], 5.0); }, {x, targets})));
  }
}

// The gradient in bf16 logits' own dtype, against the float64 formula softmax − onehot.
TEST(CrossEntropy, Bf16GradientInLogitsDtype) {
  const int64_t N = 5, V = 11;
  auto t = random_targets(N, V);
  t[0] = 2;
  Tensor x = random({N, V}, DType::bf16, -3.0, 3.0).requires_grad_(true);
  cross_entropy(x, Tensor::from_vector(t, {N})).backward();
  ASSERT_EQ(x.grad().dtype(), DType::bf16);
  const auto xv = x.to_vector<double>();
  int64_t n = 0;
  for (int64_t r : t) n += r != -100;
  std::vector<double> ref(size_t(N * V), 0.0);
  for (int64_t r = 0; r < N; ++r) {
    if (t[size_t(r)] == -100) continue;
    double z = 0;
    for (int64_t c = 0; c < V; ++c) z += std::exp(xv[size_t(r * V + c)]);
    for (int64_t c = 0; c < V; ++c)
      ref[size_t(r * V + c)] = (std::exp(xv[size_t(r * V + c)]) / z - (c == t[size_t(r)])) / double(n);
  }
  EXPECT_TRUE(all_close(x.grad(), ref, 1e-4, 8e-3));
}

// All rows ignored: defined as loss 0 and zero gradient (HF gives NaN from 0/0).
TEST(CrossEntropy, AllIgnoredIsZeroNotNan) {
  Tensor x = random({4, 6}).requires_grad_(true);
  Tensor targets = Tensor::full({4}, -100.0, DType::i64);
  Tensor loss = cross_entropy(x, targets);
  EXPECT_EQ(loss.item<double>(), 0.0);
  loss.backward();
  for (double g : x.grad().to_vector<double>()) EXPECT_EQ(g, 0.0);
  EXPECT_EQ(cross_entropy(x, targets, {.reduction = Reduction::sum}).item<double>(), 0.0);
  EXPECT_EQ(cross_entropy(Tensor::zeros({0, 6}), Tensor::zeros({0}, DType::i64)).item<double>(), 0.0);  // N = 0
}

// Accumulating micro-batches normalised by the effective batch's token count equals one mean.
TEST(CrossEntropy, NormalizedMicroBatchesSumToTheMean) {
  const int64_t V = 7;
  auto t = random_targets(8, V);
  t[0] = 1, t[5] = 6;
  Tensor x = random({8, V}), targets = Tensor::from_vector(t, {8});
  int64_t n = 0;
  for (int64_t r : t) n += r != -100;
  const double whole = cross_entropy(x, targets).item<double>();
  const double parts = cross_entropy_normalized(x.narrow(0, 0, 3), targets.narrow(0, 0, 3), double(n)).item<double>() +
                       cross_entropy_normalized(x.narrow(0, 3, 5), targets.narrow(0, 3, 5), double(n)).item<double>();
  EXPECT_NEAR(parts, whole, 1e-12);
}

TEST(CrossEntropy, ErrorPaths) {
  Tensor x = random({3, 5});
  auto tg = [](std::vector<int64_t> v) { return Tensor::from_vector(v, {int64_t(v.size())}); };
  EXPECT_THROW(cross_entropy(x, tg({0, 5, 1})), Error);             // target = V
  EXPECT_THROW(cross_entropy(x, tg({0, -1, 1})), Error);            // negative, not ignore_index
  EXPECT_THROW(cross_entropy(x, tg({0, -100, 1}), {.ignore_index = -1}), Error);  // −100 not ignored now
  EXPECT_THROW(cross_entropy(x, tg({0, 1})), Error);                // N mismatch
  EXPECT_THROW(cross_entropy(x.reshape({15}), tg({0})), Error);     // logits not 2-D
  EXPECT_THROW(cross_entropy(x, Tensor::from_vector<int64_t>({0, 1, 2}, {3, 1})), Error);  // targets not 1-D
  EXPECT_THROW(cross_entropy(x, Tensor::zeros({3}, DType::f32)), Error);                 // float targets
  EXPECT_THROW(cross_entropy(Tensor::zeros({3, 5}, DType::i64), tg({0, 1, 2})), Error);  // integer logits
  EXPECT_THROW(cross_entropy_normalized(x, tg({0, 1, 2}), 0.0), Error);                  // normaliser 0
  try {
    cross_entropy(x, tg({0, 1, 9}));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 2"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tq::test
