// NF4 on CUDA against the CPU reference (quant/nf4.hpp) and against real bitsandbytes 0.49.2
// (tests/fixtures/nf4/*.gpu.safetensors): quantize bit for bit, dequantize bit for bit, the fused
// small-M product (NF4Linear's decoding path) against an f64 reference of its own numerics and
// against the CPU NF4Linear, and NF4Linear forward/backward on CUDA.
//
// Inputs are fresh random draws (plus planted all-zero, denormal and huge blocks); outputs are
// poisoned first (explicit destinations filled with NaN, the allocator's cache with 0xFF bytes).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "tests/cuda/gpu_test_util.hpp"
#include "tests/quant/nf4_fixture_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;
using tq::test::same_bits;

// ---- helpers ----

// A weight of `shape` in `dt`: uniform values of scale ~0.05 with blocks planted to hit the edge
// cases: an all-zero block, a block of denormals only (absmax flushes to 0), single denormals among
// normal values, a block with one huge value (most of its codes become 7), and exact zeros.
Tensor planted_weight(const Shape& shape, DType dt) {
  std::vector<double> v = rnd(shape, DType::f64, -0.05, 0.05).to_vector<double>();
  const int64_t n = int64_t(v.size());
  auto block = [&](int64_t b, auto&& f) {
    for (int64_t i = 64 * b; i < std::min(n, 64 * b + 64); ++i) f(i);
  };
  const int64_t nb = (n + 63) / 64;
  if (nb > 3) block(1, [&](int64_t i) { v[size_t(i)] = 0.0; });
  if (nb > 5) block(3, [&](int64_t i) { v[size_t(i)] = (i % 2 ? 1.0 : -3.0) * 1e-39; });
  if (nb > 7) block(5, [&](int64_t i) { v[size_t(i)] = i % 9 == 0 ? 7e-40 : v[size_t(i)]; });
  if (nb > 9) block(7, [&](int64_t i) { v[size_t(i)] = i % 64 == 5 ? 4.0e3 : v[size_t(i)]; });
  for (int64_t i = 0; i < n; i += 97) v[size_t(i)] = 0.0;
  return Tensor::from_vector(v, shape).to(dt);  // f32 keeps the denormals; bf16 rounds them to bf16 denormals
}

// rcp.approx.ftz.f32 as the hardware computes it: what bnb's --use_fast_math build scales by.
__global__ void rcp_approx_kernel(const float* x, float* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x[i]));
  y[i] = r;
}
std::vector<float> rcp_approx(const std::vector<float>& x) {
  Tensor in = Tensor::from_vector(x, {int64_t(x.size())}).to(kCuda);
  Tensor out = Tensor::empty({int64_t(x.size())}, DType::f32, kCuda);
  rcp_approx_kernel<<<unsigned((x.size() + 255) / 256), 256>>>(in.data<float>(), out.data<float>(), int64_t(x.size()));
  TQ_CUDA_CHECK_LAUNCH();
  return out.to_vector<float>();
}

std::string blob_offset_note(const NF4Tensor& q) { return str_cat("offset ", q.offset); }

// Every serialized tensor and the offset of a (CUDA) quantization equal the CPU's.
void expect_same_quantization(const NF4Tensor& gpu, const NF4Tensor& cpu) {
  EXPECT_EQ(gpu.device(), kCuda);
  EXPECT_EQ(gpu.shape, cpu.shape);
  EXPECT_EQ(gpu.dtype, cpu.dtype);
  EXPECT_EQ(std::bit_cast<uint32_t>(gpu.offset), std::bit_cast<uint32_t>(cpu.offset))
      << blob_offset_note(gpu) << " vs " << blob_offset_note(cpu);
  auto g = nf4_to_state_dict("w", gpu), c = nf4_to_state_dict("w", cpu);
  ASSERT_EQ(g.size(), c.size());
  for (size_t i = 0; i < g.size(); ++i) {
    SCOPED_TRACE(g[i].first);
    EXPECT_EQ(g[i].first, c[i].first);
    EXPECT_TRUE(same_bits(g[i].second, c[i].second));
  }
}

struct QuantCase {
  Shape shape;
  DType dt;
};
const std::vector<QuantCase> kQuantCases = {
    {{37, 29}, DType::f32},  {{3, 7}, DType::f32},       {{1, 1}, DType::bf16},    {{64, 64}, DType::f16},
    {{72, 4304}, DType::f32}, {{1152, 4304}, DType::bf16}, {{2048, 16384}, DType::bf16}};

// ---- quantize ----

