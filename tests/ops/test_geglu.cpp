// Fused GeGLU against a float64 reference written here, against the unfused
// gelu(gate, tanh) * up (bit for bit in f32, within bf16 tolerance in bf16, forward and
// gradients), gradcheck, errors.
#include "../test_util.hpp"
#include "op_test_util.hpp"
#include <tq/ops/geglu.hpp>

#include <cmath>
#include <tuple>

using namespace tq;
using tq::test::all_close;
using tq::test::fake_cuda;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {

double ref_gelu_tanh(double x) { return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }

// d/dx of ref_gelu_tanh, written out independently of the library's formula.
double ref_gelu_tanh_grad(double x) {
  const double k = std::sqrt(2 / M_PI), u = k * (x + 0.044715 * x * x * x), t = std::tanh(u);
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) == 0;
}

}  // namespace

TEST(Geglu, ForwardMatchesFloat64Reference) {
  for (int rep = 0; rep < 8; ++rep) {
    Shape s = random_shape(1 + rep % 3, 9);
    SCOPED_TRACE(str_cat("shape ", s));
    Tensor gate = random(s, DType::f64, -5, 5), up = random(s, DType::f64, -3, 3);
    auto gv = gate.to_vector(), uv = up.to_vector();
    std::vector<double> ref;
    for (size_t i = 0; i < gv.size(); ++i) ref.push_back(ref_gelu_tanh(gv[i]) * uv[i]);
    Tensor y = geglu(gate, up);
    EXPECT_EQ(y.dtype(), DType::f64);
    EXPECT_TRUE(all_close(y, ref, 1e-12, 1e-12));
    EXPECT_TRUE(all_close(geglu(gate.to(DType::f32), up.to(DType::f32)), ref, 1e-5, 1e-5));
  }
}

TEST(Geglu, BackwardMatchesFloat64Reference) {
  Shape s = {7, 13};
  Tensor gate = random(s, DType::f64, -5, 5), up = random(s, DType::f64, -3, 3), g = random(s, DType::f64);
  auto gv = gate.to_vector(), uv = up.to_vector(), ov = g.to_vector();
  std::vector<double> ref_gate, ref_up;
  for (size_t i = 0; i < gv.size(); ++i) {
    ref_gate.push_back(ov[i] * uv[i] * ref_gelu_tanh_grad(gv[i]));
    ref_up.push_back(ov[i] * ref_gelu_tanh(gv[i]));
  }
  ops::GegluGrads gr = ops::geglu_backward(g, gate, up);
  EXPECT_TRUE(all_close(gr.gate, ref_gate, 1e-12, 1e-12));
  EXPECT_TRUE(all_close(gr.up, ref_up, 1e-12, 1e-12));
}

TEST(Geglu, Gradcheck) {
  for (int rep = 0; rep < 6; ++rep) {
    Shape s = random_shape(1 + rep % 3, 6);
    SCOPED_TRACE(str_cat("shape ", s));
    Tensor gate = random(s, DType::f64, -3, 3), up = random(s, DType::f64, -2, 2);
    EXPECT_TRUE(grad_ok(gradcheck([](const std::vector<Tensor>& in) { return geglu(in[0], in[1]); }, {gate, up})));
  }
}

TEST(Geglu, EqualsUnfusedBitForBitInF32) {
  // One fused node computes what gelu(gate, tanh) * up computes, operation for operation.
  Shape s = {9, 301};
  Tensor gate = random(s, DType::f32, -6, 6), up = random(s, DType::f32, -3, 3), g = random(s, DType::f32);
  Tensor gf = gate.clone().requires_grad_(), uf = up.clone().requires_grad_();
  Tensor gu = gate.clone().requires_grad_(), uu = up.clone().requires_grad_();
  Tensor fused = geglu(gf, uf), unfused = gelu(gu, true) * uu;
  EXPECT_TRUE(same_bits(fused.detach(), unfused.detach()));
  fused.backward(g);
  unfused.backward(g);
  EXPECT_TRUE(same_bits(gf.grad(), gu.grad()));
  EXPECT_TRUE(same_bits(uf.grad(), uu.grad()));
}

