// GPU GEMM tests: every kernel path (sm90 wgmma/TMA, sm80 mma.sync, skinny, SIMT) and every
// transpose combination against a float64 CPU reference on fresh random inputs, at shapes that
// are not tile multiples, outputs poisoned (NaN) before each run; large model shapes through the
// automatic dispatch against a cuBLASLt fp32-output result.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <kernels/gemm/gemm.cuh>
#include <tests/cuda/gemm_test_util.cuh>

namespace {

using tq::kernels::GemmDType;
using tq::kernels::GemmKernel;
using tq::kernels::GemmParams;
using tq::kernels::GemmSplitReduce;
using tq::testing::DevBuf;

#define TQ_SKIP_WITHOUT_GPU() \
  if (!tq::testing::gpu_present()) GTEST_SKIP() << "no CUDA device"

struct Case {
  int M, N, K;
  bool ta, tb;
  GemmKernel kernel = GemmKernel::auto_select;
  bool out_f32 = false;
  float alpha = 1.0f, beta = 0.0f;
  bool bias = false, bias_f32 = true, residual = false;
  int split_k = 0, tile_n = 0;
  GemmSplitReduce split_reduce = GemmSplitReduce::auto_select;
  int pad = 8;  // leading dimensions = row length rounded up to 8, plus pad
  std::string str() const {
    return tq::str_cat("M=", M, " N=", N, " K=", K, " ta=", ta, " tb=", tb, " kernel=",
                       static_cast<int>(kernel), " f32out=", out_f32, " alpha=", alpha,
                       " beta=", beta, " bias=", bias, " residual=", residual,  " split_k=", split_k,
                       " split_reduce=", static_cast<int>(split_reduce), " tile_n=", tile_n, " pad=", pad);
  }
};

int64_t ld_for(int cols, int pad) { return (cols + 7) / 8 * 8 + pad; }

// Worst element error relative to rtol*|ref| + atol*rms(ref); <= 1 passes. NaN fails.
struct Err {
  double worst = 0, rel_fro = 0;
  int64_t bad_index = -1;
};
Err compare(const std::vector<float>& out, const std::vector<double>& ref, int M, int N,
            int64_t ldo, double rtol, double atol_rms) {
  double ss = 0, se = 0;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) ss += ref[size_t(m) * N + n] * ref[size_t(m) * N + n];
  const double rms = std::sqrt(ss / (double(M) * N));
  Err e;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      const double r = ref[size_t(m) * N + n], o = out[size_t(m) * ldo + n];
      const double d = std::fabs(o - r);
      se += d * d;
      const double q = std::isfinite(o) ? d / (rtol * std::fabs(r) + atol_rms * rms + 1e-30) : 1e30;
      if (!(q <= e.worst)) {
        e.worst = q;
        e.bad_index = int64_t(m) * N + n;
      }
    }
  e.rel_fro = std::sqrt(se / (ss + 1e-300));
  return e;
}

struct Problem {
  Case c;
  int64_t lda, ldb, ldc, ldr;
  DevBuf A, B, C, bias, R;
  GemmParams p;

