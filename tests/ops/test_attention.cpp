// Attention against a direct float64 computation written here from spec §5.6/§6.1 (plain loops:
// scores, softcap, mask, softmax, weighted sum), for every mask kind × MHA/GQA/MQA × softcap ×
// sliding window, forward and gradcheck of q, k, v; plus bf16, KV-cache offsets, fully masked rows
// and error paths.
#include <tq/ops/attention.hpp>

#include <cmath>
#include <random>

#include "../test_util.hpp"

namespace tq::test {
namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(fresh_seed());
  return r;
}
int64_t pick(int64_t lo, int64_t hi) { return lo + int64_t(rng()() % uint64_t(hi - lo + 1)); }  // [lo, hi]

enum class Kind { none, causal, prefix_types, prefix_lengths, padding, causal_padding, prefix_padding };
enum class Heads { mha, gqa, mqa };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::none: return "None";
    case Kind::causal: return "Causal";
    case Kind::prefix_types: return "PrefixTypes";
    case Kind::prefix_lengths: return "PrefixLengths";
    case Kind::padding: return "Padding";
    case Kind::causal_padding: return "CausalPadding";
    case Kind::prefix_padding: return "PrefixPadding";
  }
  return "?";
}

// Everything the reference needs, in plain vectors; token types are 0 = prefix, 1 = suffix.
struct Case {
  int64_t B, Hq, Hkv, Tq, Tk, D, Dv, offset;
  double scale, softcap = 0;
  int64_t window = 0;
  bool causal = false, prefix = false;
  std::vector<int64_t> types;  // (B, Tk), empty = no prefix mask
  std::vector<int64_t> pad;    // (B, Tk), empty = all valid
};

// Spec §6.1, written directly: same contiguous prefix run = no suffix token between p and j.
bool ref_allowed(const Case& c, int64_t b, int64_t p, int64_t j) {
  if (!c.pad.empty() && c.pad[size_t(b * c.Tk + j)] == 0) return false;
  if (c.window > 0 && !(p - j < c.window)) return false;
  if (c.prefix) {
    if (j <= p) return true;
    for (int64_t x = std::min(p, j); x <= std::max(p, j); ++x)
      if (c.types[size_t(b * c.Tk + x)] != 0) return false;
    return true;
  }
  return c.causal ? j <= p : true;
}

std::vector<double> ref_attention(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                                  const std::vector<double>& v) {
  std::vector<double> out(size_t(c.B * c.Hq * c.Tq * c.Dv), 0.0);
  const int64_t group = c.Hq / c.Hkv;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Tq; ++i) {
        const int64_t kh = h / group, p = c.offset + i;
        std::vector<double> logit(size_t(c.Tk));
        std::vector<bool> ok(size_t(c.Tk));
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.Tk; ++j) {
          double s = 0;
          for (int64_t d = 0; d < c.D; ++d)
            s += q[size_t(((b * c.Hq + h) * c.Tq + i) * c.D + d)] * k[size_t(((b * c.Hkv + kh) * c.Tk + j) * c.D + d)];
          s *= c.scale;
          if (c.softcap > 0) s = c.softcap * std::tanh(s / c.softcap);
          logit[size_t(j)] = s;
          ok[size_t(j)] = ref_allowed(c, b, p, j);
          if (ok[size_t(j)]) mx = std::max(mx, s);
        }
        double z = 0;
        for (int64_t j = 0; j < c.Tk; ++j) z += ok[size_t(j)] ? std::exp(logit[size_t(j)] - mx) : 0.0;
        if (z == 0) continue;  // no visible key: the row stays zero (documented behaviour)
        for (int64_t j = 0; j < c.Tk; ++j) {
          if (!ok[size_t(j)]) continue;
          const double w = std::exp(logit[size_t(j)] - mx) / z;
          for (int64_t d = 0; d < c.Dv; ++d)
            out[size_t(((b * c.Hq + h) * c.Tq + i) * c.Dv + d)] += w * v[size_t(((b * c.Hkv + kh) * c.Tk + j) * c.Dv + d)];
        }
      }
  return out;
}

