// concat, stack, index_select, masked_scatter against float64 references written here.
#include "../test_util.hpp"
#include "op_test_util.hpp"
#include <tq/ops/shape_ops.hpp>

#include <random>

using namespace tq;
using tq::test::all_close;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {

using tq::test::rng;
int64_t rand_int(int64_t n) { return int64_t(rng()() % uint64_t(n)); }

// (outer, n, inner) of a shape around dim.
std::array<int64_t, 3> around(const Shape& s, int64_t dim) {
  std::array<int64_t, 3> r{1, s[size_t(dim)], 1};
  for (int64_t d = 0; d < int64_t(s.size()); ++d)
    if (d < dim) r[0] *= s[size_t(d)];
    else if (d > dim) r[2] *= s[size_t(d)];
  return r;
}

std::vector<double> ref_concat(const std::vector<Tensor>& ts, int64_t dim) {
  int64_t total = 0;
  for (auto& t : ts) total += t.size(dim);
  auto [outer, n0, inner] = around(ts[0].shape(), dim);
  std::vector<double> out(size_t(outer * total * inner));
  int64_t at = 0;
  for (auto& t : ts) {
    auto v = t.to_vector();
    const int64_t n = t.size(dim);
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < inner; ++i) out[size_t((o * total + at + j) * inner + i)] = v[size_t((o * n + j) * inner + i)];
    at += n;
  }
  return out;
}

// Flat index into `small` (broadcast to `big`, trailing-aligned) of the element at flat index e of big.
int64_t broadcast_source(int64_t e, const Shape& big, const Shape& small) {
  int64_t idx = 0, stride = 1;
  for (int64_t d = int64_t(big.size()) - 1, k = int64_t(small.size()) - 1; d >= 0; --d, --k) {
    const int64_t coord = e % big[size_t(d)];
    e /= big[size_t(d)];
    if (k >= 0) {
      if (small[size_t(k)] != 1) idx += coord * stride;
      stride *= small[size_t(k)];
    }
  }
  return idx;
}

Tensor random_mask(const Shape& s, double p_true = 0.5) {
  std::vector<bool> v(static_cast<size_t>(numel_of(s)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = double(rng()() % 1000) < 1000 * p_true;
  return Tensor::from_vector(v, s);
}

using tq::test::fake_cuda;

}  // namespace

// ---- concat / stack ----

TEST(Concat, ForwardAndGradcheck) {
  for (int rep = 0; rep < 10; ++rep) {
    const int nd = 1 + rep % 3;
    Shape base = random_shape(nd, 4);
    const int64_t dim = rand_int(nd);
    std::vector<Tensor> ts;
    for (int k = 0, n = 1 + rep % 3; k < n; ++k) {
      Shape s = base;
      s[size_t(dim)] = rand_int(4) + (k == 0);  // size-0 parts allowed after the first
      ts.push_back(random(s, DType::f64));
    }
    SCOPED_TRACE(str_cat("base ", base, " dim ", dim, " parts ", ts.size()));
    auto ref = ref_concat(ts, dim);
    EXPECT_TRUE(all_close(concat(ts, dim - (rep % 2 ? nd : 0)), ref, 0, 0));
    std::vector<Tensor> tb;
    for (auto& t : ts) tb.push_back(t.to(DType::bf16));
    EXPECT_TRUE(all_close(concat(tb, dim), ref_concat(tb, dim), 0, 0));  // bytes moved, no rounding
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return concat(in, dim); }, ts)));
  }
  // Non-contiguous inputs and integer dtypes.
  Tensor a = random({3, 2}, DType::f64).t(), b = random({2, 4}, DType::f64);
  EXPECT_TRUE(all_close(concat({a, b}, 1), ref_concat({a.contiguous(), b}, 1), 0, 0));
  Tensor i = Tensor::arange(4).reshape({2, 2});
  EXPECT_EQ(concat({i, i}, 0).to_vector<int64_t>(), (std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2, 3}));
}

