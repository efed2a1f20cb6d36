// CUDA NF4 (bitsandbytes 0.49.2's layout and arithmetic, spec/qlora.md §A): quantize, dequantize
// and the fused small-M product y = x · dequant(W)ᵀ + b (the entries of cuda_nf4_kernels()).
//
// Invariants:
// - Quantize and dequantize are bit-identical to the CPU reference (quant/nf4.hpp): every float
//   operation that decides a bit is an explicit IEEE intrinsic (__fmul_rn, __fadd_rn, __fsub_rn:
//   the compiler may not fuse them into an FMA), with flush-to-zero exactly where the CPU (and
//   bnb's --use_fast_math build) flushes, maxima skipping NaN as the CPU's std::max does, and the
//   same strict-> threshold count / literal binary search for the codes. The one selectable
//   difference is the reciprocal of each absmax: bnb's rcp.approx.ftz.f32 (default: what bnb
//   computes on the GPU) or the CPU's IEEE 1/x (Nf4QuantizeOptions::ieee_reciprocal).
// - The double-quant offset mean(absmax) is summed in double in the CPU's fixed order (one thread
//   per 256-chunk, then the chunk sums in order, nf4::absmax_mean) and rounded once, so it equals
//   the CPU's bits. It is read back to the host once per quantized weight (NF4Tensor::offset is a
//   host float); quantization is a load-time op, everything else here never synchronizes.
// - Dequantize never materializes the per-block absmax: each thread decodes the scale of the 64-block
//   it is in (A.7: f32(f32(DYN[q]·absmax2) + offset), no FMA) and writes one coalesced 16-byte store
//   per round (a warp covers 512 contiguous output bytes, its code loads 64-128 contiguous bytes).
// - The fused product never materializes W. A warp streams the codes of 4 rows with 16-byte loads
//   (each lane one 32-code chunk per row, lanes on consecutive chunks), x (M ≤ 16 tokens, one K slice)
//   sits in shared memory, staged once per CTA. The codes enter as bf16 (bnb's gemv_4bit also rounds
//   its code table to bf16), so every product with a bf16 x is exact in fp32; sums are fp32; the
//   64-block scale multiplies each chunk's fp32 sum (M = 1) or each decoded code (M > 1); the bias
//   (rounded to bf16, as NF4Linear does) is added in fp32 and the output rounded once to bf16.
//   When K is split into slices (x too large for shared memory) the per-slice fp32 sums go through a
//   workspace and are added in slice order: results are deterministic (no atomics).
// The kernels that are not otherwise templates are templates on an unused parameter: every
// translation unit that includes this header may instantiate them (a plain __global__ definition
// in a header is a duplicate symbol at link time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <numeric>

#include "kernels/copy.cuh"
#include "tq/quant/nf4.hpp"

namespace tq::cuda {

namespace nf4k {

// ---- constant tables, passed to kernels by value (kernel parameters live in constant memory) ----

struct Tables {
  float code[16];       // get_4bit_type("nf4")
  float threshold[15];  // dQuantizeNF4's decision thresholds
  float dyn[256];       // create_dynamic_map (the nested 8-bit code)
};
inline const Tables& tables() {
  static const Tables t = [] {
    Tables x{};
    for (int i = 0; i < 16; ++i) x.code[i] = nf4::code(i);
    for (int i = 0; i < 15; ++i) x.threshold[i] = nf4::threshold(i);
    for (int i = 0; i < 256; ++i) x.dyn[i] = nf4::dyn(i);
    return x;
  }();
  return t;
}

// QuantState.dtype as the kernels see it: how a dequantized value is rounded before its store.
enum class Round : int { f32 = 0, bf16 = 1, f16 = 2 };
inline Round round_of(DType dt) {
  switch (dt) {
    case DType::bf16: return Round::bf16;
    case DType::f16: return Round::f16;
    case DType::f32: return Round::f32;
    default: fail(str_cat("nf4: unsupported QuantState dtype ", dtype_name(dt)));
  }
}

// ---- device arithmetic mirroring quant/nf4.hpp ----

// Subnormal → signed zero (nf4::ftz).
__device__ __forceinline__ float ftz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }
// nf4::mul_ftz: flush inputs and result, one IEEE rounding.
__device__ __forceinline__ float mul_ftz(float a, float b) { return ftz(__fmul_rn(ftz(a), ftz(b))); }
// NaN counts as 0 in a maximum (std::max(acc, NaN) keeps acc, and every maximum starts at 0).
__device__ __forceinline__ float nan_to_zero(float v) { return v == v ? v : 0.0f; }

// 1/absmax as bnb's fast-math build computes it (rcp.approx.ftz.f32), or the CPU's IEEE rcp_ftz.
template <bool kIeee>
__device__ __forceinline__ float block_reciprocal(float x) {
  if constexpr (kIeee) {
    return ftz(__frcp_rn(ftz(x)));
  } else {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
  }
}

// dQuantizeNF4: the number of thresholds strictly below x (ties go to the lower code, NaN → 0).
__device__ __forceinline__ uint32_t nf4_code_of(float x, const float* threshold) {
  uint32_t q = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) q += x > threshold[k] ? 1u : 0u;
  return q;
}