  explicit Problem(const Case& cs) : c(cs) {
    const int a_rows = c.ta ? c.K : c.M, a_cols = c.ta ? c.M : c.K;
    const int b_rows = c.tb ? c.N : c.K, b_cols = c.tb ? c.K : c.N;
    lda = ld_for(a_cols, c.pad);
    ldb = ld_for(b_cols, c.pad);
    ldc = ld_for(c.N, c.pad);
    ldr = ld_for(c.N, c.pad + 8);
    const size_t osz = c.out_f32 ? 4 : 2;
    A = DevBuf(size_t(a_rows) * lda * 2);
    B = DevBuf(size_t(b_rows) * ldb * 2);
    C = DevBuf(size_t(c.M) * ldc * osz);
    tq::testing::fill_bf16(A.as(), size_t(a_rows) * lda, tq::testing::fresh_seed());
    tq::testing::fill_bf16(B.as(), size_t(b_rows) * ldb, tq::testing::fresh_seed());
    if (c.beta != 0.0f) {
      if (c.out_f32) tq::testing::fill_f32(C.as(), size_t(c.M) * ldc, tq::testing::fresh_seed(), 4.0f);
      else tq::testing::fill_bf16(C.as(), size_t(c.M) * ldc, tq::testing::fresh_seed(), 4.0f);
    } else {
      tq::testing::poison(C.as(), C.bytes());
    }
    if (c.bias) {
      bias = DevBuf(size_t(c.N) * (c.bias_f32 ? 4 : 2));
      if (c.bias_f32) tq::testing::fill_f32(bias.as(), c.N, tq::testing::fresh_seed(), 2.0f);
      else tq::testing::fill_bf16(bias.as(), c.N, tq::testing::fresh_seed(), 2.0f);
    }
    if (c.residual) {
      R = DevBuf(size_t(c.M) * ldr * osz);
      if (c.out_f32) tq::testing::fill_f32(R.as(), size_t(c.M) * ldr, tq::testing::fresh_seed(), 3.0f);
      else tq::testing::fill_bf16(R.as(), size_t(c.M) * ldr, tq::testing::fresh_seed(), 3.0f);
    }
    p.M = c.M, p.N = c.N, p.K = c.K;
    p.A = A.as<__nv_bfloat16>(), p.lda = lda, p.trans_a = c.ta;
    p.B = B.as<__nv_bfloat16>(), p.ldb = ldb, p.trans_b = c.tb;
    p.C = C.as(), p.ldc = ldc, p.c_dtype = c.out_f32 ? GemmDType::f32 : GemmDType::bf16;
    p.alpha = c.alpha, p.beta = c.beta;
    p.bias = c.bias ? bias.as() : nullptr;
    p.bias_dtype = c.bias_f32 ? GemmDType::f32 : GemmDType::bf16;
    p.residual = c.residual ? R.as() : nullptr, p.ldr = ldr;
    p.kernel = c.kernel, p.split_k = c.split_k, p.tile_n = c.tile_n, p.split_reduce = c.split_reduce;
  }

  // float64 reference of the whole epilogue, from the device inputs (C read before the run).
  std::vector<double> reference() const {
    const int a_rows = c.ta ? c.K : c.M, b_rows = c.tb ? c.N : c.K;
    const auto a = tq::testing::to_host_f32(A.as(), size_t(a_rows) * lda, false);
    const auto b = tq::testing::to_host_f32(B.as(), size_t(b_rows) * ldb, false);
    std::vector<float> c0, bi, r;
    if (c.beta != 0.0f) c0 = tq::testing::to_host_f32(C.as(), size_t(c.M) * ldc, c.out_f32);
    if (c.bias) bi = tq::testing::to_host_f32(bias.as(), c.N, c.bias_f32);
    if (c.residual) r = tq::testing::to_host_f32(R.as(), size_t(c.M) * ldr, c.out_f32);
    std::vector<double> ref(size_t(c.M) * c.N);
    auto rows = [&](int m0, int m1) {
      std::vector<double> bcol(c.K);
      for (int n = 0; n < c.N; ++n) {
        for (int k = 0; k < c.K; ++k) bcol[k] = c.tb ? b[size_t(n) * ldb + k] : b[size_t(k) * ldb + n];
        for (int m = m0; m < m1; ++m) {
          double s = 0;
          for (int k = 0; k < c.K; ++k)
            s += double(c.ta ? a[size_t(k) * lda + m] : a[size_t(m) * lda + k]) * bcol[k];
          s *= c.alpha;
          if (c.bias) s += bi[n];
          if (c.beta != 0.0f) s += double(c.beta) * c0[size_t(m) * ldc + n];
          if (c.residual) s += r[size_t(m) * ldr + n];
          ref[size_t(m) * c.N + n] = s;
        }
      }
    };
    const int nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
    std::vector<std::thread> th;
    for (int t = 0; t < nt; ++t)
      th.emplace_back(rows, int(int64_t(c.M) * t / nt), int(int64_t(c.M) * (t + 1) / nt));
    for (auto& x : th) x.join();
    return ref;
  }