TEST(Stack, ForwardAndGradcheck) {
  for (int rep = 0; rep < 8; ++rep) {
    const int nd = rep % 3;  // 0-D tensors stack too
    Shape s = random_shape(nd, 4);
    const int64_t dim = rand_int(nd + 1);
    std::vector<Tensor> ts;
    for (int k = 0, n = 1 + rep % 4; k < n; ++k) ts.push_back(random(s, DType::f64));
    SCOPED_TRACE(str_cat("shape ", s, " dim ", dim, " count ", ts.size()));
    // stack == concat of the parts with a size-1 axis inserted at dim.
    std::vector<Tensor> un;
    for (auto& t : ts) {
      Shape u = s;
      u.insert(u.begin() + dim, 1);
      un.push_back(Tensor::from_vector(t.to_vector(), u));
    }
    Tensor out = stack(ts, dim);
    Shape want = s;
    want.insert(want.begin() + dim, int64_t(ts.size()));
    EXPECT_EQ(out.shape(), want);
    EXPECT_TRUE(all_close(out, ref_concat(un, dim), 0, 0));
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return stack(in, dim); }, ts)));
  }
}

TEST(Concat, Errors) {
  Tensor a = random({2, 3}), b = random({2, 4});
  EXPECT_THROW(concat({}, 0), Error);
  EXPECT_THROW(concat({a, b}, 0), Error);  // shapes differ outside dim
  EXPECT_NO_THROW(concat({a, b}, 1));
  EXPECT_THROW(concat({a, b}, 2), Error);
  EXPECT_THROW(concat({a, random({2, 3, 1})}, 1), Error);
  EXPECT_THROW(concat({a, a.to(DType::f32)}, 0), Error);  // dtype
  EXPECT_THROW(concat({a, fake_cuda({2, 3}, DType::f32)}, 0), Error);
  EXPECT_THROW(concat({Tensor::scalar(1.0), Tensor::scalar(2.0)}, 0), Error);
  EXPECT_THROW(stack({a, b}, 0), Error);
  EXPECT_THROW(stack({a, a}, 3), Error);
  try {
    concat({a, a.to(DType::bf16)}, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16[2, 3]"), std::string::npos) << e.what();
  }
}

// ---- index_select ----

TEST(IndexSelect, ForwardAndGradcheck) {
  for (int rep = 0; rep < 10; ++rep) {
    const int nd = 1 + rep % 3;
    Shape s = random_shape(nd, 4);
    const int64_t dim = rand_int(nd), n = s[size_t(dim)], K = rand_int(6);  // K = 0 allowed
    std::vector<int64_t> idx(static_cast<size_t>(K));
    for (auto& v : idx) v = rand_int(n);  // repeats on purpose
    Tensor index = Tensor::from_vector(idx, {K}).to(rep % 2 ? DType::i32 : DType::i64);
    Tensor x = random(s, DType::f64);
    SCOPED_TRACE(str_cat("shape ", s, " dim ", dim, " index ", idx));
    auto [outer, nn, inner] = around(s, dim);
    auto xv = x.to_vector();
    std::vector<double> ref;
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < inner; ++i) ref.push_back(xv[size_t((o * nn + idx[size_t(k)]) * inner + i)]);
    EXPECT_TRUE(all_close(index_select(x, dim, index), ref, 0, 0));
    EXPECT_TRUE(grad_ok(gradcheck([&](const std::vector<Tensor>& in) { return index_select(in[0], dim, index); }, {x})));
    // The backward accumulates repeats: check against an explicit sum.
    Shape os = s;
    os[size_t(dim)] = K;
    Tensor g = random(os, DType::f64);
    auto gv = g.to_vector();
    std::vector<double> gref(xv.size(), 0.0);
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < inner; ++i)
          gref[size_t((o * nn + idx[size_t(k)]) * inner + i)] += gv[size_t((o * K + k) * inner + i)];
    EXPECT_TRUE(all_close(ops::index_select_backward(g, s, DType::f64, dim, index), gref, 1e-14, 1e-14));
  }
}

TEST(IndexSelect, Errors) {
  Tensor x = random({3, 4});
  try {
    index_select(x, 1, Tensor::from_vector<int64_t>({0, 4}, {2}));
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("index 4"), std::string::npos) << m;
    EXPECT_NE(m.find("size 4"), std::string::npos) << m;
  }
  EXPECT_THROW(index_select(x, 0, Tensor::from_vector<int64_t>({-1}, {1})), Error);
  EXPECT_THROW(index_select(x, 2, Tensor::from_vector<int64_t>({0}, {1})), Error);
  EXPECT_THROW(index_select(x, 0, Tensor::from_vector<double>({0}, {1})), Error);  // float index
  EXPECT_THROW(index_select(x, 0, Tensor::zeros({1, 1}, DType::i64)), Error);       // 2-D index
  EXPECT_THROW(index_select(x, 0, fake_cuda({1}, DType::i64)), Error);
}

