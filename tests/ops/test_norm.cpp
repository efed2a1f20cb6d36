// layer_norm / rms_norm against float64 references written here, gradcheck, bf16, errors.
#include "../test_util.hpp"
#include "op_test_util.hpp"
#include <tq/ops/norm.hpp>

using namespace tq;
using tq::test::all_close;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {

// Rows of length D; w/b empty = no affine part. rms: no centering and scale (offset + w).
std::vector<double> ref_norm(const std::vector<double>& x, int64_t D, const std::vector<double>& w,
                             const std::vector<double>& b, double eps, bool rms, double offset) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r * size_t(D) < x.size(); ++r) {
    const double* xr = &x[r * size_t(D)];
    double mean = 0, var = 0;
    if (!rms) {
      for (int64_t j = 0; j < D; ++j) mean += xr[j];
      mean /= double(D);
    }
    for (int64_t j = 0; j < D; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    var /= double(D);
    for (int64_t j = 0; j < D; ++j) {
      double v = (xr[j] - mean) / std::sqrt(var + eps);
      if (!w.empty()) v *= (rms ? offset : 0.0) + w[size_t(j)];
      if (!b.empty()) v += b[size_t(j)];
      y[r * size_t(D) + size_t(j)] = v;
    }
  }
  return y;
}

std::vector<double> values(const Tensor& t) { return t.defined() ? t.to_vector() : std::vector<double>{}; }

using tq::test::fake_cuda;

// fp32 layer_norm against the reference of the fp32-rounded inputs, with a per-row allowance for
// the conditioning. Centering a row costs ~D·u·max|x| absolute before the division by σ, so a row
// whose values nearly coincide (σ → sqrt(eps)) amplifies fp32 rounding by max|x|/σ — up to 3000×
// for |x| ≤ 3 — in any correct fp32 implementation (CI drew such a [8, 7, 2] row). Well-conditioned
// rows keep the plain 1e-5 tolerance.
void expect_layer_norm_f32_close(const Tensor& x, const Tensor& w, const Tensor& b, bool affine) {
  const int64_t D = x.shape().back();
  Tensor x32 = x.to(DType::f32), w32 = affine ? w.to(DType::f32) : Tensor(), b32 = affine ? b.to(DType::f32) : Tensor();
  std::vector<double> xv = x32.to_vector(), wv = values(w32);
  auto ref = ref_norm(xv, D, wv, values(b32), 1e-6, false, 0);
  std::vector<double> got = layer_norm(x32, w32, b32, 1e-6).to_vector();
  ASSERT_EQ(got.size(), ref.size());
  for (size_t r = 0; r * size_t(D) < xv.size(); ++r) {
    double mean = 0, var = 0, amax = 0;
    for (int64_t j = 0; j < D; ++j) mean += xv[r * size_t(D) + size_t(j)] / double(D);
    for (int64_t j = 0; j < D; ++j) {
      const double xj = xv[r * size_t(D) + size_t(j)];
      var += (xj - mean) * (xj - mean) / double(D);
      amax = std::max(amax, std::abs(xj));
    }
    const double kappa = amax / std::sqrt(var + 1e-6), u = std::ldexp(1.0, -24);
    for (int64_t j = 0; j < D; ++j) {
      const size_t i = r * size_t(D) + size_t(j);
      const double cond = 4.0 * double(D) * u * kappa * (affine ? std::abs(wv[size_t(j)]) : 1.0);
      EXPECT_LE(std::abs(got[i] - ref[i]), 1e-5 + 1e-5 * std::abs(ref[i]) + cond)
          << "element " << i << " (row condition " << kappa << ")";
    }
  }
}

}  // namespace

