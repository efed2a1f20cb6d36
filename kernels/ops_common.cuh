// Device helpers shared by the op-family kernels (norm, rope, softmax, index, patch_embed, dropout,
// cross_entropy, geglu): rounding-exact arithmetic, block reductions, a row visitor with 16-byte
// loads, and the device-side index error record.
//
// Invariants:
// - mul_rn/add_rn/sub_rn are never contracted into an FMA, so a formula written with them rounds
//   after every operation exactly as the CPU reference does (the host compiler does not contract
//   in ISO C++ mode). Reductions use ordinary arithmetic: their order differs from the CPU's anyway.
// - block_sum / block_max are deterministic: a fixed tree over a fixed thread layout, and every
//   warp computes the final combine itself, so all threads receive the identical value.
// - Index errors (an id or target outside its range) never fault the GPU: the kernel that meets
//   one records it in a per-device record (first error wins), treats the element as described by
//   its op, and ops::check_device_index_errors() reads and clears the record on the host later.
//   No op reads it: ops never synchronize.
#pragma once

#include <cstdint>

#include "kernels/copy.cuh"
#include "tq/ops/shape_ops.hpp"

namespace tq::cuda {

// ---- arithmetic that rounds like the CPU (no FMA contraction) ----

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// v rounded as a tensor of storage type T stores it, back in the compute type C.
template <class T, class C>
__device__ __forceinline__ C round_to(C v) {
  if constexpr (std::is_same_v<T, C>) return v;
  else return convert<C>(convert<T>(v));
}

// ---- block reductions ----

template <class C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// NaN-ignoring max (std::max(m, x) with m never NaN, as the CPU loops start from -inf).
template <class C>
__device__ __forceinline__ C max_ignore_nan(C a, C b) { return a < b ? b : a; }

template <class C>
__device__ __forceinline__ C warp_max(C v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = max_ignore_nan(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` is __shared__ C[32]; it may be reused by the next call (the leading barrier orders it).
template <class C>
__device__ __forceinline__ C block_sum(C v, C* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? scratch[lane] : C(0));
}

template <class C>
__device__ __forceinline__ C block_max(C v, C* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < nwarps ? scratch[lane] : -C(INFINITY));
}

// Sums two values over the block at once (one pair of barriers); `scratch` is __shared__ C[64].
template <class C>
__device__ __forceinline__ void block_sum2(C& a, C& b, C* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = warp_sum(lane < nwarps ? scratch[lane] : C(0));
  b = warp_sum(lane < nwarps ? scratch[32 + lane] : C(0));
}

// Threads for one block working on rows of n elements: n rounded up to a warp, within [32, cap].
inline int threads_for_row(int64_t n, int cap = 256) {
  const int64_t t = (n + 31) / 32 * 32;
  return int(std::max<int64_t>(32, std::min<int64_t>(t, cap)));
}

// A detached dense tensor of dtype dt (no copy when t already is one).
inline Tensor dense_as(const Tensor& t, DType dt) {
  Tensor d = t.detach();
  if (d.dtype() != dt) d = d.to(dt);
  return d.contiguous();
}

template <class T>
T* data_as(const Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// Calls fn(T{}) with T the storage type of a float dtype.
template <class F>
void dispatch_float(DType dt, const char* op, F&& fn) {
  switch (dt) {
    case DType::f32: fn(float{}); break;
    case DType::f64: fn(double{}); break;
    case DType::bf16: fn(::tq::bf16{}); break;
    case DType::f16: fn(::tq::f16{}); break;
    default: fail(str_cat(op, ": expected a float tensor, got ", dtype_name(dt)));
  }
}

// ---- row visitor ----

// Calls f(j, value) for every element j in [0, n) of `row`, this thread taking every `step`-th
// element from `first`: an unaligned head element by element, then 16-byte vectors, then the tail.
// value is converted to C. Any alignment of `row` works.
template <class C, class T, class F>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ row, int64_t n, int first, int step, F&& f) {
  constexpr int V = kVecWidth<T>;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = int64_t((16 - addr % 16) % 16);
  head = head % int64_t(sizeof(T)) == 0 ? head / int64_t(sizeof(T)) : n;  // misaligned element: no vectors
  head = head < n ? head : n;
  for (int64_t j = first; j < head; j += step) f(j, convert<C>(row[j]));
  const int64_t nv = (n - head) / V;
  const Vec<T, V>* vrow = reinterpret_cast<const Vec<T, V>*>(row + head);
#pragma unroll 4
  for (int64_t k = first; k < nv; k += step) {
    const Vec<T, V> v = vrow[k];
#pragma unroll
    for (int e = 0; e < V; ++e) f(head + k * V + e, convert<C>(v.v[e]));
  }
  for (int64_t j = head + nv * V + first; j < n; j += step) f(j, convert<C>(row[j]));
}

// ---- index errors ----

// What a kernel records when it meets an out-of-range index (ops::IndexOp names the op).
struct IndexErrorRecord {
  unsigned int raised;
  int op;
  long long value, bound, position;
};

// One record per device (a __device__ variable exists once per device context). Internal linkage:
// only the one translation unit that includes <tq/cuda.hpp> compiles these kernels.
static __device__ IndexErrorRecord g_index_error;

// Records the first index error of the program run (later ones are dropped until it is read).
__device__ __forceinline__ void raise_index_error(ops::IndexOp op, long long value, long long bound, long long position) {
  if (atomicCAS(&g_index_error.raised, 0u, 1u) == 0u) {
    g_index_error.op = int(op);
    g_index_error.value = value;
    g_index_error.bound = bound;
    g_index_error.position = position;
    __threadfence();
  }
}

}  // namespace tq::cuda
