// CUDA embedding, index_select, masked_scatter, concat and stack against the CPU reference ops
// (forward, backward and through autograd), and the device-side index validation: an
// out-of-range index never faults, and ops::check_device_index_errors() reports it afterwards.
//
// Every input is a fresh random draw (ids with repeats); the allocator's cache is poisoned (NaN)
// right before each CUDA op runs.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

Tensor dev(const Tensor& t) { return t.to(kCuda); }

// Integer ids in [0, hi) with plenty of repeats, as i64 (or i32).
Tensor random_ids(const Shape& s, int64_t hi, DType dt = DType::i64) {
  return rnd(s, DType::f64, 0, double(hi)).to(DType::i64).to(dt);
}

// Reads the device error record and expects it to be clear.
void expect_no_index_error() { EXPECT_NO_THROW(ops::check_device_index_errors(kCuda)); }

// ---- embedding ----

TEST(GpuEmbedding, ForwardBackwardMatchCpu) {
  TQ_REQUIRE_GPU();
  struct Case {
    int64_t V, D;
    Shape ids;
  };
  const std::vector<Case> cases = {{1, 1, {3}},       {72, 72, {4, 9}},   {300, 2048, {2, 286}},
                                   {257216, 72, {37}}, {1000, 4304, {5}}, {17, 3, {2, 3, 4}}};
  for (DType dt : {DType::bf16, DType::f32, DType::f64, DType::f16})
    for (const Case& c : cases)
      for (DType idt : {DType::i64, DType::i32}) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " V ", c.V, " D ", c.D, " ids ", c.ids, " ", dtype_name(idt)));
        Tensor w = rnd({c.V, c.D}, dt), ids = random_ids(c.ids, std::min<int64_t>(c.V, 50), idt);
        Shape gs = c.ids;
        gs.push_back(c.D);
        Tensor g = rnd(gs, dt);
        const int64_t pad = c.V > 1 ? 3 : -1;
        Tensor ref = ops::embedding(ids, w);
        Tensor gref = ops::embedding_backward(g, ids, c.V, dt, pad);
        Tensor wd = dev(w), idd = dev(ids), gd = dev(g);
        poison_for(ref, 4);
        ASSERT_TRUE(close(ops::embedding(idd, wd).cpu(), ref, 0.0)) << "forward";
        poison_for(gref, 2);
        ASSERT_TRUE(close(ops::embedding_backward(gd, idd, c.V, dt, pad).cpu(), gref, tol_for(dt))) << "backward";
      }
  expect_no_index_error();
}

TEST(GpuEmbedding, BackwardSumsRepeatsInTheCpuOrderAndHonoursPadding) {
  TQ_REQUIRE_GPU();
  // Every id repeated many times: the device sums each id's rows in position order, as the CPU.
  Tensor ids = random_ids({4576}, 7), g = rnd({4576, 128}, DType::f32);
  Tensor ref = ops::embedding_backward(g, ids, 257216, DType::f32, 0);
  poison_for(ref, 2);
  Tensor got = ops::embedding_backward(dev(g), dev(ids), 257216, DType::f32, 0);
  EXPECT_TRUE(close(got.cpu(), ref, 0.0));  // f32: bit for bit
  // An f32 gradient for a bf16 table: summed in fp32, rounded once to bf16.
  Tensor gb = ops::embedding_backward(dev(g), dev(ids), 300, DType::bf16, -1);
  EXPECT_TRUE(close(gb.cpu(), ops::embedding_backward(g, ids, 300, DType::bf16, -1), 1e-2));
  expect_no_index_error();
}

TEST(GpuEmbedding, AutogradMatchesCpu) {
  TQ_REQUIRE_GPU();
  Tensor w = rnd({300, 72}, DType::f32), ids = random_ids({3, 40}, 300), g = rnd({3, 40, 72}, DType::f32);
  auto run = [&](Device d) {
    Tensor ww = w.to(d).detach().requires_grad_();
    Tensor y = embedding(ids.to(d), ww, /*padding_idx=*/0);
    y.backward(g.to(d));
    return std::pair<Tensor, Tensor>{y.detach().cpu(), ww.grad().cpu()};
  };
  auto [yc, gc] = run(Device::cpu());
  auto [yg, gg] = run(kCuda);
  EXPECT_TRUE(close(yg, yc, 0.0));
  EXPECT_TRUE(close(gg, gc, 1e-5));
}

