// NF4 4-bit quantization with double-quantized absmax, exactly as bitsandbytes 0.49.2's CUDA path
// (spec/qlora.md §A), and its serialized form (QuantState.as_dict(packed=True), §A.8).
//
// Layout (n = numel of the weight, flattened row-major; blocks straddle rows):
//   packed         u8  [(n+1)/2, 1]   element 2j → high nibble, 2j+1 → low nibble
//   absmax         u8  [nb]           nb = ceil(n/64); 8-bit DYN codes of absmax − offset (double quant)
//                  f32 [nb]           plain absmax (no double quant)
//   nested_absmax  f32 [ceil(nb/256)] per 256 absmax values
//   offset         f32                mean(absmax), stored as nested_offset in the JSON blob
//
// What is bit-exact (checked against real bitsandbytes 0.49.2 on an H200, tests/fixtures/nf4/*.gpu.*):
//   * nf4_dequantize: always (plain IEEE f32 multiply/add, A.7), so is loading a bnb-saved checkpoint.
//   * nf4_quantize: the code decisions (dQuantizeNF4 / dQuantize<0>), ties, all-zero blocks, packing.
//     The one deliberate difference: bnb's fast-math build scales by rcp.approx.ftz.f32(absmax), which on
//     sm_90 returns, for 13.2 % of mantissas, the other of the two floats bracketing 1/x (always faithful,
//     never > 1 ulp, a function of the mantissa alone — measured over all 2^23 mantissas in 7 binades).
//     No public definition of that hardware table exists, so the CPU uses IEEE 1/x (with FTZ as the GPU
//     does). A code can then differ only when the scaled value lies within ~1 ulp of a threshold; on the
//     fixtures (5.2 M weights incl. the 1152×4304 SigLIP fc2 shape) zero codes differed.
//   * offset: float32 rounding of the float64 mean, summed in a fixed order (per 256-block partials, then
//     the partials in order: nf4::absmax_mean) that the CUDA path reproduces bit for bit. torch's CUDA
//     reduction order is not reproduced (it matched on every fixture). Pass Nf4QuantizeOptions::offset to
//     force a known value.
//
// CUDA: an NF4Tensor whose tensors live on a CUDA device (nf4_quantize of a CUDA weight, or
// NF4Tensor::to) quantizes and dequantizes through kernels/nf4.cuh (cuda_nf4_kernels()), bit-identical to
// the functions below except for the reciprocal: CUDA uses bnb's rcp.approx.ftz.f32 by default
// (Nf4QuantizeOptions::ieee_reciprocal selects the CPU's IEEE 1/x).
#pragma once

#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tq/core/tensor.hpp"
#include "tq/core/thread_pool.hpp"

namespace tq {

namespace nf4 {

inline constexpr int64_t kBlock = 64;         // 4-bit blocksize (Params4bit / quantize_4bit default)
inline constexpr int64_t kNestedBlock = 256;  // hard-coded in quantize_4bit for the absmax statistics

// get_4bit_type("nf4") = nf4_dequantization_lut, by bit pattern.
inline constexpr std::array<uint32_t, 16> kCodeBits = {
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};

// dQuantizeNF4's decimal literals rounded once to float32 (what nvcc does). Entries 0, 8, 12 and 14 are one
// ulp away from f32((c_k + c_k+1)/2) — spec A.4's table — because those literals sit within 1e-9 ulp of a
// float32 midpoint; real bitsandbytes confirms these values (fixture w4x64_ties_f32.gpu).
inline constexpr std::array<uint32_t, 15> kThresholdBits = {
    0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
    0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9};

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), sorted ascending (spec A.6).
inline constexpr std::array<uint32_t, 256> kDynBits = {
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000};

inline float code(int q) { return std::bit_cast<float>(kCodeBits[size_t(q)]); }
inline float threshold(int k) { return std::bit_cast<float>(kThresholdBits[size_t(k)]); }
inline float dyn(int i) { return std::bit_cast<float>(kDynBits[size_t(i)]); }

// bnb is built with --use_fast_math: float multiplies and the reciprocal flush subnormal inputs and
// results to (signed) zero.
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
inline float mul_ftz(float a, float b) { return ftz(ftz(a) * ftz(b)); }
// CPU stand-in for rcp.approx.ftz.f32: IEEE 1/x with FTZ (see the header comment for the 1-ulp caveat).
inline float rcp_ftz(float x) { return ftz(1.0f / ftz(x)); }

// dQuantizeNF4: the number of thresholds strictly below x (a tie goes to the lower code; NaN → 0).
inline uint8_t quantize_code(float x) {
  uint8_t q = 0;
  for (uint32_t t : kThresholdBits) q += uint8_t(x > std::bit_cast<float>(t));
  return q;
}

// dQuantize<0> (kQuantizeBlockwise<float, 256, General8bit>): the binary search over DYN, literally
// (at exact midpoints the winner is the neighbour probed last, not always the lower one).
inline uint8_t quantize_dyn(float z) {
  int p = 127, up = 255, lo = 0;
  float lower = -1.0f, upper = 1.0f, v = dyn(127);
  for (int step = 64; step >= 1; step /= 2) {
    if (z > v) {
      lo = p;
      lower = v;
      p += step;
    } else {
      up = p;
      upper = v;
      p -= step;
    }
    v = dyn(p);
  }
  if (up == 255) upper = dyn(255);
  if (lo == 0) lower = dyn(0);
  if (z > v) return uint8_t(z > (upper + v) * 0.5f ? up : p);
  return uint8_t(z < (lower + v) * 0.5f ? lo : p);
}

// "bfloat16" / "float16" / "float32": str(torch.dtype) stripped of "torch." as bnb writes it.
inline const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::f32: return "float32";
    default: fail(str_cat("nf4: weights of dtype ", dtype_name(t), " cannot be quantized (bf16, f16 or f32)"));
  }
}
inline std::optional<DType> dtype_from_torch_name(const std::string& s) {
  if (s == "bfloat16") return DType::bf16;
  if (s == "float16") return DType::f16;
  if (s == "float32") return DType::f32;
  return std::nullopt;
}

