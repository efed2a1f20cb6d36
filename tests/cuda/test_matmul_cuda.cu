// ops::matmul / linear on CUDA against the CPU reference: every float dtype (bf16 through our
// GEMM, f32/f64/f16 through the SIMT kernel), every transpose combination, 1-D operands, numpy
// batch broadcasting (folded into one GEMM or one per entry), strided, sliced and misaligned
// views, empty and K = 0 products, mixed dtypes, the fused bias epilogue of linear, gradients
// through autograd, and a CUDA graph capture (no hidden host synchronization).
//
// Inputs are fresh random draws; the allocator's cache is poisoned (NaN) right before each op so
// an output element the kernels never write shows up.
#include <gtest/gtest.h>

#include <functional>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

const DType kFloatDtypes[] = {DType::bf16, DType::f32, DType::f64, DType::f16};

// The same op on the CPU and (after poisoning the pool) on CUDA; compares at the dtype's tolerance.
void expect_same(const std::function<Tensor(const Tensor&, const Tensor&)>& op, const Tensor& a, const Tensor& b,
                 double rtol) {
  const Tensor ref = op(a, b);
  const Tensor ad = a.to(kCuda), bd = b.to(kCuda);
  poison_for(ref, 8);
  const Tensor got = op(ad, bd);
  ASSERT_TRUE(got.device().is_cuda());
  EXPECT_TRUE(close(got.cpu(), ref, rtol));
}

// (M, K, N) triples: 1, tile remainders, K not a multiple of 8, a model-sized K and a vocabulary N.
struct Mkn {
  int64_t M, K, N;
};
const Mkn kShapes[] = {{1, 72, 1}, {1, 1, 1}, {72, 72, 72}, {37, 77, 129}, {130, 264, 200}, {7, 4304, 72}, {5, 72, 4304}};

TEST(GpuMatmul, EveryDtypeAndTransposeMatchesCpu) {
  TQ_REQUIRE_GPU();
  for (DType dt : kFloatDtypes)
    for (const Mkn& s : kShapes)
      for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
          SCOPED_TRACE(str_cat(dt, " M=", s.M, " K=", s.K, " N=", s.N, " ta=", ta, " tb=", tb));
          const Tensor a = rnd(ta ? Shape{s.K, s.M} : Shape{s.M, s.K}, dt);
          const Tensor b = rnd(tb ? Shape{s.N, s.K} : Shape{s.K, s.N}, dt);
          expect_same([&](const Tensor& x, const Tensor& y) { return ops::matmul(x, y, ta, tb); }, a, b, tol_for(dt));
        }
}

TEST(GpuMatmul, VocabularyWideAndModelShapes) {
  TQ_REQUIRE_GPU();
  // The tied lm_head's shape (N = 257216), and a Gemma projection through the sm90 kernel.
  const Tensor h = rnd({7, 72}, DType::bf16), emb = rnd({257216, 72}, DType::bf16, -0.5, 0.5);
  expect_same([](const Tensor& x, const Tensor& y) { return ops::matmul(x, y, false, true); }, h, emb, 1e-2);
  const Tensor x = rnd({416, 2048}, DType::bf16, -1, 1), w = rnd({2304, 2048}, DType::bf16, -1, 1);
  expect_same([](const Tensor& p, const Tensor& q) { return ops::matmul(p, q, false, true); }, x, w, 1e-2);
  expect_same([](const Tensor& p, const Tensor& q) { return ops::matmul(p, q, true, false); }, x, x.narrow(1, 0, 264),
              1e-2);  // a weight-gradient shape: (K = 416)ᵀ
  // dw 4544/2048/256 of bench_gemm: C (256, 2048) = dYᵀ·X with K = 4544 (split-K in one wave).
  const Tensor dy = rnd({4544, 256}, DType::bf16, -1, 1), xs = rnd({4544, 2048}, DType::bf16, -1, 1);
  expect_same([](const Tensor& p, const Tensor& q) { return ops::matmul(p, q, true, false); }, dy, xs, 1e-2);
}

TEST(GpuMatmul, VectorsAndBroadcastBatches) {
  TQ_REQUIRE_GPU();
  for (DType dt : kFloatDtypes) {
    SCOPED_TRACE(str_cat(dt));
    const double tol = tol_for(dt);
    auto mm = [](const Tensor& x, const Tensor& y) { return ops::matmul(x, y); };
    expect_same(mm, rnd({72}, dt), rnd({72, 33}, dt), tol);                    // vector · matrix
    expect_same(mm, rnd({33, 72}, dt), rnd({72}, dt), tol);                    // matrix · vector
    expect_same(mm, rnd({4304}, dt, 0.1, 1), rnd({4304}, dt, 0.1, 1), tol);    // dot product → () (no cancellation)
    expect_same(mm, rnd({3, 41, 72}, dt), rnd({72, 24}, dt), tol);             // shared right operand (folded)
    expect_same(mm, rnd({3, 1, 9, 40}, dt), rnd({2, 40, 17}, dt), tol);        // both sides broadcast
    expect_same(mm, rnd({1, 9, 40}, dt), rnd({4, 40, 17}, dt), tol);           // shared left operand
    expect_same([](const Tensor& x, const Tensor& y) { return ops::matmul(x, y, true, true); }, rnd({2, 3, 40, 9}, dt),
                rnd({3, 17, 40}, dt), tol);
  }
}

