// Fused attention on CUDA against the CPU op (include/tq/ops/attention.hpp), forward and all three
// gradients through autograd: every mask kind × MHA/GQA/MQA × softcap × sliding window × padding,
// on the tensor-core path (bf16/f16, D ∈ {72, 256}) and the generic path (f32, f64, odd head dims),
// at sizes that are not tile multiples (T = 1, 7, 286, 300), KV-cache decoding (Tq = 1 with an
// offset), masks on the host and on the device, non-contiguous inputs, rows that see no key, and a
// CUDA-graph capture (no host synchronization inside the op).
//
// Every input is a fresh random draw; outputs come from a poisoned pool (0xFF = NaN), so an element a
// kernel forgets to write cannot pass. Low-precision results are compared with the CPU op run in f32
// on the same bf16/f16 values, f32 results with the CPU op run in f64 on the same f32 values: the CPU
// op's own fp32 rounding reaches the f32 tolerance (1e-5) at these logit magnitudes, so an f32
// reference cannot tell a correct kernel from a wrong one at that tolerance. Suites are named Gpu*
// (ctest label gpu) and skip without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

std::mt19937_64& rng() {
  static std::mt19937_64 r(test::fresh_seed());
  return r;
}
int64_t pick(int64_t lo, int64_t hi) { return lo + int64_t(rng()() % uint64_t(hi - lo + 1)); }  // [lo, hi]

enum class Kind { none, causal, prefix_types, prefix_lengths, padding, causal_padding, prefix_padding };
enum class Heads { mha, gqa, mqa };
const Kind kAllKinds[] = {Kind::none,    Kind::causal,         Kind::prefix_types,  Kind::prefix_lengths,
                          Kind::padding, Kind::causal_padding, Kind::prefix_padding};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::none: return "none";
    case Kind::causal: return "causal";
    case Kind::prefix_types: return "prefix_types";
    case Kind::prefix_lengths: return "prefix_lengths";
    case Kind::padding: return "padding";
    case Kind::causal_padding: return "causal_padding";
    case Kind::prefix_padding: return "prefix_padding";
  }
  return "?";
}
bool is_prefix(Kind k) { return k == Kind::prefix_types || k == Kind::prefix_lengths || k == Kind::prefix_padding; }
bool is_padded(Kind k) { return k == Kind::padding || k == Kind::causal_padding || k == Kind::prefix_padding; }

struct Case {
  int64_t B = 1, Hq = 1, Hkv = 1, Tq = 1, Tk = 1, D = 8, Dv = 8;
  std::optional<int64_t> offset;  // default Tk − Tq
  std::optional<double> scale;    // default 1/√D
  double softcap = 0;
  int64_t window = 0;
  Kind kind = Kind::none;
  double range = 1.5;  // inputs uniform in [−range, range)
};

int64_t heads_for(Heads h, int64_t Hkv, int64_t rep) { return h == Heads::mha ? Hkv : Hkv * rep; }

std::string describe_case(const Case& c, DType dt) {
  return str_cat(dtype_name(dt), " B=", c.B, " Hq=", c.Hq, " Hkv=", c.Hkv, " Tq=", c.Tq, " Tk=", c.Tk, " D=", c.D,
                 " Dv=", c.Dv, " offset=", c.offset.value_or(c.Tk - c.Tq), " softcap=", c.softcap, " window=", c.window,
                 " mask=", kind_name(c.kind));
}

