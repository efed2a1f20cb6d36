// NF4Linear: forward against a float64 reference on the dequantized weight, the input gradient against
// dy·W_deq computed independently and against finite differences (f64 reference mode), the scratch
// buffer shared by all layers.
#include <tq/quant/nf4_linear.hpp>

#include "../test_util.hpp"

namespace tq {
namespace {

// y_ref (M, N) = x (M, K) · W (N, K)ᵀ + b in float64 from host vectors.
std::vector<double> reference_linear(const std::vector<double>& x, const std::vector<double>& w,
                                     const std::vector<double>& b, int64_t M, int64_t N, int64_t K) {
  std::vector<double> y(static_cast<size_t>(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = b.empty() ? 0.0 : b[size_t(j)];
      for (int64_t k = 0; k < K; ++k) s += x[size_t(i * K + k)] * w[size_t(j * K + k)];
      y[size_t(i * N + j)] = s;
    }
  return y;
}

TEST(Nf4Linear, ForwardMatchesFloat64ReferenceOnDequantizedWeight) {
  const int64_t N = 48, K = 200;  // K not a multiple of 64: blocks straddle rows
  Tensor w = test::random({N, K}, DType::bf16, -0.05, 0.05);
  Tensor bias = test::random({N}, DType::f32, -0.5, 0.5);
  NF4Linear lin(nf4_quantize(w), bias);
  Tensor x = test::random({2, 3, K}, DType::f32);
  Tensor y = lin(x);
  EXPECT_EQ(y.shape(), (Shape{2, 3, N}));
  EXPECT_EQ(y.dtype(), DType::f32);
  // Reference: bf16-rounded x and bias (the compute dtype), the bf16 dequantized weight, float64 math.
  std::vector<double> wd = nf4_dequantize(lin.weight(), DType::bf16).to_vector<double>();
  std::vector<double> xb = x.to(DType::bf16).to_vector<double>(), bb = bias.to(DType::bf16).to_vector<double>();
  std::vector<double> ref = reference_linear(xb, wd, bb, 6, N, K);
  // One bf16 rounding of the output (fp32 accumulation error is far below it).
  EXPECT_TRUE(test::all_close(y, ref, 1e-6, 1.0 / 128));
  // And it really is rounded to bf16 once: y equals bf16(ref) for almost every element.
  std::vector<double> yv = y.to_vector<double>();
  int exact = 0;
  for (size_t i = 0; i < ref.size(); ++i) exact += yv[i] == double(float(bf16(float(ref[i]))));
  EXPECT_GE(exact, int(ref.size()) * 9 / 10);
}

TEST(Nf4Linear, Bf16InputGivesBf16Output) {
  Tensor w = test::random({16, 64}, DType::f32, -1, 1);
  NF4Linear lin(nf4_quantize(w));
  Tensor y = lin(test::random({5, 64}, DType::bf16));
  EXPECT_EQ(y.dtype(), DType::bf16);
  EXPECT_EQ(y.shape(), (Shape{5, 16}));
}

TEST(Nf4Linear, InputGradientIsDyTimesDequantizedWeight) {
  const int64_t N = 24, K = 96;
  NF4Linear lin(nf4_quantize(test::random({N, K}, DType::f16, -0.2, 0.2)));
  Tensor x = test::random({4, K}, DType::f32).requires_grad_();
  Tensor y = lin(x);
  Tensor dy = test::random({4, N}, DType::f32);
  y.backward(dy);
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().dtype(), DType::f32);
  // Independent: dx = bf16(dy_bf16 · W_bf16) with W through f16 then bf16 (two roundings, A.7).
  std::vector<double> wd = nf4_dequantize(lin.weight(), DType::bf16).to_vector<double>();
  std::vector<double> g = dy.to(DType::bf16).to_vector<double>();
  std::vector<double> ref(static_cast<size_t>(4 * K), 0.0);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) ref[size_t(i * K + k)] += g[size_t(i * N + j)] * wd[size_t(j * K + k)];
  EXPECT_TRUE(test::all_close(x.grad(), ref, 1e-6, 1.0 / 128));
}

TEST(Nf4Linear, GradcheckInF64ReferenceMode) {
  NF4Linear lin(nf4_quantize(test::random({7, 70}, DType::bf16, -0.3, 0.3)), test::random({7}, DType::f32));
  Tensor x = test::random({3, 70}, DType::f64);
  EXPECT_TRUE(test::grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return lin(in[0]); }, {x})));
  // f64 forward is exact float64 math on the dequantized weight.
  Tensor y = lin(x);
  std::vector<double> ref = reference_linear(x.to_vector<double>(), nf4_dequantize(lin.weight(), DType::f32).to_vector<double>(),
                                             lin.bias().to_vector<double>(), 3, 7, 70);
  EXPECT_TRUE(test::all_close(y, ref, 1e-12, 1e-12));
}

TEST(Nf4Linear, ScratchIsReusedAcrossCalls) {
  NF4Linear lin(nf4_quantize(test::random({8, 32}, DType::f32)));
  const void* p1 = lin.dequantized_weight().data_ptr();
  lin(test::random({2, 32}, DType::f32));
  const void* p2 = lin.dequantized_weight().data_ptr();
  EXPECT_EQ(p1, p2);
  EXPECT_THROW(lin(test::random({2, 31}, DType::f32)), Error);
}

// Every layer dequantizes into one shared buffer (a per-layer copy would add up to a bf16 model):
// a second, smaller layer reuses the first one's memory, and a chain of layers still gets every
// forward and backward right, because each dequantization is consumed before the next one.
TEST(Nf4Linear, LayersShareOneScratchBuffer) {
  NF4Linear a(nf4_quantize(test::random({40, 64}, DType::f32, -0.2, 0.2)));
  NF4Linear b(nf4_quantize(test::random({24, 40}, DType::f32, -0.2, 0.2)));
  const void* pa = a.dequantized_weight().data_ptr();
  const Tensor wb = b.dequantized_weight();
  EXPECT_EQ(wb.data_ptr(), pa);
  EXPECT_TRUE(test::all_close(wb, nf4_dequantize(b.weight(), DType::bf16).to_vector<double>(), 0.0, 0.0));

  Tensor x = test::random({3, 64}, DType::f32).requires_grad_();
  Tensor y = b(a(x));
  Tensor dy = test::random({3, 24}, DType::f32);
  y.backward(dy);
  // The same chain on dense bf16 weights dequantized independently (fresh tensors), same roundings.
  Tensor wa_d = nf4_dequantize(a.weight(), DType::bf16), wb_d = nf4_dequantize(b.weight(), DType::bf16);
  Tensor h = ops::matmul(x.detach().to(DType::bf16).to(DType::f32), wa_d.to(DType::f32), false, true).to(DType::bf16);
  Tensor y_ref = ops::matmul(h.to(DType::f32), wb_d.to(DType::f32), false, true).to(DType::bf16).to(DType::f32);
  EXPECT_TRUE(test::all_close(y, y_ref.to_vector<double>(), 0.0, 0.0));
  Tensor dh = ops::matmul(dy.to(DType::bf16), wb_d).to(DType::f32);
  Tensor dx = ops::matmul(dh.to(DType::bf16), wa_d).to(DType::f32);
  EXPECT_TRUE(test::all_close(x.grad(), dx.to_vector<double>(), 0.0, 0.0));
}

}  // namespace
}  // namespace tq
