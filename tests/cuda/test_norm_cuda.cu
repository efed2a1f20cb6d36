// CUDA layer_norm / rms_norm, RoPE and fused GeGLU against the CPU reference ops: forward,
// backward (the pure ops and through autograd), every float dtype, row sizes of the model and odd
// ones (1, 72, 4304, 257216), aligned and unaligned inputs.
//
// Every input is a fresh random draw; the allocator's cache is poisoned (NaN) right before each
// CUDA op runs, so an element a kernel forgets to write fails the comparison. References are the
// CPU op in the same dtype, except for fp32 rows too long for the CPU's sequential fp32 sums to be
// a 1e-5 reference (> 16384 elements): there the CPU op runs in f64 and is rounded to f32.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

constexpr int64_t kLongRow = 16384;

Tensor dev(const Tensor& t) { return t.defined() ? t.to(kCuda) : Tensor(); }
Tensor as(const Tensor& t, DType dt) { return t.defined() ? t.to(dt) : Tensor(); }

struct NormCase {
  int64_t rows, D;
};
const std::vector<NormCase> kNormCases = {{1, 1},    {7, 72},   {33, 1152}, {65, 2048}, {40, 2304},
                                          {5, 4304}, {3, 4303}, {2, 257216}, {300, 8}};

// ---- norms ----

// rms_bias: rms_norm's backward also given a bias (the op allows one; layer_norm has one when affine).
void check_norm(bool layer, DType dt, DType wdt, const NormCase& c, bool affine, double offset, bool rms_bias = false) {
  const bool with_bias = affine && (layer || rms_bias);
  SCOPED_TRACE(str_cat(layer ? "layer_norm " : "rms_norm ", dtype_name(dt), " weight ", dtype_name(wdt), " rows ",
                       c.rows, " D ", c.D, affine ? " affine" : "", with_bias ? " bias" : "", " offset ", offset));
  const double eps = 1e-6;
  Tensor x = rnd({c.rows, c.D}, DType::f64, -3, 3), g = rnd({c.rows, c.D}, DType::f64);
  Tensor w = affine ? rnd({c.D}, DType::f64, -1, 1) : Tensor(), b = with_bias ? rnd({c.D}, DType::f64) : Tensor();
  auto fwd = [&](const Tensor& xx, const Tensor& ww, const Tensor& bb) {
    return layer ? ops::layer_norm(xx, ww, bb, eps) : ops::rms_norm(xx, ww, eps, offset);
  };
  auto bwd = [&](const Tensor& gg, const Tensor& xx, const Tensor& ww, const Tensor& bb) {
    return ops::norm_backward(gg, xx, ww, bb, eps, layer, layer ? 0.0 : offset);
  };
  // Inputs as the op sees them (x in dt, weight/bias in wdt), then the reference.
  Tensor xd = x.to(dt), gd = g.to(dt), wd = as(w, wdt), bd = as(b, wdt);
  const bool wide = dt == DType::f32 && c.D > kLongRow;  // reference in f64, see the file comment
  const DType f64 = DType::f64;
  Tensor y_ref = wide ? fwd(xd.to(f64), as(wd, f64), as(bd, f64)).to(dt) : fwd(xd, wd, bd);
  ops::NormGrads gr_ref = bwd(gd, xd, wd, bd);
  if (wide) {
    ops::NormGrads r64 = bwd(gd.to(f64), xd.to(f64), as(wd, f64), as(bd, f64));
    gr_ref = {r64.x.to(dt), as(r64.weight, wdt), as(r64.bias, wdt)};
  }
  Tensor xc = dev(xd), gc = dev(gd), wc = dev(wd), bc = dev(bd);
  poison_for(xd, 6);
  Tensor y = fwd(xc, wc, bc);
  ASSERT_EQ(y.dtype(), dt);
  ASSERT_TRUE(close(y.cpu(), y_ref, tol_for(dt))) << "forward";
  poison_for(xd, 6);
  ops::NormGrads gr = bwd(gc, xc, wc, bc);
  ASSERT_TRUE(close(gr.x.cpu(), gr_ref.x, tol_for(dt))) << "dx";
  ASSERT_EQ(gr.weight.defined(), affine);
  ASSERT_EQ(gr.bias.defined(), with_bias);
  // Weight gradients are sums over rows: fp32 partials on the device vs a double sum on the CPU.
  const double wtol = std::max(tol_for(wdt), tol_for(dt));
  if (affine) ASSERT_TRUE(close(gr.weight.cpu(), gr_ref.weight, wtol)) << "dweight";
  if (with_bias) ASSERT_TRUE(close(gr.bias.cpu(), gr_ref.bias, wtol)) << "dbias";
}