// Masks on the CPU: PaliGemma-shaped token types (prefix run, then suffix) or arbitrary 0/1 runs, and
// padding with a random pattern (left padding in some rows), at least one valid key per row.
AttentionOptions options_for(const Case& c) {
  AttentionOptions o;
  o.scale = c.scale;
  o.softcap = c.softcap;
  o.sliding_window = c.window;
  o.query_offset = c.offset;
  o.mask = is_prefix(c.kind) ? AttentionMask::prefix_lm
           : (c.kind == Kind::causal || c.kind == Kind::causal_padding) ? AttentionMask::causal
                                                                          : AttentionMask::none;
  if (is_prefix(c.kind)) {
    std::vector<int64_t> types, lengths;
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t len = pick(0, c.Tk);
      const bool structured = c.kind == Kind::prefix_lengths || pick(0, 2) > 0;
      lengths.push_back(len);
      for (int64_t x = 0; x < c.Tk; ++x) types.push_back(structured ? (x < len ? 0 : 1) : (pick(0, 3) == 0 ? 1 : 0));
    }
    if (c.kind == Kind::prefix_lengths) o.prefix_lengths = Tensor::from_vector(lengths, {c.B});
    else o.token_type_ids = Tensor::from_vector(types, {c.B, c.Tk});
  }
  if (is_padded(c.kind)) {
    std::vector<int64_t> pad;
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t left = b % 2 == 1 ? pick(0, c.Tk / 3) : 0;  // left padding (generation batches)
      for (int64_t x = 0; x < c.Tk; ++x) pad.push_back(x < left ? 0 : (pick(0, 5) == 0 ? 0 : 1));
      pad[size_t(b * c.Tk + pick(left, c.Tk - 1))] = 1;
    }
    o.key_padding = Tensor::from_vector(pad, {c.B, c.Tk});
  }
  return o;
}

// The same options with every mask tensor on the GPU.
AttentionOptions on_device(AttentionOptions o) {
  for (Tensor* t : {&o.token_type_ids, &o.prefix_lengths, &o.key_padding})
    if (t->defined()) *t = t->to(kCuda);
  return o;
}

struct Result {
  Tensor out;
  std::vector<Tensor> grads;  // dq, dk, dv
};

// The CPU op on the same values upcast: in f32 for bf16/f16 inputs, in f64 for f32 and f64 inputs.
Result cpu_reference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const AttentionOptions& opt) {
  const DType rd = q.dtype() == DType::bf16 || q.dtype() == DType::f16 ? DType::f32 : DType::f64;
  Tensor qf = q.to(rd), kf = k.to(rd), vf = v.to(rd), df = dout.to(rd);
  return {ops::attention_forward(qf, kf, vf, opt), ops::attention_backward(df, qf, kf, vf, opt)};
}

size_t bytes_of(const Tensor& t) { return std::max<size_t>(t.nbytes(), 256); }

// The op on the GPU through autograd; new allocations are poisoned before the forward and the backward.
Result gpu_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const AttentionOptions& opt) {
  Tensor qg = q.to(kCuda).requires_grad_(), kg = k.to(kCuda).requires_grad_(), vg = v.to(kCuda).requires_grad_();
  Tensor dg = dout.to(kCuda);
  const size_t poison = 4 * (bytes_of(q) + bytes_of(k) + bytes_of(v) + bytes_of(dout)) * (q.dtype() == DType::f64 ? 1 : 2);
  poison_pool(poison);
  Tensor out = scaled_dot_product_attention(qg, kg, vg, opt);
  poison_pool(poison);  // out and the saved lse stay alive; every gradient buffer starts as NaN
  out.backward(dg);
  return {out.cpu(), {qg.grad().cpu(), kg.grad().cpu(), vg.grad().cpu()}};
}

double tolerance(DType dt) { return dt == DType::f64 ? 1e-10 : tol_for(dt); }