TEST(GpuNf4Quantize, IeeeReciprocalIsBitIdenticalToTheCpu) {
  TQ_REQUIRE_GPU();
  for (const QuantCase& c : kQuantCases) {
    for (bool dq : {true, false}) {
      SCOPED_TRACE(str_cat(dtype_name(c.dt), c.shape, dq ? " double quant" : " plain absmax"));
      Tensor w = planted_weight(c.shape, c.dt);
      const NF4Tensor cpu = nf4_quantize(w, {.double_quant = dq, .offset = std::nullopt});
      Tensor wd = w.to(kCuda);
      poison_pool(size_t(w.numel()) * 2 + (1 << 20));
      const NF4Tensor gpu = nf4_quantize(wd, {.double_quant = dq, .offset = std::nullopt, .ieee_reciprocal = true});
      expect_same_quantization(gpu, cpu);
    }
  }
}

TEST(GpuNf4Quantize, ForcedOffsetAndStridedInput) {
  TQ_REQUIRE_GPU();
  Tensor w = planted_weight({300, 130}, DType::f32);
  const float off = 0.0123f;
  const NF4Tensor cpu = nf4_quantize(w.t().contiguous(), {.double_quant = true, .offset = off});
  // A transposed (non-contiguous) CUDA view quantizes as its dense copy.
  const NF4Tensor gpu = nf4_quantize(w.to(kCuda).t(), {.double_quant = true, .offset = off, .ieee_reciprocal = true});
  EXPECT_EQ(gpu.offset, off);
  expect_same_quantization(gpu, cpu);
}

// The default (bnb) reciprocal: absmax, offset and nested absmax equal the CPU's; every 4-bit and
// 8-bit code equals the CPU's decision rule applied with the hardware's rcp.approx scale.
TEST(GpuNf4Quantize, FastMathReciprocalCodesFollowTheHardwareScale) {
  TQ_REQUIRE_GPU();
  for (const QuantCase& c : kQuantCases) {
    SCOPED_TRACE(str_cat(dtype_name(c.dt), c.shape));
    Tensor w = planted_weight(c.shape, c.dt);
    const NF4Tensor plain_cpu = nf4_quantize(w, {.double_quant = false, .offset = std::nullopt});
    const NF4Tensor cpu = nf4_quantize(w);
    const NF4Tensor plain_gpu = nf4_quantize(w.to(kCuda), {.double_quant = false, .offset = std::nullopt});
    const NF4Tensor gpu = nf4_quantize(w.to(kCuda));
    ASSERT_TRUE(same_bits(plain_gpu.absmax.cpu(), plain_cpu.absmax));
    EXPECT_EQ(gpu.offset, cpu.offset);
    ASSERT_TRUE(same_bits(gpu.nested_absmax.cpu(), cpu.nested_absmax));
    // 4-bit codes with s = rcp.approx(absmax).
    const std::vector<float> am = plain_cpu.absmax.to_vector<float>();
    const std::vector<float> s = rcp_approx(am);
    const std::vector<double> wv = w.to_vector<double>();
    const std::vector<uint8_t> packed = gpu.packed.cpu().contiguous().to_vector<uint8_t>();
    const std::vector<uint8_t> packed_cpu = cpu.packed.contiguous().to_vector<uint8_t>();
    const int64_t n = w.numel();
    int64_t bad = 0, differ_from_ieee = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int want = nf4::quantize_code(nf4::mul_ftz(float(wv[size_t(i)]), s[size_t(i / 64)]));
      const int got = (i & 1) ? packed[size_t(i / 2)] & 0xF : packed[size_t(i / 2)] >> 4;
      const int ieee = (i & 1) ? packed_cpu[size_t(i / 2)] & 0xF : packed_cpu[size_t(i / 2)] >> 4;
      bad += got != want;
      differ_from_ieee += got != ieee;
    }
    EXPECT_EQ(bad, 0);
    if (n % 2) EXPECT_EQ(packed.back() & 0xF, packed_cpu.back() & 0xF) << "pad nibble";
    // Only codes within an ulp of a threshold can follow the reciprocal's last bit.
    EXPECT_LE(differ_from_ieee, std::max<int64_t>(2, n / 1000000)) << "codes that differ from the IEEE scale";
    // 8-bit absmax codes with s2 = rcp.approx(absmax2).
    const std::vector<float> am2 = gpu.nested_absmax.to_vector<float>();
    const std::vector<float> s2 = rcp_approx(am2);
    const std::vector<uint8_t> q8 = gpu.absmax.to_vector<uint8_t>();
    for (size_t b = 0; b < am.size(); ++b)
      ASSERT_EQ(q8[b], nf4::quantize_dyn(nf4::mul_ftz(am[b] - gpu.offset, s2[b / 256]))) << "absmax code " << b;
  }
}

