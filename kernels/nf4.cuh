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
// - The fused product never materializes W. At M = 1 (decoding one sequence) gemv_stationary_kernel
//   streams the codes on CUDA cores with x held in registers (one table lookup and two fp32 FMAs per
//   code byte, a fixed reduction order: one launch, no workspace; gemv_kernel where a row is wider
//   than 16 warps, and at M ≤ 4 with TQ_NF4_GEMV=1; TQ_NF4_GEMV=0 moves every M to the tensor cores,
//   see gemv_default_max_rows and gemv_x_path). Otherwise tensor-core mma (m16n8k16,
//   bf16 in, fp32 accumulate) with the weight as the A operand (16 output rows) and x as B (up to 8
//   or 16 tokens): the codes enter as bf16 (bnb's gemv_4bit also rounds its code table to bf16),
//   each 64-block's fp32 scale multiplies that block's fp32 partial sum, the bias (rounded to bf16,
//   as NF4Linear does) is added in fp32 and the output rounded once to bf16. Work is split stream-K
//   style (every warp the same number of 64-block units); partial sums go through an fp32 workspace
//   and are added in a fixed order: results are deterministic (no atomics).
// The kernels that are not otherwise templates are templates on an unused parameter: every
// translation unit that includes this header may instantiate them (a plain __global__ definition
// in a header is a duplicate symbol at link time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cfloat>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <string_view>
#include <type_traits>

#include "kernels/bulk_async.cuh"
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

// The 16 bytes of output of one chunk: the E = 16 / sizeof(Out) elements whose codes are the low E/2
// bytes of `bits` (element e: byte e/2 of the little-endian word, high nibble first), block scale am.
template <class Out, Round kRound>
__device__ __forceinline__ Vec<Out, 16 / int(sizeof(Out))> dequant_chunk(uint32_t bits, float am, const float* code) {
  constexpr int E = 16 / int(sizeof(Out));
  Vec<Out, E> o;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const uint32_t byte = (bits >> (8 * (e >> 1))) & 0xFFu;
    o.v[e] = float_to<Out>(dequant_value(code, (e & 1) ? (byte & 0xFu) : (byte >> 4), am, kRound));
  }
  return o;
}
// Elements [from, n) one by one, grid-stride over every thread of the grid.
template <class Out, Round kRound>
__device__ __forceinline__ void dequant_elements(Out* out, const uint8_t* packed, const Scales& sc, const float* dyn,
                                                 const float* code, int64_t from, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = from + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t byte = packed[i >> 1];
    const uint32_t qc = (i & 1) ? (byte & 0xFu) : (byte >> 4);
    out[i] = float_to<Out>(dequant_value(code, qc, block_scale(sc, dyn, i >> 6), kRound));
  }
}

// out (n) = dequantized weight, coalesced: one 16-byte output store per thread and round (E
// elements: 8 for bf16/f16, 4 for f32), so a warp's store covers 512 contiguous bytes and its code
// load (4 bytes, resp. 2) 128 (64) contiguous bytes. A thread runs U rounds per loop trip, all loads
// first (U code words and U scale sources in flight), then decodes and stores. The block scale is
// decoded per round (A.7, no FMA); the 16 code values and DYN sit in shared memory (a lookup of
// code[q] by 32 lanes touches at most 16 distinct words in 16 distinct banks: no conflicts).
// vec: packed 4-byte and out 16-byte aligned; the n % E last elements (all of them when !vec) go
// one by one. stream_stores: the 16-byte stores are evict-first (st.global.cs).
template <class Out, Round kRound>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(Out* __restrict__ out, const uint8_t* __restrict__ packed,
                                                              Scales sc, int64_t n, bool vec, bool stream_stores,
                                                              Tables tab) {
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
      const Vec<Out, E> o = dequant_chunk<Out, kRound>(bits[u], finish_scale(sc, dyn, raw[u]), code);
      Vec<Out, E>* dst = reinterpret_cast<Vec<Out, E>*>(out) + c;
      if (stream_stores) __stcs(reinterpret_cast<int4*>(dst), *reinterpret_cast<const int4*>(&o));
      else *dst = o;
    }
  }
  dequant_elements<Out, kRound>(out, packed, sc, dyn, code, chunks * E, n);
}

// The same output through shared memory and bulk copies (sm_90): a CTA decodes a tile of
// kDeqBulkChunks 16-byte chunks (32 KB of output; thread i owns chunks i + kThreads·u, u < U, with
// all U code and scale loads in flight first, as above) into one of two shared buffers, and one
// thread hands the tile to the TMA unit (cp.async.bulk global ← shared, one 32 KB write), so the
// SM's store path carries no per-thread stores. A buffer is rewritten only after the bulk copy
// issued from it two tiles earlier has read it (cp.async.bulk.wait_group.read 1). The n % E last
// elements go one by one, plainly. packed 4-byte and out 16-byte aligned.
constexpr int kDeqBulkRounds = 8;
constexpr int kDeqBulkChunks = kThreads * kDeqBulkRounds;
constexpr size_t kDeqBulkSmem = 2 * size_t(kDeqBulkChunks) * 16;

template <class Out, Round kRound>
__global__ void __launch_bounds__(kThreads) dequantize_bulk_kernel(Out* __restrict__ out, const uint8_t* __restrict__ packed,
                                                                   Scales sc, int64_t n, Tables tab) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int E = 16 / int(sizeof(Out)), U = kDeqBulkRounds;
  using Codes = std::conditional_t<E == 8, uint32_t, unsigned short>;
  extern __shared__ __align__(128) unsigned char deq_smem[];
  __shared__ float code[16];
  __shared__ float dyn[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) dyn[k] = tab.dyn[k];
  if (threadIdx.x < 16) code[threadIdx.x] = tab.code[threadIdx.x];
  const int64_t chunks = n / E, tiles = (chunks + kDeqBulkChunks - 1) / kDeqBulkChunks;
  const Codes* codes = reinterpret_cast<const Codes*>(packed);
  int buf = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, buf ^= 1) {
    const int64_t base = tile * kDeqBulkChunks;
    const int count = int(chunks - base < kDeqBulkChunks ? chunks - base : kDeqBulkChunks);
    uint32_t bits[U];
    RawScale raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = int(threadIdx.x) + u * kThreads;
      bits[u] = 0u;
      raw[u] = RawScale{0u, 0.0f};
      if (i < count) {
        bits[u] = __ldcs(codes + base + i);
        raw[u] = load_scale(sc, ((base + i) * E) >> 6);
      }
    }
    if (threadIdx.x == 0) bulk_wait_read<1>();
    __syncthreads();  // this buffer is free again (and, the first time, the tables are in place)
    Vec<Out, E>* tile_out = reinterpret_cast<Vec<Out, E>*>(deq_smem + size_t(buf) * kDeqBulkChunks * 16);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = int(threadIdx.x) + u * kThreads;
      if (i < count) tile_out[i] = dequant_chunk<Out, kRound>(bits[u], finish_scale(sc, dyn, raw[u]), code);
    }
    fence_proxy_async();  // the writes, visible to the bulk copy
    __syncthreads();
    if (threadIdx.x == 0) {
      bulk_store(out + base * E, uint32_t(__cvta_generic_to_shared(tile_out)), uint32_t(count) * 16u);
      bulk_commit();
    }
  }
  if (threadIdx.x == 0) bulk_wait_all();  // before the shared memory goes
  __syncthreads();  // the tables, where this CTA had no tile
  dequant_elements<Out, kRound>(out, packed, sc, dyn, code, chunks * E, n);
#else
  __trap();  // launched only on sm_90 (dequantize_into): a build without sm_90 code must not pass silently
#endif
}

// ---- fused small-M product ----

struct SmallMArgs {
  const uint8_t* packed;      // ((N·K+1)/2) NF4 codes of W (N, K), flattened row-major
  Scales sc;
  const __nv_bfloat16* x;     // (M, K) row-major
  const __nv_bfloat16* bias;  // (N) or null
  __nv_bfloat16* y;           // (M, N) row-major
  float* partial;             // (segments, M, 16) fp32 partial sums of the tensor-core path
  int M;
  int64_t N, K;
  // Rows n ≡ r (mod P) share the block phase ψ_r = (r·K) mod 64, so one 16-row tile of a residue
  // class sees its 64-block boundaries at the same k in every row. P = 64 / gcd(K, 64).
  int P;
  int64_t tiles_per_class;  // ceil(ceil(N / P) / 16)
  int64_t tiles;            // P · tiles_per_class
  int64_t units_per_tile;   // 64-block units per row, the most any residue class has (U)
  int64_t units_per_warp;   // Q: warp w owns tile-units [w·Q, (w+1)·Q) of the tiles·U in tile-major order
  int64_t total_units;      // tiles · U
};

// A tile's rows: tile = class r, 16 consecutive rows of that class; lane (g, t) owns rows g, g+8.
struct TileRows {
  int r, psi, units;  // residue class, block phase, this class's units per row
  bool okA, okB;      // rows g, g+8 exist (< N)
  int64_t nA, nB;     // their row indices
  int64_t b0A, b0B;   // the flat 64-block each row starts in
};
__device__ __forceinline__ TileRows tile_rows(const SmallMArgs& a, int64_t tile, int g) {
  TileRows tr;
  tr.r = int(tile / a.tiles_per_class);
  const int64_t tau = tile - int64_t(tr.r) * a.tiles_per_class;
  const int64_t class_rows = tr.r < a.N ? (a.N - tr.r + a.P - 1) / a.P : 0;
  const int64_t iA = 16 * tau + g, iB = iA + 8;
  tr.okA = iA < class_rows;
  tr.okB = iB < class_rows;
  tr.nA = tr.r + int64_t(a.P) * iA;
  tr.nB = tr.r + int64_t(a.P) * iB;
  tr.psi = int((int64_t(tr.r) * a.K) & 63);
  tr.units = int((tr.psi + a.K + 63) / 64);
  tr.b0A = tr.okA ? (tr.nA * a.K) >> 6 : 0;
  tr.b0B = tr.okB ? (tr.nB * a.K) >> 6 : 0;
  return tr;
}

// d = A·B + c for one m16n8k16 tile (bf16 in, fp32 accumulate). Fragments as in the PTX ISA:
// a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d0,d1 = D[g][2t..2t+1], d2,d3 = D[g+8][2t..2t+1]
// (g = lane / 4, t = lane % 4; the lower k / column in the lower half of each register).
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