// close() for the low-precision path: the forward rounds P to bf16/f16 before P·V (as every flash
// kernel does) and every result is rounded once to bf16/f16, an error of ~2⁻⁹ of the typical magnitude,
// not of each element: elements that cancel to near zero get an absolute allowance of rtol/4 of the
// largest reference element (a masking or indexing error is O(1) of it). The norm check is unchanged.
// (The backward's products see P and dS as hi + lo pairs, see flash_backward.cuh: rounded once, P and
// dS alone would use up this allowance.) A reference that is exactly zero everywhere (a single visible
// key: dq = dk = 0 analytically) allows no error at all; the kernels give exact zeros there.
::testing::AssertionResult close_lowp(const Tensor& got, const Tensor& ref, double rtol) {
  std::vector<double> g = got.to_vector<double>(), r = ref.to_vector<double>();
  if (got.shape() != ref.shape()) return ::testing::AssertionFailure() << "shape " << str_cat(got.shape());
  double maxref = 0, num = 0, den = 0;
  for (double x : r) maxref = std::max(maxref, std::abs(x));
  for (size_t i = 0; i < r.size(); ++i) {
    const double err = std::abs(g[i] - r[i]);
    if (!(err <= rtol * std::abs(r[i]) + 0.25 * rtol * maxref))
      return ::testing::AssertionFailure() << "element " << i << " of " << r.size() << ": got " << g[i]
                                           << ", expected " << r[i] << " (max |ref| " << maxref << ")";
    num += err * err;
    den += r[i] * r[i];
  }
  if (num > rtol * rtol * den) return ::testing::AssertionFailure() << "relative norm error " << std::sqrt(num / den);
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult matches(const Tensor& got, const Tensor& ref, DType dt) {
  if (got.dtype() != dt) return ::testing::AssertionFailure() << "dtype " << dtype_name(got.dtype());
  if (dt == DType::bf16 || dt == DType::f16) return close_lowp(got.to(DType::f32), ref, tolerance(dt));
  return close(got.to(ref.dtype()), ref, tolerance(dt));
}

// Runs one case on the GPU (masks on the host or the device) and compares everything with the CPU.
void check_case(const Case& c, DType dt, bool device_masks) {
  SCOPED_TRACE(describe_case(c, dt) + (device_masks ? " (device masks)" : " (host masks)"));
  const AttentionOptions opt = options_for(c);
  Tensor q = rnd({c.B, c.Hq, c.Tq, c.D}, dt, -c.range, c.range);
  Tensor k = rnd({c.B, c.Hkv, c.Tk, c.D}, dt, -c.range, c.range);
  Tensor v = rnd({c.B, c.Hkv, c.Tk, c.Dv}, dt, -1.0, 1.0);
  Tensor dout = rnd({c.B, c.Hq, c.Tq, c.Dv}, dt, -1.0, 1.0);
  const Result ref = cpu_reference(q, k, v, dout, opt);
  const Result got = gpu_autograd(q, k, v, dout, device_masks ? on_device(opt) : opt);
  EXPECT_TRUE(matches(got.out, ref.out, dt)) << "out";
  const char* names[] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(matches(got.grads[size_t(i)], ref.grads[size_t(i)], dt)) << names[i];
}

// A random case of the given mask kind and head layout with sizes in [1, max_t] and head dims `D`, `Dv`.
Case random_case(Kind kind, Heads heads, bool softcap, bool window, int64_t max_t, int64_t D, int64_t Dv) {
  Case c;
  c.kind = kind;
  c.B = pick(1, 2);
  c.Hkv = heads == Heads::mqa ? 1 : pick(1, 2);
  c.Hq = heads_for(heads, c.Hkv, pick(2, 4));
  c.Tk = pick(1, max_t);
  c.Tq = pick(0, 2) == 0 ? pick(1, c.Tk) : c.Tk;
  if (pick(0, 1) == 0) c.offset = pick(0, c.Tk - c.Tq);
  c.D = D, c.Dv = Dv;
  if (pick(0, 1) == 0) c.scale = 0.05 + 0.1 * double(pick(0, 4));
  if (softcap) c.softcap = 0.5 + 0.5 * double(pick(0, 4));
  if (window) c.window = pick(1, c.Tk);
  return c;
}

// ---- generic path: f32 and f64, every mask × head layout × softcap × window ----

TEST(GpuAttention, F32MatchesCpuForEveryMaskHeadsSoftcapAndWindow) {
  TQ_REQUIRE_GPU();
  const int64_t dims[][2] = {{3, 5}, {8, 8}, {16, 16}, {33, 33}, {72, 72}, {256, 256}};
  int n = 0;
  for (Kind kind : kAllKinds)
    for (Heads heads : {Heads::mha, Heads::gqa, Heads::mqa})
      for (bool softcap : {false, true})
        for (bool window : {false, true}) {
          const auto* d = dims[n++ % 6];
          check_case(random_case(kind, heads, softcap, window, 40, d[0], d[1]), DType::f32, n % 2 == 0);
        }
}

TEST(GpuAttention, F64MatchesCpu) {
  TQ_REQUIRE_GPU();
  for (Kind kind : {Kind::none, Kind::causal_padding, Kind::prefix_padding, Kind::prefix_lengths})
    for (Heads heads : {Heads::mha, Heads::mqa}) {
      check_case(random_case(kind, heads, true, kind == Kind::causal_padding, 20, 5, 3), DType::f64, false);
      check_case(random_case(kind, heads, false, false, 33, 72, 72), DType::f64, true);
    }
}

// Exact sizes 1 and 7 and odd head dims, where nothing is a multiple of a tile or a warp.
TEST(GpuAttention, SizeOneAndOddHeadDims) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16})
    for (int64_t D : {1, 3, 8, 16, 33})
      for (int64_t T : {1, 7})
        for (Kind kind : {Kind::none, Kind::causal, Kind::prefix_padding}) {
          Case c;
          c.kind = kind, c.B = 1, c.Hq = 3, c.Hkv = 1, c.Tq = T, c.Tk = T, c.D = D, c.Dv = D == 1 ? 2 : D;
          check_case(c, dt, T == 7);
        }
}

