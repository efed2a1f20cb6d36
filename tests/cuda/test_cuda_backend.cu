// The CUDA backend against the CPU reference: copies/conversions, fill, binary/unary ops and
// their backward, reductions, Philox RNG; memory statistics; streams; pinned buffers; and a CUDA
// graph capture of several ops (which fails if any of them synchronizes the host).
//
// Every input is a fresh random draw; every output buffer is poisoned first: explicit
// destinations are filled with NaN, and the allocator's cached blocks are overwritten with 0xFF
// bytes (NaN in every float dtype) right before an op allocates its output from them.
// Suites are named Gpu* (ctest label gpu) and skip when no CUDA device is present.
#include <gtest/gtest.h>

#include <functional>

#include <cmath>
#include <cstring>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

// ---- backend basics ----

TEST(GpuBackend, DevicePropertiesAndErrors) {
  TQ_REQUIRE_GPU();
  ASSERT_TRUE(cuda_available());
  const cudaDeviceProp& p = tq::cuda::device_properties(0);
  EXPECT_GT(tq::cuda::sm_count(0), 0);
  std::printf("device 0: %s, %d SMs, cc %d.%d, %.1f GiB\n", p.name, p.multiProcessorCount, p.major, p.minor,
              double(p.totalGlobalMem) / (1 << 30));
  // A failing CUDA call becomes a tq::Error naming the call and the file.
  try {
    TQ_CUDA_CHECK(cudaSetDevice(100000));
    FAIL() << "expected a tq::Error";
  } catch (const tq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaSetDevice"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("test_cuda_backend.cu"), std::string::npos) << e.what();
  }
  (void)cudaGetLastError();  // the runtime keeps that error as its "last error": clear it
  // Ops reject what the CPU rejects, with a tq::Error rather than a crash.
  Tensor xi = rnd({7}, DType::i32).to(kCuda);
  EXPECT_THROW(tq::exp(xi), tq::Error);
}

TEST(GpuBackend, PoisonedPoolReachesNewTensors) {
  TQ_REQUIRE_GPU();
  // The harness relies on the pool handing cached (poisoned) blocks to new tensors.
  poison_pool(1 << 20);
  Tensor t = Tensor::empty({4304}, DType::f32, kCuda);
  std::vector<float> v = t.to_vector<float>();
  int nan = 0;
  for (float x : v) nan += std::isnan(x);
  EXPECT_EQ(nan, int(v.size())) << "new tensors do not come from the poisoned cache";
}

TEST(GpuMemory, StatsTrackAllocationsAndPool) {
  TQ_REQUIRE_GPU();
  tq::cuda::synchronize();
  tq::cuda::reset_peak_memory_stats();
  const MemoryStats before = memory_stats(kCuda);
  const int64_t bytes = int64_t(96) << 20;
  {
    Tensor t = Tensor::empty({bytes}, DType::u8, kCuda);
    const MemoryStats mid = memory_stats(kCuda);
    EXPECT_EQ(mid.current, before.current + size_t(bytes));
    EXPECT_GE(mid.peak, before.current + size_t(bytes));
    tq::cuda::synchronize();
    EXPECT_GE(tq::cuda::pool_stats().used_current, uint64_t(bytes));
  }
  const MemoryStats after = memory_stats(kCuda);
  EXPECT_EQ(after.current, before.current);
  EXPECT_GE(after.peak, before.current + size_t(bytes));
  tq::cuda::synchronize();
  const tq::cuda::PoolStats ps = tq::cuda::pool_stats();
  EXPECT_GE(ps.used_high, uint64_t(bytes));
  // The release threshold keeps freed memory in the pool...
  EXPECT_GE(ps.reserved_current, uint64_t(bytes));
  // ...until it is trimmed explicitly.
  tq::cuda::release_cached_memory();
  EXPECT_LT(tq::cuda::pool_stats().reserved_current, ps.reserved_current);
  tq::cuda::reset_peak_memory_stats();
  EXPECT_EQ(memory_stats(kCuda).peak, memory_stats(kCuda).current);
}