// Rounds an f32 value through `dt` (the QuantState dtype): one RNE rounding, as a T-typed store does.
inline float round_through(float v, DType dt) {
  if (dt == DType::bf16) return float(bf16(v));
  if (dt == DType::f16) return float(f16(v));
  return v;
}

}  // namespace nf4

// A frozen NF4 weight: bnb's packed codes plus its QuantState.
struct NF4Tensor {
  Tensor packed;         // u8 [(n+1)/2, 1]
  Tensor absmax;         // u8 [nb] with double quant, else f32 [nb]
  Tensor nested_absmax;  // f32 [ceil(nb/256)]; undefined without double quant
  float offset = 0.0f;   // nested_offset
  Shape shape;           // the weight's shape, e.g. (out, in)
  DType dtype = DType::bf16;  // QuantState.dtype: the dtype W had when it was quantized

  int64_t numel() const { return numel_of(shape); }
  int64_t num_blocks() const { return (numel() + nf4::kBlock - 1) / nf4::kBlock; }
  bool double_quant() const { return absmax.defined() && absmax.dtype() == DType::u8; }
  Device device() const { return packed.device(); }

  // The same quantized weight with its tensors on `d` (a copy; the host-side fields are shared).
  NF4Tensor to(Device d) const {
    NF4Tensor r = *this;
    r.packed = packed.detach().to(d);
    r.absmax = absmax.detach().to(d);
    if (nested_absmax.defined()) r.nested_absmax = nested_absmax.detach().to(d);
    return r;
  }
};

struct Nf4QuantizeOptions {
  bool double_quant = true;     // compress_statistics (bnb_4bit_use_double_quant)
  std::optional<float> offset;  // force the double-quant offset (e.g. a stored torch mean) instead of the mean
  // CUDA only: scale each block by the IEEE reciprocal of its absmax, as the CPU reference does, instead of
  // bnb's rcp.approx.ftz.f32 (the default on CUDA, what bitsandbytes computes). The CPU always uses IEEE.
  bool ieee_reciprocal = false;
};

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/nf4.cuh); empty in a CPU-only program.
struct Nf4CudaKernels {
  // nf4_quantize of a CUDA weight (f32/bf16/f16, contiguous): the NF4Tensor's tensors on that device.
  NF4Tensor (*quantize)(const Tensor& w, const Nf4QuantizeOptions& opt) = nullptr;
  // nf4_dequantize_into with q and out on one CUDA device.
  void (*dequantize_into)(const NF4Tensor& q, const Tensor& out) = nullptr;
  // The fused small-M product: y (M, N) bf16 = x (M, K) · dequant(W)ᵀ + bias, x bf16, W (N, K), M ≤ 16,
  // bias (N) any float dtype or undefined; fp32 accumulation, bias added in fp32, one bf16 rounding.
  Tensor (*linear_small_m)(const Tensor& x, const NF4Tensor& w, const Tensor& bias) = nullptr;
};
inline Nf4CudaKernels& cuda_nf4_kernels() {
  static Nf4CudaKernels k;
  return k;
}