TEST(LayerNorm, ForwardMatchesFloat64Reference) {
  for (int rep = 0; rep < 10; ++rep) {
    Shape s = random_shape(1 + rep % 3, 9);
    const int64_t D = s.back();
    Tensor x = random(s, DType::f64, -3, 3), w = random({D}, DType::f64), b = random({D}, DType::f64);
    const bool affine = rep % 3 != 0;
    SCOPED_TRACE(str_cat("shape ", s, affine ? " affine" : ""));
    Tensor wt = affine ? w : Tensor(), bt = affine ? b : Tensor();
    auto ref = ref_norm(x.to_vector(), D, values(wt), values(bt), 1e-6, false, 0);
    EXPECT_TRUE(all_close(layer_norm(x, wt, bt, 1e-6), ref, 1e-12, 1e-10));
    expect_layer_norm_f32_close(x, w, b, affine);
  }
  // Rows whose values nearly coincide: σ within a few sqrt(eps) of zero, the worst conditioning.
  Tensor x = Tensor::from_vector(std::vector<double>{2.9, 2.9 + 1e-3, -1.7, -1.7 - 3e-4, 0.3, 0.3}, {3, 2});
  expect_layer_norm_f32_close(x, random({2}, DType::f64), random({2}, DType::f64), true);
  expect_layer_norm_f32_close(x, Tensor(), Tensor(), false);
}

TEST(RmsNorm, ForwardMatchesFloat64Reference) {
  for (int rep = 0; rep < 10; ++rep) {
    Shape s = random_shape(1 + rep % 3, 9);
    const int64_t D = s.back();
    const double offset = rep % 2 ? 1.0 : 0.0;  // Gemma's (1 + w) and plain
    Tensor x = random(s, DType::f64, -3, 3), w = random({D}, DType::f64);
    SCOPED_TRACE(str_cat("shape ", s, " offset ", offset));
    auto ref = ref_norm(x.to_vector(), D, values(w), {}, 1e-6, true, offset);
    EXPECT_TRUE(all_close(rms_norm(x, w, 1e-6, offset), ref, 1e-12, 1e-10));
    EXPECT_TRUE(all_close(rms_norm(x.to(DType::f32), w.to(DType::f32), 1e-6, offset), ref, 1e-5, 1e-5));
  }
  Tensor x = random({4, 5}, DType::f64);
  EXPECT_TRUE(all_close(rms_norm(x, Tensor(), 1e-5), ref_norm(x.to_vector(), 5, {}, {}, 1e-5, true, 0), 1e-12, 1e-10));
}

TEST(Norm, Bf16WithinBf16Tolerance) {
  for (int rep = 0; rep < 6; ++rep) {
    const int64_t D = 1 + rep * 7;
    Shape s = {3, D};
    Tensor x = random(s, DType::bf16, -4, 4), w = random({D}, DType::bf16), b = random({D}, DType::bf16);
    SCOPED_TRACE(str_cat("D ", D));
    auto ref_ln = ref_norm(x.to_vector(), D, w.to_vector(), b.to_vector(), 1e-6, false, 0);
    auto ref_rms = ref_norm(x.to_vector(), D, w.to_vector(), {}, 1e-6, true, 1.0);
    Tensor y = layer_norm(x, w, b, 1e-6);
    EXPECT_EQ(y.dtype(), DType::bf16);
    EXPECT_TRUE(all_close(y, ref_ln, 1e-4, 1.0 / 256));
    EXPECT_TRUE(all_close(rms_norm(x, w, 1e-6, 1.0), ref_rms, 1e-4, 1.0 / 256));
    // Norm weights kept in fp32 next to bf16 activations (QLoRA): output stays bf16.
    Tensor y2 = rms_norm(x, w.to(DType::f32), 1e-6, 1.0);
    EXPECT_EQ(y2.dtype(), DType::bf16);
    EXPECT_TRUE(all_close(y2, ref_rms, 1e-4, 1.0 / 256));
  }
}