  std::vector<float> output() const {
    return tq::testing::to_host_f32(C.as(), size_t(c.M) * ldc, c.out_f32);
  }
};

void check_against_cpu(const Case& c) {
  SCOPED_TRACE(c.str());
  Problem pr(c);
  const auto ref = pr.reference();
  tq::kernels::gemm(pr.p, nullptr);
  TQ_CUDA_CHECK(cudaDeviceSynchronize());
  const auto out = pr.output();
  const double rtol = c.out_f32 ? 2e-5 : 8e-3, atol = c.out_f32 ? 2e-5 : 1e-3;
  const Err e = compare(out, ref, c.M, c.N, pr.ldc, rtol, atol);
  EXPECT_LE(e.worst, 1.0) << "worst element " << e.bad_index << " (row " << e.bad_index / c.N
                          << ", col " << e.bad_index % c.N << "), rel Frobenius " << e.rel_fro;
  EXPECT_LE(e.rel_fro, c.out_f32 ? 1e-5 : 5e-3);
}

bool sm90_here() { return tq::testing::gpu_present() && tq::kernels::gemm_sm90_available(); }

// A split-K case on sm90 through both reductions: the fp32 workspace + second kernel, and the
// thread-block cluster exchanging partials through distributed shared memory (2..8 splits).
void check_split_reduces(Case c) {
  c.split_reduce = GemmSplitReduce::global;
  check_against_cpu(c);
  if (c.split_k >= 2 && c.split_k <= 8) {
    c.split_reduce = GemmSplitReduce::cluster;
    check_against_cpu(c);
  }
}

const bool kLayouts[4][2] = {{false, true}, {false, false}, {true, false}, {true, true}};

TEST(GpuGemm, Sm90EveryLayoutAndTile) {
  TQ_SKIP_WITHOUT_GPU();
  if (!sm90_here()) GTEST_SKIP() << "not an sm_90 device with the sm_90a build";
  for (auto [ta, tb] : kLayouts)
    for (int tile_n : {128, 192, 256}) {
      check_against_cpu({.M = 200, .N = 328, .K = 1160, .ta = ta, .tb = tb,
                         .kernel = GemmKernel::sm90, .tile_n = tile_n});
      check_against_cpu({.M = 72, .N = 72, .K = 72, .ta = ta, .tb = tb,
                         .kernel = GemmKernel::sm90, .tile_n = tile_n});
    }
}