// ---- tensor-core path: bf16 / f16 at D = 72 and 256 ----

TEST(GpuAttention, FlashBf16MatchesCpuAcrossMasksAndTileTails) {
  TQ_REQUIRE_GPU();
  int n = 0;
  for (int64_t D : {72, 256})
    for (int64_t T : {1, 7, 286, 300})
      for (Kind kind : kAllKinds) {
        const Heads heads = n % 3 == 0 ? Heads::mha : n % 3 == 1 ? Heads::gqa : Heads::mqa;
        Case c = random_case(kind, heads, n % 2 == 0, n % 4 == 1, T, D, D);
        c.Tk = T;
        c.Tq = n % 5 == 0 ? pick(1, T) : T;  // sometimes a KV-cache style tail of queries
        c.offset.reset();
        if (n % 7 == 3) c.offset = pick(0, c.Tk - c.Tq);
        if (c.window > 0) c.window = pick(1, T);
        c.range = D == 72 ? 2.0 : 1.5;
        check_case(c, DType::bf16, n % 2 == 1);
        ++n;
      }
}

TEST(GpuAttention, FlashF16MatchesCpu) {
  TQ_REQUIRE_GPU();
  for (int64_t D : {72, 256})
    for (Kind kind : {Kind::none, Kind::causal_padding, Kind::prefix_padding}) {
      Case c = random_case(kind, Heads::gqa, kind != Kind::none, kind == Kind::causal_padding, 100, D, D);
      c.Tk = c.Tq = 97;
      c.offset.reset();
      if (c.window > 0) c.window = 33;
      check_case(c, DType::f16, kind == Kind::prefix_padding);
    }
}

// The model's shapes (batch reduced): SigLIP, Gemma (PaliGemma 1, MQA, prefix-LM + padding) and
// Gemma 2 (GQA, softcap 50, sliding window on and off).
TEST(GpuAttention, ModelShapesBf16) {
  TQ_REQUIRE_GPU();
  Case siglip;
  siglip.B = 2, siglip.Hq = siglip.Hkv = 16, siglip.Tq = siglip.Tk = 256, siglip.D = siglip.Dv = 72;
  siglip.range = 2.0;
  check_case(siglip, DType::bf16, false);
  Case gemma;
  gemma.kind = Kind::prefix_padding, gemma.B = 2, gemma.Hq = 8, gemma.Hkv = 1, gemma.Tq = gemma.Tk = 286;
  gemma.D = gemma.Dv = 256;
  check_case(gemma, DType::bf16, true);
  for (int64_t window : {int64_t(4096), int64_t(100)}) {
    Case gemma2 = gemma;
    gemma2.kind = Kind::prefix_types, gemma2.Hkv = 4, gemma2.softcap = 50.0, gemma2.window = window;
    gemma2.scale = 1.0 / 16.0, gemma2.range = 4.0;
    check_case(gemma2, DType::bf16, false);
  }
}

// ---- decoding, special rows, layouts ----