// dQuantize<0>: the literal binary search of spec A.6 over the sorted DYN table.
__device__ __forceinline__ uint32_t dyn_code_of(float z, const float* dyn) {
  int p = 127, up = 255, lo = 0;
  float lower = -1.0f, upper = 1.0f, v = dyn[127];
#pragma unroll
  for (int step = 64; step >= 1; step >>= 1) {
    if (z > v) {
      lo = p;
      lower = v;
      p += step;
    } else {
      up = p;
      upper = v;
      p -= step;
    }
    v = dyn[p];
  }
  if (up == 255) upper = dyn[255];
  if (lo == 0) lower = dyn[0];
  if (z > v) return uint32_t(z > __fmul_rn(__fadd_rn(upper, v), 0.5f) ? up : p);
  return uint32_t(z < __fmul_rn(__fadd_rn(lower, v), 0.5f) ? lo : p);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// Where a weight's per-block scale comes from (A.7).
struct Scales {
  const uint8_t* qabsmax;     // (nb) 8-bit DYN codes with double quant, else null
  const float* absmax_f32;    // (nb) plain absmax without double quant, else null
  const float* absmax2;       // (ceil(nb/256)) nested absmax (double quant)
  float offset;               // nested offset (double quant)
};

// am[b] = f32(f32(DYN[q[b]]·absmax2[b/256]) + offset) with double quant, else the stored absmax.
__device__ __forceinline__ float block_scale(const Scales& s, const float* dyn, int64_t b) {
  if (s.qabsmax != nullptr) return __fadd_rn(mul_ftz(dyn[s.qabsmax[b]], s.absmax2[b >> 8]), s.offset);
  return s.absmax_f32[b];
}

// block_scale in two halves, so that a kernel can issue the global loads early and finish later:
// the raw values (the 8-bit code and the nested absmax, or the plain absmax), then the scale.
struct RawScale {
  uint32_t code;
  float value;
};
__device__ __forceinline__ RawScale load_scale(const Scales& s, int64_t b) {
  if (s.qabsmax != nullptr) return {s.qabsmax[b], s.absmax2[b >> 8]};
  return {0u, s.absmax_f32[b]};
}
__device__ __forceinline__ float finish_scale(const Scales& s, const float* dyn, RawScale r) {
  if (s.qabsmax != nullptr) return __fadd_rn(mul_ftz(dyn[r.code], r.value), s.offset);
  return r.value;
}

__device__ __forceinline__ float round_through(float v, Round r) {
  if (r == Round::bf16) return __bfloat162float(__float2bfloat16_rn(v));
  if (r == Round::f16) return __half2float(__float2half_rn(v));
  return v;
}

// One dequantized element: NF4[code]·am rounded once to the QuantState dtype (kDequantizeBlockwise<T>).
__device__ __forceinline__ float dequant_value(const float* code, uint32_t q, float am, Round r) {
  return round_through(mul_ftz(code[q], am), r);
}

// ---- quantize ----

// kQuantizeBlockwise<T, 64, NF4>: one warp per 64-block, lane l owns elements 2l and 2l+1 (one
// packed byte). absmax (nb) f32; packed ((n+1)/2) bytes.
template <class T, bool kIeee>
__global__ void __launch_bounds__(kThreads) quantize_blocks_kernel(const T* __restrict__ w, int64_t n,
                                                                   float* __restrict__ absmax,
                                                                   uint8_t* __restrict__ packed, Tables tab) {
  const int lane = int(threadIdx.x & 31);
  const int64_t nb = (n + 63) / 64;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t b = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; b < nb; b += warps) {
    const int64_t i = b * 64 + 2 * lane;
    // The zero pad of an odd n is quantized like the kernel's zero-padded load (nf4::quantize_blocks).
    const float x0 = i < n ? as_float(w[i]) : 0.0f;
    const float x1 = i + 1 < n ? as_float(w[i + 1]) : 0.0f;
    const float am = warp_max(fmaxf(nan_to_zero(fabsf(ftz(x0))), nan_to_zero(fabsf(ftz(x1)))));
    if (lane == 0) absmax[b] = am;
    const float s = block_reciprocal<kIeee>(am);  // inf for an all-zero block → NaN → code 0, as bnb
    if (i < n)
      packed[i >> 1] = uint8_t(nf4_code_of(mul_ftz(x0, s), tab.threshold) << 4 |
                               nf4_code_of(mul_ftz(x1, s), tab.threshold));
  }
}

// nf4::absmax_mean, step 1: partial[c] = Σ absmax[256c .. 256c+255] in double, in order.
template <class = void>
__global__ void absmax_chunk_sums_kernel(const float* __restrict__ absmax, int64_t nb, double* __restrict__ partial) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lo = c * nf4::kNestedBlock;
  if (lo >= nb) return;
  const int64_t hi = lo + nf4::kNestedBlock < nb ? lo + nf4::kNestedBlock : nb;
  double s = 0.0;
  for (int64_t i = lo; i < hi; ++i) s = __dadd_rn(s, double(absmax[i]));
  partial[c] = s;
}