TEST(GpuMemory, PinnedBuffersAndTransfers) {
  TQ_REQUIRE_GPU();
  Tensor h = tq::cuda::pinned_empty({4304}, DType::f32);
  Tensor src = rnd({4304}, DType::f32);
  h.copy_(src);
  unsigned flags = 0;
  TQ_CUDA_CHECK(cudaHostGetFlags(&flags, h.data_ptr()));  // fails unless the memory is page-locked
  Tensor d = h.to(kCuda);
  EXPECT_TRUE(close(d.cpu(), src, 0));
  tq::cuda::PinnedBuffer buf(1 << 20);
  EXPECT_EQ(buf.size(), size_t(1) << 20);
  tq::cuda::PinnedBuffer moved = std::move(buf);
  EXPECT_EQ(buf.data(), nullptr);
  EXPECT_NE(moved.data(), nullptr);
}

// ---- copy / convert / fill ----

TEST(GpuCopy, ConvertsBetweenAllDtypesLikeTheCpu) {
  TQ_REQUIRE_GPU();
  for (DType from : kAllDtypes) {
    for (DType to : kAllDtypes) {
      for (int64_t n : kSizes) {
        SCOPED_TRACE(str_cat(dtype_name(from), " -> ", dtype_name(to), ", n = ", n));
        // Non-negative values keep float -> unsigned conversions defined on the CPU side.
        const bool unsigned_involved = from == DType::u8 || to == DType::u8;
        Tensor src = rnd({n}, from, unsigned_involved ? 0.0 : -300.0, 250.0);
        Tensor dsrc = src.to(kCuda);
        poison_for(Tensor::empty({n}, DType::f64));
        Tensor got = dsrc.to(to);
        ASSERT_TRUE(close(got.cpu(), src.to(to), 0.0));
      }
    }
  }
}

TEST(GpuCopy, StridedBroadcastAndPartialDestinations) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::i64}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor a = rnd({72, 4304}, dt);
    Tensor da = a.to(kCuda);
    // Transposed source into a dense destination (same dtype and converting).
    for (DType to : {dt, DType::f32, DType::bf16}) {
      poison_for(a);
      EXPECT_TRUE(close(da.t().contiguous().to(to).cpu(), a.t().contiguous().to(to), 0.0));
    }
    // Permuted 4-D view with a stepped slice.
    Tensor b = rnd({5, 7, 9, 11}, dt);
    Tensor vb = b.permute({2, 0, 3, 1}).slice(2, 1, 11, 3);
    Tensor dvb = b.to(kCuda).permute({2, 0, 3, 1}).slice(2, 1, 11, 3);
    EXPECT_TRUE(close(dvb.contiguous().cpu(), vb.contiguous(), 0.0));
    // Broadcast (0-stride) source into a strided destination; the rest of dst keeps its poison.
    Tensor row = rnd({1, 4304}, dt);
    Tensor dst_cpu = Tensor::full({72, 4304 * 2}, 7.0, DType::f32);
    Tensor dst = Tensor::full({72, 4304 * 2}, NAN, DType::f32, kCuda);
    dst_cpu.slice(1, 0, 8608, 2).copy_(row);
    dst.slice(1, 0, 8608, 2).copy_(row.to(kCuda));
    std::vector<double> got = dst.to_vector<double>(), ref = dst_cpu.to_vector<double>();
    for (size_t i = 0; i < got.size(); ++i) {
      if (i % 2 == 1) {
        ASSERT_TRUE(std::isnan(got[i])) << "element " << i << " outside the view was written";
      } else {
        ASSERT_EQ(got[i], ref[i]) << "element " << i;
      }
    }
  }
}