// One new token against a KV cache (Tq = 1, offset Tk − 1) and a short tail at an explicit offset.
TEST(GpuAttention, DecodeAgainstKvCache) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32})
    for (int64_t Tk : {1, 63, 64, 65, 350}) {
      Case c;
      c.kind = Kind::prefix_padding, c.B = 3, c.Hq = 8, c.Hkv = 1, c.Tq = 1, c.Tk = Tk, c.D = c.Dv = 256;
      check_case(c, dt, true);
      c.kind = Kind::causal_padding, c.Hkv = 4, c.Tq = std::min<int64_t>(3, Tk), c.offset = Tk - c.Tq;
      c.softcap = 50.0, c.window = std::max<int64_t>(1, Tk / 2), c.D = c.Dv = 72;
      check_case(c, dt, false);
    }
}

// A query that sees no key: zero output, zero gradient, lse = −inf, nothing NaN; other rows unaffected.
TEST(GpuAttention, FullyMaskedRowsAreZero) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32})
    for (int64_t D : {72, 16}) {
      SCOPED_TRACE(str_cat(dtype_name(dt), " D=", D));
      const int64_t B = 2, H = 2, T = 70;
      AttentionOptions opt;
      opt.mask = AttentionMask::causal;
      // Sample 0: keys 0..4 are pads, so queries 0..4 see nothing. Sample 1: every key is a pad.
      std::vector<int64_t> pad(size_t(B * T), 1);
      for (int64_t x = 0; x < 5; ++x) pad[size_t(x)] = 0;
      for (int64_t x = 0; x < T; ++x) pad[size_t(T + x)] = 0;
      opt.key_padding = Tensor::from_vector(pad, {B, T});
      Tensor q = rnd({B, H, T, D}, dt), k = rnd({B, H, T, D}, dt), v = rnd({B, H, T, D}, dt);
      Tensor dout = rnd({B, H, T, D}, dt);
      const Result ref = cpu_reference(q, k, v, dout, opt);
      const Result got = gpu_autograd(q, k, v, dout, on_device(opt));
      EXPECT_TRUE(matches(got.out, ref.out, dt));
      for (int i = 0; i < 3; ++i) EXPECT_TRUE(matches(got.grads[size_t(i)], ref.grads[size_t(i)], dt)) << "grad " << i;
      const std::vector<double> o = got.out.to_vector<double>(), dq = got.grads[0].to_vector<double>();
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < T; ++i)
          for (int64_t d = 0; d < D; ++d) {
            const size_t s0 = size_t(((0 * H + h) * T + i) * D + d), s1 = size_t(((1 * H + h) * T + i) * D + d);
            if (i < 5) {
              ASSERT_EQ(o[s0], 0.0) << "sample 0, head " << h << ", query " << i;
              ASSERT_EQ(dq[s0], 0.0);
            } else {
              ASSERT_TRUE(std::isfinite(o[s0]));
            }
            ASSERT_EQ(o[s1], 0.0);
            ASSERT_EQ(dq[s1], 0.0);
          }
      const std::vector<Tensor> fw = ops::attention_forward_cuda(q.to(kCuda), k.to(kCuda), v.to(kCuda), opt);
      const std::vector<double> lse = fw[1].cpu().to_vector<double>();
      for (int64_t h = 0; h < H; ++h) {
        EXPECT_EQ(lse[size_t(h * T)], -INFINITY);
        EXPECT_TRUE(std::isfinite(lse[size_t(h * T + 5)]));
        EXPECT_EQ(lse[size_t((H + h) * T + 7)], -INFINITY);
      }
    }
}

// Prefix runs are numbered by a block scan in chunks of 256 keys: many short runs over several chunks.
TEST(GpuAttention, PrefixRunsAcrossScanChunks) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16}) {
    Case c;
    c.kind = Kind::prefix_padding, c.B = 2, c.Hq = 2, c.Hkv = 1, c.Tq = 40, c.Tk = 700, c.D = c.Dv = 72;
    SCOPED_TRACE(describe_case(c, dt));
    AttentionOptions opt = options_for(c);
    std::vector<int64_t> types;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t x = 0; x < c.Tk; ++x) types.push_back(pick(0, 2) == 0 ? 1 : 0);  // runs of ~3 prefix tokens
    types[size_t(255)] = types[size_t(256)] = types[size_t(257)] = 0;  // a run across the first chunk edge
    opt.token_type_ids = Tensor::from_vector(types, {c.B, c.Tk});
    opt.query_offset = c.Tk - c.Tq - 3;
    Tensor q = rnd({c.B, c.Hq, c.Tq, c.D}, dt), k = rnd({c.B, c.Hkv, c.Tk, c.D}, dt), v = rnd({c.B, c.Hkv, c.Tk, c.Dv}, dt);
    Tensor dout = rnd({c.B, c.Hq, c.Tq, c.Dv}, dt);
    const Result ref = cpu_reference(q, k, v, dout, opt);
    const Result got = gpu_autograd(q, k, v, dout, on_device(opt));
    EXPECT_TRUE(matches(got.out, ref.out, dt)) << "out";
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(matches(got.grads[size_t(i)], ref.grads[size_t(i)], dt)) << "grad " << i;
  }
}

