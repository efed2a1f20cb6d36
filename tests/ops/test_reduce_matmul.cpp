#include "../test_util.hpp"

using namespace tq;
using tq::test::random;
using tq::test::random_shape;

TEST(Reduce, SumMeanOverAnyDims) {
  for (int rep = 0; rep < 6; ++rep) {
    Shape s = random_shape(3, 6);
    Tensor x = random(s);
    auto v = x.to_vector();
    // sum over dims {0, 2} with keepdim = false → (s1)
    std::vector<double> ref(size_t(s[1]), 0.0);
    for (int64_t i = 0; i < s[0]; ++i)
      for (int64_t j = 0; j < s[1]; ++j)
        for (int64_t k = 0; k < s[2]; ++k) ref[size_t(j)] += v[size_t((i * s[1] + j) * s[2] + k)];
    Tensor r = sum(x, {0, -1});
    ASSERT_EQ(r.shape(), (Shape{s[1]}));
    EXPECT_TRUE(test::all_close(r, ref, 1e-12));
    EXPECT_EQ(sum(x, {0, 2}, true).shape(), (Shape{1, s[1], 1}));
    std::vector<double> mref = ref;
    for (auto& m : mref) m /= double(s[0] * s[2]);
    EXPECT_TRUE(test::all_close(mean(x, {0, 2}), mref, 1e-12));
    double total = 0;
    for (double a : v) total += a;
    EXPECT_NEAR(sum(x).item(), total, 1e-12);
    EXPECT_TRUE(test::grad_ok(gradcheck([](const std::vector<Tensor>& in) { return sum(in[0], {0, 2}); }, {x})));
    EXPECT_TRUE(test::grad_ok(gradcheck([](const std::vector<Tensor>& in) { return mean(in[0], {1}, true); }, {x})));
  }
}

TEST(Reduce, MaxAndArgmax) {
  for (int rep = 0; rep < 6; ++rep) {
    Shape s = random_shape(3, 6);
    Tensor x = random(s);
    auto v = x.to_vector();
    Tensor m = max(x, 1), am = argmax(x, 1);
    auto mv = m.to_vector();
    auto amv = am.to_vector<int64_t>();
    for (int64_t i = 0; i < s[0]; ++i)
      for (int64_t k = 0; k < s[2]; ++k) {
        double best = -INFINITY;
        int64_t bi = 0;
        for (int64_t j = 0; j < s[1]; ++j) {
          double a = v[size_t((i * s[1] + j) * s[2] + k)];
          if (a > best) best = a, bi = j;
        }
        EXPECT_EQ(mv[size_t(i * s[2] + k)], best);
        EXPECT_EQ(amv[size_t(i * s[2] + k)], bi);
      }
    EXPECT_TRUE(test::grad_ok(gradcheck([](const std::vector<Tensor>& in) { return max(in[0], 1); }, {x})));
  }
  EXPECT_THROW(max(Tensor::zeros({2, 0}), 1), Error);
}

namespace {
// float64 reference: C[b] = op(A[b]) · op(B[b]) on dense row-major batches.
std::vector<double> ref_matmul(const std::vector<double>& a, const std::vector<double>& b, int64_t batch, int64_t M,
                               int64_t N, int64_t K, bool ta, bool tb) {
  std::vector<double> c(size_t(batch * M * N), 0.0);
  for (int64_t p = 0; p < batch; ++p)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k) {
          double x = ta ? a[size_t(p * M * K + k * M + i)] : a[size_t(p * M * K + i * K + k)];
          double y = tb ? b[size_t(p * K * N + j * K + k)] : b[size_t(p * K * N + k * N + j)];
          acc += x * y;
        }
        c[size_t(p * M * N + i * N + j)] = acc;
      }
  return c;
}
}  // namespace

TEST(Matmul, AllTransposesAndBatchesMatchFloat64) {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int rep = 0; rep < 3; ++rep) {
        Shape d = random_shape(4, 7);
        int64_t batch = d[0], M = d[1], N = d[2], K = d[3];
        Tensor a = random(ta ? Shape{batch, K, M} : Shape{batch, M, K});
        Tensor b = random(tb ? Shape{batch, N, K} : Shape{batch, K, N});
        Tensor c = matmul(a, b, ta, tb);
        ASSERT_EQ(c.shape(), (Shape{batch, M, N}));
        EXPECT_TRUE(test::all_close(c, ref_matmul(a.to_vector(), b.to_vector(), batch, M, N, K, ta, tb), 1e-12));
        EXPECT_TRUE(test::grad_ok(gradcheck(
            [ta, tb](const std::vector<Tensor>& in) { return matmul(in[0], in[1], ta, tb); }, {a, b})));
      }
}

TEST(Matmul, BroadcastBatchAndLowPrecision) {
  Tensor a = random({3, 1, 4, 5});
  Tensor b = random({2, 5, 6});
  Tensor c = matmul(a, b);
  ASSERT_EQ(c.shape(), (Shape{3, 2, 4, 6}));
  EXPECT_TRUE(test::grad_ok(gradcheck([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); }, {a, b})));
  // bf16 inputs: fp32 accumulation, one rounding at the end.
  Tensor x = random({33, 72}, DType::bf16), w = random({72, 17}, DType::bf16);
  auto ref = ref_matmul(x.to_vector(), w.to_vector(), 1, 33, 17, 72, false, false);
  Tensor y = matmul(x, w);
  EXPECT_EQ(y.dtype(), DType::bf16);
  EXPECT_TRUE(test::all_close(y, ref, 1e-2, 8e-3));
  EXPECT_THROW(matmul(random({2, 3}), random({4, 2})), Error);
}

TEST(Linear, MatchesFloat64WithBias) {
  Shape d = random_shape(4, 6);
  Tensor x = random({d[0], d[1], d[2]}), w = random({d[3], d[2]}), b = random({d[3]});
  Tensor y = linear(x, w, b);
  ASSERT_EQ(y.shape(), (Shape{d[0], d[1], d[3]}));
  auto ref = ref_matmul(x.to_vector(), w.to_vector(), 1, d[0] * d[1], d[3], d[2], false, true);
  auto bv = b.to_vector();
  for (size_t i = 0; i < ref.size(); ++i) ref[i] += bv[i % size_t(d[3])];
  EXPECT_TRUE(test::all_close(y, ref, 1e-12));
  EXPECT_TRUE(test::grad_ok(
      gradcheck([](const std::vector<Tensor>& in) { return linear(in[0], in[1], in[2]); }, {x, w, b})));
  EXPECT_THROW(linear(x, random({d[3], d[2] + 1})), Error);
}
