#include "../test_util.hpp"

using namespace tq;
using tq::test::random;

TEST(Autograd, GradientsAccumulateIntoLeaves) {
  Tensor x = random({3, 4}).requires_grad_();
  Tensor w = random({4, 2}).requires_grad_();
  sum(matmul(x, w)).backward();
  Tensor g1 = w.grad();
  ASSERT_TRUE(g1.defined());
  auto first = g1.to_vector();
  sum(matmul(x, w)).backward();  // second backward adds the same gradient
  auto second = w.grad().to_vector();
  for (size_t i = 0; i < first.size(); ++i) EXPECT_NEAR(second[i], 2 * first[i], 1e-12);
  // dL/dw[k][j] = Σ_i x[i][k]
  auto xv = x.to_vector();
  for (int k = 0; k < 4; ++k) {
    double s = 0;
    for (int i = 0; i < 3; ++i) s += xv[size_t(i * 4 + k)];
    EXPECT_NEAR(first[size_t(k * 2)], s, 1e-12);
  }
  w.zero_grad();
  EXPECT_FALSE(w.grad().defined());
}

TEST(Autograd, SharedSubgraphsSumTheirGradients) {
  Tensor x = random({5}).requires_grad_();
  Tensor y = x * x;         // used twice below
  Tensor z = sum(y * y + y);  // d/dx = (4x³ + 2x)
  z.backward();
  auto xv = x.to_vector(), g = x.grad().to_vector();
  for (size_t i = 0; i < xv.size(); ++i) EXPECT_NEAR(g[i], 4 * std::pow(xv[i], 3) + 2 * xv[i], 1e-12);
}

TEST(Autograd, ViewsAreDifferentiable) {
  Tensor x = random({2, 3, 4});
  auto f = [](const std::vector<Tensor>& in) {
    const Tensor& t = in[0];
    return t.transpose(0, 2).slice(1, 1, 3).reshape({4, 4}) * t.select(1, 0).permute({1, 0}).expand({2, 4, 2})
                                                                      .reshape({4, 4});
  };
  EXPECT_TRUE(test::grad_ok(gradcheck(f, {x})));
  auto g = [](const std::vector<Tensor>& in) { return in[0].unsqueeze(1).squeeze(1).narrow(2, 1, 2).contiguous(); };
  EXPECT_TRUE(test::grad_ok(gradcheck(g, {x})));
  // dtype casts pass the gradient through (converted back to the input's dtype); finite
  // differences cannot see through f32 rounding, so compare with the upstream gradient directly.
  Tensor up = random({2, 3, 4});
  auto grads = grad_of([](const std::vector<Tensor>& in) { return in[0].to(DType::f32).to(DType::f64); }, {x}, up);
  EXPECT_EQ(grads[0].dtype(), DType::f64);
  EXPECT_EQ(grads[0].to_vector(), up.to(DType::f32).to_vector());
}

TEST(Autograd, NoGradAndDetach) {
  Tensor x = random({3}).requires_grad_();
  {
    NoGradGuard ng;
    Tensor y = x * 2.0;
    EXPECT_FALSE(y.requires_grad());
  }
  Tensor d = x.detach();
  EXPECT_FALSE(d.requires_grad());
  EXPECT_EQ(d.storage().get(), x.storage().get());
  EXPECT_THROW(sum(d).backward(), Error);
  EXPECT_THROW((x * 2.0).backward(), Error);  // non-scalar without a gradient
  EXPECT_THROW(Tensor::arange(3).requires_grad_(), Error);
}

TEST(Autograd, CheckpointRecomputesAndMatches) {
  Tensor w = random({4, 4}).requires_grad_();
  Tensor x = random({3, 4}).requires_grad_();
  auto block = [&w](const std::vector<Tensor>& in) { return tanh(matmul(in[0], w)) * in[0]; };
  sum(block({x})).backward();
  auto gw_ref = w.grad().to_vector(), gx_ref = x.grad().to_vector();
  w.zero_grad();
  x.zero_grad();
  int calls = 0;
  auto counted = [&](const std::vector<Tensor>& in) {
    ++calls;
    return block(in);
  };
  Tensor out = checkpoint(counted, {x});
  EXPECT_EQ(calls, 1);
  sum(out).backward();
  EXPECT_EQ(calls, 2);  // recomputed once in backward
  EXPECT_LT(test::max_abs_diff(w.grad().to_vector(), gw_ref), 1e-12);
  EXPECT_LT(test::max_abs_diff(x.grad().to_vector(), gx_ref), 1e-12);
}

TEST(Autograd, GradcheckDetectsAWrongBackward) {
  // A deliberately wrong backward (factor 2) must be caught: gradcheck can fail.
  auto wrong = [](const std::vector<Tensor>& in) {
    Tensor xd = in[0].detach();
    Tensor out = ops::unary(UnaryOp::square, xd);
    return record("wrong_square", out, {in[0]}, [xd](const Tensor& g) {
      return std::vector<Tensor>{ops::binary(BinaryOp::mul, g, xd)};  // should be 2·x·g
    });
  };
  EXPECT_FALSE(gradcheck(wrong, {random({4})}).ok);
}