TEST(GpuNorm, RmsNormForwardBackwardAllDtypesAndSizes) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64})
    for (const NormCase& c : kNormCases) {
      check_norm(false, dt, dt, c, true, 1.0);  // Gemma: (1 + w)
      check_norm(false, dt, dt, c, true, 0.0);
    }
  check_norm(false, DType::f32, DType::f32, {9, 72}, false, 0.0);  // no weight
}

TEST(GpuNorm, LayerNormForwardBackwardAllDtypesAndSizes) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64})
    for (const NormCase& c : kNormCases) check_norm(true, dt, dt, c, true, 0.0);
  check_norm(true, DType::f32, DType::f32, {9, 1152}, false, 0.0);
}

TEST(GpuNorm, Fp32WeightsNextToBf16Activations) {
  TQ_REQUIRE_GPU();
  for (const NormCase& c : {NormCase{33, 1152}, NormCase{65, 2048}, NormCase{4, 2304}, NormCase{3, 4303}}) {
    check_norm(false, DType::bf16, DType::f32, c, true, 1.0);
    check_norm(true, DType::bf16, DType::f32, c, true, 0.0);
    check_norm(true, DType::f32, DType::bf16, c, true, 0.0);
  }
}

TEST(GpuNorm, ManyRowsAndStridedOrUnalignedInputs) {
  TQ_REQUIRE_GPU();
  // Many rows per block in the backward (the partial-sum path), and a 3-D input.
  check_norm(false, DType::bf16, DType::bf16, {4576, 2048}, true, 1.0);
  check_norm(true, DType::f32, DType::f32, {4096, 72}, true, 0.0);
  Tensor x = rnd({4, 300, 2304}, DType::bf16), w = rnd({2304}, DType::f32, -0.5, 0.5);
  poison_for(x);
  EXPECT_TRUE(close(ops::rms_norm(dev(x), dev(w), 1e-6, 1.0).cpu(), ops::rms_norm(x, w, 1e-6, 1.0), 1e-2));
  // A transposed view, and a view starting one element in (no 16-byte alignment).
  Tensor xt = rnd({1152, 40}, DType::f32);
  EXPECT_TRUE(close(ops::layer_norm(dev(xt).t(), Tensor(), Tensor(), 1e-6).cpu(),
                    ops::layer_norm(xt.t(), Tensor(), Tensor(), 1e-6), 1e-5));
  Tensor xu = rnd({5 * 1152 + 1}, DType::bf16), wu = rnd({1152}, DType::bf16);
  Tensor xv = xu.slice(0, 1, 5 * 1152 + 1).view({5, 1152}), xvd = dev(xu).slice(0, 1, 5 * 1152 + 1).view({5, 1152});
  EXPECT_TRUE(close(ops::layer_norm(xvd, dev(wu), dev(wu), 1e-6).cpu(), ops::layer_norm(xv, wu, wu, 1e-6), 1e-2));
  Tensor gu = rnd({5, 1152}, DType::f32);  // a gradient of another dtype than x
  ops::NormGrads a = ops::norm_backward(dev(gu), xvd, dev(wu), Tensor(), 1e-6, false, 1.0);
  ops::NormGrads r = ops::norm_backward(gu, xv, wu, Tensor(), 1e-6, false, 1.0);
  EXPECT_TRUE(close(a.x.cpu(), r.x, 1e-2));
  EXPECT_TRUE(close(a.weight.cpu(), r.weight, 1e-2));
  // rms_norm backward with a bias: the uncentered warp-kernel instance that also sums g per column.
  check_norm(false, DType::bf16, DType::f32, {300, 2048}, true, 1.0, true);
}

TEST(GpuNorm, AutogradMatchesCpu) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = rnd({37, 2304}, dt), w = rnd({2304}, DType::f32, -0.5, 0.5), b = rnd({2304}, DType::f32);
    Tensor g = rnd({37, 2304}, dt);
    auto run = [&](Device d) {
      Tensor xx = x.to(d).detach().requires_grad_(), ww = w.to(d).detach().requires_grad_(), bb = b.to(d).detach().requires_grad_();
      Tensor y = rms_norm(layer_norm(xx, ww, bb, 1e-6), ww, 1e-6, 1.0);
      y.backward(g.to(d));
      return std::vector<Tensor>{y.detach().cpu(), xx.grad().cpu(), ww.grad().cpu(), bb.grad().cpu()};
    };
    auto cpu = run(Device::cpu()), gpu = run(kCuda);
    for (size_t i = 0; i < cpu.size(); ++i) EXPECT_TRUE(close(gpu[i], cpu[i], tol_for(dt))) << "output " << i;
  }
}