TEST(GpuGemm, Sm90SplitKAndPersistentTiles) {
  TQ_SKIP_WITHOUT_GPU();
  if (!sm90_here()) GTEST_SKIP() << "not an sm_90 device with the sm_90a build";
  for (auto [ta, tb] : kLayouts) {
    check_split_reduces({.M = 136, .N = 264, .K = 4304, .ta = ta, .tb = tb,
                         .kernel = GemmKernel::sm90, .split_k = 3, .tile_n = 128});
    // every cluster size, each width: rows of a tile split unevenly (128 / 3, / 5, / 7)
    for (int splits : {2, 5, 7, 8})
      check_split_reduces({.M = 200, .N = 520, .K = 1160, .ta = ta, .tb = tb, .kernel = GemmKernel::sm90,
                           .split_k = splits, .tile_n = splits == 2 ? 256 : splits == 5 ? 192 : 128});
    // more tiles than SMs: each persistent CTA runs several units through one barrier ring
    check_against_cpu({.M = 1136, .N = 2056, .K = 200, .ta = ta, .tb = tb,
                       .kernel = GemmKernel::sm90, .tile_n = 128});
  }
  check_split_reduces({.M = 4304, .N = 1152, .K = 136, .ta = true, .tb = false,
                       .kernel = GemmKernel::sm90, .split_k = 2, .tile_n = 256});
  for (auto [ta, tb] : kLayouts)
    for (int M : {1, 16}) {  // decoding sizes run here too on sm_90
      check_against_cpu({.M = M, .N = 4304, .K = 2048, .ta = ta, .tb = tb, .kernel = GemmKernel::sm90});
      check_split_reduces({.M = M, .N = 264, .K = 1152, .ta = ta, .tb = tb, .kernel = GemmKernel::sm90,
                           .split_k = 5});
    }
  // The TMA-store epilogue with alpha != 1, tails in M and N, several tiles per CTA; and the
  // same problem forced onto the generic epilogue by an fp32 output.
  for (auto [ta, tb] : kLayouts) {
    check_against_cpu({.M = 1100, .N = 1000, .K = 264, .ta = ta, .tb = tb, .kernel = GemmKernel::sm90,
                       .alpha = 0.75f, .tile_n = 192});
    check_against_cpu({.M = 1100, .N = 1000, .K = 264, .ta = ta, .tb = tb, .kernel = GemmKernel::sm90,
                       .out_f32 = true, .alpha = 0.75f, .tile_n = 256});
  }
  // N odd (B K-major allows it): the scalar store fallbacks of the epilogue and of split-K
  check_against_cpu({.M = 130, .N = 77, .K = 520, .ta = false, .tb = true, .kernel = GemmKernel::sm90,
                     .bias = true, .residual = true});
  check_split_reduces({.M = 130, .N = 77, .K = 520, .ta = false, .tb = true, .kernel = GemmKernel::sm90,
                       .out_f32 = true, .beta = 1.0f, .split_k = 3});
}

// The two split-K reductions add the same fp32 partials in the same order (split 0 first, from
// zero): their outputs must agree bit for bit, for bf16 and fp32 C, at a model shape the cost
// model splits (dw of a 256-wide projection) and with a full epilogue.
TEST(GpuGemm, Sm90SplitReducesAgreeBitwise) {
  TQ_SKIP_WITHOUT_GPU();
  if (!sm90_here()) GTEST_SKIP() << "not an sm_90 device with the sm_90a build";
  const Case cases[] = {
      {.M = 256, .N = 2048, .K = 4544, .ta = true, .tb = false, .kernel = GemmKernel::sm90, .split_k = 8},
      {.M = 1136, .N = 256, .K = 2048, .ta = false, .tb = true, .kernel = GemmKernel::sm90,
       .out_f32 = true, .alpha = 0.5f, .beta = 1.0f, .bias = true, .split_k = 6, .tile_n = 128}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.str());
    Problem pr(c);
    const size_t bytes = pr.C.bytes();
    std::vector<uint8_t> c0(bytes), out[2];
    TQ_CUDA_CHECK(cudaMemcpy(c0.data(), pr.C.as(), bytes, cudaMemcpyDeviceToHost));
    for (int mode = 0; mode < 2; ++mode) {
      TQ_CUDA_CHECK(cudaMemcpy(pr.C.as(), c0.data(), bytes, cudaMemcpyHostToDevice));  // beta reads C
      pr.p.split_reduce = mode ? GemmSplitReduce::cluster : GemmSplitReduce::global;
      tq::kernels::gemm(pr.p, nullptr);
      TQ_CUDA_CHECK(cudaDeviceSynchronize());
      out[mode].resize(bytes);
      TQ_CUDA_CHECK(cudaMemcpy(out[mode].data(), pr.C.as(), bytes, cudaMemcpyDeviceToHost));
    }
    // only the (M, N) elements: the padding of each row keeps its poison in both
    EXPECT_TRUE(out[0] == out[1]) << "the cluster and global split-K reductions differ";
    check_against_cpu(c);  // and the result is right
  }
}