const char* kFixtureCases[] = {"w37x29_f32", "w64x64_f16", "w3x1000_f32bf", "w10x64_zeroblock_f32", "w4x64_ties_f32"};

// Real bitsandbytes 0.49.2 on an H200 produced these files: the default CUDA quantize reproduces
// every serialized tensor (with the stored torch offset, as in the CPU test) and dequantize every bit.
TEST(GpuNf4Quantize, MatchesRealBitsandbytesFixtures) {
  TQ_REQUIRE_GPU();
  for (const char* name : kFixtureCases) {
    SCOPED_TRACE(name);
    auto f = test::read_safetensors(test::fixture_path(std::string(name) + ".gpu.safetensors"));
    auto ieee = test::read_safetensors(test::fixture_path(std::string(name) + ".safetensors"));
    const DType dt = *nf4::dtype_from_torch_name(f.metadata.at("dtype"));
    const Tensor blob = f.tensors.at("layer.weight.quant_state.bitsandbytes__nf4");
    const float stored = nf4::parse_quant_state(blob, "blob").offset;
    Tensor w = ieee.tensors.at("input").to(dt).to(kCuda);
    const NF4Tensor q = nf4_quantize(w, {.double_quant = true, .offset = stored});
    EXPECT_EQ(nf4_quantize(w).offset, stored) << "the f64 mean differs from torch's";
    for (auto& [k, t] : nf4_to_state_dict("layer", q)) {
      SCOPED_TRACE(k);
      ASSERT_TRUE(f.tensors.count(k));
      EXPECT_TRUE(same_bits(t, f.tensors.at(k)));
    }
    const NF4Tensor loaded = nf4_from_state_dict("layer", f.tensors).to(kCuda);
    Tensor out = Tensor::full(loaded.shape, NAN, loaded.dtype, kCuda);
    nf4_dequantize_into(loaded, out);
    EXPECT_TRUE(same_bits(out.cpu(), f.tensors.at("expected.dequant")));
  }
}

// 1152×4304 (SigLIP fc2: blocks straddle rows, 303 nested blocks, the last one partial). The input is
// the script's generator; its checksum, seed, scale and slices live in the IEEE transcription's file
// (w1152x4304_bf16.safetensors), what real bitsandbytes produced on the H200 in the .gpu file.
TEST(GpuNf4Quantize, Big1152x4304MatchesBitsandbytes) {
  TQ_REQUIRE_GPU();
  auto f = test::read_safetensors(test::fixture_path("w1152x4304_bf16.safetensors"));
  auto g = test::read_safetensors(test::fixture_path("w1152x4304_bf16.gpu.safetensors"));
  ASSERT_EQ(f.metadata.at("seed"), "1");
  ASSERT_EQ(f.metadata.at("scale"), "0.02");
  Tensor w = Tensor::from_vector(test::gen_values(1, 1152 * 4304, 0.02), {1152, 4304}).to(DType::bf16);
  ASSERT_EQ(test::fnv1a64(w), f.metadata.at("fnv1a64.input")) << "input generator differs from the script";
  ASSERT_EQ(g.tensors.at("diff.index").numel(), 0) << "real bnb and the IEEE transcription differ on this input";
  poison_pool(size_t(8) << 20);
  const NF4Tensor q = nf4_quantize(w.to(kCuda));
  for (auto& [k, t] : nf4_to_state_dict("layer", q)) {
    SCOPED_TRACE(k);
    if (k == "layer.weight") continue;  // the packed codes: checksums and slices below
    ASSERT_TRUE(g.tensors.count(k));
    EXPECT_TRUE(same_bits(t, g.tensors.at(k)));
  }
  const Tensor packed = q.packed.cpu();
  EXPECT_EQ(test::fnv1a64(packed), g.metadata.at("fnv1a64.packed"));
  const Tensor deq = nf4_dequantize(q).cpu();
  EXPECT_EQ(test::fnv1a64(deq), g.metadata.at("fnv1a64.dequant"));
  // The stored slices localize a checksum mismatch.
  auto expect_slices = [&](const Tensor& got, const std::string& what, int count) {
    for (int i = 0; i < count; ++i) {
      const std::string key = "slice" + std::to_string(i) + "." + what;
      SCOPED_TRACE(key);
      const std::string r = f.metadata.at(key);
      const int64_t a = std::stoll(r), b = std::stoll(r.substr(r.find(':') + 1));
      EXPECT_TRUE(same_bits(got.reshape({-1}).slice(0, a, b), f.tensors.at(key)));
    }
  };
  expect_slices(packed, "packed", 2);
  expect_slices(deq, "dequant", 3);
}