TEST(GpuNorm, ZeroRows) {
  TQ_REQUIRE_GPU();
  Tensor x = Tensor::empty({0, 72}, DType::f32, kCuda), w = dev(rnd({72}, DType::f32));
  EXPECT_EQ(ops::rms_norm(x, w, 1e-6, 1.0).numel(), 0);
  ops::NormGrads gr = ops::norm_backward(x, x, w, w, 1e-6, true, 0.0);
  EXPECT_TRUE(close(gr.weight.cpu(), Tensor::zeros({72}, DType::f32), 0.0));
  EXPECT_TRUE(close(gr.bias.cpu(), Tensor::zeros({72}, DType::f32), 0.0));
}

// ---- RoPE ----

Tensor random_positions(int64_t B, int64_t T, int64_t hi) {
  return rnd({B, T}, DType::f64, 0, double(hi)).to(DType::i64);
}

TEST(GpuRope, ForwardBackwardMatchCpu) {
  TQ_REQUIRE_GPU();
  struct Case {
    Shape x;
    int64_t Bp;
  };
  const std::vector<Case> cases = {{{2, 8, 286, 256}, 2}, {{3, 1, 17, 256}, 1}, {{1, 16, 5, 72}, 1},
                                   {{2, 3, 7, 6}, 2},     {{1, 1, 1, 2}, 1},    {{2, 2, 4, 1024}, 2}};
  for (DType dt : {DType::bf16, DType::f32, DType::f16, DType::f64})
    for (const Case& c : cases) {
      SCOPED_TRACE(str_cat(dtype_name(dt), " x ", c.x, " Bp ", c.Bp));
      Tensor x = rnd(c.x, dt), g = rnd(c.x, dt);
      Tensor pos = random_positions(c.Bp, c.x[2], 9000);  // large angles exercise the cos/sin rounding
      Tensor ref = ops::rope(x, pos, 10000.0), gref = ops::rope_backward(g, pos, 10000.0);
      Tensor xd = dev(x), gd = dev(g), pd = dev(pos);
      poison_for(x, 4);
      // f64 keeps the fp32 cos/sin: a last-bit difference of the device's double cos can move
      // one fp32 rounding, a 6e-8 relative difference that 1e-6 allows.
      const double tol = dt == DType::f64 ? 1e-6 : tol_for(dt);
      ASSERT_TRUE(close(ops::rope(xd, pd, 10000.0).cpu(), ref, tol)) << "forward";
      poison_for(x, 4);
      ASSERT_TRUE(close(ops::rope_backward(gd, pd, 10000.0).cpu(), gref, tol)) << "backward";
    }
}

TEST(GpuRope, F32MatchesTightlyAndPositionsMayBe1DOrI32) {
  TQ_REQUIRE_GPU();
  // f32 uses the CPU's cos/sin (up to the last double bit) and never fuses a product into an add.
  Tensor x = rnd({2, 4, 286, 256}, DType::f32);
  Tensor pos = Tensor::arange(286, DType::i64).reshape({1, 286});
  Tensor ref = ops::rope(x, pos, 10000.0);
  EXPECT_TRUE(close(ops::rope(dev(x), dev(pos), 10000.0).cpu(), ref, 1e-6));
  Tensor p1 = Tensor::arange(286, DType::i32);  // (T) i32, shared by the batch
  EXPECT_TRUE(close(ops::rope(dev(x), dev(p1), 10000.0).cpu(), ref, 1e-6));
  // Strided input (a head permute view).
  Tensor xs = rnd({2, 286, 4, 256}, DType::bf16);
  EXPECT_TRUE(close(ops::rope(dev(xs).permute({0, 2, 1, 3}), dev(pos), 10000.0).cpu(),
                    ops::rope(xs.permute({0, 2, 1, 3}), pos, 10000.0), 1e-2));
}