// nf4::absmax_mean, step 2 (one block): offset = f32((Σ_c partial[c] in order) / nb). The block
// stages the partials in shared memory; thread 0 adds them in order.
template <class = void>
__global__ void absmax_mean_kernel(const double* __restrict__ partial, int64_t chunks, int64_t nb,
                                   float* __restrict__ offset) {
  constexpr int kStage = 2048;
  __shared__ double stage[kStage];
  double total = 0.0;
  for (int64_t c0 = 0; c0 < chunks; c0 += kStage) {
    const int64_t m = chunks - c0 < kStage ? chunks - c0 : kStage;
    for (int64_t k = threadIdx.x; k < m; k += blockDim.x) stage[k] = partial[c0 + k];
    __syncthreads();
    if (threadIdx.x == 0)
      for (int64_t k = 0; k < m; ++k) total = __dadd_rn(total, stage[k]);
    __syncthreads();
  }
  if (threadIdx.x == 0) offset[0] = __double2float_rn(__ddiv_rn(total, double(nb)));
}

// quantize_blockwise(absmax − offset, DYN, blocksize 256): one 256-thread block per nested block.
// q (nb) u8; absmax2 (ceil(nb/256)) f32; offset: one f32 on the device.
template <bool kIeee>
__global__ void __launch_bounds__(256) quantize_nested_kernel(const float* __restrict__ absmax, int64_t nb,
                                                              const float* __restrict__ offset,
                                                              uint8_t* __restrict__ q, float* __restrict__ absmax2,
                                                              Tables tab) {
  static_assert(nf4::kNestedBlock == 256, "one thread per absmax of a nested block");
  __shared__ float dyn[256];
  __shared__ float warp_am[8];
  dyn[threadIdx.x] = tab.dyn[threadIdx.x];
  const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x;
  const float y = i < nb ? __fsub_rn(absmax[i], offset[0]) : 0.0f;
  float m = warp_max(nan_to_zero(fabsf(ftz(y))));
  if ((threadIdx.x & 31) == 0) warp_am[threadIdx.x >> 5] = m;
  __syncthreads();
  m = warp_am[0];
#pragma unroll
  for (int k = 1; k < 8; ++k) m = fmaxf(m, warp_am[k]);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
  const float s2 = block_reciprocal<kIeee>(m);
  if (i < nb) q[i] = uint8_t(dyn_code_of(mul_ftz(y, s2), dyn));
}

// ---- dequantize ----

// out (n) = dequantized weight, coalesced: one 16-byte output store per thread and round (E
// elements: 8 for bf16/f16, 4 for f32), so a warp's store covers 512 contiguous bytes and its code
// load (4 bytes, resp. 2) 128 (64) contiguous bytes. A thread runs U rounds per loop trip, all loads
// first (U code words and U scale sources in flight), then decodes and stores. The block scale is
// decoded per round (A.7, no FMA); the 16 code values and DYN sit in shared memory (a lookup of
// code[q] by 32 lanes touches at most 16 distinct words in 16 distinct banks: no conflicts).
// vec: packed 4-byte and out 16-byte aligned; the n % E last elements (all of them when !vec) go
// one by one.
template <class Out, Round kRound>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(Out* __restrict__ out, const uint8_t* __restrict__ packed,
                                                              Scales sc, int64_t n, bool vec, Tables tab) {
  constexpr int E = 16 / int(sizeof(Out));  // elements per 16-byte store
  static_assert(E == 8 || E == 4, "2- or 4-byte outputs");
  using Codes = std::conditional_t<E == 8, uint32_t, unsigned short>;  // the E codes of one store
  constexpr int U = 8;  // rounds per trip: U code loads in flight per thread
  __shared__ float code[16];
  __shared__ float dyn[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) dyn[k] = tab.dyn[k];
  if (threadIdx.x < 16) code[threadIdx.x] = tab.code[threadIdx.x];
  __syncthreads();
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t chunks = vec ? n / E : 0;  // 16-byte output chunks; chunk c = elements [E·c, E·c + E)
  const Codes* codes = reinterpret_cast<const Codes*>(packed);  // chunk c's codes: bytes [E·c/2, E·c/2 + E/2)
  for (int64_t c0 = tid; c0 < chunks; c0 += U * stride) {
    uint32_t bits[U];
    RawScale raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * stride;
      bits[u] = 0u;
      raw[u] = RawScale{0u, 0.0f};
      if (c < chunks) {
        bits[u] = __ldcs(codes + c);
        raw[u] = load_scale(sc, (c * E) >> 6);  // E divides 64: a chunk lies in one 64-block
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u * stride;
      if (c >= chunks) break;
      const float am = finish_scale(sc, dyn, raw[u]);
      Vec<Out, E> o;
#pragma unroll
      for (int e = 0; e < E; ++e) {  // element e: byte e/2 of the little-endian word, high nibble first
        const uint32_t byte = (bits[u] >> (8 * (e >> 1))) & 0xFFu;
        o.v[e] = float_to<Out>(dequant_value(code, (e & 1) ? (byte & 0xFu) : (byte >> 4), am, kRound));
      }
      reinterpret_cast<Vec<Out, E>*>(out)[c] = o;
    }
  }
  for (int64_t i = chunks * E + tid; i < n; i += stride) {
    const uint32_t byte = packed[i >> 1];
    const uint32_t qc = (i & 1) ? (byte & 0xFu) : (byte >> 4);
    out[i] = float_to<Out>(dequant_value(code, qc, block_scale(sc, dyn, i >> 6), kRound));
  }
}

// ---- fused small-M product ----