// Random case of the given kind/heads; token types either PaliGemma-shaped (prefix then suffix)
// or arbitrary 0/1 (several prefix runs); padding random with at least one valid key per sample.
Case make_case(Kind kind, Heads heads, bool softcap, bool window) {
  Case c;
  c.B = pick(1, 2);
  c.Hkv = heads == Heads::mqa ? 1 : pick(1, 2);
  c.Hq = heads == Heads::mha ? c.Hkv : c.Hkv * (heads == Heads::gqa ? pick(2, 3) : pick(2, 4));
  c.Tk = pick(1, 6);
  c.Tq = pick(0, 2) == 0 ? pick(1, c.Tk) : c.Tk;  // sometimes a KV-cache style tail of queries
  c.offset = pick(0, 1) == 0 ? c.Tk - c.Tq : pick(0, c.Tk - c.Tq);
  c.D = pick(1, 5);
  c.Dv = pick(1, 4);
  c.scale = pick(0, 1) == 0 ? 1.0 / std::sqrt(double(c.D)) : 0.3 + 0.2 * double(pick(0, 6));
  if (softcap) c.softcap = 0.4 + 0.3 * double(pick(0, 4));
  if (window) c.window = pick(1, c.Tk);
  c.causal = kind == Kind::causal || kind == Kind::causal_padding;
  c.prefix = kind == Kind::prefix_types || kind == Kind::prefix_lengths || kind == Kind::prefix_padding;
  if (c.prefix) {
    const bool structured = kind == Kind::prefix_lengths || pick(0, 1) == 0;
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t len = pick(0, c.Tk);
      for (int64_t x = 0; x < c.Tk; ++x) c.types.push_back(structured ? (x < len ? 0 : 1) : pick(0, 1));
    }
  }
  if (kind == Kind::padding || kind == Kind::causal_padding || kind == Kind::prefix_padding) {
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t x = 0; x < c.Tk; ++x) c.pad.push_back(pick(0, 3) == 0 ? 0 : 1);
      c.pad[size_t(b * c.Tk + pick(0, c.Tk - 1))] = 1;
    }
  }
  return c;
}

AttentionOptions options_for(const Case& c, Kind kind, bool default_scale = false) {
  AttentionOptions o;
  if (!default_scale) o.scale = c.scale;
  o.softcap = c.softcap;
  o.sliding_window = c.window;
  o.query_offset = c.offset;
  o.mask = c.prefix ? AttentionMask::prefix_lm : (c.causal ? AttentionMask::causal : AttentionMask::none);
  if (kind == Kind::prefix_lengths) {
    std::vector<int64_t> len;
    for (int64_t b = 0; b < c.B; ++b) {
      int64_t n = 0;
      while (n < c.Tk && c.types[size_t(b * c.Tk + n)] == 0) ++n;
      len.push_back(n);
    }
    o.prefix_lengths = Tensor::from_vector(len, {c.B});
  } else if (c.prefix) {
    o.token_type_ids = Tensor::from_vector(c.types, {c.B, c.Tk});
  }
  if (!c.pad.empty()) o.key_padding = Tensor::from_vector(c.pad, {c.B, c.Tk});
  return o;
}

std::string describe_case(const Case& c) {
  return str_cat("B=", c.B, " Hq=", c.Hq, " Hkv=", c.Hkv, " Tq=", c.Tq, " Tk=", c.Tk, " D=", c.D, " Dv=", c.Dv,
                 " offset=", c.offset, " scale=", c.scale, " softcap=", c.softcap, " window=", c.window,
                 " types=", c.types, " pad=", c.pad);
}

struct Inputs {
  Tensor q, k, v;
};
Inputs random_inputs(const Case& c, DType dt, double range = 1.5) {
  return {random({c.B, c.Hq, c.Tq, c.D}, dt, -range, range), random({c.B, c.Hkv, c.Tk, c.D}, dt, -range, range),
          random({c.B, c.Hkv, c.Tk, c.Dv}, dt, -range, range)};
}

using Param = std::tuple<Kind, Heads, bool, bool>;
class AttentionVsReference : public ::testing::TestWithParam<Param> {};

TEST_P(AttentionVsReference, ForwardAndGradcheck) {
  const auto [kind, heads, softcap, window] = GetParam();
  for (int rep = 0; rep < 3; ++rep) {
    const Case c = make_case(kind, heads, softcap, window);
    SCOPED_TRACE(describe_case(c));
    const AttentionOptions opt = options_for(c, kind);
    for (DType dt : {DType::f64, DType::f32}) {
      Inputs in = random_inputs(c, dt);
      Tensor out = scaled_dot_product_attention(in.q, in.k, in.v, opt);
      ASSERT_EQ(out.shape(), Shape({c.B, c.Hq, c.Tq, c.Dv}));
      ASSERT_EQ(out.dtype(), dt);
      const auto ref = ref_attention(c, in.q.to_vector<double>(), in.k.to_vector<double>(), in.v.to_vector<double>());
      const double tol = dt == DType::f64 ? 1e-12 : 2e-6;
      EXPECT_TRUE(all_close(out, ref, tol, tol)) << dtype_name(dt);
    }
    Inputs in = random_inputs(c, DType::f64);
    auto fn = [&](const std::vector<Tensor>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], opt); };
    EXPECT_TRUE(grad_ok(gradcheck(fn, {in.q, in.k, in.v})));
  }
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const Kind kind = std::get<0>(info.param);
  const Heads heads = std::get<1>(info.param);
  const char* h = heads == Heads::mha ? "Mha" : heads == Heads::gqa ? "Gqa" : "Mqa";
  return str_cat(kind_name(kind), h, std::get<2>(info.param) ? "Softcap" : "", std::get<3>(info.param) ? "Window" : "");
}

