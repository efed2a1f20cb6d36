// RoPE (HF rotate_half, explicit position ids) against float64 references written here,
// gradcheck, bf16 bit-exactness with HF's bf16 arithmetic, errors.
#include "../test_util.hpp"
#include "op_test_util.hpp"
#include <tq/ops/rope.hpp>

#include <random>

using namespace tq;
using tq::test::all_close;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {

using tq::test::rng;

Tensor random_positions(int64_t B, int64_t T, int64_t max_pos) {
  std::vector<int64_t> v(size_t(B * T));
  for (auto& p : v) p = int64_t(rng()() % uint64_t(max_pos + 1));
  return Tensor::from_vector(v, {B, T});
}

// HF's angle for dimension j of a head of size D at position p: fp32 inv_freq and fp32 product.
float hf_angle(int64_t p, int64_t j, int64_t D, double theta) {
  const int64_t i = j % (D / 2);
  const float inv_freq = 1.0f / std::pow(float(theta), float(2 * i) / float(D));
  return float(p) * inv_freq;
}

// out[b,h,t,j] = x·cos + rotate_half(x)·sin with cos/sin from `trig(angle)` (double).
template <class Trig>
std::vector<double> ref_rope(const std::vector<double>& x, const Shape& s, const std::vector<int64_t>& pos, int64_t Bp,
                             double theta, Trig trig) {
  const int64_t B = s[0], H = s[1], T = s[2], D = s[3];
  std::vector<double> y(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p = pos[size_t((Bp == 1 ? 0 : b) * T + t)];
        const size_t base = size_t(((b * H + h) * T + t) * D);
        for (int64_t j = 0; j < D; ++j) {
          auto [c, sn] = trig(hf_angle(p, j, D, theta));
          const double rot = j < D / 2 ? -x[base + size_t(j + D / 2)] : x[base + size_t(j - D / 2)];
          y[base + size_t(j)] = x[base + size_t(j)] * c + rot * sn;
        }
      }
  return y;
}

auto exact_trig = [](float a) { return std::pair<double, double>{std::cos(double(a)), std::sin(double(a))}; };

using tq::test::fake_cuda;

}  // namespace

TEST(Rope, ForwardMatchesFloat64Reference) {
  for (int rep = 0; rep < 10; ++rep) {
    Shape s = random_shape(3, 4);
    const int64_t D = 2 * (1 + int64_t(rng()() % 5));  // 2..10, halves odd or even
    s.push_back(D);
    const int64_t Bp = rep % 2 ? 1 : s[0];  // (B, T) and shared (1, T)
    const double theta = rep % 3 ? 10000.0 : 500.0;
    Tensor pos = random_positions(Bp, s[2], rep < 5 ? 300 : 9000);
    Tensor x = random(s, DType::f64);
    SCOPED_TRACE(str_cat("shape ", s, " Bp ", Bp, " theta ", theta));
    auto ref = ref_rope(x.to_vector(), s, pos.to_vector<int64_t>(), Bp, theta, exact_trig);
    // cos/sin are defined as fp32 values (HF), so f64 agrees to fp32 precision of the tables.
    EXPECT_TRUE(all_close(rope(x, pos, theta), ref, 3e-7, 0));
    EXPECT_TRUE(all_close(rope(x.to(DType::f32), pos.to(DType::i32), theta), ref, 1e-6, 1e-6));
  }
}

TEST(Rope, ScoresDependOnlyOnRelativePosition) {
  // ⟨rope(q, p + k), rope(k, p)⟩ is the same for every p (up to the fp32 angle rounding).
  const int64_t D = 8;
  Tensor q = random({1, 1, 1, D}, DType::f64), k = random({1, 1, 1, D}, DType::f64);
  auto score = [&](int64_t pq, int64_t pk) {
    auto a = rope(q, Tensor::from_vector<int64_t>({pq}, {1, 1})).to_vector();
    auto b = rope(k, Tensor::from_vector<int64_t>({pk}, {1, 1})).to_vector();
    double s = 0;
    for (int64_t j = 0; j < D; ++j) s += a[size_t(j)] * b[size_t(j)];
    return s;
  };
  const double s0 = score(3, 1);
  for (int64_t p : {2, 10, 77}) EXPECT_NEAR(score(p + 2, p), s0, 1e-5);
  EXPECT_GT(std::abs(score(1, 1) - s0), 1e-3);  // a different offset changes it (the test can fail)
}