struct SmallMArgs {
  const uint8_t* packed;      // ((N·K+1)/2) NF4 codes of W (N, K), flattened row-major
  Scales sc;
  const __nv_bfloat16* x;     // (M, K) row-major
  const __nv_bfloat16* bias;  // (N) or null
  __nv_bfloat16* y;           // (M, N) row-major
  float* partial;             // (S, M, N) fp32 per-slice sums when the plan splits K (S > 1), else unused
  int M;
  int64_t N, K;
  // Filled by launch_small_m from the plan:
  int64_t packed_bytes;  // (N·K + 1) / 2
  int P;                 // 1 when K % 32 == 0, else 2: rows n ≡ r (mod P) start at the same phase in a 32-code chunk
  int64_t groups;        // row groups of R = small_m_rows(MT) rows of one phase: P · ceil(N / (P · R))
  int64_t slice;         // k per slice (a multiple of 32); slice s covers k in [s·slice, min(K, (s+1)·slice))
  int slices;            // S
};

constexpr int kSmallMThreads = 256;  // 8 warps per CTA
// R: rows a warp streams at once (R 16-byte loads in flight per lane); 2 at M > 8, where the fp32
// accumulators (R·16) would otherwise spill.
__host__ __device__ constexpr int small_m_rows(int MT) { return MT > 8 ? 2 : 4; }

// Shared memory of the fast kernel: code[16], dyn[256] (f32), then x (MT, slice + 32) bf16.
inline int64_t small_m_smem_bytes(int MT, int64_t slice) { return (16 + 256) * 4 + int64_t(MT) * (slice + 32) * 2; }

// The fast path (K % 16 == 0, 16-byte aligned codes and x). Chunk c of the flat code array is bytes
// [16c, 16c + 16) = elements [32c, 32c + 32): one 16-byte load, inside one 64-block (scale am(c/2)).
// Row n starts at flat element nK, at phase ψ = nK mod 32 ∈ {0, 16} of its first chunk c0 = ⌊nK/32⌋,
// so its chunk c0 + j holds k ∈ [32j − ψ, 32j − ψ + 32); the part outside [0, K) (another row's
// codes) meets zeros of the staged x. A warp takes R rows of one phase (a row group) and its lanes
// take consecutive chunks j (coalesced 512-byte loads per row); x of the CTA's K slice, for all MT
// tokens, is staged in shared memory once, with 16 zeros before and after (and zeros for tokens
// ≥ M). Lane l reads the four 16-byte x quads of its chunk starting at quad (l/2) mod 4, which makes
// each quarter-warp's loads hit 8 distinct 16-byte bank groups (no conflicts at a 64-byte stride).
// Products bf16(code)·x are exact in fp32 and accumulate in fp32; the 64-block scale multiplies a
// chunk's sum (kFold = false, M = 1) or each decoded weight (kFold, M > 1, so that the per-chunk
// sums need no registers); lanes are combined by a fixed xor-shuffle tree. One slice: y = bf16(sum +
// bias) directly; several: per-slice fp32 sums in a.partial, added in slice order by
// small_m_reduce_kernel. No atomics: the result is deterministic.
template <int MT, bool kFold>
__global__ void __launch_bounds__(kSmallMThreads, MT == 1 ? 4 : 2) small_m_kernel(SmallMArgs a, Tables tab) {
  constexpr int R = small_m_rows(MT);
  extern __shared__ __align__(16) unsigned char smem[];
  float* code = reinterpret_cast<float*>(smem);  // (16) bf16-rounded NF4 codes, as f32
  float* dyn = code + 16;                        // (256)
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(dyn + 256);  // (MT, L): xs[m][16 + k − lo]
  const int64_t K = a.K, lo = int64_t(blockIdx.y) * a.slice, hi = lo + a.slice < K ? lo + a.slice : K;
  const int L = int(a.slice) + 32;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn[i] = tab.dyn[i];
  if (threadIdx.x < 16) code[threadIdx.x] = __bfloat162float(__float2bfloat16_rn(tab.code[threadIdx.x]));
  {
    const int per_row = L / 8;  // 16-byte pieces of 8 values; k = lo − 16 + 8·p is in or out of [lo, hi) as a whole
    for (int u = threadIdx.x; u < MT * per_row; u += blockDim.x) {
      const int m = u / per_row;
      const int64_t k = lo - 16 + 8 * int64_t(u - m * per_row);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (m < a.M && k >= lo && k < hi) v = __ldg(reinterpret_cast<const uint4*>(a.x + int64_t(m) * K + k));
      reinterpret_cast<uint4*>(xs)[u] = v;
    }
  }
  __syncthreads();

  const int lane = int(threadIdx.x & 31);
  const int rot = (lane >> 1) & 3;
  const int warps = kSmallMThreads / 32;
  const uint4* chunks = reinterpret_cast<const uint4*>(a.packed);
  for (int64_t g = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); g < a.groups; g += int64_t(gridDim.x) * warps) {
    const int64_t base = (g / a.P) * (int64_t(a.P) * R) + g % a.P;  // rows base + P·i, i < R
    const int psi = int((base * K) & 31);
    int64_t c0[R];
    bool ok[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t n = base + int64_t(a.P) * i;
      ok[i] = n < a.N;
      c0[i] = ok[i] ? (n * K) >> 5 : 0;
    }
    float acc[R][MT];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[i][m] = 0.0f;
    const int64_t j_hi = (hi + psi + 31) / 32;  // chunks j in [lo/32, j_hi) overlap the slice
    for (int64_t j = lo / 32 + lane; j < j_hi; j += 32) {
      uint4 w[R];
      RawScale raw[R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t c = c0[i] + j;
        w[i] = make_uint4(0u, 0u, 0u, 0u);
        raw[i] = RawScale{0u, 0.0f};
        if (!ok[i]) continue;
        if (16 * c + 16 <= a.packed_bytes) {
          w[i] = __ldcs(chunks + c);
        } else {  // the last chunk of the array: only its existing bytes (the rest meets zero x)
          uint32_t wb[4] = {0u, 0u, 0u, 0u};
#pragma unroll
          for (int t = 0; t < 16; ++t)
            if (16 * c + t < a.packed_bytes) wb[t >> 2] |= uint32_t(a.packed[16 * c + t]) << (8 * (t & 3));
          w[i] = make_uint4(wb[0], wb[1], wb[2], wb[3]);
        }
        raw[i] = load_scale(a.sc, c >> 1);
      }
      float am[R];
#pragma unroll
      for (int i = 0; i < R; ++i) am[i] = finish_scale(a.sc, dyn, raw[i]);
      const __nv_bfloat16* xj = xs + (32 * j - psi - lo + 16);  // x of k = 32j − ψ, token 0
      float part[R][kFold ? 1 : MT];
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int m = 0; m < (kFold ? 1 : MT); ++m) part[i][m] = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int qq = (q + rot) & 3;  // the quad (8 codes = one word of each row's chunk) of this step
        float wf[R][8];
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const uint32_t word = qq == 0 ? w[i].x : qq == 1 ? w[i].y : qq == 2 ? w[i].z : w[i].w;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const uint32_t byte = (word >> (8 * (e >> 1))) & 0xFFu;
            const float cv = code[(e & 1) ? (byte & 0xFu) : (byte >> 4)];
            wf[i][e] = kFold ? cv * am[i] : cv;
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const uint4 xv = *reinterpret_cast<const uint4*>(xj + m * L + 8 * qq);
          const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float xf = __uint_as_float((e & 1) ? (xw[e >> 1] & 0xFFFF0000u) : (xw[e >> 1] << 16));
#pragma unroll
            for (int i = 0; i < R; ++i) {
              if constexpr (kFold) acc[i][m] = fmaf(xf, wf[i][e], acc[i][m]);
              else part[i][m] = fmaf(xf, wf[i][e], part[i][m]);
            }
          }
        }
      }
      if constexpr (!kFold) {
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[i][m] = fmaf(am[i], part[i][m], acc[i][m]);
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float v = acc[i][m];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        const int64_t n = base + int64_t(a.P) * i;
        if (lane == (i * MT + m) % 32 && ok[i] && m < a.M) {
          if (a.slices == 1) {
            const float b = a.bias ? __bfloat162float(a.bias[n]) : 0.0f;
            a.y[int64_t(m) * a.N + n] = __float2bfloat16_rn(v + b);
          } else {
            a.partial[(int64_t(blockIdx.y) * a.M + m) * a.N + n] = v;
          }
        }
      }
  }
}