constexpr int kSmallMWarps = 8;  // warps per CTA; each warp walks its own range of tile-units

// The two codes of one packed byte as bf16x2 (bnb's gemv rounds its code table to bf16 alike):
// NF4[byte >> 4], the element first in memory, in the low half; NF4[byte & 15] in the high half.
__device__ __forceinline__ uint32_t code_pair_bf16x2(const Tables& tab, int byte) {
  const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(tab.code[byte >> 4]));
  const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(tab.code[byte & 15]));
  return lo | (hi << 16);
}
// A bf16x2 word as two floats, the low half first (exact).
__device__ __forceinline__ float2 widen_bf16x2(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}

// The lookup table both product kernels decode codes with: pair[byte · 32 + lane] = bf16x2
// {NF4[byte >> 4] (low half: the element first in memory), NF4[byte & 15]}, replicated per lane so
// that a warp's 32 lookups of random bytes hit 32 different banks (32 KB); and DYN for the block
// scales. Built by the CTA's first 256 threads (blockDim.x ≥ 256), ends with a barrier.
__device__ __forceinline__ void build_pair_table(uint32_t* pair, uint32_t* pair_of_byte, float* dyn, const Tables& tab) {
  if (threadIdx.x < 256) {
    const int byte = int(threadIdx.x);
    pair_of_byte[byte] = code_pair_bf16x2(tab, byte);
    dyn[byte] = tab.dyn[byte];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 256 * 32; e += blockDim.x) pair[e] = pair_of_byte[e >> 5];
  __syncthreads();
}

// The tensor-core path. A unit j of a row is its flat 64-block b0(row) + j, i.e. the k in
// [64j − ψ, 64j − ψ + 64) ∩ [0, K). Lane (g, t) owns rows g and g+8 of a 16-row tile and, in every
// unit, the 16 k starting at kl = 64j − ψ + 16t: 8 packed bytes per row (one 8-byte load) and 16 x
// values per token (two 16-byte loads). In mma step s (0..3) it feeds bytes 2s, 2s+1 of each row
// piece (physical k = kl + 4s .. kl + 4s + 3) as logical k 2t, 2t+1, 2t+8, 2t+9 — x takes the same
// mapping, so the sum over k is unchanged — and every step of a unit stays inside one 64-block of
// every row of the tile, so the unit's fp32 partial sum is scaled by that block's absmax once.
// MT token tiles of 8 (1: M ≤ 8, 2: M ≤ 16) share the A fragments. acc receives the fp32 sums of units
// [j0, j1) for rows g, g+8 and tokens 2t, 2t+1 (+8 per token tile), as the mma's C fragment.
template <int MT>
__device__ __forceinline__ void tile_units(const SmallMArgs& a, const TileRows& tr, int j0, int j1,
                                           const uint32_t* my_pair, const float* dyn, float (&acc)[MT][4]) {
  const int lane = int(threadIdx.x & 31), g = lane >> 2, t = lane & 3;
  const float zero4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.0f;
  // 8 packed bytes of rows A and B for unit j (zeros where the lane's k-range leaves the row or the
  // row is past N: such pieces meet x = 0 below, and rows past N are never stored).
  auto fetch = [&](int j, uint2& pa, uint2& pb) {
    pa = make_uint2(0u, 0u);
    pb = make_uint2(0u, 0u);
    if (j >= j1) return;
    const int64_t kl = int64_t(64) * j - tr.psi + 16 * t;
    if (kl < 0 || kl + 16 > a.K) return;
    if (tr.okA) pa = __ldcs(reinterpret_cast<const uint2*>(a.packed + 32 * (tr.b0A + j) + 8 * t));
    if (tr.okB) pb = __ldcs(reinterpret_cast<const uint2*>(a.packed + 32 * (tr.b0B + j) + 8 * t));
  };
  // Three units in flight while one computes: cur (j), nxt (j + 1), nn (j + 2), fetching j + 3.
  uint2 curA, curB, nxtA, nxtB, nnA, nnB;
  fetch(j0, curA, curB);
  fetch(j0 + 1, nxtA, nxtB);
  fetch(j0 + 2, nnA, nnB);
  // Block scales four units at a time: lane t of a group holds unit j + t's (am4); the raw values of
  // the next four units are loaded a group ahead (raw4), so no unit waits for them.
  auto load_raw = [&](int jj, bool ok, int64_t b0) { return ok && jj < j1 ? load_scale(a.sc, b0 + jj) : RawScale{0u, 0.0f}; };
  RawScale raw4A = load_raw(j0 + t, tr.okA, tr.b0A), raw4B = load_raw(j0 + t, tr.okB, tr.b0B);
  float am4A = 0.0f, am4B = 0.0f;
  for (int j = j0; j < j1; ++j) {
    uint2 nnnA, nnnB;
    fetch(j + 3, nnnA, nnnB);
    if (((j - j0) & 3) == 0) {
      am4A = finish_scale(a.sc, dyn, raw4A);
      am4B = finish_scale(a.sc, dyn, raw4B);
      raw4A = load_raw(j + 4 + t, tr.okA, tr.b0A);
      raw4B = load_raw(j + 4 + t, tr.okB, tr.b0B);
    }
    const int src = (lane & ~3) | ((j - j0) & 3);
    const float amA = __shfl_sync(0xffffffffu, am4A, src);
    const float amB = __shfl_sync(0xffffffffu, am4B, src);
    const int64_t kl = int64_t(64) * j - tr.psi + 16 * t;
    const bool kok = kl >= 0 && kl + 16 <= a.K;
    uint32_t xw[MT][8];  // x[tok][kl .. kl+15] as bf16 pairs
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int tok = g + 8 * mt;
      uint4 v0 = make_uint4(0u, 0u, 0u, 0u), v1 = v0;
      if (kok && tok < a.M) {
        const uint4* px = reinterpret_cast<const uint4*>(a.x + int64_t(tok) * a.K + kl);
        v0 = __ldg(px);
        v1 = __ldg(px + 1);
      }
      xw[mt][0] = v0.x, xw[mt][1] = v0.y, xw[mt][2] = v0.z, xw[mt][3] = v0.w;
      xw[mt][4] = v1.x, xw[mt][5] = v1.y, xw[mt][6] = v1.z, xw[mt][7] = v1.w;
    }
    float c[MT][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t wa = s < 2 ? curA.x : curA.y, wb = s < 2 ? curB.x : curB.y;
      const int sh = (s & 1) * 16;  // bytes 2s, 2s+1 of the piece
      const uint32_t a0 = my_pair[((wa >> sh) & 0xFFu) << 5];
      const uint32_t a2 = my_pair[((wa >> (sh + 8)) & 0xFFu) << 5];
      const uint32_t a1 = my_pair[((wb >> sh) & 0xFFu) << 5];
      const uint32_t a3 = my_pair[((wb >> (sh + 8)) & 0xFFu) << 5];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (s == 0) mma_16816(c[mt], a0, a1, a2, a3, xw[mt][0], xw[mt][1], zero4);  // a fresh sum per unit
        else mma_16816(c[mt], a0, a1, a2, a3, xw[mt][2 * s], xw[mt][2 * s + 1], c[mt]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] = fmaf(amA, c[mt][0], acc[mt][0]);
      acc[mt][1] = fmaf(amA, c[mt][1], acc[mt][1]);
      acc[mt][2] = fmaf(amB, c[mt][2], acc[mt][2]);
      acc[mt][3] = fmaf(amB, c[mt][3], acc[mt][3]);
    }
    curA = nxtA, curB = nxtB, nxtA = nnA, nxtB = nnB, nnA = nnnA, nnB = nnnB;
  }
}

// Stream-K over tile-units: warp w owns units [w·Q, (w+1)·Q) of the tiles·U tile-units in tile-major
// order, so every warp has the same work. Each (warp, tile) segment stores its fp32 sums at segment
// id w + tile (unique: a warp and a tile boundary each start a new segment); small_m_reduce_kernel
// adds a tile's segments in warp order. partial: (segments, M, 16) with rows in tile order.
template <int MT>
__global__ void __launch_bounds__(kSmallMWarps * 32, MT == 1 ? 3 : 2)
    small_m_kernel(SmallMArgs a, Tables tab) {
  static_assert(kSmallMWarps * 32 == 256, "one thread per byte value builds the table");
  __shared__ uint32_t pair[256 * 32];
  __shared__ uint32_t pair_of_byte[256];
  __shared__ float dyn[256];
  build_pair_table(pair, pair_of_byte, dyn, tab);

  const int lane = int(threadIdx.x & 31), g = lane >> 2, t = lane & 3;
  const int64_t w = int64_t(blockIdx.x) * kSmallMWarps + (threadIdx.x >> 5);
  const int64_t U = a.units_per_tile;
  int64_t u = w * a.units_per_warp;
  const int64_t u_end = u + a.units_per_warp < a.total_units ? u + a.units_per_warp : a.total_units;
  while (u < u_end) {  // one segment per tile the warp's range touches (uniform across the warp)
    const int64_t tile = u / U;
    const int j_begin = int(u - tile * U);
    const int j_end = int(u_end - tile * U < U ? u_end - tile * U : U);
    const TileRows tr = tile_rows(a, tile, g);
    float acc[MT][4];
    tile_units<MT>(a, tr, j_begin, j_end < tr.units ? j_end : tr.units, pair + lane, dyn, acc);
    float* seg = a.partial + (w + tile) * a.M * 16;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = 8 * mt + 2 * t + (e & 1);
        if (tok < a.M) seg[tok * 16 + g + (e < 2 ? 0 : 8)] = acc[mt][e];
      }
    u += j_end - j_begin;
  }
}

// y[tok][n] = bf16(Σ of the tile's segments in warp order + bias[n]): one thread per (tile row, tok).
template <class = void>
__global__ void small_m_reduce_kernel(SmallMArgs a) {
  const int64_t total = a.tiles * 16 * a.M;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tile = idx / (16 * a.M);
    const int rem = int(idx - tile * 16 * a.M), tok = rem / 16, i = rem % 16;
    const TileRows tr = tile_rows(a, tile, i % 8);
    const bool ok = i < 8 ? tr.okA : tr.okB;
    if (!ok) continue;
    const int64_t n = i < 8 ? tr.nA : tr.nB;
    const int64_t w0 = tile * a.units_per_tile / a.units_per_warp;
    const int64_t w1 = ((tile + 1) * a.units_per_tile - 1) / a.units_per_warp;
    float s = 0.0f;
    for (int64_t w = w0; w <= w1; ++w) s += a.partial[((w + tile) * a.M + tok) * 16 + i];
    if (a.bias) s += __bfloat162float(a.bias[n]);
    a.y[int64_t(tok) * a.N + n] = __float2bfloat16_rn(s);
  }
}

