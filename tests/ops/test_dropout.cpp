// dropout: the mask is Philox::uniform(seed, offset, i) < p, checked against a float64
// reference written here; gradcheck; identity/edge cases; errors.
#include "../test_util.hpp"
#include <tq/ops/dropout.hpp>

using namespace tq;
using tq::test::all_close;
using tq::test::fresh_seed;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {
std::vector<double> ref_dropout(const std::vector<double>& x, double p, uint64_t seed, uint64_t offset) {
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i)
    y[i] = double(Philox::uniform(seed, offset, i)) < p ? 0.0 : x[i] / (1.0 - p);
  return y;
}
}  // namespace

TEST(Dropout, ForwardMatchesFloat64Reference) {
  for (int rep = 0; rep < 10; ++rep) {
    Shape s = random_shape(1 + rep % 3, 9);
    const double p = 0.05 + 0.9 * double(rep) / 10.0;
    const uint64_t seed = fresh_seed(), offset = fresh_seed() % 1000;
    Tensor x = random(s, DType::f64);
    SCOPED_TRACE(str_cat("shape ", s, " p ", p, " seed ", seed));
    auto ref = ref_dropout(x.to_vector(), p, seed, offset);
    EXPECT_TRUE(all_close(dropout(x, p, seed, offset), ref, 1e-15, 1e-15));
    EXPECT_TRUE(all_close(dropout(x.to(DType::f32), p, seed, offset), ref, 1e-6, 1e-6));
    Tensor xb = x.to(DType::bf16);
    EXPECT_TRUE(all_close(dropout(xb, p, seed, offset), ref_dropout(xb.to_vector(), p, seed, offset), 1e-6, 1.0 / 256));
    // The mask helper agrees with the op.
    auto keep = ops::dropout_mask(s, p, seed, offset).to_vector<bool>();
    for (size_t i = 0; i < keep.size(); ++i) EXPECT_EQ(keep[i], ref[i] != 0.0 || x.to_vector()[i] == 0.0) << i;
  }
}

TEST(Dropout, MaskFollowsLogicalIndexAndDropRate) {
  const uint64_t seed = fresh_seed();
  // A transposed view is masked by its logical (row-major) index, not by memory order.
  Tensor x = random({5, 7}, DType::f64).t();
  EXPECT_TRUE(all_close(dropout(x, 0.3, seed, 2), ref_dropout(x.contiguous().to_vector(), 0.3, seed, 2), 1e-15, 1e-15));
  // Same (seed, offset) → same mask; another offset → another mask; the drop rate is p.
  Tensor ones = Tensor::ones({20000}, DType::f32);
  auto a = dropout(ones, 0.25, seed, 5).to_vector(), b = dropout(ones, 0.25, seed, 5).to_vector();
  auto c = dropout(ones, 0.25, seed, 6).to_vector();
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  double dropped = 0;
  for (double v : a) dropped += v == 0.0;
  EXPECT_NEAR(dropped / double(a.size()), 0.25, 0.015);
  for (double v : a) ASSERT_TRUE(v == 0.0 || std::abs(v - 1.0 / 0.75) < 1e-6) << v;
}

TEST(Dropout, IdentityAndEdgeCases) {
  Tensor x = random({3, 4}, DType::f32);
  EXPECT_TRUE(dropout(x, 0.5, 1, 0, /*training=*/false).same(x));
  EXPECT_TRUE(dropout(x, 0.0, 1, 0).same(x));
  EXPECT_TRUE(all_close(dropout(x, 1.0, 1, 0), std::vector<double>(12, 0.0), 0, 0));
  // The Generator overload consumes one offset per active call and none in eval.
  Generator g(fresh_seed());
  dropout(x, 0.5, g, false);
  EXPECT_EQ(g.offset(), 0u);
  Tensor y = dropout(x, 0.5, g);
  EXPECT_EQ(g.offset(), 1u);
  EXPECT_TRUE(all_close(y, ref_dropout(x.to_vector(), 0.5, g.seed(), 0), 1e-6, 1e-6));
}

TEST(Dropout, BackwardUsesTheSameMask) {
  const uint64_t seed = fresh_seed();
  for (int rep = 0; rep < 5; ++rep) {
    Shape s = random_shape(2, 5);
    Tensor x = random(s, DType::f64);
    SCOPED_TRACE(str_cat("shape ", s));
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return dropout(in[0], 0.4, seed, 3); }, {x})));
    Tensor g = random(s, DType::f64);
    EXPECT_TRUE(all_close(ops::dropout_backward(g, 0.4, seed, 3), ref_dropout(g.to_vector(), 0.4, seed, 3), 1e-15, 1e-15));
  }
}

TEST(Dropout, Errors) {
  Tensor x = random({2, 2}, DType::f32);
  EXPECT_THROW(dropout(x, -0.1, 0, 0), Error);
  EXPECT_THROW(dropout(x, 1.5, 0, 0), Error);
  EXPECT_THROW(dropout(x, 1.5, 0, 0, false), Error);  // a bad p is an error even in eval
  EXPECT_THROW(dropout(Tensor::arange(4), 0.5, 0, 0), Error);
}