// y[m][n] = bf16(Σ_s partial[s][m][n] in slice order + bias[n]): one thread per output.
template <class = void>
__global__ void small_m_reduce_kernel(SmallMArgs a) {
  const int64_t total = int64_t(a.M) * a.N;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int sl = 0; sl < a.slices; ++sl) s += a.partial[int64_t(sl) * total + idx];
    if (a.bias) s += __bfloat162float(a.bias[idx % a.N]);
    a.y[idx] = __float2bfloat16_rn(s);
  }
}
// The general path (any K, any alignment): one warp per output row, each element dequantized
// exactly as nf4_dequantize does (then rounded to bf16, as the NF4Linear scratch holds it), fp32
// accumulation per lane, a fixed shuffle tree across lanes.
template <class = void>
__global__ void __launch_bounds__(kThreads) small_m_generic_kernel(SmallMArgs a, Round rnd, Tables tab) {
  __shared__ float code[16];
  __shared__ float dyn[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) dyn[k] = tab.dyn[k];
  if (threadIdx.x < 16) code[threadIdx.x] = tab.code[threadIdx.x];
  __syncthreads();
  const int lane = int(threadIdx.x & 31);
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t n = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; n < a.N; n += warps) {
    float acc[16];
#pragma unroll
    for (int m = 0; m < 16; ++m) acc[m] = 0.0f;
    for (int64_t k = lane; k < a.K; k += 32) {
      const int64_t i = n * a.K + k;
      const uint32_t byte = a.packed[i >> 1];
      const uint32_t qc = (i & 1) ? (byte & 0xFu) : (byte >> 4);
      const float w = __bfloat162float(__float2bfloat16_rn(dequant_value(code, qc, block_scale(a.sc, dyn, i >> 6), rnd)));
#pragma unroll
      for (int m = 0; m < 16; ++m)
        if (m < a.M) acc[m] = fmaf(__bfloat162float(a.x[int64_t(m) * a.K + k]), w, acc[m]);
    }
#pragma unroll
    for (int m = 0; m < 16; ++m) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
    }
    if (lane == 0) {
      const float b = a.bias ? __bfloat162float(a.bias[n]) : 0.0f;
      for (int m = 0; m < a.M; ++m) a.y[int64_t(m) * a.N + n] = __float2bfloat16_rn(acc[m] + b);
    }
  }
}