TEST(GpuGemm, Sm80EveryLayout) {
  TQ_SKIP_WITHOUT_GPU();
  for (auto [ta, tb] : kLayouts) {
    check_against_cpu({.M = 200, .N = 328, .K = 1160, .ta = ta, .tb = tb, .kernel = GemmKernel::sm80});
    check_against_cpu({.M = 1, .N = 72, .K = 72, .ta = ta, .tb = tb, .kernel = GemmKernel::sm80});
    check_against_cpu({.M = 72, .N = 4304, .K = 264, .ta = ta, .tb = tb, .kernel = GemmKernel::sm80});
  }
}

TEST(GpuGemm, SkinnyEveryLayout) {
  TQ_SKIP_WITHOUT_GPU();
  for (auto [ta, tb] : kLayouts)
    for (int M : {1, 3, 16}) {
      check_against_cpu({.M = M, .N = 4304, .K = 1152, .ta = ta, .tb = tb, .kernel = GemmKernel::skinny});
      check_against_cpu({.M = M, .N = 72, .K = 2056, .ta = ta, .tb = tb, .kernel = GemmKernel::skinny});
    }
}

TEST(GpuGemm, SimtAnyStride) {
  TQ_SKIP_WITHOUT_GPU();
  for (auto [ta, tb] : kLayouts) {
    check_against_cpu({.M = 37, .N = 51, .K = 77, .ta = ta, .tb = tb, .kernel = GemmKernel::simt, .pad = 3});
    // odd K and leading dimensions: the automatic dispatch must fall back to SIMT
    check_against_cpu({.M = 70, .N = 45, .K = 93, .ta = ta, .tb = tb, .pad = 1});
  }
}

TEST(GpuGemm, FusedEpilogues) {
  TQ_SKIP_WITHOUT_GPU();
  std::vector<GemmKernel> kernels = {GemmKernel::sm80, GemmKernel::skinny, GemmKernel::simt};
  if (sm90_here()) kernels.push_back(GemmKernel::sm90);
  for (GemmKernel k : kernels)
    for (bool f32 : {false, true}) {
      const int M = k == GemmKernel::skinny ? 16 : 136;
      // y = 0.5 x W^T + b + r
      check_against_cpu({.M = M, .N = 264, .K = 1152, .ta = false, .tb = true, .kernel = k,
                         .out_f32 = f32, .alpha = 0.5f, .bias = true, .bias_f32 = f32,
                         .residual = true});
      // bf16 bias into an fp32 output is allowed too
      check_against_cpu({.M = M, .N = 264, .K = 1152, .ta = false, .tb = true, .kernel = k,
                         .out_f32 = f32, .bias = true, .bias_f32 = false});
      // dW += dY^T X (accumulate, beta = 1) and a general beta
      check_against_cpu({.M = M, .N = 200, .K = 72, .ta = true, .tb = false, .kernel = k,
                         .out_f32 = f32, .beta = 1.0f});
      check_against_cpu({.M = M, .N = 200, .K = 1160, .ta = false, .tb = false, .kernel = k,
                         .out_f32 = f32, .alpha = -1.5f, .beta = 0.25f});
    }
  if (sm90_here())  // split-K with the full epilogue
    check_split_reduces({.M = 136, .N = 264, .K = 2304, .ta = false, .tb = true,
                         .kernel = GemmKernel::sm90, .alpha = 2.0f, .beta = 0.5f, .bias = true,
                         .residual = true, .split_k = 4, .tile_n = 192});
}