// ---- the bandwidth-bound product for M ≤ kGemvMaxRows (decoding one to four sequences) ----
//
// At M = 1 the product is a stream of the packed codes, so the kernel is built around keeping HBM
// busy while the same warps decode: a persistent grid (as many CTAs as stay resident), each warp
// walking its items (a row group × a batch of chunks) with the next item's code and scale loads
// issued before the current item is decoded (register double buffering: 32 or 64 bytes of codes per lane
// in flight while 64 are consumed), and the CTA's first loads issued before it builds its lookup
// table. Decoding spends few instructions per code: one table lookup per byte (bf16 pair), two FMAs
// per element and token on CUDA cores. A group of G lanes owns R consecutive rows; lane `sub` of the
// group reads chunks sub, sub + G, ... of each row (the R rows share each x chunk it loads), and the
// group's partial sums meet in a fixed shuffle tree: deterministic, no workspace, one launch.
// Arithmetic as the tensor-core path: codes as bf16, each chunk's fp32 sum times its 64-block's
// fp32 scale (a chunk of 16 or 32 elements starting at a multiple of its size lies in one 64-block),
// bias rounded to bf16, one rounding.
constexpr int kGemvMaxRows = 4;
constexpr int kGemvWarps = 8;

struct GemvShape {
  int G;             // lanes per row group (1 .. 32, a power of two)
  int64_t C;         // VEC-byte chunks per row: K / (2·VEC)
  int64_t groups;    // ceil(N / R)
  int64_t batches;   // items per group: ceil(ceil(C / G) / D)
};

// The shared-memory slot of x's 16-byte word w (8 elements): one 16-byte pad after every 8 words, so
// that the 8 lanes of a 16-byte-access phase, which read the same word v of 8 consecutive chunks
// (W = 2 or 4 words each), meet 8 distinct 16-byte bank groups ((W·c + c·W/8 + v) mod 8 is a
// permutation of c mod 8), and word v of a chunk is an immediate offset from the chunk's first word
// (W·c + v never crosses a multiple of 8 that W·c does not).
__device__ __forceinline__ uint32_t gemv_x_slot(uint32_t w) { return w + (w >> 3); }
// The 16-byte slots x needs in shared memory for K elements.
inline size_t gemv_x_slots(int64_t K) { return size_t(K / 8 + (K / 8 + 7) / 8); }

// The f32 pair table of the x-in-shared-memory path: pairf[byte · 16 + r] = {bf16(NF4[byte >> 4]),
// bf16(NF4[byte & 15])} as two floats (the element first in memory first), replicated 16 times so
// that the 16 lanes of a 64-bit access phase (lanes l and l + 16 share replica l mod 16) hit
// distinct bank pairs (32 KB, the same as the bf16 table). One ld.shared.v2 yields both factors of
// a byte's two FMAs: no unpacking. Built by the first 256 threads (one byte each into `stage`, then
// consecutive 16-byte stores: conflict-free), ends with a barrier.
__device__ __forceinline__ void build_pair_table_f32(float2* pairf, float2* stage, float* dyn, const Tables& tab) {
  if (threadIdx.x < 256) {
    const int byte = int(threadIdx.x);
    stage[byte] = widen_bf16x2(code_pair_bf16x2(tab, byte));
    dyn[byte] = tab.dyn[byte];
  }
  __syncthreads();
  for (int f = threadIdx.x; f < 256 * 8; f += blockDim.x) {  // float4 f holds replicas 2(f % 8), +1 of byte f / 8
    const float2 v = stage[f >> 3];
    reinterpret_cast<float4*>(pairf)[f] = make_float4(v.x, v.y, v.x, v.y);
  }
  __syncthreads();
}

template <int VEC, int R, int BYTES>
struct GemvBatch {
  static constexpr int D = BYTES / VEC / R;  // chunks of each row per item: BYTES code bytes per lane
  uint32_t code[D][R][VEC / 4];
  RawScale raw[D][R];
};

// BYTES: code bytes per lane and item, 32 (3 CTAs per SM: ≤ 80 registers) or 64 (2 CTAs per SM).
// XS (M = 1): x staged once per CTA in dynamic shared memory (padded so that a warp's 16-byte
// reads of its lanes' chunks are free of bank conflicts) instead of read from L1 per chunk, the
// codes decoded through the f32 pair table (one ld.shared.v2 per byte, no unpacking), and the
// item's D chunks interleaved byte by byte: D independent lookup → FMA chains in flight, not one.
template <int VEC, int R, int MM, int BYTES = 32, bool XS = false>
__global__ void __launch_bounds__(kGemvWarps * 32, BYTES == 32 ? 3 : 2) gemv_kernel(SmallMArgs a, GemvShape gs, Tables tab) {
  static_assert(VEC == 8 || VEC == 16, "8- or 16-byte code chunks");
  static_assert(!XS || MM == 1, "x in shared memory at M = 1");
  extern __shared__ uint4 xs[];
  static_assert(BYTES == 32 || BYTES == 64, "32 or 64 code bytes per lane and item");
  using Batch = GemvBatch<VEC, R, BYTES>;
  constexpr int D = Batch::D;
  constexpr int W = VEC / 4;  // 32-bit code words per chunk
  using Chunk = std::conditional_t<VEC == 16, uint4, uint2>;
  __shared__ __align__(16) uint32_t pair[256 * 32];  // bf16x2 replicas per lane, or (XS) f32 pairs per half-warp lane
  __shared__ float2 stage[256];
  __shared__ float dyn[256];

  const int lane = int(threadIdx.x & 31), G = gs.G, sub = lane % G;
  const int per_warp = 32 / G;
  const int64_t K = a.K, N = a.N, C = gs.C, B = gs.batches;
  [[maybe_unused]] const uint32_t x_base = uint32_t(__cvta_generic_to_shared(xs));  // XS: x's slots in the shared window
  // Warp-uniform walk: the warp's first group q0 advances by the grid's group slots; lanes whose
  // group is past the end load zeros and store nothing, so the shuffles always have all 32 lanes.
  const int64_t stride = int64_t(gridDim.x) * kGemvWarps * per_warp;
  int64_t q0 = (int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * per_warp;
  int64_t b = 0;

  // Codes and raw scales of item (group q0 + lane / G, batch bb) (zeros past the row, the rows or the groups).
  auto fetch = [&](int64_t qq0, int64_t bb, Batch& t) {
    const int64_t q = qq0 + lane / G;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int64_t c = sub + (bb * D + d) * G;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = q * R + r;
        t.raw[d][r] = RawScale{0u, 0.0f};
#pragma unroll
        for (int w = 0; w < W; ++w) t.code[d][r][w] = 0u;
        if (c < C && q < gs.groups && n < N) {
          const Chunk v = __ldcs(reinterpret_cast<const Chunk*>(a.packed + n * (K / 2) + c * VEC));
          if constexpr (VEC == 16) t.code[d][r][0] = v.x, t.code[d][r][1] = v.y, t.code[d][r][2] = v.z, t.code[d][r][3] = v.w;
          else t.code[d][r][0] = v.x, t.code[d][r][1] = v.y;
          t.raw[d][r] = load_scale(a.sc, (n * K + c * 2 * VEC) >> 6);
        }
      }
    }
  };

  float acc[R][MM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MM; ++m) acc[r][m] = 0.0f;

  // Decodes item (q0, b) from `cur` after issuing the loads of the next item into `nxt`; at a group's
  // last batch, reduces and stores its rows. False once the warp has no item left.
  auto step = [&](const Batch& cur, Batch& nxt, uint32_t lane_pair) -> bool {
    if (q0 >= gs.groups) return false;
    int64_t nq0 = q0, nb = b + 1;
    if (nb == B) nb = 0, nq0 += stride;
    if (nq0 < gs.groups) fetch(nq0, nb, nxt);
    if constexpr (XS) {
      // The item's chunks c_d = sub + (b·D + d)·G in groups of DI, interleaved byte by byte within a
      // group; a group past the row on every lane is skipped (the item's tail at K = 4304: 9 chunks
      // per lane, 8 per item). A chunk past the row on this lane has zero codes and its x reads
      // clamped into the row, and is not added.
      constexpr int DI = D < 4 ? D : 4;
#pragma unroll
      for (int d0 = 0; d0 < D; d0 += DI) {
        if ((b * D + d0) * G >= C) break;  // warp-uniform: chunk c of lane 0 ≥ C
        uint32_t xoff[DI];
        bool ok[DI];
        float s[DI][R];
#pragma unroll
        for (int j = 0; j < DI; ++j) {
          const int64_t c = sub + (b * D + d0 + j) * G;
          ok[j] = c < C;
          xoff[j] = x_base + 16u * gemv_x_slot(uint32_t((ok[j] ? c : C - 1) * W));
#pragma unroll
          for (int r = 0; r < R; ++r) s[j][r] = 0.0f;
        }
#pragma unroll
        for (int v = 0; v < W; ++v) {  // code word v of every chunk: bytes 4v .. 4v + 3
          uint4 xv[DI];
#pragma unroll
          for (int j = 0; j < DI; ++j)
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(xv[j].x), "=r"(xv[j].y), "=r"(xv[j].z), "=r"(xv[j].w)
                         : "r"(xoff[j] + 16u * v));
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < DI; ++j) {
              const uint32_t xw = i == 0 ? xv[j].x : i == 1 ? xv[j].y : i == 2 ? xv[j].z : xv[j].w;
              const float2 xp = widen_bf16x2(xw);
              const float x0 = xp.x, x1 = xp.y;
#pragma unroll
              for (int r = 0; r < R; ++r) {
                float w0, w1;  // pairf[byte · 16 + lane % 16] at lane_pair + byte · 128
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                             : "=f"(w0), "=f"(w1)
                             : "r"(lane_pair + (__byte_perm(cur.code[d0 + j][r][v], 0u, 0x4440u + i) << 7)));
                s[j][r] = fmaf(w1, x1, fmaf(w0, x0, s[j][r]));
              }
            }
        }