// Views the GEMM reads in place (transposed, sliced columns, batch-permuted) and views it cannot
// (misaligned starts, inner stride ≠ 1), which go through a copy or its SIMT fallback.
TEST(GpuMatmul, StridedAndMisalignedViews) {
  TQ_REQUIRE_GPU();
  for (DType dt : kFloatDtypes) {
    SCOPED_TRACE(str_cat(dt));
    const double tol = tol_for(dt);
    const Tensor big = rnd({96, 264}, dt), other = rnd({264, 80}, dt);
    auto on = [](const std::function<Tensor(const Tensor&)>& view) {
      return [view](const Tensor& x, const Tensor& y) { return ops::matmul(view(x), y); };
    };
    // a.t() of a (264, 96) slab: column-major A, no copy.
    expect_same([](const Tensor& x, const Tensor& y) { return ops::matmul(x.t(), y.narrow(0, 0, 96)); }, big, other, tol);
    // sliced columns: ld = 264 > K = 200; misaligned start (column 3); every other row.
    expect_same(on([](const Tensor& x) { return x.narrow(1, 0, 200); }), big, other.narrow(0, 0, 200), tol);
    expect_same(on([](const Tensor& x) { return x.narrow(1, 3, 200); }), big, other.narrow(0, 0, 200), tol);
    expect_same(on([](const Tensor& x) { return x.slice(0, 0, 96, 2); }), big, other, tol);
    expect_same(on([](const Tensor& x) { return x.slice(1, 0, 264, 2); }), big, other.narrow(0, 0, 132), tol);
    // a batch dim permuted behind the rows: (B, M, K) view of an (M, B, K) tensor.
    expect_same([](const Tensor& x, const Tensor& y) { return ops::matmul(x.permute({1, 0, 2}), y); },
                rnd({12, 5, 40}, dt), rnd({40, 72}, dt), tol);
  }
}

TEST(GpuMatmul, EmptyAndZeroInnerProducts) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(str_cat(dt));
    auto mm = [](const Tensor& x, const Tensor& y) { return ops::matmul(x, y); };
    expect_same(mm, rnd({0, 72}, dt), rnd({72, 9}, dt), 0);
    expect_same(mm, rnd({9, 72}, dt), rnd({72, 0}, dt), 0);
    expect_same(mm, rnd({0, 9, 72}, dt), rnd({72, 9}, dt), 0);
    poison_pool(1 << 16);
    const Tensor z = ops::matmul(Tensor::empty({9, 0}, dt, kCuda), Tensor::empty({0, 7}, dt, kCuda));  // K = 0
    ASSERT_EQ(z.shape(), (Shape{9, 7}));
    for (double v : z.to_vector<double>()) EXPECT_EQ(v, 0.0);
  }
}

TEST(GpuMatmul, MixedDtypesPromoteLikeTheCpu) {
  TQ_REQUIRE_GPU();
  auto mm = [](const Tensor& x, const Tensor& y) { return ops::matmul(x, y); };
  expect_same(mm, rnd({33, 72}, DType::bf16), rnd({72, 40}, DType::f32), 1e-5);  // → f32
  expect_same(mm, rnd({33, 72}, DType::bf16), rnd({72, 40}, DType::f16), 1e-5);  // → f32
  expect_same(mm, rnd({33, 72}, DType::f32), rnd({72, 40}, DType::f64), 1e-10);  // → f64
  const Tensor r = ops::matmul(rnd({3, 4}, DType::bf16).to(kCuda), rnd({4, 5}, DType::f16).to(kCuda));
  EXPECT_EQ(r.dtype(), DType::f32);
}