// Without a positional mask the queries need no position: more queries than keys is fine.
TEST(GpuAttention, MoreQueriesThanKeysWithoutPositionalMask) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16})
    for (Kind kind : {Kind::none, Kind::padding}) {
      Case c;
      c.kind = kind, c.B = 2, c.Hq = 4, c.Hkv = 2, c.Tq = 70, c.Tk = 5, c.D = c.Dv = 72;
      check_case(c, dt, kind == Kind::padding);
    }
}

// Host and device masks give the same forward bit for bit (the same kernels on the same key records).
TEST(GpuAttention, DeviceMasksEqualHostMasks) {
  TQ_REQUIRE_GPU();
  for (Kind kind : {Kind::prefix_types, Kind::prefix_lengths, Kind::prefix_padding, Kind::causal_padding}) {
    Case c;
    c.kind = kind, c.B = 3, c.Hq = 4, c.Hkv = 2, c.Tq = c.Tk = 130, c.D = c.Dv = 72, c.window = 77;
    SCOPED_TRACE(describe_case(c, DType::bf16));
    const AttentionOptions opt = options_for(c);
    Tensor q = rnd({c.B, c.Hq, c.Tq, c.D}, DType::bf16).to(kCuda), k = rnd({c.B, c.Hkv, c.Tk, c.D}, DType::bf16).to(kCuda);
    Tensor v = rnd({c.B, c.Hkv, c.Tk, c.Dv}, DType::bf16).to(kCuda);
    const Tensor host = ops::attention_forward(q, k, v, opt).cpu(), dev = ops::attention_forward(q, k, v, on_device(opt)).cpu();
    EXPECT_TRUE(close(dev, host, 0.0));
  }
}

// Views that are not dense (heads split from (B, T, H, D), as the models produce them) and an offset
// into their storage give the same answer as dense copies.
TEST(GpuAttention, NonContiguousInputs) {
  TQ_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t B = 2, T = 77, Hq = 4, Hkv = 2, D = 72;
    Tensor qb = rnd({B + 1, T, Hq, D}, dt).to(kCuda), kb = rnd({B, T, Hkv, D}, dt).to(kCuda);
    Tensor vb = rnd({B, T, Hkv, D}, dt).to(kCuda);
    Tensor q = qb.narrow(0, 1, B).permute({0, 2, 1, 3}), k = kb.permute({0, 2, 1, 3}), v = vb.permute({0, 2, 1, 3});
    ASSERT_FALSE(q.is_contiguous());
    AttentionOptions opt;
    opt.mask = AttentionMask::causal;
    Tensor dout = rnd({B, Hq, T, D}, dt).to(kCuda).transpose(2, 3).contiguous().transpose(2, 3);
    const Tensor got = ops::attention_forward(q, k, v, opt).cpu();
    const Tensor want = ops::attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), opt).cpu();
    EXPECT_TRUE(close(got, want, 0.0));
    const std::vector<Tensor> g = ops::attention_backward(dout, q, k, v, opt);
    const std::vector<Tensor> w = ops::attention_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), opt);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(matches(g[size_t(i)].cpu(), w[size_t(i)].cpu().to(DType::f32), dt)) << i;
  }
}