#pragma unroll
        for (int j = 0; j < DI; ++j)
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (ok[j]) acc[r][0] = fmaf(finish_scale(a.sc, dyn, cur.raw[d0 + j][r]), s[j][r], acc[r][0]);
      }
    } else {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int64_t c = sub + (b * D + d) * G;
      if (c >= C) break;
      float s[R][MM];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MM; ++m) s[r][m] = 0.0f;
#pragma unroll
      for (int v = 0; v < W; ++v) {  // code word v: bytes 4v .. 4v + 3
        // x[m][2VEC·c + 8v .. + 8) as bf16 pairs: word i holds the elements of code byte 4v + i.
        uint4 xv[MM];
#pragma unroll
        for (int m = 0; m < MM; ++m) {
          xv[m] = make_uint4(0u, 0u, 0u, 0u);
          if (m < a.M) xv[m] = __ldg(reinterpret_cast<const uint4*>(a.x + int64_t(m) * K + c * 2 * VEC) + v);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // byte 4v + i: elements 2(4v + i) (high nibble), 2(4v + i) + 1
          float x0[MM], x1[MM];
#pragma unroll
          for (int m = 0; m < MM; ++m) {
            const uint32_t xw = i == 0 ? xv[m].x : i == 1 ? xv[m].y : i == 2 ? xv[m].z : xv[m].w;
            const float2 xp = widen_bf16x2(xw);
            x0[m] = xp.x;
            x1[m] = xp.y;
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            // pair[byte · 32 + lane] at lane_pair + byte · 128: one PRMT, one LEA, one LDS.
            uint32_t p;
            asm volatile("ld.shared.u32 %0, [%1];"
                         : "=r"(p)
                         : "r"(lane_pair + (__byte_perm(cur.code[d][r][v], 0u, 0x4440u + i) << 7)));
            const float2 wp = widen_bf16x2(p);
            const float w0 = wp.x, w1 = wp.y;
#pragma unroll
            for (int m = 0; m < MM; ++m) s[r][m] = fmaf(w1, x1[m], fmaf(w0, x0[m], s[r][m]));
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float am = finish_scale(a.sc, dyn, cur.raw[d][r]);
#pragma unroll
        for (int m = 0; m < MM; ++m) acc[r][m] = fmaf(am, s[r][m], acc[r][m]);
      }
    }
    }
    if (b == B - 1) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MM; ++m)
          for (int o = G >> 1; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
      const int64_t q = q0 + lane / G;
      if (sub == 0 && q < gs.groups) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int64_t n = q * R + r;
          if (n >= N) break;
          const float bias = a.bias ? __bfloat162float(a.bias[n]) : 0.0f;
#pragma unroll
          for (int m = 0; m < MM; ++m)
            if (m < a.M) a.y[int64_t(m) * N + n] = __float2bfloat16_rn(acc[r][m] + bias);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MM; ++m) acc[r][m] = 0.0f;
    }
    q0 = nq0, b = nb;
    return true;
  };

  Batch x0, x1;
  if (q0 < gs.groups) fetch(q0, 0, x0);  // in flight while the table is built
  if constexpr (XS) {  // visible after the table's barriers
    const uint32_t words = uint32_t(K / 8);
    for (uint32_t w = threadIdx.x; w < words; w += blockDim.x)
      xs[gemv_x_slot(w)] = __ldg(reinterpret_cast<const uint4*>(a.x) + w);
    build_pair_table_f32(reinterpret_cast<float2*>(pair), stage, dyn, tab);
  } else {
    build_pair_table(pair, reinterpret_cast<uint32_t*>(stage), dyn, tab);
  }
  // The lane's replica as a 32-bit shared-window address (indexing `pair` from C++ cost two more
  // integer ops per lookup: the shift by 5 and the OR of the lane): 4 bytes per lane in the bf16
  // table, 8 bytes per lane of a half-warp in the f32 one; x's slots likewise.
  const uint32_t lane_pair = uint32_t(__cvta_generic_to_shared(pair)) + (XS ? 8u * uint32_t(lane & 15) : 4u * uint32_t(lane));

  while (step(x0, x1, lane_pair) && step(x1, x0, lane_pair)) {
  }
}

// The bf16 pair table both M = 1 kernels look codes up in, addressed by one PRMT: the pair of byte
// b for lane l at byte offset b · 256 + l · 4 (PRMT puts the code byte in bits 8..15 and l · 4 in
// bits 0..7; the upper 128 bytes of each byte's 256 are left unused). 64 KB at `table`, from
// stage[b] = code_pair_bf16x2(tab, b); uint4 f: lanes 4(f % 8)..+3 of byte f / 8. No barrier.
__device__ __forceinline__ void fill_prmt_pair_table(unsigned char* table, const uint32_t* stage) {
  for (int f = threadIdx.x; f < 256 * 8; f += blockDim.x) {
    const uint32_t u = stage[f >> 3];
    *reinterpret_cast<uint4*>(table + (f >> 3) * 256 + (f & 7) * 16) = make_uint4(u, u, u, u);
  }
}
// The table entry of byte i (0..3) of `word` for the lane whose lane · 4 is `lane4`.
__device__ __forceinline__ uint32_t prmt_pair(const unsigned char* table, uint32_t word, uint32_t lane4, int i) {
  return *reinterpret_cast<const uint32_t*>(table + __byte_perm(word, lane4, 0x5504u + (uint32_t(i) << 4)));
}

// ---- M = 1, the default: the x-stationary product ----
//
// gemv_kernel walks rows and fetches x again for every row: per code byte one table lookup, two x
// values to read and unpack, two FMAs, ~15 instructions per code byte in all (ncu, 2048 → 16384).
// Here a lane's K positions never change. A team of TW warps covers a row: lane p of the team owns
// chunks c = p + P·d (d < D, P = 32·TW) of every row, holds those x values in registers as f32 for
// the whole kernel and walks the team's rows team, team + T, team + 2T, ... (T teams in the grid).
// A code byte then costs one PRMT (the byte and the lane's table replica in one address), one
// 4-byte ld.shared of both codes as a bf16 pair and two integer ops to widen them (the table holds
// one replica per lane, so a warp's lookups never meet in a bank; TQ_NF4_STAT_TABLE=f32: an f32 pair
// table, one ld.shared.v2 and no widening but two wavefronts per warp lookup, 2.5% slower over the
// decode shapes on an H100) and two FMAs. Each lane keeps the next RB rows' codes
// and raw scales in flight (a register double buffer; the first rows are requested before the CTA
// builds its table) while it decodes the current RB. The RB row sums leave the warp in one
// transposed shuffle reduction (6 shuffles instead of RB × 5), land in shared memory per (row,
// warp), and once per round of RR rows the CTA adds each row's TW warp sums in warp order, adds the
// bias (bf16, as NF4Linear holds it) and stores the row once, rounded to bf16. Arithmetic as
// gemv_kernel: codes as bf16, each chunk's fp32 sum (elements in order) times its 64-block's fp32
// scale. Deterministic, one launch, no workspace.
constexpr int kStatMaxWarps = 16;   // warps per CTA at most (one CTA of 16 warps per SM at ≤ 128 registers)
constexpr int kStatRows = 4;        // RB: rows per batch and lane
constexpr int kStatRoundRows = 32;  // RR: rows per reduction round, a multiple of RB
constexpr size_t kStatTableBytes = size_t(256) * 32 * sizeof(float2);  // [byte][lane] pairs: 64 KB (bf16: half used)

struct StatShape {
  int64_t C;      // VEC-byte chunks per row: K / (2·VEC)
  int TW;         // warps per team: ceil(C / (32·D))
  int teams_cta;  // teams per CTA
  int64_t T;      // teams in the grid
  int64_t iters;  // rows per team: ceil(N / T), the same for every team (rows ≥ N load zeros, store nothing)
  int pdl;        // launched as a programmatic dependent (gemv_pdl()): no global read before the table
};

template <int VEC, int D, bool kBf16Table>
__global__ void __launch_bounds__(kStatMaxWarps * 32, 1) gemv_stationary_kernel(SmallMArgs a, StatShape ss, Tables tab) {
  static_assert((VEC == 16 && D == 1) || (VEC == 8 && (D == 1 || D == 2)), "x in registers: at most 32 floats per lane");
  constexpr int RB = kStatRows, RR = kStatRoundRows, W = VEC / 4, E = 2 * VEC;
  static_assert(RB == 4 && RR % RB == 0, "the transposed reduction is written for 4 rows");
  using Chunk = std::conditional_t<VEC == 16, uint4, uint2>;
  extern __shared__ __align__(16) unsigned char stat_smem[];
  float* red = reinterpret_cast<float*>(stat_smem + kStatTableBytes);  // [slot · warps + warp]
  __shared__ uint32_t stage[256];  // code_pair_bf16x2 of every byte
  __shared__ float dyn[256];

  const int lane = int(threadIdx.x & 31), warp = int(threadIdx.x >> 5), warps = int(blockDim.x >> 5);
  const int tl = warp / ss.TW, P = 32 * ss.TW, p = (warp - tl * ss.TW) * 32 + lane;
  const int64_t team = int64_t(blockIdx.x) * ss.teams_cta + tl;
  const int64_t N = a.N, K = a.K, C = ss.C, T = ss.T, iters = ss.iters;

  struct Buf {
    Chunk code[RB][D];
    RawScale raw[RB][D];
  };
  // Rows team + T·(i0 + r), r < RB: the lane's chunks and their raw scales (zeros past the row or N).
  auto fetch = [&](int64_t i0, Buf& b) {
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const int64_t n = team + T * (i0 + r);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        const int64_t c = p + int64_t(P) * d;
        b.code[r][d] = Chunk{};
        b.raw[r][d] = RawScale{0u, 0.0f};
        if (n < N && c < C) {
          b.code[r][d] = __ldcs(reinterpret_cast<const Chunk*>(a.packed + n * (K / 2) + c * VEC));
          b.raw[r][d] = load_scale(a.sc, (n * K + c * E) >> 6);
        }
      }
    }
  };
  Buf b0, b1;
  // Without programmatic dependent launch the first rows' codes are in flight while the table is
  // built. With it (ss.pdl; launch_stationary sets the attribute unless TQ_NF4_GEMV_PDL=0) the
  // next kernel in the stream may be scheduled now, and this CTA builds its table, which depends
  // on nothing in global memory, while the previous kernel is still finishing; every global read
  // (x, codes, scales, bias) comes after griddepcontrol.wait, which returns once the previous grid
  // has completed and its writes are visible (at once without the attribute).
  if (!ss.pdl) fetch(0, b0);
  grid_dependents_launch();
  for (int byte = threadIdx.x; byte < 256; byte += blockDim.x) {
    stage[byte] = code_pair_bf16x2(tab, byte);
    dyn[byte] = tab.dyn[byte];
  }
  __syncthreads();
  if constexpr (kBf16Table) {
    fill_prmt_pair_table(stat_smem, stage);
  } else {
    float2* pairf = reinterpret_cast<float2*>(stat_smem);  // [byte · 32 + lane]
    for (int f = threadIdx.x; f < 256 * 16; f += blockDim.x) {  // float4 f: replicas 2(f % 16), +1 of byte f / 16
      const float2 v = widen_bf16x2(stage[f >> 4]);
      reinterpret_cast<float4*>(pairf)[f] = make_float4(v.x, v.y, v.x, v.y);
    }
  }
  grid_dependency_wait();
  if (ss.pdl) fetch(0, b0);  // in flight while x is loaded

  // x[c·E .. c·E + E) of the lane's chunks as f32 (zeros for a chunk past the row: its codes decode
  // to NF4[0] = −1, which must meet x = 0).
  float xf[D][E];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const int64_t c = p + int64_t(P) * d;
