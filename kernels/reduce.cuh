// Reductions on CUDA: sum, max and argmax over any set of dims (the entry of
// ops::cuda_reduce_kernels()).
//
// Invariants (the CPU reference in ops/reduce.hpp is the contract):
// - The reduced dims are moved last, as on the CPU: a permuted view that is not already dense is
//   bit-copied into a dense (outer, inner) buffer first, so every output element reduces one
//   contiguous row. Accumulation is in double for every dtype, like the CPU reference; integer
//   inputs are reduced as f64 and converted back, as the CPU does.
// - max propagates NaN; argmax returns the first maximal index, or the first NaN's index. The
//   combine step is associative and commutative, so the result does not depend on the order in
//   which threads meet.
// - Long rows with few outputs are split over several blocks into double partials (a scratch
//   tensor from the stream-ordered allocator), then a second launch combines them. No host
//   synchronization anywhere (graph-capturable).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/copy.cuh"
#include "tq/ops/reduce.hpp"

namespace tq::cuda {

// ---- combine rules ----

struct SumRule {
  using Acc = double;
  static __device__ __forceinline__ Acc identity() { return 0.0; }
  static __device__ __forceinline__ Acc make(double v, int64_t) { return v; }
  static __device__ __forceinline__ Acc combine(Acc a, Acc b) { return a + b; }
  static __device__ __forceinline__ Acc shfl_xor(Acc a, int m) { return __shfl_xor_sync(0xffffffffu, a, m); }
};

struct MaxRule {
  using Acc = double;
  static __device__ __forceinline__ Acc identity() { return -double(INFINITY); }
  static __device__ __forceinline__ Acc make(double v, int64_t) { return v; }
  static __device__ __forceinline__ Acc combine(Acc a, Acc b) {
    if (a != a) return a;
    if (b != b) return b;
    return a > b ? a : b;
  }
  static __device__ __forceinline__ Acc shfl_xor(Acc a, int m) { return __shfl_xor_sync(0xffffffffu, a, m); }
};

struct ArgmaxRule {
  struct Acc {
    double v;
    int64_t i;
  };
  static __device__ __forceinline__ Acc identity() { return {-double(INFINITY), INT64_MAX}; }
  static __device__ __forceinline__ Acc make(double v, int64_t i) { return {v, i}; }
  // Lexicographic: NaN above everything, then the larger value, then the smaller index.
  static __device__ __forceinline__ Acc combine(Acc a, Acc b) {
    const bool an = a.v != a.v, bn = b.v != b.v;
    if (an != bn) return an ? a : b;
    if (!an && a.v != b.v) return a.v > b.v ? a : b;
    return a.i <= b.i ? a : b;
  }
  static __device__ __forceinline__ Acc shfl_xor(Acc a, int m) {
    return {__shfl_xor_sync(0xffffffffu, a.v, m), (int64_t)__shfl_xor_sync(0xffffffffu, (long long)a.i, m)};
  }
};

// Folds elements [begin, end) of row r of a dense (rows, len) matrix into acc, this thread taking
// every `step`-th one from `first`. Elements load as 16-byte vectors from the first aligned one.
template <class T, class R>
struct ElementLoad {
  const T* x;
  __device__ __forceinline__ typename R::Acc fold(typename R::Acc acc, int64_t r, int64_t len, int64_t begin,
                                                  int64_t end, int64_t first, int64_t step) const {
    constexpr int V = kVecWidth<T>;
    const T* row = x + r * len;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row + begin);
    const int64_t head = int64_t((16 - addr % 16) % 16) / int64_t(sizeof(T));
    const int64_t vbegin = begin + (head < end - begin ? head : end - begin);
    for (int64_t j = begin + first; j < vbegin; j += step) acc = R::combine(acc, R::make(as_double(row[j]), j));
    const int64_t nv = (end - vbegin) / V;
    const Vec<T, V>* vrow = reinterpret_cast<const Vec<T, V>*>(row + vbegin);
    for (int64_t k = first; k < nv; k += step) {
      const Vec<T, V> v = vrow[k];
#pragma unroll
      for (int e = 0; e < V; ++e) acc = R::combine(acc, R::make(as_double(v.v[e]), vbegin + k * V + e));
    }
    for (int64_t j = vbegin + nv * V + first; j < end; j += step) acc = R::combine(acc, R::make(as_double(row[j]), j));
    return acc;
  }
};
template <class R>
struct PartialLoad {
  const typename R::Acc* p;
  __device__ __forceinline__ typename R::Acc fold(typename R::Acc acc, int64_t r, int64_t len, int64_t begin,
                                                  int64_t end, int64_t first, int64_t step) const {
    for (int64_t j = begin + first; j < end; j += step) acc = R::combine(acc, p[r * len + j]);
    return acc;
  }
};

template <class R, class Out>
__device__ __forceinline__ void store(Out* out, int64_t i, typename R::Acc a) {
  if constexpr (std::is_same_v<Out, typename R::Acc>) out[i] = a;
  else if constexpr (std::is_same_v<R, ArgmaxRule>) out[i] = a.i;
  else out[i] = double_to<Out>(a);
}