TEST(GpuRope, AutogradMatchesCpu) {
  TQ_REQUIRE_GPU();
  Tensor x = rnd({2, 8, 31, 256}, DType::bf16), g = rnd({2, 8, 31, 256}, DType::bf16);
  Tensor pos = random_positions(2, 31, 400);
  auto run = [&](Device d) {
    Tensor xx = x.to(d).detach().requires_grad_();
    Tensor y = rope(xx, pos.to(d), 10000.0);
    y.backward(g.to(d));
    return std::pair<Tensor, Tensor>{y.detach().cpu(), xx.grad().cpu()};
  };
  auto [yc, gc] = run(Device::cpu());
  auto [yg, gg] = run(kCuda);
  EXPECT_TRUE(close(yg, yc, 1e-2));
  EXPECT_TRUE(close(gg, gc, 1e-2));
}

// ---- GeGLU ----

TEST(GpuGeglu, ForwardBackwardMatchCpu) {
  TQ_REQUIRE_GPU();
  std::vector<Shape> shapes;
  for (int64_t n : kSizes) shapes.push_back({n});
  shapes.push_back({72, 4304});
  shapes.push_back({3, 5, 7});
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64})
    for (const Shape& s : shapes) {
      SCOPED_TRACE(str_cat(dtype_name(dt), " shape ", s));
      Tensor a = rnd(s, dt, -6, 6), u = rnd(s, dt), g = rnd(s, dt);
      Tensor ref = ops::geglu(a, u);
      ops::GegluGrads gref = ops::geglu_backward(g, a, u);
      Tensor ad = dev(a), ud = dev(u), gd = dev(g);
      poison_for(a, 6);
      ASSERT_TRUE(close(ops::geglu(ad, ud).cpu(), ref, tol_for(dt))) << "forward";
      poison_for(a, 6);
      ops::GegluGrads gr = ops::geglu_backward(gd, ad, ud);
      ASSERT_TRUE(close(gr.gate.cpu(), gref.gate, tol_for(dt))) << "d gate";
      ASSERT_TRUE(close(gr.up.cpu(), gref.up, tol_for(dt))) << "d up";
    }
}

TEST(GpuGeglu, UnalignedStridedAndMixedGradient) {
  TQ_REQUIRE_GPU();
  Tensor a = rnd({4305}, DType::bf16), u = rnd({4305}, DType::bf16);
  Tensor av = a.slice(0, 1, 4305), uv = u.slice(0, 0, 4304);
  EXPECT_TRUE(close(ops::geglu(dev(a).slice(0, 1, 4305), dev(u).slice(0, 0, 4304)).cpu(), ops::geglu(av, uv), 1e-2));
  Tensor at = rnd({4304, 72}, DType::f32), ut = rnd({72, 4304}, DType::f32);
  EXPECT_TRUE(close(ops::geglu(dev(at).t(), dev(ut)).cpu(), ops::geglu(at.t(), ut), 1e-5));
  Tensor g32 = rnd({4304}, DType::f32);  // f32 gradient of bf16 activations
  ops::GegluGrads r = ops::geglu_backward(g32, av, uv);
  ops::GegluGrads d = ops::geglu_backward(dev(g32), dev(a).slice(0, 1, 4305), dev(u).slice(0, 0, 4304));
  EXPECT_TRUE(close(d.gate.cpu(), r.gate, 1e-2));
  EXPECT_TRUE(close(d.up.cpu(), r.up, 1e-2));
}

TEST(GpuGeglu, AutogradMatchesCpuAndTheUnfusedPath) {
  TQ_REQUIRE_GPU();
  Tensor a = rnd({72, 1024}, DType::f32, -5, 5), u = rnd({72, 1024}, DType::f32), g = rnd({72, 1024}, DType::f32);
  auto run = [&](Device d, bool fused) {
    Tensor aa = a.to(d).detach().requires_grad_(), uu = u.to(d).detach().requires_grad_();
    Tensor y = fused ? geglu(aa, uu) : gelu(aa, true) * uu;
    y.backward(g.to(d));
    return std::vector<Tensor>{y.detach().cpu(), aa.grad().cpu(), uu.grad().cpu()};
  };
  auto cpu = run(Device::cpu(), true), gpu = run(kCuda, true), unfused = run(kCuda, false);
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_TRUE(close(gpu[i], cpu[i], 1e-5)) << "output " << i;
    EXPECT_TRUE(close(gpu[i], unfused[i], 1e-5)) << "output " << i << " vs unfused";
  }
}

}  // namespace