// ---- host side ----

inline void require_nf4_on(const NF4Tensor& q, Device dev, const char* op) {
  TQ_CHECK(q.packed.defined() && q.absmax.defined(), op, ": the NF4 weight is empty");
  TQ_CHECK(q.packed.dtype() == DType::u8 && q.packed.numel() == (q.numel() + 1) / 2 && q.packed.device() == dev,
           op, ": packed codes ", describe(q.packed), " do not match shape ", q.shape, " on ", dev.str());
  TQ_CHECK(q.absmax.device() == dev && q.absmax.numel() == q.num_blocks(), op, ": absmax ", describe(q.absmax),
           " does not match ", q.num_blocks(), " blocks on ", dev.str());
  if (q.double_quant())
    TQ_CHECK(q.nested_absmax.defined() && q.nested_absmax.device() == dev && q.nested_absmax.dtype() == DType::f32 &&
                 q.nested_absmax.numel() == (q.num_blocks() + nf4::kNestedBlock - 1) / nf4::kNestedBlock,
             op, ": nested absmax ", describe(q.nested_absmax), " does not match the 8-bit absmax codes");
  else
    TQ_CHECK(q.absmax.dtype() == DType::f32, op, ": absmax ", describe(q.absmax), " must be u8 codes or f32");
}

// The scale sources of q, with its tensors made dense (returned in `keep` so they outlive the launch).
inline Scales scales_of(const NF4Tensor& q, std::vector<Tensor>& keep) {
  Scales s{};
  keep.push_back(q.absmax.contiguous());
  if (q.double_quant()) {
    keep.push_back(q.nested_absmax.contiguous());
    s.qabsmax = static_cast<const uint8_t*>(keep[keep.size() - 2].data_ptr());
    s.absmax2 = static_cast<const float*>(keep.back().data_ptr());
    s.offset = q.offset;
  } else {
    s.absmax_f32 = static_cast<const float*>(keep.back().data_ptr());
  }
  return s;
}

inline NF4Tensor quantize(const Tensor& w_in, const Nf4QuantizeOptions& opt) {
  const Device dev = w_in.device();
  DeviceGuard guard(dev.index);
  cudaStream_t st = current_stream();
  Tensor w = w_in.detach().contiguous();
  NF4Tensor q;
  q.dtype = w.dtype();
  q.shape = w.shape();
  const int64_t n = w.numel(), nb = q.num_blocks();
  Tensor absmax = Tensor::empty({nb}, DType::f32, dev);
  q.packed = Tensor::empty({(n + 1) / 2, 1}, DType::u8, dev);
  const Tables& tab = tables();
  const unsigned blocks = grid_for((nb + kThreads / 32 - 1) / (kThreads / 32), 1, dev.index);
  auto launch_blocks = [&](auto tag) {
    using T = decltype(tag);
    const T* pw = static_cast<const T*>(w.data_ptr());
    float* pa = absmax.data<float>();
    uint8_t* pp = q.packed.data<uint8_t>();
    if (opt.ieee_reciprocal) quantize_blocks_kernel<T, true><<<blocks, kThreads, 0, st>>>(pw, n, pa, pp, tab);
    else quantize_blocks_kernel<T, false><<<blocks, kThreads, 0, st>>>(pw, n, pa, pp, tab);
    check_launch();
  };
  switch (w.dtype()) {
    case DType::f32: launch_blocks(float{}); break;
    case DType::bf16: launch_blocks(::tq::bf16{}); break;
    case DType::f16: launch_blocks(::tq::f16{}); break;
    default: fail(str_cat("nf4_quantize: weights of dtype ", dtype_name(w.dtype()), " cannot be quantized"));
  }
  if (!opt.double_quant) {
    q.absmax = absmax;
    return q;
  }
  Tensor offset = Tensor::empty({1}, DType::f32, dev);
  if (opt.offset) {
    offset.fill_(double(*opt.offset));
  } else {
    const int64_t chunks = (nb + nf4::kNestedBlock - 1) / nf4::kNestedBlock;
    Tensor partial = Tensor::empty({chunks}, DType::f64, dev);
    absmax_chunk_sums_kernel<><<<unsigned((chunks + 127) / 128), 128, 0, st>>>(absmax.data<float>(), nb,
                                                                             partial.data<double>());
    check_launch();
    absmax_mean_kernel<><<<1, 256, 0, st>>>(partial.data<double>(), chunks, nb, offset.data<float>());
    check_launch();
  }
  const int64_t nb2 = (nb + nf4::kNestedBlock - 1) / nf4::kNestedBlock;
  q.absmax = Tensor::empty({nb}, DType::u8, dev);
  q.nested_absmax = Tensor::empty({nb2}, DType::f32, dev);
  TQ_CHECK(nb2 <= int64_t(INT32_MAX), "nf4_quantize: weight ", describe(w_in), " has too many blocks");
  if (opt.ieee_reciprocal)
    quantize_nested_kernel<true><<<unsigned(nb2), 256, 0, st>>>(absmax.data<float>(), nb, offset.data<float>(),
                                                                q.absmax.data<uint8_t>(), q.nested_absmax.data<float>(), tab);
  else
    quantize_nested_kernel<false><<<unsigned(nb2), 256, 0, st>>>(absmax.data<float>(), nb, offset.data<float>(),
                                                                 q.absmax.data<uint8_t>(), q.nested_absmax.data<float>(), tab);
  check_launch();
  // The one host read: NF4Tensor keeps the offset as a host float (serialization, CPU dequantize).
  q.offset = opt.offset ? *opt.offset : offset.item<float>();
  return q;
}