namespace nf4 {
// The CUDA table entry, or a tq::Error naming the op when no CUDA backend is compiled in.
template <class Fn>
Fn cuda_entry(Fn fn, const char* op) {
  TQ_CHECK(fn != nullptr, op, ": no CUDA kernel is available for CUDA tensors in this program"
           " (include <tq/cuda.hpp> in one CUDA translation unit)");
  return fn;
}
}  // namespace nf4

namespace nf4 {

// kQuantizeBlockwise<T, 64, NF4> over w (f32 values of the weight, n of them): absmax per block and packed
// codes. The pad item of an odd n takes the code of 0·scale, as the kernel's zero-padded load does.
inline void quantize_blocks(const float* w, int64_t n, float* absmax, uint8_t* packed) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  parallel_for(nb, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      float am = 0.0f;  // fmaxf under FTZ: subnormals count as zero
      for (int64_t i = lo; i < hi; ++i) am = std::max(am, std::fabs(ftz(w[i])));
      absmax[b] = am;
      const float s = rcp_ftz(am);  // inf for an all-zero block → 0·inf = NaN → code 0
      for (int64_t i = lo; i < lo + kBlock; i += 2) {
        if (i >= n) break;
        const float x0 = w[i], x1 = i + 1 < n ? w[i + 1] : 0.0f;
        packed[i / 2] = uint8_t(quantize_code(mul_ftz(x0, s)) << 4 | quantize_code(mul_ftz(x1, s)));
      }
    }
  });
}

// quantize_blockwise(absmax − offset, code=DYN, blocksize=256): 8-bit codes and the nested absmax.
inline void quantize_nested(const float* absmax, int64_t nb, float offset, uint8_t* q, float* absmax2) {
  for (int64_t c = 0; c * kNestedBlock < nb; ++c) {
    const int64_t lo = c * kNestedBlock, hi = std::min(nb, lo + kNestedBlock);
    float am2 = 0.0f;
    for (int64_t i = lo; i < hi; ++i) am2 = std::max(am2, std::fabs(ftz(absmax[i] - offset)));
    absmax2[c] = am2;
    const float s2 = rcp_ftz(am2);
    for (int64_t i = lo; i < hi; ++i) q[i] = quantize_dyn(mul_ftz(absmax[i] - offset, s2));
  }
}

// mean(absmax) as the double-quant offset: summed in double per 256-block chunk (in order), the chunk sums
// added in order, the mean rounded once to float. The CUDA path (kernels/nf4.cuh) sums in exactly this
// order, so both give the same bits; a plain sequential sum would be hard to reproduce on the device.
inline float absmax_mean(const float* absmax, int64_t nb) {
  double total = 0;
  for (int64_t lo = 0; lo < nb; lo += kNestedBlock) {
    double part = 0;
    for (int64_t i = lo; i < std::min(nb, lo + kNestedBlock); ++i) part += double(absmax[i]);
    total += part;
  }
  return float(total / double(nb));
}

// The per-block absmax as dequantize_4bit sees it: am = f32(f32(DYN[q]·absmax2) + offset) (the add is a
// separate torch op, no FMA) with double quant, else the stored f32 absmax.
inline std::vector<float> block_absmax(const NF4Tensor& q) {
  TQ_CHECK(q.device().is_cpu(), "nf4::block_absmax: the NF4 weight is on ", q.device().str(), " (a CPU helper)");
  const int64_t nb = q.num_blocks();
  std::vector<float> am(static_cast<size_t>(nb));
  Tensor a = q.absmax.contiguous();
  if (!q.double_quant()) {
    std::copy_n(a.data<float>(), nb, am.data());
    return am;
  }
  Tensor a2 = q.nested_absmax.contiguous();
  const uint8_t* codes = a.data<uint8_t>();
  const float* n2 = a2.data<float>();
  for (int64_t b = 0; b < nb; ++b) am[size_t(b)] = mul_ftz(dyn(codes[b]), n2[b / kNestedBlock]) + q.offset;
  return am;
}

}  // namespace nf4