TEST(RmsNorm, GemmaScaleIsAppliedInFp32BeforeTheSingleRounding) {
  // HF Gemma multiplies by (1 + w) in fp32 and rounds to bf16 once (spec §5.3, pitfall P1).
  // Rounding once means the bf16 result equals bf16(exact) except at near-ties; rounding the
  // normalized x to bf16 first and then scaling (Llama style) misses on roughly a quarter.
  const int64_t D = 256;
  Tensor x = random({16, D}, DType::bf16, -2, 2), w = random({D}, DType::bf16, -0.5, 0.5);
  auto ref = ref_norm(x.to_vector(), D, w.to_vector(), {}, 1e-6, true, 1.0);
  auto got = rms_norm(x, w, 1e-6, 1.0).to_vector();
  size_t exact = 0;
  for (size_t i = 0; i < ref.size(); ++i) exact += got[i] == double(float(bf16(float(ref[i]))));
  EXPECT_GE(double(exact), 0.98 * double(ref.size())) << exact << " of " << ref.size();
}

TEST(LayerNorm, Gradcheck) {
  for (int rep = 0; rep < 8; ++rep) {
    Shape s = random_shape(1 + rep % 3, 5);
    const int64_t D = s.back();
    const int variant = rep % 4;  // weight+bias, weight only, bias only, none
    SCOPED_TRACE(str_cat("shape ", s, " variant ", variant));
    Tensor x = random(s, DType::f64, -2, 2), w = random({D}, DType::f64), b = random({D}, DType::f64);
    auto fn = [&](const std::vector<Tensor>& in) {
      return layer_norm(in[0], variant <= 1 ? in[1] : Tensor(), variant % 2 == 0 ? in[2] : Tensor(), 1e-5);
    };
    EXPECT_TRUE(grad_ok(gradcheck(fn, {x, w, b})));
  }
}

TEST(RmsNorm, Gradcheck) {
  for (int rep = 0; rep < 8; ++rep) {
    Shape s = random_shape(1 + rep % 3, 5);
    const int64_t D = s.back();
    const double offset = rep % 2 ? 1.0 : 0.0;
    SCOPED_TRACE(str_cat("shape ", s, " offset ", offset));
    Tensor x = random(s, DType::f64, -2, 2), w = random({D}, DType::f64);
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return rms_norm(in[0], in[1], 1e-6, offset); },
                                  {x, w})));
  }
  Tensor x = random({3, 7}, DType::f64);
  EXPECT_TRUE(grad_ok(gradcheck([](const std::vector<Tensor>& in) { return rms_norm(in[0], Tensor()); }, {x})));
}

TEST(Norm, GradientsAccumulateIntoMixedDtypeParameters) {
  // bf16 activations with an fp32 weight: each gradient comes back in its own tensor's dtype.
  Tensor x = random({4, 6}, DType::bf16), w = random({6}, DType::f32), b = random({6}, DType::f32);
  w.requires_grad_();
  b.requires_grad_();
  x.requires_grad_();
  sum(layer_norm(x, w, b)).backward();
  EXPECT_EQ(w.grad().dtype(), DType::f32);
  EXPECT_EQ(b.grad().dtype(), DType::f32);
  EXPECT_EQ(x.grad().dtype(), DType::bf16);
  // d(Σy)/db_j = number of rows, exactly.
  EXPECT_TRUE(all_close(b.grad(), std::vector<double>(6, 4.0), 0, 0));
}

TEST(Norm, Errors) {
  Tensor x = random({2, 4});
  EXPECT_THROW(layer_norm(x, random({3}), Tensor()), Error);           // weight size
  EXPECT_THROW(layer_norm(x, random({4}), random({4, 1})), Error);     // bias shape
  EXPECT_THROW(rms_norm(x, random({5})), Error);
  EXPECT_THROW(rms_norm(Tensor::zeros({2, 4}, DType::i64), Tensor()), Error);  // dtype
  EXPECT_THROW(rms_norm(x, Tensor::zeros({4}, DType::i32)), Error);
  EXPECT_THROW(rms_norm(Tensor::scalar(1.0), Tensor()), Error);
  try {
    rms_norm(x, fake_cuda({4}, DType::f32));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("different devices"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos) << e.what();
  }
  try {
    layer_norm(x, random({3}), Tensor());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f64[3]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("f64[2, 4]"), std::string::npos) << e.what();
  }
}