#pragma unroll
    for (int v = 0; v < E / 8; ++v) {
      uint4 w = make_uint4(0u, 0u, 0u, 0u);
      if (c < C) w = __ldg(reinterpret_cast<const uint4*>(a.x + c * E) + v);
      const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 xw = widen_bf16x2(ws[j]);
        xf[d][8 * v + 2 * j] = xw.x;
        xf[d][8 * v + 2 * j + 1] = xw.y;
      }
    }
  }
  __syncthreads();  // the table

  // PRMT(word, lane·8, 0x55?4): byte 0 = lane·8, byte 1 = code byte ?, bytes 2, 3 = 0, i.e. the
  // byte offset of pairf[byte · 32 + lane] (lane·4: of the bf16 pair at byte · 256 + lane · 4).
  const uint32_t lane_sel = uint32_t(lane) * (kBf16Table ? 4u : 8u);
  const unsigned char* table = stat_smem;

  // Rows team + T·j < N: a team's valid rows are a prefix of its sequence, so a batch holds
  // min(RB, team_rows − i0) of them (all RB but in a team's last batch). Rows past N are not decoded
  // (at 2048 → 2048 two of each team's four): the valid count is a compile-time constant of each
  // instance of row_sums, so its rows' chains stay straight-line code the compiler interleaves.
  const int64_t team_rows = team < N ? (N - team + T - 1) / T : 0;
  auto row_sums = [&](const Buf& b, float (&v)[RB], auto valid) {
    constexpr int NV = decltype(valid)::value;
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      float s = 0.0f;
      if (r < NV) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
          uint32_t cw[W];
          if constexpr (VEC == 16) {
            cw[0] = b.code[r][d].x, cw[1] = b.code[r][d].y, cw[2] = b.code[r][d].z, cw[3] = b.code[r][d].w;
          } else {
            cw[0] = b.code[r][d].x, cw[1] = b.code[r][d].y;
          }
          float t = 0.0f;
#pragma unroll
          for (int w = 0; w < W; ++w)
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // byte 4w + i: elements 2(4w + i) (high nibble) and 2(4w + i) + 1
              const unsigned char* at = table + __byte_perm(cw[w], lane_sel, 0x5504u + (i << 4));
              float2 f;
              if constexpr (kBf16Table) f = widen_bf16x2(*reinterpret_cast<const uint32_t*>(at));
              else f = *reinterpret_cast<const float2*>(at);
              t = fmaf(f.y, xf[d][8 * w + 2 * i + 1], fmaf(f.x, xf[d][8 * w + 2 * i], t));
            }
          s = fmaf(finish_scale(a.sc, dyn, b.raw[r][d]), t, s);
        }
      }
      v[r] = s;
    }
  };
  auto decode = [&](const Buf& b, int64_t i0) {
    float v[RB];
    const int64_t left = team_rows - i0;  // the same in every lane of the team
    if (left >= RB) row_sums(b, v, std::integral_constant<int, RB>{});
    else if (left == 3) row_sums(b, v, std::integral_constant<int, 3>{});
    else if (left == 2) row_sums(b, v, std::integral_constant<int, 2>{});
    else if (left == 1) row_sums(b, v, std::integral_constant<int, 1>{});
    else row_sums(b, v, std::integral_constant<int, 0>{});
    // Transposed reduction: lanes exchange half their rows across 16, then half again across 8, so
    // each group of 8 lanes holds one row; three butterfly steps finish it. Lane 8j ends with row j.
    const bool h16 = (lane & 16) != 0, h8 = (lane & 8) != 0;
    float k0 = h16 ? v[2] : v[0], k1 = h16 ? v[3] : v[1];
    k0 += __shfl_xor_sync(0xffffffffu, h16 ? v[0] : v[2], 16);
    k1 += __shfl_xor_sync(0xffffffffu, h16 ? v[1] : v[3], 16);
    float k = (h8 ? k1 : k0) + __shfl_xor_sync(0xffffffffu, h8 ? k0 : k1, 8);
    k += __shfl_xor_sync(0xffffffffu, k, 4);
    k += __shfl_xor_sync(0xffffffffu, k, 2);
    k += __shfl_xor_sync(0xffffffffu, k, 1);
    if ((lane & 7) == 0) red[(int(i0 % RR) + (lane >> 3)) * warps + warp] = k;
  };

  // Rows r0 .. r0 + rows − 1 of every team of the CTA: the TW warp sums in warp order, the bias, one store.
  auto finish_round = [&](int64_t r0, int rows) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < ss.teams_cta * RR; idx += blockDim.x) {
      const int t = idx / RR, slot = idx - t * RR;
      const int64_t n = int64_t(blockIdx.x) * ss.teams_cta + t + T * (r0 + slot);
      if (slot < rows && n < N) {
        float s = 0.0f;
        for (int w = 0; w < ss.TW; ++w) s += red[slot * warps + t * ss.TW + w];
        if (a.bias) s += __bfloat162float(a.bias[n]);
        a.y[n] = __float2bfloat16_rn(s);
      }
    }
    __syncthreads();
  };

  int64_t i0 = 0;  // the same sequence in every team: the barriers are uniform
  auto step = [&](const Buf& cur, Buf& nxt) -> bool {
    if (i0 >= iters) return false;
    if (i0 + RB < iters) fetch(i0 + RB, nxt);
    decode(cur, i0);
    const int64_t r0 = i0 - i0 % RR;
    if (i0 + RB == r0 + RR || i0 + RB >= iters) finish_round(r0, int(iters - r0 < RR ? iters - r0 : RR));
    i0 += RB;
    return true;
  };
  while (step(b0, b1) && step(b1, b0)) {
  }
}

// ---- M = 1 on tensor cores: x in shared memory, fixed segments ----
//
// The x-stationary kernel spends per code byte a PRMT, a table lookup, two integer ops to widen the
// pair and two FMAs. Here the pair goes to an mma unwidened: a 16-row tile of W is the A operand
// (m16n8k16, bf16 in, fp32 accumulate), x the B operand, held once per CTA in shared memory and
// repeated in all 8 columns (so every lane of a quad ends with its rows' sums: nothing is masked).
// A byte then costs one PRMT and one 4-byte ld.shared (the PRMT table above, one replica per lane:
// conflict-free), and 128 bytes of a warp one mma. Units, block scales and the k order inside a
// unit are those of the tensor-core small-M path (tile_units): unit j of a tile row is its flat
// 64-block b0 + j, lane (g, t) feeds bytes 8t .. 8t + 7 of rows g and g + 8, each unit's fp32 sum
// is scaled by its block's scale once. A tile's units are cut into segments of kTcSegUnits; an
// item is one (tile, segment), and a row's value is Σ over its segments in order of the segment's
// scaled unit sums in order, so the bits depend on K alone, never on the grid. Each CTA owns a
// contiguous range of tiles and walks it in rounds of items that fit its reduction buffer; its
// warps split a round's items into contiguous ranges, keep the next items' codes and raw scales in
// flight while the current one computes (a register ring, see DEPTH), and write each item's 16 row
// sums to shared memory; after a barrier the CTA adds each row's segments, adds the bias and stores
// the row, rounded to bf16. Deterministic, one launch, no workspace.
// DEPTH: items per warp in the register ring (DEPTH − 1 in flight while one computes): 2 with 16
// warps per CTA (≤ 128 registers), 3 with 12 (≤ 170): 32 KB vs 48 KB of codes in flight per SM
// (TQ_NF4_TC_DEPTH=3; the benchmark's comparison).
__host__ __device__ constexpr int tc_warps(int depth) { return depth == 2 ? 16 : 12; }
constexpr int kTcSegUnits = 4;                       // units (64-blocks of a tile's rows) per item
constexpr int kTcRoundItems = 256;                   // items per round: one reduction buffer, 16 KB
constexpr int64_t kTcMaxK = 32768;                   // x in shared memory: at most 64 KB
constexpr size_t kTcRedBytes = size_t(kTcRoundItems) * 16 * sizeof(float);

struct TcShape {
  int nseg;         // segments per tile: ceil(units_per_tile / kTcSegUnits)
  int round_tiles;  // tiles per round: kTcRoundItems / nseg (≥ 1)
  int64_t ctas;     // CTAs; CTA c owns tiles [c·T/ctas, (c+1)·T/ctas)
};

// The shared memory of gemv_tc_kernel for K: the PRMT table, x (16-byte aligned), two reduction buffers.
inline size_t tc_smem_bytes(int64_t K) {
  return kStatTableBytes + size_t((K * 2 + 15) / 16 * 16) + 2 * kTcRedBytes;
}

