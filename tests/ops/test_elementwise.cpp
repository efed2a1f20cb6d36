#include "../test_util.hpp"

using namespace tq;
using tq::test::random;
using tq::test::random_shape;

namespace {

double ref_unary(UnaryOp op, double x) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return std::log(x);
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::rsqrt: return 1 / std::sqrt(x);
    case UnaryOp::tanh: return std::tanh(x);
    case UnaryOp::sigmoid: return 1 / (1 + std::exp(-x));
    case UnaryOp::gelu_erf: return 0.5 * x * std::erfc(-x / std::sqrt(2.0));
    case UnaryOp::gelu_tanh: return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * std::pow(x, 3))));
    case UnaryOp::silu: return x / (1 + std::exp(-x));
    case UnaryOp::abs: return std::fabs(x);
    case UnaryOp::square: return x * x;
  }
  return 0;
}

const std::vector<std::pair<UnaryOp, const char*>> kUnary = {
    {UnaryOp::neg, "neg"},         {UnaryOp::exp, "exp"},           {UnaryOp::log, "log"},
    {UnaryOp::sqrt, "sqrt"},       {UnaryOp::rsqrt, "rsqrt"},       {UnaryOp::tanh, "tanh"},
    {UnaryOp::sigmoid, "sigmoid"}, {UnaryOp::gelu_erf, "gelu_erf"}, {UnaryOp::gelu_tanh, "gelu_tanh"},
    {UnaryOp::silu, "silu"},       {UnaryOp::abs, "abs"},           {UnaryOp::square, "square"}};

bool positive_domain(UnaryOp op) { return op == UnaryOp::log || op == UnaryOp::sqrt || op == UnaryOp::rsqrt; }

}  // namespace

TEST(Elementwise, UnaryForwardMatchesFloat64) {
  for (auto [op, name] : kUnary) {
    SCOPED_TRACE(name);
    Shape s = random_shape(3, 7);
    Tensor x = positive_domain(op) ? random(s, DType::f64, 0.1, 3.0) : random(s, DType::f64, -3, 3);
    auto xv = x.to_vector<double>();
    std::vector<double> ref;
    for (double v : xv) ref.push_back(ref_unary(op, v));
    EXPECT_TRUE(test::all_close(unary_op(op, x), ref, 1e-12, 1e-12));
    // f32 and bf16 results: rounded once from fp32 math.
    EXPECT_TRUE(test::all_close(unary_op(op, x.to(DType::f32)), ref, 1e-5, 1e-5));
    EXPECT_TRUE(test::all_close(unary_op(op, x.to(DType::bf16)), ref, 2e-2, 1e-2));
  }
}

TEST(Elementwise, UnaryGradcheck) {
  for (auto [op, name] : kUnary) {
    SCOPED_TRACE(name);
    Tensor x = positive_domain(op) ? random(random_shape(2, 6), DType::f64, 0.2, 3.0) : random(random_shape(2, 6));
    if (op == UnaryOp::abs) x = x + 0.05 * (x / abs(x));  // stay away from the kink at 0
    EXPECT_TRUE(test::grad_ok(gradcheck([op](const std::vector<Tensor>& in) { return unary_op(op, in[0]); }, {x})));
  }
}

TEST(Elementwise, BinaryBroadcastForwardAndGradcheck) {
  const std::vector<std::pair<BinaryOp, const char*>> ops = {{BinaryOp::add, "add"}, {BinaryOp::sub, "sub"},
                                                             {BinaryOp::mul, "mul"}, {BinaryOp::div, "div"},
                                                             {BinaryOp::maximum, "max"}, {BinaryOp::minimum, "min"}};
  for (auto [op, name] : ops) {
    for (int rep = 0; rep < 4; ++rep) {
      SCOPED_TRACE(name);
      // a: (d0, d1, d2); b: a suffix of a's shape with some dims set to 1.
      Shape sa = random_shape(3, 5);
      Shape sb(sa.begin() + rep % 2, sa.end());
      for (auto& d : sb)
        if (test::random({}, DType::f64).item() > 0.3) d = 1;
      Tensor a = random(sa), b = random(sb, DType::f64, 0.5, 2.0);
      Tensor out = binary_op(op, a, b);
      Shape so = broadcast_shapes(sa, sb);
      ASSERT_EQ(out.shape(), so);
      // float64 reference with explicit index arithmetic.
      auto av = a.to_vector(), bv = b.to_vector();
      std::vector<double> ref;
      Shape sb3 = sb;
      while (sb3.size() < 3) sb3.insert(sb3.begin(), 1);
      for (int64_t i = 0; i < so[0]; ++i)
        for (int64_t j = 0; j < so[1]; ++j)
          for (int64_t k = 0; k < so[2]; ++k) {
            double x = av[size_t((i * sa[1] + j) * sa[2] + k)];
            int64_t bi = sb3[0] == 1 ? 0 : i, bj = sb3[1] == 1 ? 0 : j, bk = sb3[2] == 1 ? 0 : k;
            double y = bv[size_t((bi * sb3[1] + bj) * sb3[2] + bk)];
            double r = op == BinaryOp::add   ? x + y
                       : op == BinaryOp::sub ? x - y
                       : op == BinaryOp::mul ? x * y
                       : op == BinaryOp::div ? x / y
                       : op == BinaryOp::maximum ? std::max(x, y) : std::min(x, y);
            ref.push_back(r);
          }
      EXPECT_TRUE(test::all_close(out, ref, 1e-14, 1e-14));
      EXPECT_TRUE(test::grad_ok(
          gradcheck([op](const std::vector<Tensor>& in) { return binary_op(op, in[0], in[1]); }, {a, b})));
    }
  }
}

TEST(Elementwise, PromotionAndScalars) {
  Tensor a = Tensor::full({2}, 1.5, DType::bf16);
  Tensor b = Tensor::full({2}, 2.0, DType::f32);
  EXPECT_EQ((a + b).dtype(), DType::f32);
  EXPECT_EQ((a + Tensor::full({2}, 1.0, DType::f16)).dtype(), DType::f32);
  EXPECT_EQ((a * 2.0).dtype(), DType::bf16);
  EXPECT_EQ((a * 2.0).to_vector<double>(), (std::vector<double>{3.0, 3.0}));
  Tensor i = Tensor::arange(4);
  EXPECT_EQ((i + i).to_vector<int64_t>(), (std::vector<int64_t>{0, 2, 4, 6}));
  EXPECT_THROW(Tensor::zeros({2, 3}) + Tensor::zeros({4}), Error);
}