inline void dequantize_into(const NF4Tensor& q, const Tensor& out) {
  const Device dev = out.device();
  require_nf4_on(q, dev, "nf4_dequantize");
  const int64_t n = q.numel();
  if (n == 0) return;
  DeviceGuard guard(dev.index);
  std::vector<Tensor> keep;
  const Scales sc = scales_of(q, keep);
  Tensor packed = q.packed.contiguous();
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());
  const bool vec = aligned_to(pp, 4) && aligned_to(out.data_ptr(), 16);
  const int64_t per_store = 16 / int64_t(dtype_size(out.dtype()));
  // A thread does 8 stores per trip; enough CTAs to fill every SM (8 × 256 threads) once.
  const int64_t work = vec ? std::max<int64_t>((n / per_store + 7) / 8, n % per_store) : n;
  const unsigned blocks = grid_for(work, kThreads, dev.index);
  cudaStream_t st = current_stream();
  const Tables& tab = tables();
  auto launch = [&](auto out_tag, auto round_tag) {
    using Out = decltype(out_tag);
    constexpr Round R = decltype(round_tag)::value;
    dequantize_kernel<Out, R><<<blocks, kThreads, 0, st>>>(static_cast<Out*>(out.data_ptr()), pp, sc, n, vec, tab);
  };
  auto with_round = [&](auto out_tag) {
    switch (round_of(q.dtype)) {
      case Round::f32: launch(out_tag, std::integral_constant<Round, Round::f32>{}); break;
      case Round::bf16: launch(out_tag, std::integral_constant<Round, Round::bf16>{}); break;
      case Round::f16: launch(out_tag, std::integral_constant<Round, Round::f16>{}); break;
    }
  };
  switch (out.dtype()) {
    case DType::f32: with_round(float{}); break;
    case DType::bf16: with_round(::tq::bf16{}); break;
    case DType::f16: with_round(::tq::f16{}); break;
    default: fail(str_cat("nf4_dequantize: output dtype must be f32, bf16 or f16, got ", dtype_name(out.dtype())));
  }
  check_launch();
}

// How one small-M product runs: the fast row-group kernel (K split into slices when x does not fit
// in shared memory) or the general warp-per-row kernel.
struct SmallMPlan {
  bool fast = false;  // K % 16 == 0, 16-byte aligned codes and x
  int MT = 1;         // M rounded up to 1, 2, 4, 8 or 16 (the kernel's token count)
  int P = 1;
  int64_t groups = 0, slice = 0;
  int slices = 1;
  unsigned ctas_x = 1;  // CTAs per slice (fast) or in all (general)
  int64_t smem = 0;     // dynamic shared memory per CTA (fast)
  // Per-slice sums when K is split: (slices, M, N) floats.
  int64_t N = 0;
  int64_t workspace_floats(int64_t M) const { return fast && slices > 1 ? int64_t(slices) * M * N : 0; }
};

// x bytes a CTA stages: 4 CTAs per SM fit at M = 1 (32 KB of x covers K = 16384), 2 at M > 1.
inline int64_t small_m_x_budget(int MT) { return MT == 1 ? 44 * 1024 : 96 * 1024; }

inline SmallMPlan plan_small_m(int64_t M, int64_t N, int64_t K, const void* packed, const void* x, int device) {
  TQ_CHECK(M >= 1 && M <= 16, "nf4 linear: M = ", M, " rows (1 ≤ M ≤ 16)");
  SmallMPlan p;
  p.N = N;
  p.fast = K > 0 && K % 16 == 0 && aligned_to(packed, 16) && aligned_to(x, 16);
  if (!p.fast) {
    p.ctas_x = grid_for((N + kThreads / 32 - 1) / (kThreads / 32), 1, device);
    return p;
  }
  p.MT = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16;
  p.P = K % 32 == 0 ? 1 : 2;
  const int R = small_m_rows(p.MT);
  p.groups = p.P * ((N + p.P * R - 1) / (p.P * R));
  const int64_t max_slice = (small_m_x_budget(p.MT) / (2 * p.MT) - 32) / 32 * 32;
  p.slices = int((K + max_slice - 1) / max_slice);
  p.slice = ((K + p.slices - 1) / p.slices + 31) / 32 * 32;
  p.smem = small_m_smem_bytes(p.MT, p.slice);
  // Every resident CTA (4 per SM at M = 1, else 2) gets work; each stages its x slice once.
  const int64_t resident = int64_t(sm_count(device)) * (p.MT == 1 ? 4 : 2);
  const int64_t need = (p.groups + kSmallMThreads / 32 - 1) / (kSmallMThreads / 32);
  p.ctas_x = unsigned(std::clamp<int64_t>((resident + p.slices - 1) / p.slices, 1, need));
  return p;
}