INSTANTIATE_TEST_SUITE_P(AllMasks, AttentionVsReference,
                         ::testing::Combine(::testing::Values(Kind::none, Kind::causal, Kind::prefix_types,
                                                              Kind::prefix_lengths, Kind::padding, Kind::causal_padding,
                                                              Kind::prefix_padding),
                                            ::testing::Values(Heads::mha, Heads::gqa, Heads::mqa), ::testing::Bool(),
                                            ::testing::Bool()),
                         param_name);

// Explicit small and odd shapes: T = 1, D = 3, odd head counts, one KV head.
TEST(Attention, SizeOneAndOddDims) {
  for (auto [Hq, Hkv, T, D] : std::vector<std::array<int64_t, 4>>{{1, 1, 1, 1}, {3, 1, 1, 3}, {3, 3, 5, 3}, {6, 2, 7, 5}}) {
    for (Kind kind : {Kind::none, Kind::causal, Kind::prefix_padding}) {
      Case c = make_case(kind, Heads::mha, false, false);
      c.Hq = Hq, c.Hkv = Hkv, c.Tq = T, c.Tk = T, c.D = D, c.Dv = D, c.offset = 0, c.B = 1;
      c.scale = 1.0 / std::sqrt(double(D));
      c.types.assign(size_t(T), 0);
      for (int64_t x = T / 2; x < T; ++x) c.types[size_t(x)] = 1;
      if (kind == Kind::prefix_padding) c.pad.assign(size_t(T), 1);
      SCOPED_TRACE(describe_case(c));
      const AttentionOptions opt = options_for(c, kind, /*default_scale=*/true);  // exercises 1/√D
      Inputs in = random_inputs(c, DType::f64);
      Tensor out = scaled_dot_product_attention(in.q, in.k, in.v, opt);
      EXPECT_TRUE(all_close(out, ref_attention(c, in.q.to_vector<double>(), in.k.to_vector<double>(),
                                               in.v.to_vector<double>()), 1e-12, 1e-12));
      auto fn = [&](const std::vector<Tensor>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], opt); };
      EXPECT_TRUE(grad_ok(gradcheck(fn, {in.q, in.k, in.v})));
    }
  }
}

// The mask must change the answer, or the comparisons above would prove nothing about it.
TEST(Attention, MasksAreNotVacuous) {
  Case c = make_case(Kind::causal, Heads::gqa, false, false);
  c.Tq = c.Tk = 5, c.offset = 0;
  Inputs in = random_inputs(c, DType::f64);
  AttentionOptions none = options_for(c, Kind::causal);
  none.mask = AttentionMask::none;
  const auto causal = scaled_dot_product_attention(in.q, in.k, in.v, options_for(c, Kind::causal)).to_vector<double>();
  const auto full = scaled_dot_product_attention(in.q, in.k, in.v, none).to_vector<double>();
  EXPECT_GT(max_abs_diff(causal, full), 1e-3);
}

// GQA equals MHA on explicitly repeated K/V heads (HF repeat_kv), and dk/dv sum over the group.
TEST(Attention, GqaMatchesRepeatedKv) {
  const int64_t B = 2, Hkv = 2, rep = 3, T = 4, D = 3;
  Tensor q = random({B, Hkv * rep, T, D}), k = random({B, Hkv, T, D}), v = random({B, Hkv, T, D});
  Tensor k_rep = k.unsqueeze(2).expand({B, Hkv, rep, T, D}).reshape({B, Hkv * rep, T, D});
  Tensor v_rep = v.unsqueeze(2).expand({B, Hkv, rep, T, D}).reshape({B, Hkv * rep, T, D});
  AttentionOptions opt;
  opt.mask = AttentionMask::causal;
  EXPECT_TRUE(all_close(scaled_dot_product_attention(q, k, v, opt),
                        scaled_dot_product_attention(q, k_rep, v_rep, opt).to_vector<double>(), 1e-14, 1e-14));
  Tensor dout = random({B, Hkv * rep, T, D});
  auto g = ops::attention_backward(dout, q, k, v, opt);
  auto g_rep = ops::attention_backward(dout, q, k_rep, v_rep, opt);
  Tensor dk_sum = ops::reduce(ops::ReduceKind::sum, g_rep[1].reshape({B, Hkv, rep, T, D}), {2}, false, "test");
  EXPECT_TRUE(all_close(g[1], dk_sum.to_vector<double>(), 1e-13, 1e-13));
}