template <int DEPTH>
__global__ void __launch_bounds__(tc_warps(DEPTH) * 32, 1) gemv_tc_kernel(SmallMArgs a, TcShape ts, Tables tab) {
  static_assert(DEPTH == 2 || DEPTH == 3, "a ring of 2 or 3 items");
  constexpr int SU = kTcSegUnits, WARPS = tc_warps(DEPTH);
  extern __shared__ __align__(16) unsigned char tc_smem[];
  unsigned char* table = tc_smem;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(tc_smem + kStatTableBytes);
  float* red = reinterpret_cast<float*>(tc_smem + kStatTableBytes + size_t((a.K * 2 + 15) / 16 * 16));
  __shared__ uint32_t stage[256];
  __shared__ float dyn[256];

  const int lane = int(threadIdx.x & 31), warp = int(threadIdx.x >> 5), g = lane >> 2, t = lane & 3;
  const int64_t K = a.K, T = a.tiles;
  const int64_t tile_begin = int64_t(blockIdx.x) * T / ts.ctas, tile_end = (int64_t(blockIdx.x) + 1) * T / ts.ctas;

  // The table depends on nothing in global memory: built before griddepcontrol.wait (see the
  // x-stationary kernel).
  grid_dependents_launch();
  for (int byte = threadIdx.x; byte < 256; byte += blockDim.x) {
    stage[byte] = code_pair_bf16x2(tab, byte);
    dyn[byte] = tab.dyn[byte];
  }
  __syncthreads();
  fill_prmt_pair_table(table, stage);
  grid_dependency_wait();

  // One item's loads: the 8-byte pieces of rows g and g + 8 for its SU units (zeros where the lane's
  // 16 k leave the row or the row is past N: such pieces meet x = 0 below) and, in lane t, the raw
  // scales of unit j0 + t of both rows (shuffled to the quad per unit at compute time).
  struct Item {
    uint2 A[SU], B[SU];
    RawScale rA, rB;
    int j0, psi, slot;  // first unit, the tile's block phase, the item's index in its round (-1: none)
  };
  // What fetch needs of the current tile's rows g, g + 8 (refreshed when the tile changes).
  struct Rows {
    int64_t b0A, b0B;
    int psi, units;
    bool okA, okB;
  };
  int64_t cached_tile = -1;
  Rows tr{};
  auto fetch = [&](int64_t r0, int item, int item_end, Item& it) {
    it.slot = -1;
    if (item >= item_end) return;
    const int64_t tile = r0 + item / ts.nseg;
    const int seg = item - int(tile - r0) * ts.nseg;
    if (tile != cached_tile) {
      const TileRows full = tile_rows(a, tile, g);
      tr = Rows{full.b0A, full.b0B, full.psi, full.units, full.okA, full.okB};
      cached_tile = tile;
    }
    it.slot = item, it.j0 = seg * SU, it.psi = tr.psi;
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const int64_t j = it.j0 + u, kl = 64 * j - tr.psi + 16 * t;
      it.A[u] = make_uint2(0u, 0u);
      it.B[u] = make_uint2(0u, 0u);
      if (kl >= 0 && kl + 16 <= K) {
        if (tr.okA) it.A[u] = __ldcs(reinterpret_cast<const uint2*>(a.packed + 32 * (tr.b0A + j) + 8 * t));
        if (tr.okB) it.B[u] = __ldcs(reinterpret_cast<const uint2*>(a.packed + 32 * (tr.b0B + j) + 8 * t));
      }
    }
    const int jt = it.j0 + t;
    it.rA = tr.okA && jt < tr.units ? load_scale(a.sc, tr.b0A + jt) : RawScale{0u, 0.0f};
    it.rB = tr.okB && jt < tr.units ? load_scale(a.sc, tr.b0B + jt) : RawScale{0u, 0.0f};
  };

  const uint32_t lane4 = uint32_t(lane) * 4u;
  const float zero4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  // The item's two row sums (rows g, g + 8) into the round's buffer.
  auto compute = [&](const Item& it, float* buf) {
    const float amA4 = finish_scale(a.sc, dyn, it.rA), amB4 = finish_scale(a.sc, dyn, it.rB);
    float sA = 0.0f, sB = 0.0f;
#pragma unroll
    for (int u = 0; u < SU; ++u) {
      const float amA = __shfl_sync(0xffffffffu, amA4, (lane & ~3) | u);
      const float amB = __shfl_sync(0xffffffffu, amB4, (lane & ~3) | u);
      const int64_t kl = 64 * int64_t(it.j0 + u) - it.psi + 16 * t;
      uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0;
      if (kl >= 0 && kl + 16 <= K) {
        const uint4* px = reinterpret_cast<const uint4*>(xs + kl);
        x0 = px[0];
        x1 = px[1];
      }
      const uint32_t xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
      float c[4];
#pragma unroll
      for (int s = 0; s < 4; ++s) {  // bytes 2s, 2s + 1 of each row piece: k 4s .. 4s + 3 of the lane's 16
        const uint32_t wa = s < 2 ? it.A[u].x : it.A[u].y, wb = s < 2 ? it.B[u].x : it.B[u].y;
        const int i = (s & 1) * 2;
        const uint32_t a0 = prmt_pair(table, wa, lane4, i), a2 = prmt_pair(table, wa, lane4, i + 1);
        const uint32_t a1 = prmt_pair(table, wb, lane4, i), a3 = prmt_pair(table, wb, lane4, i + 1);
        if (s == 0) mma_16816(c, a0, a1, a2, a3, xw[0], xw[1], zero4);  // a fresh sum per unit
        else mma_16816(c, a0, a1, a2, a3, xw[2 * s], xw[2 * s + 1], c);
      }
      sA = fmaf(amA, c[0], sA);
      sB = fmaf(amB, c[2], sB);
    }
    if (t == 0) {
      buf[it.slot * 16 + g] = sA;
      buf[it.slot * 16 + g + 8] = sB;
    }
  };

  // A round: tiles [r0, r0 + nt), items [0, nt · nseg), this warp's contiguous share of them.
  struct Round {
    int nt, begin, end;
  };
  auto round_of = [&](int64_t r0) {
    Round r;
    r.nt = int(tile_end - r0 < ts.round_tiles ? tile_end - r0 : ts.round_tiles);
    const int items = r.nt * ts.nseg;
    r.begin = int(int64_t(warp) * items / WARPS);
    r.end = int(int64_t(warp + 1) * items / WARPS);
    return r;
  };
  Item ring[DEPTH];
  auto prologue = [&](int64_t r0, const Round& r) {  // the round's first DEPTH − 1 items
#pragma unroll
    for (int d = 0; d + 1 < DEPTH; ++d) fetch(r0, r.begin + d, r.end, ring[d]);
  };
  if (tile_begin < tile_end) prologue(tile_begin, round_of(tile_begin));  // in flight while x is staged
  // x into shared memory (16-byte copies; K % 16 == 0 and x 16-byte aligned on this path).
  for (int64_t v = threadIdx.x; v < K / 8; v += blockDim.x)
    reinterpret_cast<uint4*>(xs)[v] = __ldg(reinterpret_cast<const uint4*>(a.x) + v);
  __syncthreads();  // the table and x

  int parity = 0;
  for (int64_t r0 = tile_begin; r0 < tile_end; r0 += ts.round_tiles, parity ^= 1) {
    const Round r = round_of(r0);
    const int nt = r.nt, w_begin = r.begin, w_end = r.end;
    float* buf = red + parity * (kTcRedBytes / sizeof(float));
    if (r0 != tile_begin) prologue(r0, r);
    // ring[d] holds item + d; fetching item + d + DEPTH − 1 into the slot computed last keeps
    // DEPTH − 1 items in flight.
    for (int item = w_begin; item < w_end; item += DEPTH) {
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        if (item + d >= w_end) break;
        fetch(r0, item + d + DEPTH - 1, w_end, ring[(d + DEPTH - 1) % DEPTH]);
        compute(ring[d], buf);
      }
    }
    __syncthreads();  // the round's row sums
    for (int idx = threadIdx.x; idx < nt * 16; idx += blockDim.x) {
      const int tl = idx >> 4, i = idx & 15;
      const TileRows rows = tile_rows(a, r0 + tl, i & 7);
      const bool ok = i < 8 ? rows.okA : rows.okB;
      if (!ok) continue;
      const int64_t n = i < 8 ? rows.nA : rows.nB;
      float s = 0.0f;
      for (int seg = 0; seg < ts.nseg; ++seg) s += buf[(tl * ts.nseg + seg) * 16 + i];
      if (a.bias) s += __bfloat162float(a.bias[n]);
      a.y[n] = __float2bfloat16_rn(s);
    }
    // No barrier: the next round writes the other buffer, and the one after passes the next
    // round's barrier first, which every thread reaches only after this reduction.
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
  // A thread does 8 stores per trip; enough CTAs to fill every SM (8 × 256 threads) once. The
  // stores are evict-first (st.global.cs: the output is read by the next kernel, not this one):
  // 1.5-6% faster than plain stores on an H100 (2026-12-07). TQ_NF4_DEQ_CS=0 stores plainly (A/B).
  const int64_t work = vec ? std::max<int64_t>((n / per_store + 7) / 8, n % per_store) : n;
  const unsigned blocks = grid_for(work, kThreads, dev.index);
  static const bool stream_stores = env_switch_on("TQ_NF4_DEQ_CS");
  cudaStream_t st = current_stream();
  const Tables& tab = tables();
  // TQ_NF4_DEQ_BULK=1 (read per call, so a test can run both paths), sm_90: through shared memory
  // and bulk copies (dequantize_bulk_kernel), as many CTAs as stay resident (two 32 KB buffers
  // each), at most one per tile. Opt-in: written in a session without a GPU, not yet measured.
  const bool bulk = env_opt_in("TQ_NF4_DEQ_BULK") && vec && device_properties(dev.index).major >= 9;
  auto launch = [&](auto out_tag, auto round_tag) {
    using Out = decltype(out_tag);
    constexpr Round R = decltype(round_tag)::value;
    if (bulk) {
      constexpr auto kernel = dequantize_bulk_kernel<Out, R>;
      static std::array<std::once_flag, kMaxDevices> once;
      static std::array<int, kMaxDevices> per_sm{};
      std::call_once(once[size_t(dev.index)], [&] {
        TQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kDeqBulkSmem)));
        TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[size_t(dev.index)], kernel, kThreads, kDeqBulkSmem));
      });
      const int64_t tiles = (n / per_store + kDeqBulkChunks - 1) / kDeqBulkChunks;
      const int64_t resident = int64_t(sm_count(dev.index)) * std::max(per_sm[size_t(dev.index)], 1);
      const unsigned ctas = unsigned(std::clamp<int64_t>(tiles, 1, resident));
      kernel<<<ctas, kThreads, kDeqBulkSmem, st>>>(static_cast<Out*>(out.data_ptr()), pp, sc, n, tab);
      return;
    }
    dequantize_kernel<Out, R><<<blocks, kThreads, 0, st>>>(static_cast<Out*>(out.data_ptr()), pp, sc, n, vec,
                                                          stream_stores, tab);
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