TEST(GpuEmbedding, OutOfRangeIdsAreReportedNotFaulted) {
  TQ_REQUIRE_GPU();
  expect_no_index_error();
  Tensor w = rnd({50, 72}, DType::bf16);
  Tensor ids = Tensor::from_vector<int64_t>({3, 50, 7, -2}, {4});
  Tensor y = ops::embedding(dev(ids), dev(w));  // no throw, no fault: the op never reads the ids on the host
  std::vector<double> row1 = y.cpu().select(0, 1).to_vector<double>();
  for (double v : row1) ASSERT_EQ(v, 0.0) << "an out-of-range row is zero-filled";
  EXPECT_TRUE(close(y.cpu().select(0, 2), w.select(0, 7), 0.0));  // valid rows are untouched
  try {
    ops::check_device_index_errors(kCuda);
    FAIL() << "expected a tq::Error";
  } catch (const tq::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("embedding"), std::string::npos) << m;
    EXPECT_TRUE(m.find("id 50") != std::string::npos || m.find("id -2") != std::string::npos) << m;
    EXPECT_NE(m.find("50 rows"), std::string::npos) << m;
  }
  expect_no_index_error();  // the record was cleared
  // Backward drops the bad id's gradient and reports it too.
  Tensor gw = ops::embedding_backward(dev(rnd({4, 72}, DType::f32)), dev(ids), 50, DType::f32);
  EXPECT_EQ(gw.size(0), 50);
  EXPECT_THROW(ops::check_device_index_errors(kCuda), tq::Error);
  expect_no_index_error();
}

// ---- index_select ----

TEST(GpuIndexSelect, AnyDimForwardBackwardMatchCpu) {
  TQ_REQUIRE_GPU();
  const Shape s = {5, 72, 9, 4};
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::i64, DType::u8})
    for (int64_t dim = 0; dim < 4; ++dim)
      for (int64_t K : {int64_t(1), int64_t(13), int64_t(300)}) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " dim ", dim, " K ", K));
        Tensor x = rnd(s, dt, 0, 100), idx = random_ids({K}, s[size_t(dim)], K % 2 ? DType::i64 : DType::i32);
        Tensor ref = ops::index_select(x, dim, idx);
        Tensor xd = dev(x), id = dev(idx);
        poison_for(ref, 4);
        ASSERT_TRUE(close(ops::index_select(xd, dim, id).cpu(), ref, 0.0)) << "forward";
        if (!is_floating(dt)) continue;
        Tensor g = rnd(ref.shape(), dt);
        Tensor gref = ops::index_select_backward(g, s, dt, dim, idx);
        poison_for(gref, 4);
        ASSERT_TRUE(close(ops::index_select_backward(dev(g), s, dt, dim, id).cpu(), gref, tol_for(dt))) << "backward";
      }
  // The model's use: rows of the (B·T, D) hidden states picked by a 1-D index, 0-D index too.
  Tensor h = rnd({4576, 2048}, DType::bf16), rows = random_ids({1200}, 4576);
  EXPECT_TRUE(close(ops::index_select(dev(h), 0, dev(rows)).cpu(), ops::index_select(h, 0, rows), 0.0));
  Tensor one = Tensor::scalar(17, DType::i64);
  EXPECT_TRUE(close(ops::index_select(dev(h), 0, dev(one)).cpu(), ops::index_select(h, 0, one), 0.0));
  // A strided (transposed) input.
  Tensor xt = rnd({72, 4304}, DType::f32), it = random_ids({9}, 4304);
  EXPECT_TRUE(close(ops::index_select(dev(xt).t(), 0, dev(it)).cpu(), ops::index_select(xt.t(), 0, it), 0.0));
  expect_no_index_error();
}