// Quantizes w (f32, bf16 or f16; any shape, flattened row-major) as bnb's CUDA quantize_4bit(nf4) does.
// A CUDA weight is quantized on its device (the result's tensors stay there).
inline NF4Tensor nf4_quantize(const Tensor& w, const Nf4QuantizeOptions& opt = {}) {
  TQ_CHECK(w.defined(), "nf4_quantize: undefined weight");
  if (w.device().is_cuda()) {
    nf4::torch_dtype_name(w.dtype());  // rejects other dtypes
    TQ_CHECK(w.numel() > 0, "nf4_quantize: empty weight ", describe(w));
    return nf4::cuda_entry(cuda_nf4_kernels().quantize, "nf4_quantize")(w, opt);
  }
  TQ_CHECK(w.device().is_cpu(), "nf4_quantize: expected a CPU or CUDA tensor, got ", describe(w));
  NF4Tensor q;
  q.dtype = w.dtype();
  nf4::torch_dtype_name(q.dtype);  // rejects other dtypes
  q.shape = w.shape();
  const int64_t n = w.numel();
  TQ_CHECK(n > 0, "nf4_quantize: empty weight ", describe(w));
  Tensor wf = w.detach().to(DType::f32).contiguous();  // exact for bf16/f16
  const int64_t nb = q.num_blocks();
  Tensor absmax = Tensor::empty({nb}, DType::f32);
  q.packed = Tensor::empty({(n + 1) / 2, 1}, DType::u8);
  nf4::quantize_blocks(wf.data<float>(), n, absmax.data<float>(), q.packed.data<uint8_t>());
  if (!opt.double_quant) {
    q.absmax = absmax;
    return q;
  }
  const float* am = absmax.data<float>();
  q.offset = opt.offset ? *opt.offset : nf4::absmax_mean(am, nb);
  q.absmax = Tensor::empty({nb}, DType::u8);
  q.nested_absmax = Tensor::empty({(nb + nf4::kNestedBlock - 1) / nf4::kNestedBlock}, DType::f32);
  nf4::quantize_nested(am, nb, q.offset, q.absmax.data<uint8_t>(), q.nested_absmax.data<float>());
  return q;
}

// Writes the dequantized weight into `out` (contiguous, q.shape, f32/bf16/f16): w = NF4[q]·am rounded once
// to q.dtype (kDequantizeBlockwise<T>), then converted to out's dtype (a second rounding when they differ,
// as MatMul4Bit's .to(bf16) does).
// On CUDA (q and out on one device) this is one kernel, bit-identical to the CPU.
inline void nf4_dequantize_into(const NF4Tensor& q, const Tensor& out) {
  TQ_CHECK(q.packed.defined() && out.defined() && out.is_contiguous() && out.shape() == q.shape &&
               out.device() == q.device(),
           "nf4_dequantize: output ", describe(out), " must be a contiguous tensor of shape ", q.shape, " on ",
           q.packed.defined() ? q.device().str() : std::string("the weight's device"));
  if (out.device().is_cuda()) {
    TQ_CHECK(out.dtype() == DType::f32 || out.dtype() == DType::bf16 || out.dtype() == DType::f16,
             "nf4_dequantize: output dtype must be f32, bf16 or f16, got ", dtype_name(out.dtype()));
    return nf4::cuda_entry(cuda_nf4_kernels().dequantize_into, "nf4_dequantize")(q, out);
  }
  const std::vector<float> am = nf4::block_absmax(q);
  Tensor packed = q.packed.contiguous();
  const uint8_t* p = packed.data<uint8_t>();
  const int64_t n = q.numel();
  const DType qdt = q.dtype, odt = out.dtype();
  auto run = [&](auto* dst) {
    using T = std::remove_pointer_t<decltype(dst)>;
    parallel_for(q.num_blocks(), 256, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0 * nf4::kBlock; i < std::min(n, b1 * nf4::kBlock); ++i) {
        const int code = (i & 1) ? (p[i >> 1] & 0xF) : (p[i >> 1] >> 4);
        const float v = nf4::round_through(nf4::mul_ftz(nf4::code(code), am[size_t(i >> 6)]), qdt);
        if constexpr (std::is_same_v<T, float>) dst[i] = v;
        else dst[i] = T(v);
      }
    });
  };
  switch (odt) {
    case DType::f32: run(out.data<float>()); break;
    case DType::bf16: run(out.data<bf16>()); break;
    case DType::f16: run(out.data<f16>()); break;
    default: fail(str_cat("nf4_dequantize: output dtype must be f32, bf16 or f16, got ", dtype_name(odt)));
  }
}

inline Tensor nf4_dequantize(const NF4Tensor& q, std::optional<DType> out_dtype = std::nullopt) {
  Tensor out = Tensor::empty(q.shape, out_dtype.value_or(q.dtype), q.device());
  nf4_dequantize_into(q, out);
  return out;
}

}  // namespace tq

#include "tq/quant/nf4_serialize.hpp"