TEST(GpuCopy, PermutesAndBatchedTransposes) {
  TQ_REQUIRE_GPU();
  struct Case {
    Shape shape;
    std::vector<int64_t> perm;
  };
  const std::vector<Case> cases = {
      {{3, 5, 4, 16}, {0, 2, 1, 3}},    // head permute, inner dim widened to 16 bytes
      {{2, 7, 3, 72}, {0, 2, 1, 3}},    // head_dim 72
      {{2, 7, 3, 5}, {0, 2, 1, 3}},     // inner dim too short to widen
      {{3, 72, 4304}, {0, 2, 1}},       // batched transpose (tiled)
      {{2, 33, 65}, {0, 2, 1}},         // partial tiles
      {{4304, 1, 72}, {2, 1, 0}},       // transpose with a size-1 dim in between
      {{5, 40, 6, 48}, {3, 1, 2, 0}},   // general permute
  };
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::u8}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(str_cat(dtype_name(dt), " shape ", c.shape, " perm ", c.perm));
      Tensor a = rnd(c.shape, dt, 0, 200);
      Tensor ref = a.permute(c.perm).contiguous();
      Tensor da = a.to(kCuda);
      poison_for(ref);
      ASSERT_TRUE(close(da.permute(c.perm).contiguous().cpu(), ref, 0.0));
    }
  }
  // A view that starts one element in cannot be widened; it must still copy exactly.
  Tensor a = rnd({3, 5, 4, 17}, DType::bf16);
  Tensor v = a.narrow(3, 1, 16).permute({0, 2, 1, 3});
  EXPECT_TRUE(close(a.to(kCuda).narrow(3, 1, 16).permute({0, 2, 1, 3}).contiguous().cpu(), v.contiguous(), 0.0));
}

TEST(GpuCopy, FillAllDtypesAndStridedViews) {
  TQ_REQUIRE_GPU();
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    for (int64_t n : kSizes) {
      Tensor t = Tensor::empty({n}, dt, kCuda);
      t.fill_(0);  // overwritten next: proves fill_ writes every element
      t.fill_(3.75);
      EXPECT_TRUE(close(t.cpu(), Tensor::full({n}, 3.75, dt), 0.0));
    }
    Tensor base = Tensor::zeros({72, 301}, dt, kCuda);
    Tensor base_cpu = Tensor::zeros({72, 301}, dt);
    base.slice(1, 3, 301, 7).fill_(-2.5);
    base_cpu.slice(1, 3, 301, 7).fill_(-2.5);
    EXPECT_TRUE(close(base.cpu(), base_cpu, 0.0));
  }
}

// ---- elementwise ----

const std::vector<BinaryOp> kBinaryOps = {BinaryOp::add,     BinaryOp::sub,     BinaryOp::mul,
                                          BinaryOp::div,     BinaryOp::maximum, BinaryOp::minimum,
                                          BinaryOp::eq,      BinaryOp::gt,      BinaryOp::lt};

void check_binary(const Tensor& a, const Tensor& b, DType out_dt) {
  Tensor da = a.to(kCuda), db = b.to(kCuda);
  for (BinaryOp op : kBinaryOps) {
    SCOPED_TRACE(str_cat("op ", int(op), ", ", describe(a), " with ", describe(b)));
    Tensor ref = ops::binary(op, a, b);
    poison_for(ref);
    Tensor got = ops::binary(op, da, db);
    ASSERT_TRUE(got.device() == kCuda);
    ASSERT_TRUE(close(got.cpu(), ref, tol_for(out_dt)));
  }
}

TEST(GpuElementwise, BinarySameShapeAllDtypes) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64, DType::i32, DType::i64, DType::u8}) {
    const bool integer = !is_floating(dt);
    for (int64_t n : kSizes) {
      // Integer divisors stay >= 1; eq gets some equal pairs through the shared draw.
      Tensor a = rnd({n}, dt, integer ? 1 : -3, integer ? 100 : 3);
      Tensor b = rnd({n}, dt, integer ? 1 : -3, integer ? 100 : 3);
      if (n > 10) b.slice(0, 0, n / 4).copy_(a.slice(0, 0, n / 4));
      check_binary(a, b, dt);
    }
  }
}