TEST(GpuIndexSelect, AutogradAndErrors) {
  TQ_REQUIRE_GPU();
  Tensor x = rnd({4576, 72}, DType::f32), rows = random_ids({2000}, 4576), g = rnd({2000, 72}, DType::f32);
  auto run = [&](Device d) {
    Tensor xx = x.to(d).detach().requires_grad_();
    Tensor y = index_select(xx, 0, rows.to(d));
    y.backward(g.to(d));
    return std::pair<Tensor, Tensor>{y.detach().cpu(), xx.grad().cpu()};
  };
  auto [yc, gc] = run(Device::cpu());
  auto [yg, gg] = run(kCuda);
  EXPECT_TRUE(close(yg, yc, 0.0));
  EXPECT_TRUE(close(gg, gc, 0.0));  // repeats summed in the CPU's order: bit for bit
  expect_no_index_error();
  Tensor y = ops::index_select(dev(x), 1, dev(Tensor::from_vector<int64_t>({0, 72}, {2})));
  EXPECT_EQ(y.size(1), 2);
  try {
    ops::check_device_index_errors(kCuda);
    FAIL() << "expected a tq::Error";
  } catch (const tq::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("index_select"), std::string::npos) << m;
    EXPECT_NE(m.find("index 72"), std::string::npos) << m;
    EXPECT_NE(m.find("size 72"), std::string::npos) << m;
  }
  expect_no_index_error();
  EXPECT_THROW(ops::index_select(dev(x), 0, dev(Tensor::zeros({1, 1}, DType::i64))), tq::Error);  // 2-D index
  EXPECT_THROW(ops::index_select(dev(x), 0, dev(Tensor::zeros({1}, DType::f32))), tq::Error);     // float index
  EXPECT_THROW(ops::index_select(dev(x), 0, Tensor::zeros({1}, DType::i64)), tq::Error);          // CPU index
}

// ---- masked_scatter ----

TEST(GpuMaskedScatter, ForwardBackwardMatchCpu) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32, DType::f64}) {
    // PaliGemma's merge: (B, T, D) embeddings, a (B, T, 1) token mask broadcast over D.
    const int64_t B = 3, T = 286, D = 72;
    Tensor x = rnd({B, T, D}, dt);
    Tensor tok = rnd({B, T, 1}, DType::f64, 0, 1);
    Tensor mask = ops::binary(BinaryOp::lt, tok, ops::scalar_like(tok, 0.6)).to(DType::boolean);
    const int64_t count = int64_t(std::llround(tq::sum(mask.to(DType::f64)).item<double>())) * D;
    for (int64_t extra : {int64_t(0), int64_t(77)}) {
      SCOPED_TRACE(str_cat(dtype_name(dt), " true positions ", count, " source extra ", extra));
      Tensor src = rnd({count + extra}, dt);
      Tensor ref = ops::masked_scatter(x, mask.expand({B, T, D}), src);
      Tensor xd = dev(x), md = dev(mask).expand({B, T, D}), sd = dev(src);
      poison_for(ref, 8);
      ASSERT_TRUE(close(ops::masked_scatter(xd, md, sd).cpu(), ref, 0.0)) << "forward";
      Tensor g = rnd({B, T, D}, dt);
      std::vector<Tensor> gref = ops::masked_scatter_backward(g, mask.expand({B, T, D}), src.shape(), dt);
      poison_for(ref, 8);
      std::vector<Tensor> got = ops::masked_scatter_backward(dev(g), md, src.shape(), dt);
      ASSERT_TRUE(close(got[0].cpu(), gref[0], 0.0)) << "d x";
      ASSERT_TRUE(close(got[1].cpu(), gref[1], 0.0)) << "d source";
    }
  }
  // Mask of x's full shape, an f32 gradient for a bf16 source.
  Tensor x = rnd({4304}, DType::f32), mask = rnd({4304}, DType::f64, 0, 1).to(DType::f32);
  Tensor m = ops::binary(BinaryOp::gt, mask, ops::scalar_like(mask, 0.5)).to(DType::boolean);
  Tensor src = rnd({4304}, DType::f32);
  EXPECT_TRUE(close(ops::masked_scatter(dev(x), dev(m), dev(src)).cpu(), ops::masked_scatter(x, m, src), 0.0));
  std::vector<Tensor> a = ops::masked_scatter_backward(dev(x), dev(m), {4304}, DType::bf16);
  std::vector<Tensor> r = ops::masked_scatter_backward(x, m, {4304}, DType::bf16);
  EXPECT_TRUE(close(a[1].cpu(), r[1], 0.0));
  expect_no_index_error();
}