// How one small-M product runs: the tensor-core kernel's stream-K decomposition (fast), or the
// general warp-per-row kernel.
// The M up to which NF4Linear routes to the CUDA-core kernels (gemv_stationary_kernel at M = 1, see
// gemv_x_path; gemv_kernel above): 1 by default, measured (bench/RESULTS.md, 2026-12-05: at M = 1
// gemv_kernel alone beats the tensor-core kernel on every decode shape, 1.10× vs 0.88× cuBLAS in
// geometric mean; at M = 2 it loses, 0.82× vs 0.88×). TQ_NF4_GEMV=0 routes every M to the
// tensor-core kernel, TQ_NF4_GEMV=1 every M ≤ kGemvMaxRows to the CUDA-core ones (read per call).
inline int gemv_default_max_rows() {
  const char* v = std::getenv("TQ_NF4_GEMV");
  if (v != nullptr && v[0] == '0') return 0;
  if (v != nullptr && v[0] == '1') return kGemvMaxRows;
  return 1;
}

struct SmallMPlan {
  bool fast = false;  // K % 16 == 0 and 8-byte aligned codes, 16-byte aligned x
  int gemv_vec = 0;   // M ≤ kGemvMaxRows: gemv_kernel's chunk bytes (16: K % 32 == 0 and 16-byte aligned codes)
  int P = 1;
  int64_t tiles_per_class = 0, tiles = 0, units_per_tile = 0, units_per_warp = 0, total_units = 0, warps = 0;
  unsigned ctas = 1;
  int gemv_max_rows = 0;  // M up to which gemv_kernel runs (plan_small_m: gemv_default_max_rows())
  bool gemv(int64_t M) const { return gemv_vec != 0 && M <= gemv_max_rows; }
  // Partial sums of the tensor-core path: one (M, 16) slab per segment id w + tile.
  int64_t workspace_floats(int64_t M) const { return fast && !gemv(M) ? (warps + tiles) * M * 16 : 0; }
};

inline SmallMPlan plan_small_m(int64_t N, int64_t K, const void* packed, const void* x, int device) {
  SmallMPlan p;
  p.fast = K > 0 && K % 16 == 0 && aligned_to(packed, 8) && aligned_to(x, 16);
  if (!p.fast) {
    p.ctas = grid_for((N + kThreads / 32 - 1) / (kThreads / 32), 1, device);
    return p;
  }
  p.gemv_vec = K % 32 == 0 && aligned_to(packed, 16) ? 16 : 8;
  p.gemv_max_rows = gemv_default_max_rows();
  p.P = int(64 / std::gcd(K, int64_t(64)));
  p.tiles_per_class = ((N + p.P - 1) / p.P + 15) / 16;
  p.tiles = p.P * p.tiles_per_class;
  for (int r = 0; r < p.P; ++r) p.units_per_tile = std::max(p.units_per_tile, ((int64_t(r) * K) % 64 + K + 63) / 64);
  p.total_units = p.tiles * p.units_per_tile;
  // Every resident warp (3 CTAs of 8 warps per SM) gets the same number of units, at least 2.
  const int64_t resident = int64_t(sm_count(device)) * 3 * kSmallMWarps;
  const int64_t warps = std::clamp<int64_t>((p.total_units + 1) / 2, 1, resident);
  p.units_per_warp = (p.total_units + warps - 1) / warps;
  p.warps = (p.total_units + p.units_per_warp - 1) / p.units_per_warp;
  p.ctas = unsigned((p.warps + kSmallMWarps - 1) / kSmallMWarps);
  TQ_CHECK(p.units_per_tile <= INT32_MAX, "nf4 linear: K = ", K, " is too large");
  return p;
}

// The x-stationary kernel's configuration for K: (VEC, D) among (16, 1), (8, 1), (8, 2) (x in
// registers: ≤ 32 floats per lane; VEC 16 needs K % 32 == 0 and 16-byte aligned codes), the one
// with the most busy lanes per CTA of ≤ kStatMaxWarps warps (C / (32·D·TW) of each team's lanes
// have a chunk, kStatMaxWarps / TW teams per CTA), the first of a tie. K 2048 and 16384: 16-byte
// chunks, every lane busy; K 1152: 8-byte chunks, 72 of 96 lanes (not 36 of 64); K 4304: 8-byte
// chunks two per lane, 3 teams of 5 warps (not one team of 9). TW = 0 where a row needs more than
// kStatMaxWarps warps (K > 16384).
struct StatConfig {
  int vec = 0, d = 0, TW = 0;
};
inline StatConfig stationary_config(int64_t K, bool vec16) {
  StatConfig best;
  int64_t best_num = 0, best_den = 1;  // the best score so far, busy lanes per CTA as a fraction
  for (const auto& [vec, d] : {std::pair{16, 1}, std::pair{8, 1}, std::pair{8, 2}}) {
    if (vec == 16 && !vec16) continue;
    const int64_t C = K / (2 * vec), tw = (C + 32 * d - 1) / (32 * d);
    if (tw < 1 || tw > kStatMaxWarps) continue;
    const int64_t num = C * (kStatMaxWarps / tw), den = d;  // C/(32·d·tw) · (16/tw)·tw·32 lanes
    if (best.TW == 0 || num * best_den > best_num * den) best = {vec, d, int(tw)}, best_num = num, best_den = den;
  }
  return best;
}

// TQ_NF4_GEMV_X, the M = 1 kernel where it applies, else gemv_kernel: unset (or "reg") the
// x-stationary kernel (K ≤ 16384; 1.64× cuBLAS bf16 in geometric mean over the decode shapes
// against gemv_kernel's 1.17×, same H100 run, bench/RESULTS.md 2026-12-07); "tc" gemv_tc_kernel
// wherever it can run, "auto" gemv_tc_kernel where launch_tc_for takes the shape (both opt-in:
// written in a session without a GPU, not yet measured), then the x-stationary kernel; "smem" and
// "global" gemv_kernel's x-in-shared-memory and x-from-L1 paths (the benchmark's comparisons).
inline char gemv_x_path() {
  const char* v = std::getenv("TQ_NF4_GEMV_X");
  return v == nullptr || v[0] == '\0' ? 'r' : v[0];
}

// Whether the x-stationary kernel is launched as a programmatic dependent (its table built while
// the previous kernel in the stream finishes; gemv_stationary_kernel): the default, 1.98× cuBLAS
// bf16 in geometric mean over the decode shapes against 1.62× without, same H100 run (RESULTS.md,
// 2026-12-07); TQ_NF4_GEMV_PDL=0 turns it off. Read once.
inline bool gemv_pdl() {
  static const bool v = env_switch_on("TQ_NF4_GEMV_PDL");
  return v;
}

// The x-stationary kernel's lookup table: bf16 pairs, one 4-byte ld.shared per code byte and two
// integer ops to widen them (the default), or f32 pairs (TQ_NF4_STAT_TABLE=f32: one 8-byte
// ld.shared, two shared-memory wavefronts per warp lookup instead of one). Read once.
inline bool stationary_bf16_table() {
  static const bool v = [] {
    const char* e = std::getenv("TQ_NF4_STAT_TABLE");
    return e == nullptr || std::string_view(e) != "f32";
  }();
  return v;
}

template <int VEC, int D, bool kBf16Table>
inline void launch_stationary(const SmallMArgs& a, int TW, int device, cudaStream_t st) {
  constexpr auto kernel = gemv_stationary_kernel<VEC, D, kBf16Table>;
  constexpr size_t kMaxSmem = kStatTableBytes + size_t(kStatRoundRows) * kStatMaxWarps * sizeof(float);
  const int teams_cta = kStatMaxWarps / TW, threads = teams_cta * TW * 32;
  const size_t smem = kStatTableBytes + size_t(kStatRoundRows) * size_t(threads / 32) * sizeof(float);
  // Opt into > 48 KB of dynamic shared memory, and the resident CTAs per SM for each CTA size,
  // once per device (this runs for every projection of every decoded token).
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<std::array<int, kStatMaxWarps + 1>, kMaxDevices> per_sm{};
  std::call_once(once[size_t(device)], [device] {
    DeviceGuard guard(device);
    TQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxSmem)));
    for (int w = 1; w <= kStatMaxWarps; ++w) {
      int n = 0;
      const size_t bytes = kStatTableBytes + size_t(kStatRoundRows) * size_t(w) * sizeof(float);
      TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, w * 32, bytes));
      per_sm[size_t(device)][size_t(w)] = std::max(n, 1);
    }
  });
  StatShape ss{};
  ss.C = a.K / (2 * VEC);
  ss.TW = TW;
  ss.teams_cta = teams_cta;
  const int64_t resident = int64_t(sm_count(device)) * per_sm[size_t(device)][size_t(threads / 32)];
  int64_t ctas = std::min<int64_t>((a.N + teams_cta - 1) / teams_cta, resident);
  // TQ_NF4_GEMV_CTAS=n caps the grid (a test hook: many rows per team, several reduction rounds;
  // a row's sum does not depend on the grid, so the result must not change).
  if (const char* v = std::getenv("TQ_NF4_GEMV_CTAS"); v != nullptr && std::atoi(v) > 0) ctas = std::min<int64_t>(ctas, std::atoi(v));
  ss.T = ctas * teams_cta;
  ss.iters = (a.N + ss.T - 1) / ss.T;
  const LaunchMode mode = dependent_launch(gemv_pdl(), device);
  ss.pdl = mode == LaunchMode::programmatic ? 1 : 0;
  launch_kernel(kernel, dim3(unsigned(ctas)), dim3(unsigned(threads)), smem, st, mode, a, ss, tables());
}