TEST(GpuElementwise, BinaryBroadcastStridedAndMixed) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    check_binary(rnd({72, 1}, dt), rnd({1, 4304}, dt), dt);
    check_binary(rnd({3, 1, 5, 7}, dt), rnd({4, 1, 7}, dt), dt);
    check_binary(rnd({}, dt), rnd({257216}, dt), dt);
    check_binary(rnd({257216}, dt), rnd({1}, dt), dt);
    check_binary(rnd({72, 4303}, dt), rnd({4303}, dt), dt);                   // bias row, odd period
    check_binary(rnd({4304}, dt), rnd({5, 3, 4304}, dt), dt);                 // bias row first
    check_binary(rnd({5, 3, 8}, dt), rnd({1, 3, 8}, dt), dt);                 // vectorized period
    check_binary(rnd({4304, 72}, dt).t(), rnd({72, 4304}, dt), dt);           // strided a
    check_binary(rnd({72, 4303}, dt), rnd({4304, 72}, dt).t().slice(1, 1, 4304), dt);  // strided, offset
  }
  check_binary(rnd({72, 4304}, DType::f32), rnd({72, 4304}, DType::bf16), DType::f32);
  check_binary(rnd({72, 4304}, DType::i32, 1, 100), rnd({4304}, DType::bf16), DType::bf16);
  check_binary(rnd({72, 4304}, DType::bf16), rnd({1, 4304}, DType::f16), DType::f32);
  // Unaligned dense views (offset 1 element) take the scalar path.
  Tensor a = rnd({4305}, DType::bf16), b = rnd({4305}, DType::bf16);
  check_binary(a.slice(0, 1, 4305), b.slice(0, 0, 4304), DType::bf16);
}

const std::vector<UnaryOp> kUnaryOps = {UnaryOp::neg,     UnaryOp::exp,       UnaryOp::log,      UnaryOp::sqrt,
                                        UnaryOp::rsqrt,   UnaryOp::tanh,      UnaryOp::sigmoid,  UnaryOp::gelu_erf,
                                        UnaryOp::gelu_tanh, UnaryOp::silu,    UnaryOp::abs,      UnaryOp::square};

bool positive_domain(UnaryOp op) { return op == UnaryOp::log || op == UnaryOp::sqrt || op == UnaryOp::rsqrt; }

// got = f(x) (any device; f evaluated here in float64) against f's float64 value, allowing what a
// relative change of rtol in x moves it by, besides rtol·|f(x)|: where the result cancels (gelu's
// 1 + erf(x/√2) for x near −3, gelu' = Φ(x) + x·φ(x) near x = −0.75) the device's and the CPU's
// few-ulp erf/exp errors are large relative to the sum (single f32 elements drew 1.5e-5 and 4e-5
// there, 1 run in 30 and in 10), and that is conditioning, not a wrong kernel. The norm check stays rtol.
::testing::AssertionResult close_conditioned(const Tensor& got, const Tensor& x, double rtol,
                                             const std::function<Tensor(const Tensor&)>& f) {
  const Tensor x64 = x.to(DType::f64);
  const std::vector<double> r = f(x64).to_vector<double>();
  const std::vector<double> lo = f(x64 * (1.0 - rtol)).to_vector<double>(), hi = f(x64 * (1.0 + rtol)).to_vector<double>();
  const std::vector<double> v = got.to_vector<double>();
  if (v.size() != r.size()) return ::testing::AssertionFailure() << "size " << v.size() << " vs " << r.size();
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    const double err = std::abs(v[i] - r[i]);
    const double allow = rtol * std::abs(r[i]) + std::max(std::abs(lo[i] - r[i]), std::abs(hi[i] - r[i]));
    if (!(err <= allow))
      return ::testing::AssertionFailure() << "element " << i << " of " << r.size() << ": got " << v[i] << ", expected "
                                           << r[i] << " (x " << x64.to_vector<double>()[i] << ", allowed " << allow << ")";
    num += err * err;
    den += r[i] * r[i];
  }
  if (num > rtol * rtol * den)
    return ::testing::AssertionFailure() << "relative norm error " << std::sqrt(num / den) << " > " << rtol;
  return ::testing::AssertionSuccess();
}