TEST(GpuMaskedScatter, AutogradAndTooShortSource) {
  TQ_REQUIRE_GPU();
  Tensor x = rnd({2, 50, 16}, DType::f32), src = rnd({40, 16}, DType::f32), g = rnd({2, 50, 16}, DType::f32);
  std::vector<bool> mv(100, false);
  for (int i : {3, 4, 5, 60, 61, 62, 63, 64, 90, 99}) mv[size_t(i)] = true;
  Tensor mask = Tensor::from_vector(mv, {2, 50, 1});
  auto run = [&](Device d) {
    Tensor xx = x.to(d).detach().requires_grad_(), ss = src.to(d).detach().requires_grad_();
    Tensor y = masked_scatter(xx, mask.to(d).expand({2, 50, 16}), ss);
    y.backward(g.to(d));
    return std::vector<Tensor>{y.detach().cpu(), xx.grad().cpu(), ss.grad().cpu()};
  };
  auto cpu = run(Device::cpu()), gpu = run(kCuda);
  for (size_t i = 0; i < cpu.size(); ++i) EXPECT_TRUE(close(gpu[i], cpu[i], 0.0)) << "output " << i;
  expect_no_index_error();
  // 160 true positions, 100 source elements: positions past the source keep x, and the error is reported.
  Tensor short_src = rnd({100}, DType::f32);
  Tensor y = ops::masked_scatter(dev(x), dev(mask).expand({2, 50, 16}), dev(short_src));
  EXPECT_TRUE(close(y.cpu().select(0, 1).select(0, 49), x.select(0, 1).select(0, 49), 0.0));
  try {
    ops::check_device_index_errors(kCuda);
    FAIL() << "expected a tq::Error";
  } catch (const tq::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("masked_scatter"), std::string::npos) << m;
    EXPECT_NE(m.find("100 elements"), std::string::npos) << m;
  }
  expect_no_index_error();
}

// ---- concat / stack ----

TEST(GpuConcat, AnyDimAndKvCacheAppend) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32, DType::i64, DType::u8})
    for (int64_t dim = 0; dim < 4; ++dim) {
      SCOPED_TRACE(str_cat(dtype_name(dt), " dim ", dim));
      std::vector<Tensor> parts, dparts;
      for (int64_t n : {int64_t(3), int64_t(1), int64_t(0), int64_t(5)}) {
        Shape s = {2, 3, 7, 72};
        s[size_t(dim)] = n;
        parts.push_back(rnd(s, dt, 0, 100));
        dparts.push_back(dev(parts.back()));
      }
      Tensor ref = ops::concat(parts, dim);
      poison_for(ref, 4);
      ASSERT_TRUE(close(ops::concat(dparts, dim).cpu(), ref, 0.0));
    }
  // KV cache: (B, H, T, D) grows along T by one step; a strided (permuted) input too.
  Tensor cache = rnd({16, 1, 286, 256}, DType::bf16), step = rnd({16, 1, 1, 256}, DType::bf16);
  EXPECT_TRUE(close(ops::concat({dev(cache), dev(step)}, 2).cpu(), ops::concat({cache, step}, 2), 0.0));
  Tensor p = rnd({16, 286, 1, 256}, DType::bf16);
  EXPECT_TRUE(close(ops::concat({dev(p).permute({0, 2, 1, 3}), dev(step)}, -2).cpu(),
                    ops::concat({p.permute({0, 2, 1, 3}), step}, -2), 0.0));
  EXPECT_THROW(ops::concat({dev(cache), step}, 2), tq::Error);  // devices differ
}

TEST(GpuConcat, StackAndAutograd) {
  TQ_REQUIRE_GPU();
  std::vector<Tensor> xs;
  for (int i = 0; i < 3; ++i) xs.push_back(rnd({4, 72}, DType::f32));
  for (int64_t dim : {int64_t(0), int64_t(1), int64_t(2), int64_t(-1)}) {
    std::vector<Tensor> ds;
    for (const Tensor& t : xs) ds.push_back(dev(t));
    EXPECT_TRUE(close(ops::stack(ds, dim).cpu(), ops::stack(xs, dim), 0.0)) << "dim " << dim;
  }
  Tensor gy = rnd({4, 3, 72}, DType::f32);
  auto run = [&](Device d) {
    Tensor a = xs[0].to(d).detach().requires_grad_(), b = xs[1].to(d).detach().requires_grad_(), c = xs[2].to(d).detach().requires_grad_();
    Tensor y = concat({stack({a, b}, 1), c.unsqueeze(1)}, 1);  // (4, 3, 72)
    y.backward(gy.to(d));
    return std::vector<Tensor>{y.detach().cpu(), a.grad().cpu(), b.grad().cpu(), c.grad().cpu()};
  };
  auto cpu = run(Device::cpu()), gpu = run(kCuda);
  for (size_t i = 0; i < cpu.size(); ++i) EXPECT_TRUE(close(gpu[i], cpu[i], 1e-6)) << "output " << i;
}

}  // namespace