// KV-cache decoding: queries at the last positions reproduce the last rows of the full pass.
TEST(Attention, QueryOffsetMatchesFullPass) {
  for (Kind kind : {Kind::causal, Kind::prefix_types}) {
    const int64_t B = 2, H = 2, T = 7, D = 4, Tq = 3;
    Tensor q = random({B, H, T, D}), k = random({B, H, T, D}), v = random({B, H, T, D});
    AttentionOptions opt;
    opt.mask = kind == Kind::causal ? AttentionMask::causal : AttentionMask::prefix_lm;
    if (kind == Kind::prefix_types) opt.token_type_ids = Tensor::from_vector<int64_t>({0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1}, {B, T});
    opt.sliding_window = 3;
    Tensor full = scaled_dot_product_attention(q, k, v, opt);
    Tensor tail = scaled_dot_product_attention(q.narrow(2, T - Tq, Tq), k, v, opt);  // default offset Tk − Tq
    EXPECT_TRUE(all_close(tail, full.narrow(2, T - Tq, Tq).contiguous().to_vector<double>(), 1e-14, 1e-14));
  }
}

// A query that sees no key gets zeros and passes zero gradient, never NaN.
TEST(Attention, FullyMaskedRowsAreZero) {
  const int64_t B = 2, H = 2, T = 4, D = 3;
  Tensor q = random({B, H, T, D}), k = random({B, H, T, D}), v = random({B, H, T, D});
  AttentionOptions opt;
  opt.mask = AttentionMask::causal;
  // Sample 0: key 0 is a pad, so query 0 sees nothing. Sample 1: every key is a pad.
  opt.key_padding = Tensor::from_vector<int64_t>({0, 1, 1, 1, 0, 0, 0, 0}, {B, T});
  Tensor out = scaled_dot_product_attention(q, k, v, opt);
  const auto o = out.to_vector<double>();
  for (double x : o) ASSERT_TRUE(std::isfinite(x));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) EXPECT_EQ(o[size_t((h * T + 0) * D + d)], 0.0);
  for (size_t i = size_t(H * T * D); i < o.size(); ++i) EXPECT_EQ(o[i], 0.0);
  auto g = ops::attention_backward(random({B, H, T, D}), q, k, v, opt);
  for (const Tensor& t : g)
    for (double x : t.to_vector<double>()) ASSERT_TRUE(std::isfinite(x));
  const auto dq = g[0].to_vector<double>();
  for (size_t i = size_t(H * T * D); i < dq.size(); ++i) EXPECT_EQ(dq[i], 0.0);
  auto fn = [&](const std::vector<Tensor>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], opt); };
  EXPECT_TRUE(grad_ok(gradcheck(fn, {q, k, v})));
}

// bf16 in, fp32 math, one rounding out: within bf16 tolerance of float64 on the same bf16 values.
TEST(Attention, Bf16WithinTolerance) {
  for (Kind kind : {Kind::none, Kind::causal_padding, Kind::prefix_padding}) {
    Case c = make_case(kind, Heads::gqa, true, false);  // keeps B, heads and the mask flags
    c.Tk = c.Tq = pick(8, 24), c.offset = 0, c.D = c.Dv = pick(8, 32);
    c.softcap = 1.0, c.scale = 1.0 / std::sqrt(double(c.D));
    c.types.clear(), c.pad.clear();
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t x = 0; x < c.Tk; ++x) {
        if (c.prefix) c.types.push_back(x < c.Tk / 2 ? 0 : 1);
        if (kind != Kind::none) c.pad.push_back(x < 2 * b ? 0 : 1);  // left padding in sample 1
      }
    SCOPED_TRACE(describe_case(c));
    const AttentionOptions opt = options_for(c, kind);
    Inputs in = random_inputs(c, DType::bf16, 2.0);
    Tensor out = scaled_dot_product_attention(in.q, in.k, in.v, opt);
    ASSERT_EQ(out.dtype(), DType::bf16);
    const auto ref = ref_attention(c, in.q.to_vector<double>(), in.k.to_vector<double>(), in.v.to_vector<double>());
    EXPECT_TRUE(all_close(out, ref, 1e-2, 8e-3));
    // bf16 gradients against float64 gradients of the same values.
    Tensor dout = random(out.shape(), DType::bf16);
    auto g16 = ops::attention_backward(dout, in.q, in.k, in.v, opt);
    auto g64 = ops::attention_backward(dout.to(DType::f64), in.q.to(DType::f64), in.k.to(DType::f64),
                                       in.v.to(DType::f64), opt);
    for (int i = 0; i < 3; ++i) {
      ASSERT_EQ(g16[size_t(i)].dtype(), DType::bf16);
      EXPECT_TRUE(all_close(g16[size_t(i)], g64[size_t(i)].to_vector<double>(), 3e-2, 1.6e-2)) << "grad " << i;
    }
  }
}