TEST(GpuElementwise, UnaryForwardAllOps) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    for (UnaryOp op : kUnaryOps) {
      for (int64_t n : kSizes) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " op ", int(op), " n ", n));
        Tensor x = positive_domain(op) ? rnd({n}, dt, 0.05, 4.0) : rnd({n}, dt, -4.0, 4.0);
        Tensor ref = ops::unary(op, x);
        Tensor dx = x.to(kCuda);
        poison_for(ref);
        const Tensor got = ops::unary(op, dx).cpu();
        ASSERT_EQ(got.dtype(), dt);
        // f32: against float64 with the conditioning allowance; the others against the CPU.
        if (dt == DType::f32) ASSERT_TRUE(close_conditioned(got, x, tol_for(dt), [op](const Tensor& x64) { return ops::unary(op, x64); }));
        else ASSERT_TRUE(close(got, ref, tol_for(dt)));
      }
    }
  }
  // Strided input, and the integer ops.
  Tensor x = rnd({4304, 72}, DType::f32);
  EXPECT_TRUE(close(ops::unary(UnaryOp::gelu_tanh, x.to(kCuda).t()).cpu(), ops::unary(UnaryOp::gelu_tanh, x.t()), 1e-5));
  for (DType dt : {DType::i32, DType::i64})
    for (UnaryOp op : {UnaryOp::neg, UnaryOp::abs, UnaryOp::square}) {
      Tensor xi = rnd({4304}, dt, -1000, 1000);
      EXPECT_TRUE(close(ops::unary(op, xi.to(kCuda)).cpu(), ops::unary(op, xi), 0.0));
    }
}

TEST(GpuElementwise, UnaryBackwardAllOps) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    for (UnaryOp op : kUnaryOps) {
      for (int64_t n : kSizes) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " op ", int(op), " n ", n));
        Tensor x = positive_domain(op) ? rnd({n}, dt, 0.05, 4.0) : rnd({n}, dt, -4.0, 4.0);
        Tensor g = rnd({n}, dt);
        Tensor ref = ops::unary_backward(op, g, x);
        Tensor dx = x.to(kCuda), dg = g.to(kCuda);
        poison_for(ref);
        const Tensor got = ops::unary_backward(op, dg, dx).cpu();
        ASSERT_EQ(got.dtype(), dt);
        // f32: against float64 with the conditioning allowance; bf16 (1e-2) and f64 against the CPU.
        const Tensor g64 = g.to(DType::f64);
        if (dt == DType::f32)
          ASSERT_TRUE(close_conditioned(got, x, tol_for(dt), [op, g64](const Tensor& x64) { return ops::unary_backward(op, g64, x64); }));
        else ASSERT_TRUE(close(got, ref, tol_for(dt)));
      }
    }
  }
  // A gradient in another dtype than the input (f32 gradient of a bf16 activation).
  Tensor x = rnd({257216}, DType::bf16), g = rnd({257216}, DType::f32);
  EXPECT_TRUE(close(ops::unary_backward(UnaryOp::silu, g.to(kCuda), x.to(kCuda)).cpu(),
                    ops::unary_backward(UnaryOp::silu, g, x), 1e-2));
}

// ---- reductions ----

struct ReduceCase {
  Shape shape;
  std::vector<int64_t> dims;
};

TEST(GpuReduce, SumMaxArgmaxOverAnyDims) {
  TQ_REQUIRE_GPU();
  const std::vector<ReduceCase> cases = {
      {{257216}, {}},        {{257216}, {0}},        {{72, 4304}, {1}},     {{72, 4304}, {0}},
      {{4304, 72}, {1}},     {{3, 257216}, {1}},     {{1}, {0}},            {{2, 3, 5, 7}, {1, 3}},
      {{5, 72, 9}, {0, 2}},  {{4304, 1, 72}, {1}},   {{1, 1000003}, {1}},   {{257216, 3}, {0}},
  };
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::i64}) {
    for (const ReduceCase& c : cases) {
      for (bool keepdim : {false, true}) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " shape ", c.shape, " dims ", c.dims, " keepdim ", keepdim));
        Tensor x = rnd(c.shape, dt, -100, 100);
        Tensor dx = x.to(kCuda);
        for (ops::ReduceKind kind : {ops::ReduceKind::sum, ops::ReduceKind::max}) {
          Tensor ref = ops::reduce(kind, x, c.dims, keepdim, "test");
          poison_for(ref, 16);
          // Sums: the device and the CPU both accumulate in double; the output is rounded once.
          ASSERT_TRUE(close(ops::reduce(kind, dx, c.dims, keepdim, "test").cpu(), ref, kind == ops::ReduceKind::max ? 0.0 : tol_for(dt)));
        }
        if (c.dims.size() == 1) {
          Tensor ref = tq::argmax(x, c.dims[0], keepdim);
          poison_for(ref, 16);
          ASSERT_TRUE(close(tq::argmax(dx, c.dims[0], keepdim).cpu(), ref, 0.0));
        }
      }
    }
  }
}