// The M = 1 product through the x-stationary kernel; false where it does not apply (K > 16384).
inline bool launch_stationary_for(const SmallMArgs& a, bool vec16, int device, cudaStream_t st) {
  const StatConfig cfg = stationary_config(a.K, vec16);
  if (cfg.TW == 0) return false;
  const auto launch = [&](auto bf16_table) {
    constexpr bool kB = decltype(bf16_table)::value;
    if (cfg.vec == 16) launch_stationary<16, 1, kB>(a, cfg.TW, device, st);
    else if (cfg.d == 1) launch_stationary<8, 1, kB>(a, cfg.TW, device, st);
    else launch_stationary<8, 2, kB>(a, cfg.TW, device, st);
  };
  if (stationary_bf16_table()) launch(std::true_type{});
  else launch(std::false_type{});
  return true;
}

// The M = 1 product through gemv_tc_kernel; false where it does not apply: K > kTcMaxK, more than
// kTcRoundItems segments per tile, more shared memory than a block may have on `device` (160 KB at
// K = 32768: sm_86/89 allow 99 KB), or (TQ_NF4_GEMV_X=auto) fewer tiles than SMs / 2 (the CTAs own
// whole tiles, so such a product would leave most SMs idle: the x-stationary kernel spreads its
// rows over all of them). `forced` (TQ_NF4_GEMV_X=tc): wherever the kernel can run.
template <int DEPTH>
inline bool launch_tc(SmallMArgs a, const SmallMPlan& p, bool forced, int device, cudaStream_t st) {
  constexpr auto kernel = gemv_tc_kernel<DEPTH>;
  const int64_t sms = sm_count(device);
  const int nseg = int((p.units_per_tile + kTcSegUnits - 1) / kTcSegUnits);
  const size_t optin = device_properties(device).sharedMemPerBlockOptin;
  if (a.K > kTcMaxK || nseg > kTcRoundItems || tc_smem_bytes(a.K) > optin || (!forced && 2 * p.tiles < sms)) return false;
  static std::array<std::once_flag, kMaxDevices> once;
  std::call_once(once[size_t(device)], [device, optin] {
    DeviceGuard guard(device);
    TQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(std::min(tc_smem_bytes(kTcMaxK), optin))));
  });
  a.P = p.P;
  a.tiles_per_class = p.tiles_per_class;
  a.tiles = p.tiles;
  TcShape ts{};
  ts.nseg = nseg;
  ts.round_tiles = kTcRoundItems / nseg;
  ts.ctas = std::min<int64_t>(p.tiles, sms);
  // TQ_NF4_GEMV_CTAS=n caps the grid, as for the x-stationary kernel (a test hook: many rounds per
  // CTA; a row's sum does not depend on the grid).
  if (const char* v = std::getenv("TQ_NF4_GEMV_CTAS"); v != nullptr && std::atoi(v) > 0) ts.ctas = std::min<int64_t>(ts.ctas, std::atoi(v));
  launch_kernel(kernel, dim3(unsigned(ts.ctas)), dim3(tc_warps(DEPTH) * 32), tc_smem_bytes(a.K), st,
                dependent_launch(gemv_pdl(), device), a, ts, tables());
  return true;
}
inline bool launch_tc_for(const SmallMArgs& a, const SmallMPlan& p, bool forced, int device, cudaStream_t st) {
  const char* v = std::getenv("TQ_NF4_TC_DEPTH");  // read per call, as TQ_NF4_GEMV_X (tests switch it)
  if (v != nullptr && v[0] == '3') return launch_tc<3>(a, p, forced, device, st);
  return launch_tc<2>(a, p, forced, device, st);
}

// gemv_kernel's shape and launch for M ≤ kGemvMaxRows. Lanes per row G: the largest power of two
// that keeps ≥ 85 % of the lanes busy on the row's chunks (C = 36 at K = 1152: 8 lanes × 5 chunks).
// Rows per group R: 2 (the x chunk a lane loads serves both rows), 1 where that would leave fewer
// than two warps per SM scheduler (K = 16384, N = 2048: latency wants the warps more than x wants
// the reuse), and 1 for M > 2 (registers). The grid is persistent: at most the CTAs that stay
// resident (3 per SM, 2 at 64 bytes per item), each walking the groups grid-stride.
// A gemv_kernel with x in shared memory, opted into 64 KB of dynamic shared memory on `device`
// (more than 48 KB in all needs it) once per kernel and device, not per launch: this runs for every
// projection of every decoded token.
template <auto Kernel>
inline auto gemv_x_smem_kernel(int device) {
  static std::array<std::once_flag, kMaxDevices> once;
  std::call_once(once[size_t(device)], [] {
    TQ_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
  });
  return Kernel;
}

template <int VEC>
inline void launch_gemv(const SmallMArgs& a, int device, cudaStream_t st) {
  GemvShape gs{};
  gs.C = a.K / (2 * VEC);
  gs.G = 1;
  for (int G = 32; G >= 1; G >>= 1) {
    const int64_t it = (gs.C + G - 1) / G;
    if (double(gs.C) >= 0.85 * double(G * it)) {
      gs.G = G;
      break;
    }
  }
  const int64_t iters = (gs.C + gs.G - 1) / gs.G;
  const int64_t sms = sm_count(device);
  auto warps_for = [&](int r) {
    const int64_t groups = (a.N + r - 1) / r;
    return (groups + (32 / gs.G) - 1) / (32 / gs.G);
  };
  const int R = a.M <= 2 && warps_for(2) >= 8 * sms ? 2 : 1;
  // Code bytes per lane and item: 64 at M = 1 (half the per-item overhead, 2 CTAs per SM: 4-12 %
  // faster than 32 at 3 CTAs per SM on every decode shape), else 32 (registers). TQ_NF4_GEMV_BYTES=32
  // selects 32 at M = 1 too (the benchmark's comparison).
  const char* ev = std::getenv("TQ_NF4_GEMV_BYTES");
  const int bytes = a.M == 1 && !(ev != nullptr && std::atoi(ev) == 32) ? 64 : 32;
  const int ctas_per_sm = bytes == 64 ? 2 : 3;
  gs.groups = (a.N + R - 1) / R;
  const int64_t D = bytes / VEC / R;
  gs.batches = (iters + D - 1) / D;
  const unsigned ctas =
      unsigned(std::min<int64_t>((warps_for(R) + kGemvWarps - 1) / kGemvWarps, sms * ctas_per_sm));
  const Tables& tab = tables();
  constexpr int T = kGemvWarps * 32;
  // M = 1: x staged once per CTA in shared memory, not read from L1 per chunk (1.21× vs 1.10×
  // cuBLAS in geometric mean on the H100, bench/RESULTS.md 2026-12-06); TQ_NF4_GEMV_X=global
  // reads it from L1 (the benchmark's comparison).
  const size_t xbytes = 16 * gemv_x_slots(a.K);
  const bool xsmem = a.M == 1 && bytes == 64 && xbytes <= 64 * 1024 && gemv_x_path() != 'g';
  if (xsmem && R == 2) gemv_x_smem_kernel<gemv_kernel<VEC, 2, 1, 64, true>>(device)<<<ctas, T, xbytes, st>>>(a, gs, tab);
  else if (xsmem) gemv_x_smem_kernel<gemv_kernel<VEC, 1, 1, 64, true>>(device)<<<ctas, T, xbytes, st>>>(a, gs, tab);
  else if (a.M == 1 && R == 2 && bytes == 64) gemv_kernel<VEC, 2, 1, 64><<<ctas, T, 0, st>>>(a, gs, tab);
  else if (a.M == 1 && bytes == 64) gemv_kernel<VEC, 1, 1, 64><<<ctas, T, 0, st>>>(a, gs, tab);
  else if (a.M == 1 && R == 2) gemv_kernel<VEC, 2, 1><<<ctas, T, 0, st>>>(a, gs, tab);
  else if (a.M == 1) gemv_kernel<VEC, 1, 1><<<ctas, T, 0, st>>>(a, gs, tab);
  else if (a.M == 2 && R == 2) gemv_kernel<VEC, 2, 2><<<ctas, T, 0, st>>>(a, gs, tab);
  else if (a.M == 2) gemv_kernel<VEC, 1, 2><<<ctas, T, 0, st>>>(a, gs, tab);
  else gemv_kernel<VEC, 1, 4><<<ctas, T, 0, st>>>(a, gs, tab);
  check_launch();
}

// Runs a planned product on prepared arguments: a.y (M, N) is written; a.partial must hold
// plan.workspace_floats(M) floats. The launcher the benchmarks time with their own buffers.
inline void launch_small_m(SmallMArgs a, const SmallMPlan& p, Round rnd, int device, cudaStream_t st) {
  const Tables& tab = tables();
  if (p.fast && p.gemv(a.M)) {
    const char xp = gemv_x_path();
    if (a.M == 1 && (xp == 'a' || xp == 't') && launch_tc_for(a, p, xp == 't', device, st)) return;
    if (a.M == 1 && (xp == 'a' || xp == 't' || xp == 'r') && launch_stationary_for(a, p.gemv_vec == 16, device, st)) return;
    if (p.gemv_vec == 16) launch_gemv<16>(a, device, st);
    else launch_gemv<8>(a, device, st);
    return;
  }
  if (!p.fast) {
    small_m_generic_kernel<><<<p.ctas, kThreads, 0, st>>>(a, rnd, tab);
    check_launch();
    return;
  }
  TQ_CHECK(a.partial != nullptr, "nf4 linear: the partial-sum workspace is missing");
  a.P = p.P;
  a.tiles_per_class = p.tiles_per_class;
  a.tiles = p.tiles;
  a.units_per_tile = p.units_per_tile;
  a.units_per_warp = p.units_per_warp;
  a.total_units = p.total_units;
  if (a.M <= 8) small_m_kernel<1><<<p.ctas, kSmallMWarps * 32, 0, st>>>(a, tab);
  else small_m_kernel<2><<<p.ctas, kSmallMWarps * 32, 0, st>>>(a, tab);
  check_launch();
  small_m_reduce_kernel<><<<grid_for(p.tiles * 16 * a.M, kThreads, device), kThreads, 0, st>>>(a);
  check_launch();
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
  const SmallMPlan p = plan_small_m(N, K, a.packed, a.x, dev.index);
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