// ---- dequantize ----

TEST(GpuNf4Dequantize, BitIdenticalToTheCpuForEveryDtypeAndLayout) {
  TQ_REQUIRE_GPU();
  // Both kernels: per-thread stores, and (TQ_NF4_DEQ_BULK=1, sm_90) tiles through shared memory and
  // bulk copies (2048 × 16384: many tiles per CTA, so both buffers are reused).
  for (const char* bulk : {"0", "1"})
  for (const QuantCase& c : kQuantCases) {
    ::setenv("TQ_NF4_DEQ_BULK", bulk, 1);
    for (bool dq : {true, false}) {
      const NF4Tensor q = nf4_quantize(planted_weight(c.shape, c.dt), {.double_quant = dq, .offset = std::nullopt});
      const NF4Tensor qd = q.to(kCuda);
      for (DType out_dt : {DType::f32, DType::bf16, DType::f16}) {
        SCOPED_TRACE(str_cat(dtype_name(c.dt), c.shape, " -> ", dtype_name(out_dt), dq ? " (double quant)" : "",
                             " TQ_NF4_DEQ_BULK=", bulk));
        const Tensor ref = nf4_dequantize(q, out_dt);
        Tensor out = Tensor::full(c.shape, NAN, out_dt, kCuda);
        nf4_dequantize_into(qd, out);
        EXPECT_TRUE(same_bits(out.cpu(), ref));
        // An output view one element into a bigger buffer (unaligned: the element-wise path); the
        // elements around it must keep their poison.
        const int64_t n = q.numel();
        Tensor buf = Tensor::full({n + 2}, NAN, out_dt, kCuda);
        Tensor view = buf.slice(0, 1, n + 1).view(c.shape);
        nf4_dequantize_into(qd, view);
        EXPECT_TRUE(same_bits(view.cpu(), ref));
        std::vector<double> edges = buf.to_vector<double>();
        EXPECT_TRUE(std::isnan(edges.front()) && std::isnan(edges.back()));
      }
      poison_pool(size_t(q.numel()) * 4 + (1 << 20));
      EXPECT_TRUE(same_bits(nf4_dequantize(qd).cpu(), nf4_dequantize(q)));  // fresh output, QuantState dtype
    }
  }
  ::unsetenv("TQ_NF4_DEQ_BULK");
}

TEST(GpuNf4Dequantize, RejectsMismatchedOutputs) {
  TQ_REQUIRE_GPU();
  const NF4Tensor qd = nf4_quantize(planted_weight({8, 64}, DType::f32)).to(kCuda);
  EXPECT_THROW(nf4_dequantize_into(qd, Tensor::empty({8, 64}, DType::f32)), Error);          // CPU output
  EXPECT_THROW(nf4_dequantize_into(qd, Tensor::empty({8, 63}, DType::f32, kCuda)), Error);   // shape
  EXPECT_THROW(nf4_dequantize_into(qd, Tensor::empty({8, 64}, DType::i32, kCuda)), Error);   // dtype
  EXPECT_THROW(nf4_dequantize_into(qd, Tensor::empty({64, 8}, DType::f32, kCuda).t()), Error);  // strided
}

// ---- the fused small-M product ----

// f64 reference of y (M, N) = x · Wᵀ + b for the fused path's numerics: x and bias rounded to bf16,
// and w = bf16(NF4 code) · am (tensor-core path, K % 16 == 0) or w = the bf16 dequantized weight
// (the general path). Both are sums of exact products: only the fp32 accumulation and the final
// bf16 rounding separate the kernel from it. `terms` (optional) receives Σ_k |x·w| + |b| per output.
std::vector<double> fused_reference(const NF4Tensor& q, const Tensor& x, const Tensor& bias, bool bf16_codes,
                                    std::vector<double>* terms = nullptr) {
  const int64_t N = q.shape[0], K = q.shape[1], M = x.size(0);
  const std::vector<float> am = nf4::block_absmax(q);
  const std::vector<uint8_t> p = q.packed.contiguous().to_vector<uint8_t>();
  const std::vector<double> xb = x.to(DType::bf16).to_vector<double>();
  const std::vector<double> deq = nf4_dequantize(q, DType::bf16).to_vector<double>();
  std::vector<double> bb(size_t(N), 0.0);
  if (bias.defined()) bb = bias.to(DType::bf16).to_vector<double>();
  std::vector<double> y(size_t(M * N));
  if (terms) terms->assign(size_t(M * N), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> w(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = n * K + k;
      const int code = (i & 1) ? p[size_t(i >> 1)] & 0xF : p[size_t(i >> 1)] >> 4;
      w[size_t(k)] = bf16_codes ? double(float(bf16(nf4::code(code)))) * double(am[size_t(i >> 6)]) : deq[size_t(i)];
    }
    for (int64_t m = 0; m < M; ++m) {
      double s = 0, t = 0;
      for (int64_t k = 0; k < K; ++k) {
        s += xb[size_t(m * K + k)] * w[size_t(k)];
        t += std::abs(xb[size_t(m * K + k)] * w[size_t(k)]);
      }
      y[size_t(m * N + n)] = s + bb[size_t(n)];
      if (terms) (*terms)[size_t(m * N + n)] = t + std::abs(bb[size_t(n)]);
    }
  }
  return y;
}

