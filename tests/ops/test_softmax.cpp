// softmax / log_softmax against a float64 reference written here, gradcheck, bf16, errors.
#include "../test_util.hpp"
#include <tq/ops/softmax.hpp>

using namespace tq;
using tq::test::all_close;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {

// Softmax of `x` (row-major, shape s) along dim, in double.
std::vector<double> ref_softmax(const std::vector<double>& x, const Shape& s, int64_t dim, bool log) {
  int64_t outer = 1, n = s[size_t(dim)], inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= s[size_t(d)];
  for (size_t d = size_t(dim) + 1; d < s.size(); ++d) inner *= s[d];
  std::vector<double> y(x.size());
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      auto at = [&](int64_t j) { return size_t((o * n + j) * inner + i); };
      double mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[at(j)]);
      double z = 0;
      for (int64_t j = 0; j < n; ++j) z += std::exp(x[at(j)] - mx);
      for (int64_t j = 0; j < n; ++j) y[at(j)] = log ? x[at(j)] - mx - std::log(z) : std::exp(x[at(j)] - mx) / z;
    }
  return y;
}

Tensor run(const Tensor& x, int64_t dim, bool log) { return log ? log_softmax(x, dim) : softmax(x, dim); }

}  // namespace

TEST(Softmax, ForwardMatchesFloat64Reference) {
  for (bool log : {false, true})
    for (int rep = 0; rep < 12; ++rep) {
      const int nd = 1 + rep % 4;
      Shape s = random_shape(nd, 7);
      const int64_t dim = int64_t(rep) % nd - (rep % 2 ? nd : 0);  // negative dims too
      Tensor x = random(s, DType::f64, -6, 6);
      SCOPED_TRACE(str_cat(log ? "log_softmax" : "softmax", " shape ", s, " dim ", dim));
      auto ref = ref_softmax(x.to_vector(), s, wrap_dim(dim, nd), log);
      EXPECT_TRUE(all_close(run(x, dim, log), ref, 1e-13, 1e-12));
      // f32 computes in float: 1e-6 relative.
      EXPECT_TRUE(all_close(run(x.to(DType::f32), dim, log), ref, 1e-6, 1e-5));
    }
}

TEST(Softmax, LargeLogitsDoNotOverflowAndStridedInput) {
  Tensor x = random({3, 5}, DType::f32, 500, 1000);  // exp would overflow without the max shift
  auto ref = ref_softmax(x.to_vector(), {3, 5}, 1, false);
  EXPECT_TRUE(all_close(softmax(x, 1), ref, 1e-6, 1e-5));
  // A transposed (non-contiguous) view is read through its strides.
  Tensor xt = random({4, 6}, DType::f64).t();  // (6, 4)
  auto reft = ref_softmax(xt.contiguous().to_vector(), {6, 4}, 0, true);
  EXPECT_TRUE(all_close(log_softmax(xt, 0), reft, 1e-13, 1e-12));
}

TEST(Softmax, Bf16WithinBf16Tolerance) {
  for (bool log : {false, true})
    for (int rep = 0; rep < 6; ++rep) {
      Shape s = random_shape(3, 9);
      Tensor x = random(s, DType::bf16, -5, 5);
      SCOPED_TRACE(str_cat("shape ", s));
      Tensor y = run(x, -1, log);
      EXPECT_EQ(y.dtype(), DType::bf16);
      // Computed in fp32 and rounded once: within half a bf16 ulp (2^-9 relative), checked at 2^-8.
      EXPECT_TRUE(all_close(y, ref_softmax(x.to_vector(), s, 2, log), 1e-6, 1.0 / 256));
    }
}

TEST(Softmax, Gradcheck) {
  for (bool log : {false, true})
    for (int rep = 0; rep < 6; ++rep) {
      const int nd = 1 + rep % 3;
      Shape s = random_shape(nd, 5);
      const int64_t dim = rep % nd;
      SCOPED_TRACE(str_cat(log ? "log_softmax" : "softmax", " shape ", s, " dim ", dim));
      Tensor x = random(s, DType::f64, -3, 3);
      EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return run(in[0], dim, log); }, {x})));
    }
  // Odd and size-1 dims explicitly.
  for (Shape s : {Shape{1, 7}, Shape{3, 1}, Shape{1}, Shape{5, 3, 1}}) {
    Tensor x = random(s, DType::f64, -3, 3);
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return softmax(in[0], 0); }, {x})));
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return log_softmax(in[0], -1); }, {x})));
  }
}

TEST(Softmax, BackwardMatchesAnalyticJacobianInF32) {
  // gx = y ⊙ (g − Σ g y): checks the pure backward directly (f32 path, not only f64 gradcheck).
  Tensor x = random({4, 9}, DType::f32, -2, 2), g = random({4, 9}, DType::f32);
  Tensor y = ops::softmax(x, 1);
  auto yv = y.to_vector(), gv = g.to_vector();
  std::vector<double> ref(yv.size());
  for (int r = 0; r < 4; ++r) {
    double dot = 0;
    for (int j = 0; j < 9; ++j) dot += gv[size_t(r * 9 + j)] * yv[size_t(r * 9 + j)];
    for (int j = 0; j < 9; ++j) ref[size_t(r * 9 + j)] = yv[size_t(r * 9 + j)] * (gv[size_t(r * 9 + j)] - dot);
  }
  EXPECT_TRUE(all_close(ops::softmax_backward(g, y, 1), ref, 1e-6, 1e-5));
}

TEST(Softmax, Errors) {
  Tensor x = random({2, 3});
  EXPECT_THROW(softmax(x, 2), Error);
  EXPECT_THROW(log_softmax(x, -3), Error);
  EXPECT_THROW(softmax(Tensor::arange(4), 0), Error);  // integer input
  EXPECT_THROW(ops::softmax_backward(random({2, 4}), x, 1), Error);  // shape mismatch
  try {
    softmax(Tensor::zeros({2, 3}, DType::i32), 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("i32[2, 3]"), std::string::npos) << e.what();
  }
}
