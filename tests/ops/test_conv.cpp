// patch_embed (conv2d, stride = kernel) against a direct float64 convolution written here.
#include "../test_util.hpp"
#include "op_test_util.hpp"
#include <tq/ops/conv.hpp>

#include <random>

using namespace tq;
using tq::test::all_close;
using tq::test::grad_ok;
using tq::test::random;

namespace {

using tq::test::rng;
int64_t rand_int(int64_t lo, int64_t hi) { return lo + int64_t(rng()() % uint64_t(hi - lo + 1)); }

// Direct conv2d (stride P, no padding) laid out as (B, Nh·Nw, O), token = row·Nw + col.
std::vector<double> ref_patch_embed(const std::vector<double>& px, const Shape& ps, const std::vector<double>& w,
                                    const Shape& ws, const std::vector<double>& bias) {
  const int64_t B = ps[0], C = ps[1], H = ps[2], W = ps[3], O = ws[0], P = ws[2];
  const int64_t Nh = H / P, Nw = W / P;
  std::vector<double> out;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < Nh; ++r)
      for (int64_t c = 0; c < Nw; ++c)
        for (int64_t o = 0; o < O; ++o) {
          double acc = bias.empty() ? 0.0 : bias[size_t(o)];
          for (int64_t ch = 0; ch < C; ++ch)
            for (int64_t i = 0; i < P; ++i)
              for (int64_t j = 0; j < P; ++j)
                acc += w[size_t(((o * C + ch) * P + i) * P + j)] *
                       px[size_t(((b * C + ch) * H + r * P + i) * W + c * P + j)];
          out.push_back(acc);
        }
  return out;
}

struct Case {
  Shape ps, ws;
};
Case random_case(int64_t max_b = 2, int64_t max_c = 3, int64_t max_p = 4) {
  const int64_t B = rand_int(1, max_b), C = rand_int(1, max_c), P = rand_int(1, max_p), O = rand_int(1, 4);
  // Sizes that are not multiples of P: conv2d drops the trailing pixels.
  const int64_t H = rand_int(1, 3) * P + rand_int(0, P - 1), W = rand_int(1, 3) * P + rand_int(0, P - 1);
  return {{B, C, H, W}, {O, C, P, P}};
}

using tq::test::fake_cuda;

}  // namespace

TEST(PatchEmbed, ForwardMatchesDirectConvolution) {
  for (int rep = 0; rep < 10; ++rep) {
    Case k = random_case();
    Tensor px = random(k.ps, DType::f64), w = random(k.ws, DType::f64), b = random({k.ws[0]}, DType::f64);
    const bool with_bias = rep % 3 != 0;
    SCOPED_TRACE(str_cat("pixels ", k.ps, " weight ", k.ws, with_bias ? " bias" : ""));
    auto ref = ref_patch_embed(px.to_vector(), k.ps, w.to_vector(), k.ws, with_bias ? b.to_vector() : std::vector<double>{});
    Tensor out = patch_embed(px, w, with_bias ? b : Tensor());
    EXPECT_EQ(out.shape(), (Shape{k.ps[0], (k.ps[2] / k.ws[2]) * (k.ps[3] / k.ws[2]), k.ws[0]}));
    EXPECT_TRUE(all_close(out, ref, 1e-13, 1e-12));
    Tensor o32 = patch_embed(px.to(DType::f32), w.to(DType::f32), with_bias ? b.to(DType::f32) : Tensor());
    EXPECT_TRUE(all_close(o32, ref, 1e-5, 1e-5));
  }
}

TEST(PatchEmbed, Bf16WithinBf16Tolerance) {
  for (int rep = 0; rep < 5; ++rep) {
    Case k = random_case(2, 3, 6);
    Tensor px = random(k.ps, DType::bf16), w = random(k.ws, DType::bf16), b = random({k.ws[0]}, DType::bf16);
    SCOPED_TRACE(str_cat("pixels ", k.ps, " weight ", k.ws));
    Tensor out = patch_embed(px, w, b);
    EXPECT_EQ(out.dtype(), DType::bf16);
    // fp32 accumulation, one rounding: half a bf16 ulp of the result plus fp32 noise.
    EXPECT_TRUE(all_close(out, ref_patch_embed(px.to_vector(), k.ps, w.to_vector(), k.ws, b.to_vector()), 1e-4, 1.0 / 256));
  }
}

TEST(PatchEmbed, SiglipTokenOrderIsRowMajor) {
  // One channel, kernel 2, a weight that reads the top-left pixel: token t must see patch
  // (t / Nw, t % Nw), i.e. the conv output flattened row-major and transposed.
  const int64_t H = 4, W = 6, P = 2;
  Tensor px = random({1, 1, H, W}, DType::f64);
  Tensor w = Tensor::from_vector<double>({1, 0, 0, 0}, {1, 1, P, P});
  auto out = patch_embed(px, w).to_vector(), pv = px.to_vector();
  ASSERT_EQ(out.size(), size_t(6));
  for (int64_t t = 0; t < 6; ++t) EXPECT_EQ(out[size_t(t)], pv[size_t((t / 3) * P * W + (t % 3) * P)]) << "token " << t;
}

TEST(PatchEmbed, Gradcheck) {
  for (int rep = 0; rep < 6; ++rep) {
    Case k = random_case(2, 2, 3);
    Tensor px = random(k.ps, DType::f64), w = random(k.ws, DType::f64), b = random({k.ws[0]}, DType::f64);
    const bool with_bias = rep % 2 == 0;
    SCOPED_TRACE(str_cat("pixels ", k.ps, " weight ", k.ws));
    auto fn = [&](const std::vector<Tensor>& in) { return patch_embed(in[0], in[1], with_bias ? in[2] : Tensor()); };
    EXPECT_TRUE(grad_ok(gradcheck(fn, {px, w, b})));
  }
}

TEST(PatchEmbed, Errors) {
  Tensor px = random({1, 3, 8, 8}, DType::f32), w = random({4, 3, 4, 4}, DType::f32), b = random({4}, DType::f32);
  EXPECT_NO_THROW(patch_embed(px, w, b));
  EXPECT_THROW(patch_embed(px, random({4, 2, 4, 4}, DType::f32), b), Error);  // channels
  EXPECT_THROW(patch_embed(px, random({4, 3, 4, 2}, DType::f32), b), Error);  // non-square kernel
  EXPECT_THROW(patch_embed(px, w, random({5}, DType::f32)), Error);           // bias size
  EXPECT_THROW(patch_embed(random({3, 8, 8}, DType::f32), w, b), Error);      // not 4-D
  EXPECT_THROW(patch_embed(random({1, 3, 3, 8}, DType::f32), w, b), Error);   // smaller than a patch
  EXPECT_THROW(patch_embed(px.to(DType::bf16), w, b), Error);                 // dtype
  EXPECT_THROW(patch_embed(px, w, b.to(DType::f64)), Error);
  EXPECT_THROW(patch_embed(px, fake_cuda({4, 3, 4, 4}, DType::f32), b), Error);
  try {
    patch_embed(px.to(DType::bf16), w, b);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16[1, 3, 8, 8]"), std::string::npos) << e.what();
  }
}