// ---- masked_scatter ----

TEST(MaskedScatter, ForwardMatchesPyTorchSemantics) {
  for (int rep = 0; rep < 12; ++rep) {
    const int nd = 1 + rep % 3;
    Shape s = random_shape(nd, 5);
    // The mask broadcasts: some dims become 1, some leading dims are dropped.
    Shape ms(s.begin() + rand_int(nd), s.end());
    for (auto& d : ms)
      if (rng()() % 3 == 0) d = 1;
    Tensor mask = random_mask(ms, rep % 4 == 0 ? 1.0 : 0.5);
    Tensor x = random(s, DType::f64);
    auto mv = mask.to_vector<bool>();
    int64_t count = 0;
    for (int64_t e = 0; e < x.numel(); ++e) count += mv[size_t(broadcast_source(e, s, ms))];
    Tensor src = random({count + rand_int(3)}, DType::f64);  // extra source elements are ignored
    SCOPED_TRACE(str_cat("x ", s, " mask ", ms, " count ", count));
    auto xv = x.to_vector(), sv = src.to_vector();
    std::vector<double> ref(xv);
    for (int64_t e = 0, k = 0; e < x.numel(); ++e)
      if (mv[size_t(broadcast_source(e, s, ms))]) ref[size_t(e)] = sv[size_t(k++)];
    EXPECT_TRUE(all_close(masked_scatter(x, mask, src), ref, 0, 0));
    EXPECT_TRUE(all_close(masked_scatter(x.to(DType::bf16), mask, src.to(DType::bf16)),
                          masked_scatter(x, mask, src).to(DType::bf16).to_vector(), 0, 0));
    EXPECT_TRUE(grad_ok(gradcheck(
        [&](const std::vector<Tensor>& in) { return masked_scatter(in[0], mask, in[1]); }, {x, src})));
  }
}

TEST(MaskedScatter, ImageFeaturesIntoTokenSlots) {
  // PaliGemma's merge: (B, T, D) embeddings, mask = (ids == image)[..., None], features (B·I, D).
  const int64_t B = 2, T = 5, D = 3, image = 9;
  Tensor ids = Tensor::from_vector<int64_t>({9, 9, 1, 2, 3, 9, 9, 4, 5, 6}, {B, T});
  Tensor emb = random({B, T, D}, DType::f64), feats = random({4, D}, DType::f64);
  auto iv = ids.to_vector<int64_t>();
  std::vector<bool> m;
  for (int64_t v : iv) m.push_back(v == image);
  Tensor out = masked_scatter(emb, Tensor::from_vector(m, {B, T, 1}), feats);
  auto ov = out.to_vector(), ev = emb.to_vector(), fv = feats.to_vector();
  int64_t f = 0;
  for (int64_t t = 0; t < B * T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      const double want = iv[size_t(t)] == image ? fv[size_t(f * D + d)] : ev[size_t(t * D + d)];
      EXPECT_EQ(ov[size_t(t * D + d)], want) << "token " << t << " dim " << d;
      if (d == D - 1 && iv[size_t(t)] == image) ++f;
    }
}

TEST(MaskedScatter, Errors) {
  Tensor x = random({2, 3});
  Tensor mask = Tensor::from_vector<bool>({true, false, true}, {3});
  try {
    masked_scatter(x, mask, random({3}));  // 4 true positions, 3 source elements
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("4 true positions"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(masked_scatter(x, mask, random({4})));
  EXPECT_THROW(masked_scatter(x, mask.to(DType::u8), random({4})), Error);            // mask dtype
  EXPECT_THROW(masked_scatter(x, random_mask({2, 2}), random({6})), Error);           // no broadcast
  EXPECT_THROW(masked_scatter(x, random_mask({3, 2, 3}), random({18})), Error);       // would grow x
  EXPECT_THROW(masked_scatter(x, mask, random({4}, DType::f32)), Error);              // source dtype
  EXPECT_THROW(masked_scatter(x, mask, fake_cuda({4}, DType::f32)), Error);
}