TEST(Attention, ErrorPaths) {
  auto t = [](Shape s, DType dt = DType::f32) { return random(s, dt); };
  auto throws = [](const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& o) {
    EXPECT_THROW(scaled_dot_product_attention(q, k, v, o), Error) << describe(q) << describe(k) << describe(v);
  };
  const AttentionOptions plain;
  throws(t({1, 3, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), plain);     // 3 query heads over 2 KV heads
  throws(t({2, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), plain);     // batch differs
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 7}), t({1, 2, 4, 8}), plain);     // head dim differs
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 5, 8}), plain);     // k and v lengths differ
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 1, 4, 8}), plain);     // k and v heads differ
  throws(t({2, 4, 8}), t({2, 4, 8}), t({2, 4, 8}), plain);              // not 4-D
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}, DType::f64), t({1, 2, 4, 8}), plain);  // dtypes differ
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), Tensor::ones({1, 2, 4, 8}, DType::i64), plain);  // integer v
  throws(t({1, 2, 5, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), [] {   // causal with more queries than keys
    AttentionOptions o;
    o.mask = AttentionMask::causal;
    return o;
  }());
  const Tensor q = t({2, 2, 4, 8}), k = t({2, 1, 4, 8}), v = t({2, 1, 4, 8});
  auto with = [](auto f) {
    AttentionOptions o;
    f(o);
    return o;
  };
  throws(q, k, v, with([](AttentionOptions& o) { o.mask = AttentionMask::prefix_lm; }));  // no prefix given
  throws(q, k, v, with([](AttentionOptions& o) {
    o.mask = AttentionMask::prefix_lm;
    o.token_type_ids = Tensor::zeros({2, 5}, DType::i64);  // wrong Tk
  }));
  throws(q, k, v, with([](AttentionOptions& o) {
    o.mask = AttentionMask::prefix_lm;
    o.token_type_ids = Tensor::zeros({2, 4}, DType::i64);
    o.prefix_lengths = Tensor::zeros({2}, DType::i64);  // both given
  }));
  throws(q, k, v, with([](AttentionOptions& o) {
    o.mask = AttentionMask::prefix_lm;
    o.prefix_lengths = Tensor::from_vector<int64_t>({1, 5}, {2});  // longer than Tk
  }));
  throws(q, k, v, with([](AttentionOptions& o) {
    o.mask = AttentionMask::prefix_lm;
    o.token_type_ids = Tensor::full({2, 4}, 2.0, DType::i64);  // not 0/1
  }));
  throws(q, k, v, with([](AttentionOptions& o) { o.token_type_ids = Tensor::zeros({2, 4}, DType::i64); }));  // mask none
  throws(q, k, v, with([](AttentionOptions& o) { o.key_padding = Tensor::ones({3, 4}, DType::i64); }));  // wrong B
  throws(q, k, v, with([](AttentionOptions& o) { o.key_padding = Tensor::ones({2, 4, 1}, DType::i64); }));  // 3-D
  throws(q, k, v, with([](AttentionOptions& o) { o.sliding_window = -1; }));
  throws(q, k, v, with([](AttentionOptions& o) { o.softcap = -1; }));
  throws(q, k, v, with([](AttentionOptions& o) {
    o.mask = AttentionMask::causal;
    o.query_offset = 1;  // positions 1..4 exceed Tk = 4
  }));
  EXPECT_THROW(ops::attention_backward(t({2, 2, 3, 8}), q, k, v, plain), Error);  // gradient shape
}

}  // namespace
}  // namespace tq::test
