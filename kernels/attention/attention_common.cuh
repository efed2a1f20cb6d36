// Pieces shared by the attention kernels: the per-call parameters, the mask as the kernels see it
// (one int2 per key, built on the device by key_mask_kernel), and the PTX wrappers of the
// tensor-core path (cp.async, ldmatrix, mma.sync m16n8k16 with bf16 or f16 inputs, fp32 accumulate).
//
// Invariants:
// - Visibility is decided per (query position p, key j) by exactly the rule of ops::AttentionMaskPlan
//   (include/tq/ops/attention.hpp): valid(j) AND window AND (none | causal | prefix_lm). Forward and
//   backward call the same visible(), so a row the forward found empty (lse = −inf) has no visible
//   key in the backward either.
// - The per-key record is computed on the device from the raw mask tensors (a block scan over each
//   batch row gives the prefix run ids): the host never reads a CUDA mask tensor.
// - Positions, lengths and head dims are int (the launcher checks they fit); element offsets into
//   global tensors are int64_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/copy.cuh"
#include "tq/ops/attention.hpp"

namespace tq::cuda::attention {

using ops::AttentionGeometry;

inline constexpr float kLog2e = 1.4426950408889634f;

// x·log2(e) rounded on its own (never fused into a following subtraction): the flash kernels compute
// exp(x − m) as exp2(log2_scaled(x) − log2_scaled(m)), which is exactly exp2(0) = 1 when x == m, in the
// forward and in the backward alike.
__device__ __forceinline__ float log2_scaled(float x) { return __fmul_rn(x, kLog2e); }

// ---- the mask as the kernels see it ----

// keys (B, Tk) int2, one per key position x of each batch row:
//   .x  bit 0: the key is valid (key_padding); bits 1..: prefix run id + 1 (0 = not a prefix token)
//   .y  reach: one past the last key that a query AT position x sees through causality or its prefix
//       run (x + 1 for a non-prefix token, the end of the run for a prefix token)
// keys == nullptr: every key valid, no prefix runs (masks none/causal without key_padding).
struct MaskParams {
  const int2* keys = nullptr;
  int Tk = 0;
  int offset = 0;  // absolute position of query 0 (0 when no positional mask uses it)
  int window = 0;  // 0 = off; clamped to < Tk by the launcher (a wider window hides nothing)
  AttentionMask kind = AttentionMask::none;

  // True when some key inside [0, Tk) can be hidden from some query (else only j < Tk matters).
  __host__ __device__ bool any() const { return keys != nullptr || window > 0 || kind != AttentionMask::none; }
};

// Everything a kernel needs besides the data pointers; passed by value.
struct Params {
  int B = 0, Hq = 0, Hkv = 0, rep = 1, Tq = 0, Tk = 0, D = 0, Dv = 0;
  double scale = 1, softcap = 0;
  MaskParams mask;
};

// The position of one query row and its prefix run (−1 when it is not a prefix token).
struct RowMask {
  int p = 0;
  int run = -1;
};

__device__ __forceinline__ int run_of(int code) { return (code >> 1) - 1; }

__device__ __forceinline__ RowMask row_mask(const MaskParams& m, int b, int i) {
  RowMask r;
  r.p = m.offset + i;
  if (m.kind == AttentionMask::prefix_lm) r.run = run_of(__ldg(&m.keys[int64_t(b) * m.Tk + r.p].x));
  return r;
}

// The key record's .x for key j of batch row b; 0 (invalid) beyond Tk.
__device__ __forceinline__ int key_code(const MaskParams& m, int b, int j) {
  if (j >= m.Tk) return 0;
  return m.keys ? __ldg(&m.keys[int64_t(b) * m.Tk + j].x) : 1;
}

__device__ __forceinline__ bool visible(const MaskParams& m, const RowMask& r, int j, int code) {
  if (!(code & 1)) return false;
  if (m.window > 0 && r.p - j >= m.window) return false;
  switch (m.kind) {
    case AttentionMask::none: return true;
    case AttentionMask::causal: return j <= r.p;
    case AttentionMask::prefix_lm: return j <= r.p || (r.run >= 0 && r.run == run_of(code));
  }
  return false;
}

// [lo, hi): the keys a row can see at most (padding aside); lo >= hi when none.
__device__ __forceinline__ void key_range(const MaskParams& m, int b, const RowMask& r, int& lo, int& hi) {
  hi = m.Tk;
  if (m.kind == AttentionMask::causal) hi = ::min(m.Tk, r.p + 1);
  if (m.kind == AttentionMask::prefix_lm) hi = ::min(m.Tk, __ldg(&m.keys[int64_t(b) * m.Tk + r.p].y));
  lo = m.window > 0 ? ::max(0, r.p - m.window + 1) : 0;
}

// Builds the key records of batch row blockIdx.x. Run ids come from a block-wide scan of the run
// starts, chunk by chunk (carry between chunks); run_last (B, Tk) is scratch holding each run's
// last position. Inputs: padding (B, Tk), types (B, Tk) or lengths (B), each i64 or nullptr.
inline constexpr int kMaskThreads = 256;
template <int kThreads = kMaskThreads>  // a template so that several translation units may include it
__global__ void __launch_bounds__(kThreads) key_mask_kernel(int2* __restrict__ keys, int* __restrict__ run_last,
                                                                const int64_t* __restrict__ padding,
                                                                const int64_t* __restrict__ types,
                                                                const int64_t* __restrict__ lengths, int Tk) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024);
  constexpr int kWarps = kThreads / 32;
  __shared__ int warp_starts[kWarps];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int2* row = keys + b * Tk;                          // (Tk)
  int* last = run_last + b * Tk;                      // (Tk), indexed by run id
  const int64_t* tt = types ? types + b * Tk : nullptr;  // (Tk)
  const int64_t len = lengths ? lengths[b] : 0;
  auto is_prefix = [&](int x) -> bool { return tt ? tt[x] == 0 : x < len; };
  int carry = 0;  // run starts before this chunk
  for (int c0 = 0; c0 < Tk; c0 += kThreads) {
    const int x = c0 + int(threadIdx.x);
    const bool in = x < Tk;
    const bool pre = in && is_prefix(x);
    const bool starts = pre && (x == 0 || !is_prefix(x - 1));
    const bool ends = pre && (x + 1 == Tk || !is_prefix(x + 1));
    const unsigned ballot = __ballot_sync(0xffffffffu, starts);
    if (lane == 0) warp_starts[warp] = __popc(ballot);
    __syncthreads();
    int before = carry + __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_starts[w];
      total += warp_starts[w];
    }
    if (in) {
      const int run = pre ? before + (starts ? 1 : 0) - 1 : -1;
      const int valid = padding ? (padding[b * Tk + x] != 0 ? 1 : 0) : 1;
      row[x].x = valid | ((run + 1) << 1);
      if (ends) last[run] = x;
    }
    carry += total;
    __syncthreads();  // warp_starts is rewritten by the next chunk; run_last becomes visible
  }
  for (int x = threadIdx.x; x < Tk; x += kThreads) {  // same thread as the one that wrote row[x].x
    const int run = run_of(row[x].x);
    row[x].y = run >= 0 ? last[run] + 1 : x + 1;
  }
}