TEST(Rope, Bf16MatchesHfBf16ArithmeticExactly) {
  // HF: cos/sin computed in fp32 then cast to bf16; x·cos, rotate_half(x)·sin and their sum each
  // rounded to bf16 (spec §5.4, §9.1). Emulated here element by element.
  auto rb = [](double v) { return double(float(bf16(float(v)))); };
  for (int rep = 0; rep < 5; ++rep) {
    Shape s = {2, 3, 5, 16};
    Tensor x = random(s, DType::bf16, -3, 3), pos = random_positions(2, 5, 2000);
    auto xv = x.to_vector();
    auto pv = pos.to_vector<int64_t>();
    std::vector<double> ref(xv.size());
    for (size_t e = 0; e < xv.size(); ++e) {
      const int64_t j = int64_t(e % 16), t = int64_t(e / 16) % 5, b = int64_t(e / (16 * 5 * 3));
      const float a = hf_angle(pv[size_t(b * 5 + t)], j, 16, 10000.0);
      const double c = rb(float(std::cos(double(a)))), sn = rb(float(std::sin(double(a))));
      const double rot = j < 8 ? -xv[e + 8] : xv[e - 8];
      ref[e] = rb(rb(xv[e] * c) + rb(rot * sn));
    }
    Tensor y = rope(x, pos);
    EXPECT_EQ(y.dtype(), DType::bf16);
    EXPECT_TRUE(all_close(y, ref, 0, 0));
    // ... and within bf16 tolerance of the exact rotation.
    EXPECT_TRUE(all_close(y, ref_rope(xv, s, pv, 2, 10000.0, exact_trig), 3.0 / 128, 1.0 / 64));
  }
}

TEST(Rope, CosSinTables) {
  Tensor pos = Tensor::from_vector<int64_t>({1, 2, 5}, {3});  // 1-D positions: one shared row
  auto [c, s] = ops::rope_cos_sin(pos, 6, 10000.0, DType::f32);
  EXPECT_EQ(c.shape(), (Shape{1, 3, 6}));
  auto cv = c.to_vector(), sv = s.to_vector();
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t j = 0; j < 6; ++j) {
      const double a = double(pos.to_vector<int64_t>()[size_t(t)]) * std::pow(10000.0, -double(2 * (j % 3)) / 6.0);
      EXPECT_NEAR(cv[size_t(t * 6 + j)], std::cos(a), 2e-6);
      EXPECT_NEAR(sv[size_t(t * 6 + j)], std::sin(a), 2e-6);
    }
}

TEST(Rope, Gradcheck) {
  for (int rep = 0; rep < 8; ++rep) {
    Shape s = random_shape(3, 3);
    s.push_back(2 * (1 + rep % 3));
    const int64_t Bp = rep % 2 ? 1 : s[0];
    Tensor pos = random_positions(Bp, s[2], 100);
    SCOPED_TRACE(str_cat("shape ", s));
    Tensor x = random(s, DType::f64);
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return rope(in[0], in[1]); }, {x, pos})));
  }
}

TEST(Rope, Errors) {
  Tensor x = random({1, 2, 3, 4});
  Tensor pos = random_positions(1, 3, 10);
  EXPECT_THROW(rope(random({1, 2, 3, 5}), pos), Error);                     // odd head dim
  EXPECT_THROW(rope(random({2, 3, 4}), pos), Error);                        // not 4-D
  EXPECT_THROW(rope(x, random_positions(1, 4, 10)), Error);                 // T mismatch
  EXPECT_THROW(rope(random({2, 2, 3, 4}), random_positions(3, 3, 10)), Error);  // B mismatch
  EXPECT_THROW(rope(x, pos.to(DType::f32)), Error);                         // float positions
  EXPECT_THROW(rope(Tensor::zeros({1, 2, 3, 4}, DType::i64), pos), Error);  // integer input
  try {
    rope(x, fake_cuda({1, 3}, DType::i64));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos) << e.what();
  }
}
