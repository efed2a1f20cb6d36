// embedding lookup and its scatter-add backward against float64 references written here.
#include "../test_util.hpp"
#include "op_test_util.hpp"
#include <tq/ops/embedding.hpp>

#include <random>

using namespace tq;
using tq::test::all_close;
using tq::test::grad_ok;
using tq::test::random;
using tq::test::random_shape;

namespace {

using tq::test::rng;

Tensor random_ids(const Shape& s, int64_t V, DType dt = DType::i64) {
  std::vector<int64_t> v(static_cast<size_t>(numel_of(s)));
  for (auto& x : v) x = int64_t(rng()() % uint64_t(V));
  return Tensor::from_vector(v, s).to(dt);
}

using tq::test::fake_cuda;

}  // namespace

TEST(Embedding, ForwardGathersRows) {
  for (int rep = 0; rep < 8; ++rep) {
    const int64_t V = 1 + int64_t(rng()() % 9), D = 1 + int64_t(rng()() % 7);
    Shape s = random_shape(rep % 3, 4);  // 0-D ids too
    Tensor w = random({V, D}, rep % 2 ? DType::f64 : DType::bf16);
    Tensor ids = random_ids(s, V, rep % 2 ? DType::i64 : DType::i32);
    SCOPED_TRACE(str_cat("ids ", s, " V ", V, " D ", D));
    auto wv = w.to_vector();
    auto iv = ids.to_vector<int64_t>();
    std::vector<double> ref;
    for (int64_t id : iv)
      for (int64_t j = 0; j < D; ++j) ref.push_back(wv[size_t(id * D + j)]);
    Tensor out = embedding(ids, w);
    Shape want = s;
    want.push_back(D);
    EXPECT_EQ(out.shape(), want);
    EXPECT_EQ(out.dtype(), w.dtype());
    EXPECT_TRUE(all_close(out, ref, 0, 0));  // a copy: exact, bf16 included
  }
}

TEST(Embedding, BackwardScatterAddsRepeatedIds) {
  for (int rep = 0; rep < 6; ++rep) {
    const int64_t V = 1 + int64_t(rng()() % 5), D = 1 + int64_t(rng()() % 6);
    Shape s = random_shape(2, 6);  // few rows: repeated ids are likely
    Tensor ids = random_ids(s, V);
    Tensor g = random([&] { Shape o = s; o.push_back(D); return o; }(), DType::f64);
    const int64_t pad = rep % 2 ? int64_t(rng()() % uint64_t(V)) : -1;
    SCOPED_TRACE(str_cat("ids ", s, " V ", V, " D ", D, " padding_idx ", pad));
    auto gv = g.to_vector();
    auto iv = ids.to_vector<int64_t>();
    std::vector<double> ref(size_t(V * D), 0.0);
    for (size_t k = 0; k < iv.size(); ++k)
      if (iv[k] != pad)
        for (int64_t j = 0; j < D; ++j) ref[size_t(iv[k] * D + j)] += gv[k * size_t(D) + size_t(j)];
    EXPECT_TRUE(all_close(ops::embedding_backward(g, ids, V, DType::f64, pad), ref, 1e-14, 1e-14));
    // Through autograd, accumulating into .grad (+=) across two calls.
    Tensor w = random({V, D}, DType::f64);
    w.requires_grad_();
    embedding(ids, w, pad).backward(g);
    embedding(ids, w, pad).backward(g);
    std::vector<double> twice(ref);
    for (double& v : twice) v *= 2;
    EXPECT_TRUE(all_close(w.grad(), twice, 1e-14, 1e-14));
  }
}

TEST(Embedding, Bf16WeightGradientRoundedOnce) {
  const int64_t V = 3, D = 5;
  Tensor ids = Tensor::from_vector<int64_t>({1, 1, 1, 2, 1, 0, 1}, {7});
  Tensor g = random({7, D}, DType::bf16);
  auto gv = g.to_vector();
  std::vector<double> ref(size_t(V * D), 0.0);
  auto iv = ids.to_vector<int64_t>();
  for (size_t k = 0; k < 7; ++k)
    for (int64_t j = 0; j < D; ++j) ref[size_t(iv[k] * D + j)] += gv[k * D + size_t(j)];
  Tensor gw = ops::embedding_backward(g, ids, V, DType::bf16);
  EXPECT_EQ(gw.dtype(), DType::bf16);
  EXPECT_TRUE(all_close(gw, ref, 1e-6, 1.0 / 256));
}

TEST(Embedding, Gradcheck) {
  for (int rep = 0; rep < 6; ++rep) {
    const int64_t V = 1 + int64_t(rng()() % 5), D = 1 + int64_t(rng()() % 5);
    Shape s = random_shape(1 + rep % 2, 4);
    Tensor ids = random_ids(s, V), w = random({V, D}, DType::f64);
    SCOPED_TRACE(str_cat("ids ", s, " V ", V, " D ", D));
    EXPECT_TRUE(grad_ok(gradcheck([](const std::vector<Tensor>& in) { return embedding(in[0], in[1]); }, {ids, w})));
  }
}

TEST(Embedding, Errors) {
  Tensor w = random({4, 3});
  try {
    embedding(Tensor::from_vector<int64_t>({0, 4}, {2}), w);
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("id 4"), std::string::npos) << m;
    EXPECT_NE(m.find("4 rows"), std::string::npos) << m;
  }
  EXPECT_THROW(embedding(Tensor::from_vector<int64_t>({-1}, {1}), w), Error);
  EXPECT_THROW(embedding(Tensor::from_vector<int32_t>({7}, {1}), w), Error);
  EXPECT_THROW(embedding(Tensor::from_vector<double>({1.0}, {1}), w), Error);  // float ids
  EXPECT_THROW(embedding(random_ids({2}, 4), random({4, 3, 1})), Error);       // weight not 2-D
  EXPECT_THROW(embedding(fake_cuda({2}, DType::i64), w), Error);               // device
  EXPECT_THROW(ops::embedding_backward(random({3, 3}), random_ids({2}, 4), 4, DType::f32), Error);
}