TEST(GpuReduce, NanPropagationAndTies) {
  TQ_REQUIRE_GPU();
  Tensor x = rnd({4, 257216}, DType::f32);
  x.select(0, 1).narrow(0, 200000, 1).fill_(NAN);
  x.select(0, 1).narrow(0, 250000, 1).fill_(NAN);
  x.select(0, 2).narrow(0, 100, 1).fill_(50.0);
  x.select(0, 2).narrow(0, 257000, 1).fill_(50.0);  // a tie: the first index wins
  Tensor dx = x.to(kCuda);
  EXPECT_TRUE(close(tq::argmax(dx, 1).cpu(), tq::argmax(x, 1), 0.0));
  std::vector<int64_t> am = tq::argmax(dx, 1).to_vector<int64_t>();
  EXPECT_EQ(am[1], 200000);
  EXPECT_EQ(am[2], 100);
  std::vector<double> mx = tq::max(dx, 1).to_vector<double>();
  EXPECT_TRUE(std::isnan(mx[1]));
  EXPECT_EQ(mx[2], 50.0);
}

TEST(GpuReduce, AutogradThroughDeviceOps) {
  TQ_REQUIRE_GPU();
  Tensor x = rnd({72, 301}, DType::f32), w = rnd({301}, DType::f32);
  auto loss = [](const Tensor& xx, const Tensor& ww) {
    Tensor h = tq::gelu(xx * ww, true) + tq::sigmoid(xx);
    return tq::sum(tq::max(h, 1)) + tq::mean(tq::square(h));
  };
  Tensor xc = x.clone().requires_grad_(), wc = w.clone().requires_grad_();
  Tensor xg = x.to(kCuda).requires_grad_(), wg = w.to(kCuda).requires_grad_();
  Tensor lc = loss(xc, wc), lg = loss(xg, wg);
  lc.backward();
  lg.backward();
  EXPECT_TRUE(close(lg.cpu(), lc.detach(), 1e-5));
  ASSERT_TRUE(xg.grad().defined() && wg.grad().defined());
  EXPECT_TRUE(xg.grad().device() == kCuda);
  EXPECT_TRUE(close(xg.grad().cpu(), xc.grad(), 1e-5));
  EXPECT_TRUE(close(wg.grad().cpu(), wc.grad(), 1e-5));
}

// ---- random ----

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

TEST(GpuRandom, PhiloxMatchesTheCpuBitForBit) {
  TQ_REQUIRE_GPU();
  const uint64_t seed = test::fresh_seed() | (uint64_t(1) << 63);
  const uint64_t offset = (test::fresh_seed() >> 8) | (uint64_t(1) << 40);
  SCOPED_TRACE(str_cat("seed ", seed, " offset ", offset));
  for (int64_t n : {int64_t(1), int64_t(3), int64_t(72), int64_t(4304), int64_t(257217)}) {
    for (Distribution dist : {Distribution::uniform, Distribution::bernoulli, Distribution::normal}) {
      SCOPED_TRACE(str_cat("dist ", int(dist), " n ", n));
      const double a = dist == Distribution::bernoulli ? 0.3 : -1.5, b = dist == Distribution::bernoulli ? 0 : 2.25;
      Tensor ref = random_tensor(dist, {n}, seed, offset, a, b, DType::f32);
      poison_pool(size_t(n) * 8);
      Tensor got = random_tensor(dist, {n}, seed, offset, a, b, DType::f32, kCuda);
      std::vector<float> g = got.to_vector<float>(), r = ref.to_vector<float>();
      const int64_t max_ulp = dist == Distribution::normal ? 1 : 0;
      for (size_t i = 0; i < g.size(); ++i) {
        const int64_t d = std::abs(int64_t(bits_of(g[i])) - int64_t(bits_of(r[i])));
        ASSERT_LE(d, max_ulp) << "element " << i << ": " << g[i] << " vs " << r[i];
      }
      // Other dtypes go through the same conversion as the CPU.
      for (DType dt : {DType::bf16, DType::f64, DType::i32}) {
        Tensor rd = random_tensor(dist, {n}, seed, offset, a, b, dt);
        Tensor gd = random_tensor(dist, {n}, seed, offset, a, b, dt, kCuda);
        ASSERT_TRUE(close(gd.cpu(), rd, dist == Distribution::normal ? tol_for(dt) : 0.0)) << dtype_name(dt);
      }
    }
  }
  // The Generator front ends take a device too.
  Generator g1(seed), g2(seed);
  EXPECT_TRUE(close(randn({4304}, g1, DType::f32, 0, 1, kCuda).cpu(), randn({4304}, g2, DType::f32), 1e-6));
}