// linear with a bias: fused into the GEMM epilogue on CUDA (fp32 add before the one rounding).
TEST(GpuLinear, FusedBiasMatchesCpu) {
  TQ_REQUIRE_GPU();
  struct Case {
    DType x, bias;
  };
  for (Case c : {Case{DType::bf16, DType::bf16}, Case{DType::bf16, DType::f32}, Case{DType::f32, DType::f32},
                 Case{DType::f32, DType::bf16}, Case{DType::f16, DType::f16}, Case{DType::f16, DType::f32},
                 Case{DType::f64, DType::f64}})
    for (const Mkn& s : {Mkn{1, 72, 1152}, Mkn{130, 1152, 264}, Mkn{37, 77, 129}}) {
      SCOPED_TRACE(str_cat("x ", c.x, " bias ", c.bias, " M=", s.M, " K=", s.K, " N=", s.N));
      const Tensor x = rnd({2, s.M, s.K}, c.x, -1, 1), w = rnd({s.N, s.K}, c.x, -1, 1), b = rnd({s.N}, c.bias);
      const double tol = std::max(tol_for(c.x), tol_for(c.bias));
      Tensor g;  // the incoming gradient: drawn by the CPU run, reused on CUDA
      auto run = [&](const Device& d) {
        Tensor xl = x.detach().to(d).requires_grad_(true), wl = w.detach().to(d).requires_grad_(true);
        Tensor bl = b.detach().to(d).requires_grad_(true);
        Tensor y = linear(xl, wl, bl);
        if (!g.defined()) g = rnd(y.shape(), y.dtype());
        y.backward(g.to(d));
        return std::vector<Tensor>{y, xl.grad(), wl.grad(), bl.grad()};
      };
      const std::vector<Tensor> ref = run(Device::cpu());
      poison_for(ref[0], 8);
      const std::vector<Tensor> got = run(kCuda);
      // y: the CPU rounds x·Wᵀ to the operands' dtype before adding the bias, the GEMM epilogue
      // adds in fp32 and rounds once, so y is compared with the exact float64 value rounded once;
      // the gradients are the same formulas on both devices.
      const Tensor exact = linear(x.to(DType::f64), w.to(DType::f64), b.to(DType::f64)).to(ref[0].dtype());
      EXPECT_EQ(got[0].dtype(), ref[0].dtype());
      EXPECT_TRUE(close(got[0].cpu(), exact, tol)) << "y";
      const char* names[] = {"y", "dx", "dw", "db"};
      for (size_t i = 1; i < ref.size(); ++i) EXPECT_TRUE(close(got[i].cpu(), ref[i], tol)) << names[i];
    }
}

// Gradients of the differentiable matmul on CUDA (broadcast batch reduced by sum_to_shape), and
// only for the inputs that require them.
TEST(GpuMatmul, GradientsThroughAutogradMatchCpu) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        SCOPED_TRACE(str_cat(dt, " ta=", ta, " tb=", tb));
        const Tensor a = rnd(ta ? Shape{3, 72, 41} : Shape{3, 41, 72}, dt, -1, 1);
        const Tensor b = rnd(tb ? Shape{130, 72} : Shape{72, 130}, dt, -1, 1);
        const Tensor g = rnd({3, 41, 130}, dt);
        auto run = [&](const Device& d, bool need_b) {
          Tensor al = a.detach().to(d).requires_grad_(true), bl = b.detach().to(d).requires_grad_(need_b);
          matmul(al, bl, ta, tb).backward(g.to(d));
          return std::vector<Tensor>{al.grad(), bl.grad()};
        };
        const auto ref = run(Device::cpu(), true);
        poison_for(ref[0], 8);
        const auto got = run(kCuda, true);
        EXPECT_TRUE(close(got[0].cpu(), ref[0], tol_for(dt)));
        EXPECT_TRUE(close(got[1].cpu(), ref[1], tol_for(dt)));
        EXPECT_FALSE(run(kCuda, false)[1].defined());  // a frozen operand gets no gradient product
      }
}

// Products inside a CUDA graph capture: any host synchronization would break the capture.
TEST(GpuGraph, MatmulAndLinearCaptureAndReplay) {
  TQ_REQUIRE_GPU();
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  Tensor x = Tensor::empty({130, 264}, DType::bf16, kCuda), w = Tensor::empty({72, 264}, DType::bf16, kCuda);
  Tensor b = Tensor::empty({72}, DType::f32, kCuda), xf = Tensor::empty({33, 77}, DType::f32, kCuda);
  Tensor y = Tensor::empty({130, 72}, DType::f32, kCuda), yf = Tensor::empty({33, 72}, DType::f32, kCuda);
  auto step = [&] {
    NoGradGuard ng;
    y.copy_(linear(x, w, b));
    yf.copy_(ops::matmul(xf, w.narrow(1, 0, 77).to(DType::f32), false, true));
  };
  auto fill = [&](Tensor& xc, Tensor& wc, Tensor& bc, Tensor& xfc) {
    xc = rnd({130, 264}, DType::bf16), wc = rnd({72, 264}, DType::bf16), bc = rnd({72}, DType::f32);
    xfc = rnd({33, 77}, DType::f32);
    x.copy_(xc), w.copy_(wc), b.copy_(bc), xf.copy_(xfc);
  };
  Tensor xc, wc, bc, xfc;
  fill(xc, wc, bc, xfc);
  step();  // warm-up: module loading, GEMM attributes, pool growth happen outside the capture
  stream.synchronize();
  const CapturedGraph graph(stream.get(), [&] { step(); });
  for (int replay = 0; replay < 2; ++replay) {
    SCOPED_TRACE(str_cat("replay ", replay));
    fill(xc, wc, bc, xfc);
    y.fill_(NAN), yf.fill_(NAN);
    graph.launch();
    stream.synchronize();
    EXPECT_TRUE(close(y.cpu(), linear(xc, wc, bc), 1e-2));
    EXPECT_TRUE(close(yf.cpu(), ops::matmul(xfc, wc.narrow(1, 0, 77).to(DType::f32), false, true), 1e-5));
  }
}

}  // namespace