TEST(GpuGemm, CublasReferenceMatchesCpu) {
  TQ_SKIP_WITHOUT_GPU();
  // (cuBLASLt rounds to the output dtype before our residual kernel adds R: the residual case
  // uses an fp32 output so that the double rounding stays inside the tolerance.)
  for (auto [ta, tb] : kLayouts) {
    check_against_cpu({.M = 72, .N = 136, .K = 264, .ta = ta, .tb = tb,
                       .kernel = GemmKernel::cublas, .alpha = 0.5f, .bias = true, .bias_f32 = false});
    check_against_cpu({.M = 72, .N = 136, .K = 264, .ta = ta, .tb = tb,
                       .kernel = GemmKernel::cublas, .out_f32 = true, .beta = 0.5f, .bias = true,
                       .residual = true});
  }
}

// Model shapes through the automatic dispatch (forward NT, dX NN, dW TN) against cuBLASLt with
// fp32 output: too big for a CPU reference in a unit test.
TEST(GpuGemm, ModelShapesMatchCublas) {
  TQ_SKIP_WITHOUT_GPU();
  struct S {
    int M, K, N;
  };
  const S shapes[] = {{4544, 2048, 16384}, {1136, 16384, 2048}, {4544, 1152, 4304},
                      {1136, 2048, 256},   {16, 9216, 2304},    {1, 2048, 16384}};
  tq::kernels::CublasLtGemm lt;
  for (const S& s : shapes)
    for (int op = 0; op < 3; ++op) {
      // forward: (M,K)x(N,K)^T; dX: (M,N)x(N,K); dW: (N,M)^T... as C(N,K) = dY^T X
      Case c{};
      if (op == 0) c = {.M = s.M, .N = s.N, .K = s.K, .ta = false, .tb = true};
      if (op == 1) c = {.M = s.M, .N = s.K, .K = s.N, .ta = false, .tb = false};
      if (op == 2) c = {.M = s.N, .N = s.K, .K = s.M, .ta = true, .tb = false};
      c.pad = 0;
      SCOPED_TRACE(c.str());
      Problem pr(c);
      DevBuf ref_c(size_t(c.M) * pr.ldc * 4);
      GemmParams rp = pr.p;
      rp.C = ref_c.as(), rp.c_dtype = GemmDType::f32;
      lt.run(rp, nullptr);
      tq::kernels::gemm(pr.p, nullptr);
      TQ_CUDA_CHECK(cudaDeviceSynchronize());
      const auto out = pr.output();
      const auto r32 = tq::testing::to_host_f32(ref_c.as(), size_t(c.M) * pr.ldc, true);
      std::vector<double> ref(size_t(c.M) * c.N);
      for (int m = 0; m < c.M; ++m)
        for (int n = 0; n < c.N; ++n) ref[size_t(m) * c.N + n] = r32[size_t(m) * pr.ldc + n];
      const Err e = compare(out, ref, c.M, c.N, pr.ldc, 8e-3, 1e-3);
      EXPECT_LE(e.worst, 1.0) << "worst element " << e.bad_index << " rel Frobenius " << e.rel_fro;
      EXPECT_LE(e.rel_fro, 5e-3);
    }
}

TEST(GpuGemm, RejectsBadParameters) {
  TQ_SKIP_WITHOUT_GPU();
  DevBuf a(4096), b(4096), c(4096);
  GemmParams p;
  p.M = 8, p.N = 8, p.K = 8;
  p.A = a.as<__nv_bfloat16>(), p.lda = 8, p.B = b.as<__nv_bfloat16>(), p.ldb = 8;
  p.C = c.as(), p.ldc = 4;  // ldc < N
  EXPECT_THROW(tq::kernels::gemm(p, nullptr), tq::Error);
  p.ldc = 8, p.lda = 4;  // lda < K
  EXPECT_THROW(tq::kernels::gemm(p, nullptr), tq::Error);
  p.lda = 8, p.kernel = GemmKernel::sm80, p.K = 7, p.ldb = 8;  // K % 8 for the vector path
  EXPECT_THROW(tq::kernels::gemm(p, nullptr), tq::Error);
}

}  // namespace