// Forward and backward with device masks inside a CUDA graph capture: any host synchronization or
// device-to-host read in the op breaks the capture. Replays see new inputs written in place.
TEST(GpuAttention, CapturedInCudaGraph) {
  TQ_REQUIRE_GPU();
  for (int64_t D : {256, 33}) {
    SCOPED_TRACE(str_cat("D=", D));
    tq::cuda::Stream stream;
    StreamGuard guard(DeviceType::cuda, stream);
    Case c;
    c.kind = Kind::prefix_padding, c.B = 2, c.Hq = 8, c.Hkv = 1, c.Tq = c.Tk = 70, c.D = c.Dv = D;
    const DType dt = D == 256 ? DType::bf16 : DType::f32;
    const AttentionOptions host_opt = options_for(c);
    const AttentionOptions opt = on_device(host_opt);
    Tensor q = Tensor::empty({c.B, c.Hq, c.Tq, D}, dt, kCuda), k = Tensor::empty({c.B, c.Hkv, c.Tk, D}, dt, kCuda);
    Tensor v = Tensor::empty({c.B, c.Hkv, c.Tk, D}, dt, kCuda), dout = Tensor::empty({c.B, c.Hq, c.Tq, D}, dt, kCuda);
    // Results land in buffers made before the capture; everything the op allocates inside it is
    // also freed inside it.
    Tensor out = Tensor::empty(q.shape(), dt, kCuda), dq = Tensor::empty(q.shape(), dt, kCuda);
    auto step = [&] {
      out.copy_(ops::attention_forward(q, k, v, opt));
      dq.copy_(ops::attention_backward(dout, q, k, v, opt)[0]);
    };
    for (Tensor* t : {&q, &k, &v, &dout}) t->copy_(rnd(t->shape(), dt));
    step();  // warm-up outside the capture: kernel attributes, pool setup
    stream.synchronize();
    const CapturedGraph graph(stream.get(), [&] { step(); });
    for (int replay = 0; replay < 2; ++replay) {
      SCOPED_TRACE(str_cat("replay ", replay));
      Tensor qc = rnd(q.shape(), dt), kc = rnd(k.shape(), dt), vc = rnd(v.shape(), dt), dc = rnd(dout.shape(), dt);
      q.copy_(qc), k.copy_(kc), v.copy_(vc), dout.copy_(dc);
      out.fill_(NAN), dq.fill_(NAN);
      graph.launch();
      stream.synchronize();
      const Result ref = cpu_reference(qc, kc, vc, dc, host_opt);
      EXPECT_TRUE(matches(out.cpu(), ref.out, dt));
      EXPECT_TRUE(matches(dq.cpu(), ref.grads[0], dt));
    }
  }
}

// What the CPU op rejects, the CUDA op rejects too (with a tq::Error, before any kernel runs).
TEST(GpuAttention, ErrorPaths) {
  TQ_REQUIRE_GPU();
  auto t = [](Shape s, Device d = kCuda) { return rnd(s, DType::bf16).to(d); };
  auto throws = [](const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& o) {
    EXPECT_THROW(scaled_dot_product_attention(q, k, v, o), Error) << describe(q) << describe(k) << describe(v);
  };
  const AttentionOptions plain;
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}, Device::cpu()), t({1, 2, 4, 8}), plain);  // devices differ
  throws(t({1, 3, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), plain);                 // 3 query heads over 2
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 7}), t({1, 2, 4, 8}), plain);                 // head dims differ
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), rnd({1, 2, 4, 8}, DType::f32).to(kCuda), plain);  // dtypes differ
  AttentionOptions bad;
  bad.mask = AttentionMask::causal;
  throws(t({1, 2, 5, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), bad);  // more queries than keys, causal
  bad.key_padding = Tensor::from_vector<int64_t>({1, 1, 2, 1}, {1, 4});  // not 0/1 (host mask)
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), bad);
  bad.key_padding = Tensor::ones({1, 5}, DType::i64, kCuda);  // wrong shape (device mask)
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), bad);
  AttentionOptions prefix;
  prefix.mask = AttentionMask::prefix_lm;  // neither token types nor lengths
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), prefix);
  prefix.prefix_lengths = Tensor::from_vector<int64_t>({5}, {1});  // longer than Tk (host mask)
  throws(t({1, 2, 4, 8}), t({1, 2, 4, 8}), t({1, 2, 4, 8}), prefix);
}

}  // namespace