TEST(Geglu, Bf16WithinBf16ToleranceOfUnfused) {
  // bf16 differs from the unfused path only in where it rounds (once vs after gelu and after *).
  Shape s = {5, 257};
  Tensor gate = random(s, DType::bf16, -4, 4), up = random(s, DType::bf16, -2, 2), g = random(s, DType::bf16);
  Tensor gf = gate.clone().requires_grad_(), uf = up.clone().requires_grad_();
  Tensor gu = gate.clone().requires_grad_(), uu = up.clone().requires_grad_();
  Tensor fused = geglu(gf, uf), unfused = gelu(gu, true) * uu;
  EXPECT_EQ(fused.dtype(), DType::bf16);
  EXPECT_TRUE(all_close(fused, unfused.to_vector(), 2e-2, 1e-2));
  // The fused result is the float64 value rounded once to bf16 (up to fp32 evaluation error).
  auto gv = gate.to_vector(), uv = up.to_vector(), fv = fused.to_vector();
  size_t exact = 0;
  for (size_t i = 0; i < gv.size(); ++i) exact += fv[i] == double(float(bf16(float(ref_gelu_tanh(gv[i]) * uv[i]))));
  EXPECT_GE(double(exact), 0.98 * double(gv.size())) << exact << " of " << gv.size();
  fused.backward(g);
  unfused.backward(g);
  EXPECT_EQ(gf.grad().dtype(), DType::bf16);
  EXPECT_TRUE(all_close(gf.grad(), gu.grad().to_vector(), 3e-2, 2e-2));
  EXPECT_TRUE(all_close(uf.grad(), uu.grad().to_vector(), 2e-2, 1e-2));
}

TEST(Geglu, Bf16GradientsAreTheFloat64OnesRoundedOnce) {
  // A bf16 gate takes gelu_tanh' with f32 internals (kNarrow): still the float64 gradient rounded
  // once to bf16, up to f32 evaluation error, also next to the derivative's root (x ≈ −0.7518),
  // where its two terms cancel. The same holds for the unfused gelu backward (ops::unary_backward).
  const int64_t n = 4096;
  std::vector<double> gate_v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)  // half spread over [−6, 6], half over [−0.80, −0.70]
    gate_v[size_t(i)] = i % 2 ? -6 + 12 * double(i) / double(n) : -0.80 + 0.10 * double(i) / double(n);
  Tensor gate = Tensor::from_vector(gate_v, {n}).to(DType::bf16);
  Tensor up = random({n}, DType::bf16, -2, 2), g = random({n}, DType::bf16);
  auto gv = gate.to_vector(), uv = up.to_vector(), ov = g.to_vector();
  const Tensor dgate = ops::geglu_backward(g, gate, up).gate, dgelu = ops::unary_backward(UnaryOp::gelu_tanh, g, gate);
  for (const auto& [name, got, with_up] : {std::tuple{"geglu d gate", dgate, true}, std::tuple{"gelu", dgelu, false}}) {
    SCOPED_TRACE(name);
    ASSERT_EQ(got.dtype(), DType::bf16);
    const auto r = got.to_vector();
    size_t exact = 0;
    for (size_t i = 0; i < r.size(); ++i) {
      const double scale = ov[i] * (with_up ? uv[i] : 1.0), ref = scale * ref_gelu_tanh_grad(gv[i]);
      exact += r[i] == double(float(bf16(float(ref))));
      ASSERT_LE(std::abs(r[i] - ref), 4e-3 * std::abs(ref) + 1e-6 * std::abs(scale))
          << "gate " << gv[i] << " got " << r[i] << " expected " << ref;
    }
    EXPECT_GE(double(exact), 0.98 * double(r.size())) << exact << " of " << r.size();
  }
}

TEST(Geglu, Errors) {
  Tensor a = random({2, 4}, DType::f32);
  EXPECT_THROW(geglu(a, random({2, 5}, DType::f32)), Error);           // shape
  EXPECT_THROW(geglu(a, random({4}, DType::f32)), Error);              // no broadcasting
  EXPECT_THROW(geglu(a, a.to(DType::bf16)), Error);                    // dtype
  EXPECT_THROW(geglu(Tensor::zeros({2, 4}, DType::i32), Tensor::zeros({2, 4}, DType::i32)), Error);
  EXPECT_THROW(ops::geglu_backward(random({2, 5}, DType::f32), a, a), Error);  // gradient shape
  try {
    geglu(a, fake_cuda({2, 4}, DType::f32));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("different devices"), std::string::npos) << e.what();
  }
  try {
    geglu(a, random({3, 4}, DType::f32));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f32[3, 4]"), std::string::npos) << e.what();
  }
}