// ---- streams and graphs ----

// A few ops of a typical step: broadcast binary, scalar, activation, conversion, dropout-style
// random mask, reduction, and a copy into a preallocated output.
void step(const Tensor& x, const Tensor& w, Tensor y) {
  NoGradGuard ng;
  Device dev = x.device();
  Tensor xb = x.to(DType::bf16).to(DType::f32);  // conversions on identical inputs: exact on both devices
  Tensor h = ops::unary(UnaryOp::gelu_tanh, ops::binary(BinaryOp::add, ops::binary(BinaryOp::mul, xb, w),
                                                        ops::scalar_like(x, 0.5)));
  Tensor hb = ops::binary(BinaryOp::mul, xb, x);
  Tensor mask = random_tensor(Distribution::bernoulli, x.shape(), 1234, 99, 0.9, 0.0, DType::f32, dev);
  Tensor r = tq::sum(ops::binary(BinaryOp::mul, ops::binary(BinaryOp::mul, hb, mask), h), {1});
  y.copy_(ops::binary(BinaryOp::add, r, ops::reduce(ops::ReduceKind::max, x, {1}, false, "step")));
}

TEST(GpuStream, OpsRunOnTheCurrentStream) {
  TQ_REQUIRE_GPU();
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  EXPECT_EQ(tq::cuda::current_stream(), stream.get());
  Tensor x = rnd({72, 4304}, DType::f32), w = rnd({4304}, DType::f32);
  Tensor y = Tensor::full({72}, NAN, DType::f32, kCuda), yc = Tensor::empty({72}, DType::f32);
  step(x.to(kCuda), w.to(kCuda), y);
  step(x, w, yc);
  EXPECT_TRUE(close(y.cpu(), yc, 1e-5));
}

TEST(GpuGraph, CapturedOpsReplayWithoutHostSync) {
  TQ_REQUIRE_GPU();
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  Tensor x = Tensor::empty({72, 4304}, DType::f32, kCuda), w = Tensor::empty({4304}, DType::f32, kCuda);
  Tensor y = Tensor::empty({72}, DType::f32, kCuda);
  x.copy_(rnd({72, 4304}, DType::f32));
  w.copy_(rnd({4304}, DType::f32));
  step(x, w, y);  // warm-up: module loading and pool setup happen outside the capture
  stream.synchronize();

  const CapturedGraph graph(stream.get(), [&] { step(x, w, y); });
  EXPECT_GE(graph.nodes(), 8u);

  for (int replay = 0; replay < 2; ++replay) {
    SCOPED_TRACE(str_cat("replay ", replay));
    Tensor xc = rnd({72, 4304}, DType::f32), wc = rnd({4304}, DType::f32), yc = Tensor::empty({72}, DType::f32);
    x.copy_(xc);
    w.copy_(wc);
    y.fill_(NAN);
    graph.launch();
    stream.synchronize();
    step(xc, wc, yc);
    EXPECT_TRUE(close(y.cpu(), yc, 1e-5));
  }
}

}  // namespace