// |got − ref| ≤ rel·|ref| + abs_of_max·max|ref| for every element.
::testing::AssertionResult within(const Tensor& got, const std::vector<double>& ref, double rel, double abs_of_max) {
  std::vector<double> g = got.to_vector<double>();
  if (g.size() != ref.size()) return ::testing::AssertionFailure() << "size " << g.size() << " vs " << ref.size();
  double maxref = 0;
  for (double r : ref) maxref = std::max(maxref, std::abs(r));
  for (size_t i = 0; i < g.size(); ++i)
    if (!(std::abs(g[i] - ref[i]) <= rel * std::abs(ref[i]) + abs_of_max * maxref))
      return ::testing::AssertionFailure() << "element " << i << " of " << g.size() << ": got " << g[i] << ", expected "
                                           << ref[i] << " (max |ref| " << maxref << ")";
  return ::testing::AssertionSuccess();
}

// ‖got − ref‖ / ‖ref‖.
double relative_norm_error(const Tensor& got, const Tensor& ref) {
  std::vector<double> g = got.to_vector<double>(), r = ref.to_vector<double>();
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    num += (g[i] - r[i]) * (g[i] - r[i]);
    den += r[i] * r[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// How many elements of two bf16-valued tensors differ, and by how many bf16 ulps at most. With
// `slack`, an element within slack[i] of the reference does not count toward max_ulps (see
// sum_order_slack).
struct Bf16Disagreement {
  int64_t differing = 0, max_ulps = 0;
};
Bf16Disagreement bf16_disagreement(const Tensor& got, const Tensor& ref, const std::vector<double>& slack = {}) {
  const std::vector<float> g = got.to_vector<float>(), r = ref.to_vector<float>();
  auto ordinal = [](float v) {  // bf16 values in order on one integer line (±0 both map to 0)
    const uint32_t u = std::bit_cast<uint32_t>(v) >> 16;
    return (u & 0x8000u) ? -int64_t(u & 0x7FFFu) : int64_t(u);
  };
  Bf16Disagreement d;
  for (size_t i = 0; i < r.size(); ++i) {
    const int64_t ulps = std::abs(ordinal(g[i]) - ordinal(r[i]));
    d.differing += ulps != 0;
    if (slack.empty() || std::abs(double(g[i]) - double(r[i])) > slack[i]) d.max_ulps = std::max(d.max_ulps, ulps);
  }
  return d;
}

// How far two fp32 sums of the same K products x_k·w_k (+ bias), in any two orders, may lie apart:
// 2·K·2⁻²⁴·(Σ|x_k·w_k| + |b|), twice the worst-case bound of one order. Where an output is a small
// difference of large terms this exceeds a bf16 ulp of the output itself, so those outputs may round
// several ulps apart without any error (about one run in eight of the test below had one, up to 22
// ulps, on an H100: 2026-12-07). x (..., K) and w (N, K) dense on the CPU; one entry per output.
std::vector<double> sum_order_slack(const Tensor& x, const Tensor& w, const Tensor& bias) {
  const int64_t K = w.size(1);
  const Tensor ax = ops::unary(UnaryOp::abs, x.to(DType::f64)), aw = ops::unary(UnaryOp::abs, w.to(DType::f64));
  const std::vector<double> s = ops::matmul(ax.reshape({ax.numel() / K, K}), aw, false, true).to_vector<double>();
  const std::vector<double> b = bias.to(DType::f64).to_vector<double>();
  std::vector<double> slack(s.size());
  for (size_t i = 0; i < s.size(); ++i) slack[i] = 2.0 * double(K) * std::ldexp(1.0, -24) * (s[i] + std::abs(b[i % b.size()]));
  return slack;
}

struct GemvCase {
  int64_t K, N;
  DType wdt;
  bool double_quant;
};
// (K, N): K % 64 = 0 (one block phase), 16 (four phases), 32 (two phases), 8 (general path); the
// decode shapes; N that leave partial 16-row tiles.
const std::vector<GemvCase> kGemvCases = {
    {1152, 4304, DType::bf16, true}, {4304, 72, DType::f32, true},  {2080, 257, DType::f16, true},
    {16, 1, DType::bf16, true},      {200, 37, DType::f32, true},   {2048, 2048, DType::bf16, false},
    {72, 33, DType::bf16, true},     {2048, 16384, DType::bf16, true}};

TEST(GpuNf4Linear, FusedSmallMMatchesItsReferenceAndTheCpuLayer) {
  TQ_REQUIRE_GPU();
  // Every small-M kernel: the tensor-core one; then, with M ≤ 4 opted into the CUDA-core kernels,
  // gemv_tc_kernel at M = 1 on every shape it can run (TQ_NF4_GEMV_X=tc, opt-in) and gemv_kernel at
  // M = 2 .. 4, the x-stationary kernel at M = 1 (the default), gemv_kernel at M = 1 with x in
  // shared memory, and with x read through L1.
  const std::pair<const char*, const char*> kPaths[] = {
      {"0", "reg"}, {"1", "tc"}, {"1", "reg"}, {"1", "smem"}, {"1", "global"}};
  for (const auto& [gemv, xpath] : kPaths)
  for (const GemvCase& c : kGemvCases) {
    ::setenv("TQ_NF4_GEMV", gemv, 1);
    ::setenv("TQ_NF4_GEMV_X", xpath, 1);
    const NF4Tensor q = nf4_quantize(rnd({c.N, c.K}, c.wdt, -0.1, 0.1), {.double_quant = c.double_quant, .offset = std::nullopt});
    const NF4Tensor qd = q.to(kCuda);
    for (int64_t M : {1, 2, 3, 4, 9, 16}) {
      if (c.N * c.K > (int64_t(1) << 24) && M != 1) continue;  // the f64 host reference dominates
      if (xpath[0] != 'r' && M != 1) continue;                   // x's path is chosen at M = 1 only
      for (bool with_bias : {false, true}) {
        SCOPED_TRACE(str_cat("K ", c.K, " N ", c.N, " M ", M, with_bias ? " bias" : "", " ", dtype_name(c.wdt),
                             " TQ_NF4_GEMV=", gemv, " TQ_NF4_GEMV_X=", xpath));
        Tensor x = rnd({M, c.K}, DType::bf16, -1.0, 1.0);
        Tensor bias = with_bias ? rnd({c.N}, DType::f32, -0.5, 0.5) : Tensor();
        poison_pool(size_t(M * c.N) * 8 * 64 + (1 << 20));
        Tensor y = cuda_nf4_kernels().linear_small_m(x.to(kCuda), qd, with_bias ? bias.to(kCuda) : Tensor());
        ASSERT_EQ(y.dtype(), DType::bf16);
        ASSERT_EQ(y.shape(), (Shape{M, c.N}));
        const bool tensor_cores = c.K % 16 == 0;
        std::vector<double> terms;
        EXPECT_TRUE(within(y, fused_reference(q, x, bias, tensor_cores, &terms), 1.0 / 128, 1e-5));
        // And NF4Linear on the CPU (dequantize + f32 GEMM) to bf16 accuracy. Elementwise up to how
        // differently the two round W: bf16(code)·absmax vs bf16(code·absmax), each within 2⁻⁸ of
        // code·absmax, so 2⁻⁷·Σ|x·w| per output (a 16-term output that cancels to 5% of its terms
        // drew 5% apart, on both kernels).
        NF4Linear cpu(q, bias);
        Tensor ref = cpu(x.to(DType::f32)).to(DType::bf16);
        const std::vector<double> yv = y.to_vector<double>(), rv = ref.to_vector<double>();
        for (size_t i = 0; i < rv.size(); ++i)
          ASSERT_LE(std::abs(yv[i] - rv[i]), 1e-2 * std::abs(rv[i]) + std::ldexp(terms[i], -7)) << "output " << i;
        // In norm where there is a norm to speak of: one output of a 16-term sum (K 16, N 1, M 1)
        // is a single cancelling element (a fresh seed drew 1.6% there, the same y on both kernels).
        if (M * c.N >= 16) EXPECT_LE(relative_norm_error(y, ref), 1e-2);
      }
    }
  }
  ::unsetenv("TQ_NF4_GEMV");
  ::unsetenv("TQ_NF4_GEMV_X");
}

TEST(GpuNf4Linear, DecodeKernelsAreIndependentOfTheirGrid) {
  TQ_REQUIRE_GPU();
  // The x-stationary kernel gives each row the same arithmetic whatever team walks it, and
  // gemv_tc_kernel whatever CTA walks its tile, so capping the grid (TQ_NF4_GEMV_CTAS) to force
  // many rows per team and several reduction rounds (x-stationary, K 2048 on 2 CTAs: 16 teams, 128
  // rows each; tensor cores, K 2048 on 2 CTAs: 2 rounds of 32 tiles each, K 16384: 8 rounds of 4)
  // must give the same bits; and both must match the f64 reference. gemv_tc_kernel's ring depth
  // (TQ_NF4_TC_DEPTH: 2 items with 16 warps, 3 with 12) splits a round's items differently among
  // the warps but sums each row in the same order: the same bits again. For the x-stationary
  // kernel: 16-byte chunks (2048), 8-byte chunks (1152), two 8-byte chunks per lane (4304), and
  // K = 32768 (a row wider than 16 warps: gemv_kernel instead); for the tensor-core one: one block
  // phase (2048, 1152, 16384), four (4304), and 128 segments per tile (32768).
  struct Case {
    int64_t K, N;
    int ctas;
  };
  struct Path {
    const char *xpath, *depth;
  };
  for (const Case& c : {Case{2048, 2048, 2}, Case{1152, 999, 3}, Case{4304, 300, 1}, Case{32768, 5, 1}, Case{16384, 999, 2}}) {
    const NF4Tensor q = nf4_quantize(rnd({c.N, c.K}, DType::bf16, -0.1, 0.1));
    const NF4Tensor qd = q.to(kCuda);
    Tensor x = rnd({1, c.K}, DType::bf16, -1.0, 1.0);
    Tensor bias = rnd({c.N}, DType::f32, -0.5, 0.5);
    std::vector<float> tc_full;  // gemv_tc_kernel at depth 2 on the full grid
    for (const Path& path : {Path{"reg", "2"}, Path{"tc", "2"}, Path{"tc", "3"}}) {
      SCOPED_TRACE(str_cat("K ", c.K, " N ", c.N, " at most ", c.ctas, " CTAs, TQ_NF4_GEMV_X=", path.xpath,
                           " TQ_NF4_TC_DEPTH=", path.depth));
      ::setenv("TQ_NF4_GEMV_X", path.xpath, 1);
      ::setenv("TQ_NF4_TC_DEPTH", path.depth, 1);
      poison_pool(size_t(c.N) * 8 * 64 + (1 << 20));
      const std::vector<float> full = cuda_nf4_kernels().linear_small_m(x.to(kCuda), qd, bias.to(kCuda)).to_vector<float>();
      ::setenv("TQ_NF4_GEMV_CTAS", std::to_string(c.ctas).c_str(), 1);
      poison_pool(size_t(c.N) * 8 * 64 + (1 << 20));
      Tensor y = cuda_nf4_kernels().linear_small_m(x.to(kCuda), qd, bias.to(kCuda));
      ::unsetenv("TQ_NF4_GEMV_CTAS");
      ::unsetenv("TQ_NF4_GEMV_X");
      ::unsetenv("TQ_NF4_TC_DEPTH");
      const std::vector<float> capped = y.to_vector<float>();
      ASSERT_EQ(capped.size(), full.size());
      for (size_t i = 0; i < full.size(); ++i) ASSERT_EQ(capped[i], full[i]) << "output " << i;
      EXPECT_TRUE(within(y, fused_reference(q, x, bias, true), 1.0 / 128, 1e-5));
      if (std::string_view(path.xpath) != "tc") continue;
      if (tc_full.empty()) tc_full = full;
      for (size_t i = 0; i < full.size(); ++i) ASSERT_EQ(full[i], tc_full[i]) << "output " << i << " vs depth 2";
    }
  }
}

TEST(GpuNf4Linear, ForwardOnCudaMatchesTheCpuLayer) {
  TQ_REQUIRE_GPU();
  // Small M (fused product) and large M (dequantize into the scratch + matmul), 3-D inputs, f32 and
  // bf16 activations, with a bias.
  const int64_t N = 72, K = 4304;
  const NF4Tensor q = nf4_quantize(rnd({N, K}, DType::bf16, -0.05, 0.05));
  Tensor bias = rnd({N}, DType::f32, -0.5, 0.5);
  NF4Linear cpu(q, bias);
  NF4Linear gpu = cpu.to(kCuda);
  EXPECT_EQ(gpu.device(), kCuda);
  for (const Shape& xs : {Shape{1, 1, K}, Shape{2, 5, K}, Shape{3, 17, K}}) {
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(str_cat(xs, " ", dtype_name(dt)));
      Tensor x = rnd(xs, dt, -1.0, 1.0);
      poison_pool(size_t(N * K) * 4);
      Tensor y = gpu(x.to(kCuda));
      EXPECT_EQ(y.device(), kCuda);
      EXPECT_EQ(y.dtype(), dt);
      Tensor ref = cpu(x);
      EXPECT_TRUE(within(y, ref.to_vector<double>(), 1e-2, 1e-2));
      EXPECT_LE(relative_norm_error(y, ref), 1e-2);
      if (x.numel() / K > NF4Linear::kFusedMaxRows) {
        // The GEMM path rounds x·Wᵀ + bias once, as the CPU does: only the accumulation order differs,
        // which moves a bf16 rounding for ~0.03 % of outputs (adding the bias to a rounded product
        // would change ~30 %), by one ulp unless the output is within the two orders' error bound.
        const Bf16Disagreement d = bf16_disagreement(y.cpu(), ref, sum_order_slack(x, nf4_dequantize(q), bias));
        EXPECT_LE(d.differing, y.numel() / 50) << "outputs that differ from the CPU's";
        EXPECT_LE(d.max_ulps, 1);
      }
    }
  }
  EXPECT_THROW(gpu(rnd({2, K}, DType::f32)), Error);  // a CPU input for a CUDA layer
}

TEST(GpuNf4Linear, InputGradientOnCudaMatchesTheCpuLayer) {
  TQ_REQUIRE_GPU();
  const int64_t N = 257, K = 1152;
  const NF4Tensor q = nf4_quantize(rnd({N, K}, DType::f16, -0.05, 0.05));
  NF4Linear cpu(q), gpu = cpu.to(kCuda);
  for (int64_t M : {3, 40}) {
    SCOPED_TRACE(str_cat("M ", M));
    Tensor x = rnd({M, K}, DType::f32, -1.0, 1.0), dy = rnd({M, N}, DType::f32, -1.0, 1.0);
    Tensor xc = x.clone().requires_grad_(), xg = x.to(kCuda).requires_grad_();
    cpu(xc).backward(dy);
    poison_pool(size_t(N * K) * 4);
    gpu(xg).backward(dy.to(kCuda));
    ASSERT_TRUE(xg.grad().defined());
    EXPECT_EQ(xg.grad().device(), kCuda);
    EXPECT_TRUE(close(xg.grad().cpu(), xc.grad(), 1e-2));
  }
}

TEST(GpuNf4Linear, ScratchStaysOnTheDeviceAndIsReused) {
  TQ_REQUIRE_GPU();
  NF4Linear lin = NF4Linear(nf4_quantize(rnd({64, 256}, DType::f32))).to(kCuda);
  const Tensor& w1 = lin.dequantized_weight();
  EXPECT_EQ(w1.device(), kCuda);
  const void* p1 = w1.data_ptr();
  lin(rnd({2, 256}, DType::f32).to(kCuda));
  EXPECT_EQ(lin.dequantized_weight().data_ptr(), p1);
  EXPECT_TRUE(same_bits(lin.dequantized_weight().cpu(), nf4_dequantize(lin.weight(), DType::bf16).cpu()));
}

// The decoding path is capturable: nothing in it waits for the host.
TEST(GpuNf4Linear, FusedPathCapturesIntoAGraph) {
  TQ_REQUIRE_GPU();
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  const NF4Tensor q = nf4_quantize(rnd({2048, 2048}, DType::bf16, -0.05, 0.05));
  NF4Linear gpu = NF4Linear(q, rnd({2048}, DType::f32)).to(kCuda);
  Tensor x = Tensor::empty({1, 2048}, DType::bf16, kCuda);
  x.copy_(rnd({1, 2048}, DType::bf16));
  Tensor y = Tensor::empty({1, 2048}, DType::bf16, kCuda);
  y.copy_(gpu(x));  // warm-up outside the capture
  stream.synchronize();
  // The op's own buffers are allocated and freed inside the graph.
  const CapturedGraph graph(stream.get(), [&] { y.copy_(gpu(x)); });
  Tensor xc = rnd({1, 2048}, DType::bf16);
  x.copy_(xc);
  y.fill_(NAN);
  graph.launch();
  stream.synchronize();
  NF4Linear cpu(q, gpu.bias().cpu());
  EXPECT_TRUE(within(y, cpu(xc).to_vector<double>(), 1e-2, 1e-2));
}

}  // namespace