template <int MT, bool kFold>
inline void launch_small_m_fast(const SmallMArgs& a, const SmallMPlan& p, int device, cudaStream_t st) {
  // Above 48 KB of dynamic shared memory a kernel must opt in, once per device.
  static bool opted[64] = {};
  if (device < 0 || device >= 64 || !opted[device]) {
    TQ_CUDA_CHECK(cudaFuncSetAttribute(small_m_kernel<MT, kFold>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(small_m_smem_bytes(MT, 0) + small_m_x_budget(MT))));
    if (device >= 0 && device < 64) opted[device] = true;
  }
  small_m_kernel<MT, kFold><<<dim3(p.ctas_x, unsigned(p.slices)), kSmallMThreads, size_t(p.smem), st>>>(a, tables());
}

// Runs a planned product on prepared arguments: a.y (M, N) is written; a.partial must hold
// plan.workspace_floats(M) floats. The launcher the benchmarks time with their own buffers.
inline void launch_small_m(SmallMArgs a, const SmallMPlan& p, Round rnd, int device, cudaStream_t st) {
  if (!p.fast) {
    small_m_generic_kernel<><<<p.ctas_x, kThreads, 0, st>>>(a, rnd, tables());
    check_launch();
    return;
  }
  TQ_CHECK(p.MT >= a.M && a.M >= 1, "nf4 linear: the plan is for ", p.MT, " rows, not ", a.M);
  TQ_CHECK(p.slices == 1 || a.partial != nullptr, "nf4 linear: the partial-sum workspace is missing");
  a.packed_bytes = (a.N * a.K + 1) / 2;
  a.P = p.P;
  a.groups = p.groups;
  a.slice = p.slice;
  a.slices = p.slices;
  switch (p.MT) {
    case 1: launch_small_m_fast<1, false>(a, p, device, st); break;
    case 2: launch_small_m_fast<2, true>(a, p, device, st); break;
    case 4: launch_small_m_fast<4, true>(a, p, device, st); break;
    case 8: launch_small_m_fast<8, true>(a, p, device, st); break;
    default: launch_small_m_fast<16, true>(a, p, device, st); break;
  }
  check_launch();
  if (p.slices > 1) {
    small_m_reduce_kernel<><<<grid_for(int64_t(a.M) * a.N, kThreads, device), kThreads, 0, st>>>(a);
    check_launch();
  }
}

inline Tensor linear_small_m(const Tensor& x_in, const NF4Tensor& q, const Tensor& bias_in) {
  const Device dev = x_in.device();
  TQ_CHECK(q.shape.size() == 2, "nf4 linear: weight must be (out, in), got shape ", q.shape);
  const int64_t N = q.shape[0], K = q.shape[1];
  TQ_CHECK(x_in.dim() == 2 && x_in.size(1) == K && x_in.size(0) <= 16, "nf4 linear: input ", describe(x_in),
           " must be (M ≤ 16, ", K, ")");
  require_nf4_on(q, dev, "nf4 linear");
  TQ_CHECK(!bias_in.defined() || (bias_in.device() == dev && bias_in.numel() == N), "nf4 linear: bias ",
           describe(bias_in), " must hold ", N, " values on ", dev.str());
  const int M = int(x_in.size(0));
  Tensor y = Tensor::empty({M, N}, DType::bf16, dev);
  if (M == 0 || N == 0) return y;
  DeviceGuard guard(dev.index);
  Tensor bias = bias_in.defined() ? bias_in.detach().to(DType::bf16).contiguous() : Tensor();
  if (K == 0) {  // an empty sum: y = bias
    if (bias.defined()) y.copy_(bias.reshape({1, N}).expand({M, N}));
    else y.fill_(0.0);
    return y;
  }
  Tensor x = x_in.detach().to(DType::bf16).contiguous();
  if (!aligned_to(x.data_ptr(), 16)) x = x.clone();  // a fresh allocation is 256-byte aligned
  Tensor packed = q.packed.contiguous();
  std::vector<Tensor> keep;
  SmallMArgs a{};
  a.packed = static_cast<const uint8_t*>(packed.data_ptr());
  a.sc = scales_of(q, keep);
  a.x = static_cast<const __nv_bfloat16*>(x.data_ptr());
  a.bias = bias.defined() ? static_cast<const __nv_bfloat16*>(bias.data_ptr()) : nullptr;
  a.y = static_cast<__nv_bfloat16*>(y.data_ptr());
  a.M = M;
  a.N = N;
  a.K = K;
  const SmallMPlan p = plan_small_m(M, N, K, a.packed, a.x, dev.index);
  Tensor partial;
  if (p.workspace_floats(M) > 0) {
    partial = Tensor::empty({p.workspace_floats(M)}, DType::f32, dev);
    a.partial = partial.data<float>();
  }
  launch_small_m(a, p, round_of(q.dtype), dev.index, current_stream());
  return y;
}

}  // namespace nf4k

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_nf4_kernels() {
  Nf4CudaKernels& k = cuda_nf4_kernels();
  k.quantize = &nf4k::quantize;
  k.dequantize_into = &nf4k::dequantize_into;
  k.linear_small_m = &nf4k::linear_small_m;
}

}  // namespace tq::cuda