// ---- the mask on the device (host side) ----

// A mask tensor as dense i64 on `dev`. CPU tensors are checked like the CPU op checks them (0/1
// values, prefix lengths in [0, Tk]) and uploaded; CUDA tensors are converted on the device, unread.
inline Tensor mask_tensor_on(const Tensor& t, const AttentionGeometry& g, const char* what, Device dev) {
  if (t.device().is_cuda()) return t.detach().to(DType::i64).contiguous();
  if (t.dim() == 2) return Tensor::from_vector(ops::attention_binary_mask(t, g, what), t.shape()).to(dev);
  std::vector<int64_t> len = ops::dense(t, DType::i64).to_vector<int64_t>();  // prefix_lengths (B)
  for (size_t b = 0; b < len.size(); ++b)
    TQ_CHECK(len[b] >= 0 && len[b] <= g.Tk, "scaled_dot_product_attention: prefix_lengths[", b, "] = ", len[b],
             " is outside [0, Tk = ", g.Tk, "]");
  return Tensor::from_vector(len, t.shape()).to(dev);
}

// The mask as the kernels see it; `keys` owns the per-key records.
struct DeviceMask {
  Tensor keys;  // (B, Tk, 2) i32, or undefined when no per-key data is needed
  MaskParams params;
};

inline DeviceMask build_mask(const AttentionOptions& opt, const AttentionGeometry& g, Device dev, cudaStream_t stream) {
  DeviceMask m;
  m.params.Tk = int(g.Tk);
  m.params.kind = g.mask;
  m.params.window = g.window > 0 && g.window < g.Tk ? int(g.window) : 0;  // a window ≥ Tk hides nothing
  m.params.offset = g.mask != AttentionMask::none || g.window > 0 ? int(g.offset) : 0;
  const bool per_key = opt.key_padding.defined() || g.mask == AttentionMask::prefix_lm;
  if (!per_key || g.B == 0 || g.Tk == 0) return m;
  Tensor pad, types, lengths;
  if (opt.key_padding.defined()) pad = mask_tensor_on(opt.key_padding, g, "key_padding", dev);
  if (g.mask == AttentionMask::prefix_lm) {
    if (opt.token_type_ids.defined()) types = mask_tensor_on(opt.token_type_ids, g, "token_type_ids", dev);
    else lengths = mask_tensor_on(opt.prefix_lengths, g, "prefix_lengths", dev);
  }
  m.keys = Tensor::empty({g.B, g.Tk, 2}, DType::i32, dev);
  Tensor run_last = Tensor::empty({g.B, g.Tk}, DType::i32, dev);
  auto ptr = [](const Tensor& t) { return t.defined() ? static_cast<const int64_t*>(t.data_ptr()) : nullptr; };
  key_mask_kernel<kMaskThreads><<<unsigned(g.B), kMaskThreads, 0, stream>>>(
      static_cast<int2*>(m.keys.data_ptr()), static_cast<int*>(run_last.data_ptr()), ptr(pad), ptr(types),
      ptr(lengths), int(g.Tk));
  check_launch();
  m.params.keys = static_cast<const int2*>(m.keys.data_ptr());
  return m;
}

// ---- PTX wrappers (sm_80+) ----

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// 16 bytes global → shared, zero-filled when !valid (the source is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// The 16-bit input formats of the tensor-core path: packing two fp32 values (lo = lower column) into
// one mma operand register, reading one element, rounding a float to the format, and the mma itself
// (d = a·b + d, fp32 accumulate).
struct Bf16 {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }
  // x rounded to the format, as a float (x − rounded(x) is then exact in fp32).
  static __device__ __forceinline__ float rounded(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
struct F16 {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ float rounded(float x) { return __half2float(__float2half_rn(x)); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// dst[0..1] += (x, y) as fp32 atomics (one 8-byte vector atomic on sm_90).
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

}  // namespace tq::cuda::attention