// Each group (a warp, or the whole block when block_rows) reduces virtual rows v: row v / splits,
// elements [s·chunk, min(len, (s+1)·chunk)) with s = v % splits, and stores one value per v.
template <class R, class Load, class Out>
__global__ void __launch_bounds__(kThreads) reduce_rows_kernel(Load load, int64_t vrows, int64_t len, int64_t chunk,
                                                               int64_t splits, Out* __restrict__ out, bool block_rows) {
  using Acc = typename R::Acc;
  __shared__ Acc warp_acc[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t group_size = block_rows ? kThreads : 32;
  const int64_t gid = block_rows ? 0 : warp;
  const int64_t groups_per_block = block_rows ? 1 : kThreads / 32;
  const int64_t member = block_rows ? threadIdx.x : lane;
  for (int64_t v = int64_t(blockIdx.x) * groups_per_block + gid; v < vrows; v += int64_t(gridDim.x) * groups_per_block) {
    const int64_t r = v / splits, s = v - r * splits;
    const int64_t begin = s * chunk, end = begin + chunk < len ? begin + chunk : len;
    Acc acc = R::identity();
    acc = load.fold(acc, r, len, begin, end, member, group_size);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) acc = R::combine(acc, R::shfl_xor(acc, m));
    if (block_rows) {
      if (lane == 0) warp_acc[warp] = acc;
      __syncthreads();
      if (warp == 0) {
        acc = lane < kThreads / 32 ? warp_acc[lane] : R::identity();
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) acc = R::combine(acc, R::shfl_xor(acc, m));
        if (lane == 0) store<R, Out>(out, v, acc);
      }
      __syncthreads();  // warp_acc is reused by the next row
    } else if (lane == 0) {
      store<R, Out>(out, v, acc);
    }
  }
}

// ---- launcher ----

template <class R, class Load, class Out>
void launch_reduce_rows(Load load, int64_t vrows, int64_t len, int64_t chunk, int64_t splits, Out* out, int dev,
                        cudaStream_t st) {
  const bool block_rows = chunk >= 4096;
  const int64_t groups_per_block = block_rows ? 1 : kThreads / 32;
  const unsigned blocks = grid_for((vrows + groups_per_block - 1) / groups_per_block, 1, dev, 8);
  reduce_rows_kernel<R, Load, Out><<<blocks, kThreads, 0, st>>>(load, vrows, len, chunk, splits, out, block_rows);
  check_launch();
}

// Reduces the dense (outer, inner) rows of xd (float dtype T) into out (outer elements).
template <class T, class R, class Out>
void reduce_dense(const Tensor& xd, int64_t outer, int64_t inner, Out* out, int dev) {
  cudaStream_t st = current_stream();
  const T* px = static_cast<const T*>(xd.data_ptr());
  // Split long rows when there are too few of them to fill the GPU.
  const int64_t target_groups = int64_t(sm_count(dev)) * 16;
  int64_t splits = 1;
  if (outer < target_groups && inner >= 32768) {
    splits = std::min<int64_t>((inner + 16383) / 16384, (target_groups + outer - 1) / outer);
    splits = std::max<int64_t>(splits, 1);
  }
  if (splits == 1) {
    launch_reduce_rows<R>(ElementLoad<T, R>{px}, outer, inner, inner, 1, out, dev, st);
    return;
  }
  const int64_t chunk = (inner + splits - 1) / splits;
  using Acc = typename R::Acc;
  Tensor scratch = Tensor::empty({outer * splits * int64_t(sizeof(Acc))}, DType::u8, xd.device());
  Acc* partial = static_cast<Acc*>(scratch.data_ptr());
  launch_reduce_rows<R>(ElementLoad<T, R>{px}, outer * splits, inner, chunk, splits, partial, dev, st);
  launch_reduce_rows<R>(PartialLoad<R>{partial}, outer, splits, splits, 1, out, dev, st);
}

// dims: normalized, sorted, unique (ops::reduce_dims).
inline Tensor reduce(ops::ReduceKind kind, const Tensor& x_in, const std::vector<int64_t>& dims, bool keepdim) {
  Tensor x = x_in.detach();
  if (!is_floating(x.dtype())) {
    Tensor r = reduce(kind, x.to(DType::f64), dims, keepdim);
    return kind == ops::ReduceKind::argmax ? r : r.to(x.dtype());
  }
  int64_t inner = 1;
  const std::vector<int64_t> perm = ops::reduced_dims_last(x.shape(), dims, inner);
  const Shape out_shape = ops::reduced_shape(x.shape(), dims, keepdim);
  const int64_t outer = numel_of(out_shape);
  Tensor out = Tensor::empty(out_shape, kind == ops::ReduceKind::argmax ? DType::i64 : x.dtype(), x.device());
  if (outer == 0) return out;
  if (inner == 0) {
    TQ_CHECK(kind == ops::ReduceKind::sum, "reduce: cannot take the max of an empty dimension of ", describe(x));
    out.fill_(0.0);
    return out;
  }
  Tensor xp = x.permute(perm);
  if (!xp.is_contiguous()) xp = dense_copy(xp);
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (kind) {
      case ops::ReduceKind::sum:
        reduce_dense<T, SumRule>(xp, outer, inner, static_cast<T*>(out.data_ptr()), dev);
        break;
      case ops::ReduceKind::max:
        reduce_dense<T, MaxRule>(xp, outer, inner, static_cast<T*>(out.data_ptr()), dev);
        break;
      case ops::ReduceKind::argmax:
        reduce_dense<T, ArgmaxRule>(xp, outer, inner, static_cast<int64_t*>(out.data_ptr()), dev);
        break;
    }
  };
  switch (x.dtype()) {
    case DType::f32: run(float{}); break;
    case DType::f64: run(double{}); break;
    case DType::bf16: run(::tq::bf16{}); break;
    case DType::f16: run(::tq::f16{}); break;
    default: fail(str_cat("reduce: unsupported dtype ", describe(x)));
  }
  return out;
}

}  // namespace tq::cuda
