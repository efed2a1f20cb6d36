// Strided copy / dtype conversion and fill on CUDA tensors (the Tensor copy_ and fill_ hooks),
// plus the device-side helpers every elementwise kernel shares: dtype conversion with the CPU
// backend's exact semantics, vector loads, and strided index arithmetic.
//
// Invariants:
// - Conversions round exactly as the CPU backend does (tq::from_double(tq::to_double(x))): any
//   conversion that involves f64 or i64 goes through double; others go through float, which is
//   exact for every such source, so both paths round once like the CPU (bf16/f16 from double
//   round twice, through float, exactly as the CPU does).
// - Geometry is passed by value as kernel parameters (no device metadata buffers, no H2D), after
//   merging dims that are contiguous for every operand: at most kMaxDims dims remain.
// - Same-dtype copies move raw bits (one kernel per element size); converting copies run on
//   dense operands (a strided operand is first made dense with a bit copy).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/device.cuh"
#include "tq/core/tensor.hpp"

namespace tq::cuda {

inline constexpr int kMaxDims = 8;
inline constexpr int kThreads = 256;

// ---- device-side dtype conversion ----

template <class T>
inline constexpr bool kWideSource = std::is_same_v<T, double> || std::is_same_v<T, int64_t>;

template <class T>
__device__ __forceinline__ float as_float(T v) {
  if constexpr (std::is_same_v<T, ::tq::bf16>) return __uint_as_float(uint32_t(v.bits) << 16);
  else if constexpr (std::is_same_v<T, ::tq::f16>) return __half2float(__ushort_as_half(v.bits));
  else if constexpr (std::is_same_v<T, bool>) return v ? 1.0f : 0.0f;
  else return float(v);
}
template <class T>
__device__ __forceinline__ double as_double(T v) {
  if constexpr (std::is_same_v<T, ::tq::bf16> || std::is_same_v<T, ::tq::f16>) return double(as_float(v));
  else if constexpr (std::is_same_v<T, bool>) return v ? 1.0 : 0.0;
  else return double(v);
}
template <class D>
__device__ __forceinline__ D float_to(float f) {
  if constexpr (std::is_same_v<D, ::tq::bf16>) {
    D r;
    r.bits = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    return r;
  } else if constexpr (std::is_same_v<D, ::tq::f16>) {
    D r;
    r.bits = __half_as_ushort(__float2half_rn(f));
    return r;
  } else if constexpr (std::is_same_v<D, bool>) {
    return f != 0.0f;
  } else {
    return D(f);
  }
}
template <class D>
__device__ __forceinline__ D double_to(double v) {
  if constexpr (std::is_same_v<D, ::tq::bf16> || std::is_same_v<D, ::tq::f16>) return float_to<D>(float(v));
  else if constexpr (std::is_same_v<D, bool>) return v != 0.0;
  else return D(v);
}
// D from S with the CPU backend's rounding (see the invariants above).
template <class D, class S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (std::is_integral_v<D> && std::is_integral_v<S> && !std::is_same_v<D, bool>) {
    return D(v);
  } else if constexpr (kWideSource<S> || std::is_same_v<D, double>) {
    return double_to<D>(as_double(v));
  } else {
    return float_to<D>(as_float(v));
  }
}

// The type arithmetic runs in for a storage type: float for f32/bf16/f16, double for f64, int64
// for integers (as ops::compute_dtype on the CPU).
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double,
                                     std::conditional_t<std::is_integral_v<T>, int64_t, float>>;

// ---- vectors ----

template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
// Elements per 16-byte access for the wider of two element types.
template <class A, class B = A>
inline constexpr int kVecWidth = 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Storage types of the same size, for bit copies.
template <size_t Bytes>
using bits_t = std::conditional_t<Bytes == 1, uint8_t,
                                  std::conditional_t<Bytes == 2, uint16_t, std::conditional_t<Bytes == 4, uint32_t, uint64_t>>>;

// ---- strided geometry ----

// K operands sharing one iteration shape, each with its own strides (elements).
template <int K>
struct Geometry {
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[K][kMaxDims] = {};
};

// Merges dims that are contiguous for every operand and drops size-1 dims (row-major order of
// `shape` is kept, so linear index i still names the same element).
template <int K>
Geometry<K> make_geometry(const Shape& shape, const std::array<const Shape*, K>& strides, const char* op) {
  struct Dim {
    int64_t size;
    int64_t st[K];
  };
  std::vector<Dim> dims;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    Dim x{shape[d], {}};
    for (int k = 0; k < K; ++k) x.st[k] = (*strides[k])[d];
    if (!dims.empty()) {
      Dim& prev = dims.back();
      bool merge = true;
      for (int k = 0; k < K; ++k) merge = merge && prev.st[k] == x.st[k] * x.size;
      if (merge) {
        prev.size *= x.size;
        for (int k = 0; k < K; ++k) prev.st[k] = x.st[k];
        continue;
      }
    }
    dims.push_back(x);
  }
  TQ_CHECK(int(dims.size()) <= kMaxDims, op, ": CUDA kernels take at most ", kMaxDims,
           " non-mergeable dims, got shape ", shape);
  Geometry<K> g;
  g.ndim = int(dims.size());
  for (int d = 0; d < g.ndim; ++d) {
    g.sizes[d] = dims[size_t(d)].size;
    for (int k = 0; k < K; ++k) g.strides[k][d] = dims[size_t(d)].st[k];
  }
  return g;
}

// Element offsets of linear index i for every operand. Index is uint32_t when the element count
// fits (32-bit division is several times cheaper), else int64_t.
template <class Index, int K>
__device__ __forceinline__ void offsets_of(const Geometry<K>& g, Index i, int64_t (&off)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) off[k] = 0;
#pragma unroll
  for (int j = 0; j < kMaxDims; ++j) {
    const int d = kMaxDims - 1 - j;
    if (d < g.ndim) {
      const Index size = Index(g.sizes[d]);
      const Index q = i / size;
      const Index r = i - q * size;
#pragma unroll
      for (int k = 0; k < K; ++k) off[k] += int64_t(r) * g.strides[k][d];
      i = q;
    }
  }
}

inline bool fits_u32(int64_t n) { return n <= int64_t(UINT32_MAX); }

// ---- kernels ----

// dst[off0(i)] = src[off1(i)] bit for bit.
template <class T, class Index>
__global__ void copy_bits_strided_kernel(T* __restrict__ dst, const T* __restrict__ src, Geometry<2> g, Index n) {
  for (Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += Index(gridDim.x) * blockDim.x) {
    int64_t off[2];
    offsets_of<Index, 2>(g, i, off);
    dst[off[0]] = src[off[1]];
  }
}

// dst[i] = convert(src[i]) over n dense elements; 16-byte accesses when both are aligned.
template <class D, class S>
__global__ void convert_contiguous_kernel(D* __restrict__ dst, const S* __restrict__ src, int64_t n, bool vec) {
  constexpr int V = kVecWidth<D, S>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    for (int64_t v = tid; v < nv; v += stride) {
      Vec<S, V> a = reinterpret_cast<const Vec<S, V>*>(src)[v];
      Vec<D, V> b;
#pragma unroll
      for (int j = 0; j < V; ++j) b.v[j] = convert<D, S>(a.v[j]);
      reinterpret_cast<Vec<D, V>*>(dst)[v] = b;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) dst[i] = convert<D, S>(src[i]);
}

// base[off(i)] = value (bit pattern of the element, already converted on the host).
template <class T, class Index>
__global__ void fill_strided_kernel(T* __restrict__ base, Geometry<1> g, Index n, T value) {
  for (Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += Index(gridDim.x) * blockDim.x) {
    int64_t off[1];
    offsets_of<Index, 1>(g, i, off);
    base[off[0]] = value;
  }
}
template <class T>
__global__ void fill_contiguous_kernel(T* __restrict__ base, int64_t n, T value, bool vec) {
  constexpr int V = kVecWidth<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    Vec<T, V> b;
#pragma unroll
    for (int j = 0; j < V; ++j) b.v[j] = value;
    const int64_t nv = n / V;
    for (int64_t v = tid; v < nv; v += stride) reinterpret_cast<Vec<T, V>*>(base)[v] = b;
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) base[i] = value;
}

// ---- launchers (host) ----

inline void check_launch() { TQ_CUDA_CHECK(cudaGetLastError()); }

// Bit copy of equal-dtype tensors of one shape (any strides, 0-strided source allowed).
// Widens the elements of a bit copy whose innermost dim is contiguous on both sides to `w`
// bytes (16, 8 or 4) when every stride, the inner size and both pointers allow it: a head
// permute (B, T, H, D) -> (B, H, T, D) then moves 16 bytes per index computation instead of 2.
inline size_t widen_geometry(Geometry<2>& g, size_t es, const void* d, const void* s) {
  const int nd = g.ndim;
  if (nd == 0 || g.strides[0][nd - 1] != 1 || g.strides[1][nd - 1] != 1) return es;
  for (size_t w : {size_t(16), size_t(8), size_t(4)}) {
    if (w <= es || (g.sizes[nd - 1] * int64_t(es)) % int64_t(w) != 0 || !aligned_to(d, w) || !aligned_to(s, w)) continue;
    bool ok = true;
    for (int k = 0; k < 2; ++k)
      for (int i = 0; i < nd - 1; ++i) ok = ok && (g.strides[k][i] * int64_t(es)) % int64_t(w) == 0;
    if (!ok) continue;
    const int64_t f = int64_t(w / es);
    g.sizes[nd - 1] /= f;
    for (int k = 0; k < 2; ++k)
      for (int i = 0; i < nd - 1; ++i) g.strides[k][i] /= f;
    return w;
  }
  return es;
}

// dst (..., R, C) with unit stride along C from src with unit stride along R (a transpose of the
// two inner dims), through a 32x32 shared-memory tile so that both sides are coalesced.
template <class T>
__global__ void transpose_bits_kernel(T* __restrict__ dst, const T* __restrict__ src, Geometry<2> batch, int64_t nbatch,
                                      int64_t R, int64_t C, int64_t dst_rs, int64_t src_cs) {
  __shared__ T tile[32][33];
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  for (int64_t b = blockIdx.z; b < nbatch; b += gridDim.z) {
    int64_t off[2];
    offsets_of<int64_t, 2>(batch, b, off);
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {  // tile[k][x] = element (r0 + x, c0 + k)
      const int64_t r = r0 + threadIdx.x, c = c0 + k;
      if (r < R && c < C) tile[k][threadIdx.x] = src[off[1] + r + c * src_cs];
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
      const int64_t r = r0 + k, c = c0 + threadIdx.x;
      if (r < R && c < C) dst[off[0] + r * dst_rs + c] = tile[threadIdx.x][k];
    }
    __syncthreads();
  }
}

// Launches the tiled transpose when g is one (returns false otherwise).
template <class T>
bool try_transpose(T* d, const T* s, const Geometry<2>& g, cudaStream_t st) {
  const int nd = g.ndim;
  if (nd < 2 || g.strides[0][nd - 1] != 1 || g.strides[1][nd - 2] != 1 || g.strides[1][nd - 1] == 1 ||
      g.strides[1][nd - 1] == 0)
    return false;
  const int64_t R = g.sizes[nd - 2], C = g.sizes[nd - 1];
  if (R < 16 || C < 16 || (R + 31) / 32 > 65535) return false;
  Geometry<2> batch;
  batch.ndim = nd - 2;
  int64_t nbatch = 1;
  for (int i = 0; i < nd - 2; ++i) {
    batch.sizes[i] = g.sizes[i];
    batch.strides[0][i] = g.strides[0][i];
    batch.strides[1][i] = g.strides[1][i];
    nbatch *= g.sizes[i];
  }
  dim3 grid(unsigned((C + 31) / 32), unsigned((R + 31) / 32), unsigned(std::min<int64_t>(nbatch, 65535)));
  transpose_bits_kernel<T><<<grid, dim3(32, 8), 0, st>>>(d, s, batch, nbatch, R, C, g.strides[0][nd - 2],
                                                         g.strides[1][nd - 1]);
  return true;
}

// Bit copy of equal-dtype tensors of one shape (any strides, 0-strided source allowed).
inline void copy_bits(const Tensor& dst, const Tensor& src) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  DeviceGuard guard(dst.device().index);
  cudaStream_t s = current_stream();
  const size_t es = dtype_size(dst.dtype());
  Geometry<2> g = make_geometry<2>(dst.shape(), {&dst.strides(), &src.strides()}, "copy_");
  if (g.ndim <= 1 && (g.ndim == 0 || (g.strides[0][0] == 1 && g.strides[1][0] == 1))) {
    TQ_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), size_t(n) * es, cudaMemcpyDeviceToDevice, s));
    return;
  }
  const size_t w = widen_geometry(g, es, dst.data_ptr(), src.data_ptr());
  const int64_t items = n * int64_t(es) / int64_t(w);
  const unsigned blocks = grid_for(items, kThreads, dst.device().index);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    T* d = static_cast<T*>(dst.data_ptr());
    const T* sp = static_cast<const T*>(src.data_ptr());
    if constexpr (sizeof(T) <= 8) {
      if (w == es && try_transpose<T>(d, sp, g, s)) return;
    }
    if (fits_u32(items)) copy_bits_strided_kernel<T, uint32_t><<<blocks, kThreads, 0, s>>>(d, sp, g, uint32_t(items));
    else copy_bits_strided_kernel<T, int64_t><<<blocks, kThreads, 0, s>>>(d, sp, g, items);
  };
  switch (w) {
    case 1: launch(uint8_t{}); break;
    case 2: launch(uint16_t{}); break;
    case 4: launch(uint32_t{}); break;
    case 8: launch(uint64_t{}); break;
    case 16: launch(uint4{}); break;
    default: fail(str_cat("copy_: unsupported element size ", es));
  }
  check_launch();
}

// Dense dst (n elements of D) = convert(dense src); the raw launcher the benchmarks time too.
template <class D, class S>
void convert_contiguous(D* dst, const S* src, int64_t n, int device, cudaStream_t s) {
  if (n == 0) return;
  constexpr int V = kVecWidth<D, S>;
  const bool vec = aligned_to(dst, sizeof(D) * V) && aligned_to(src, sizeof(S) * V);
  const unsigned blocks = grid_for((n + V - 1) / V, kThreads, device);
  convert_contiguous_kernel<D, S><<<blocks, kThreads, 0, s>>>(dst, src, n, vec);
  check_launch();
}

inline Tensor dense_copy(const Tensor& t) {
  Tensor d = Tensor::empty(t.shape(), t.dtype(), t.device());
  copy_bits(d, t);
  return d;
}

// The copy_ hook: dst and src on one CUDA device, src already broadcast to dst's shape.
inline void copy_tensor(const Tensor& dst, const Tensor& src) {
  TQ_CHECK(dst.device() == src.device(), "copy_: ", describe(dst), " and ", describe(src), " are on different devices");
  if (dst.numel() == 0) return;
  if (dst.dtype() == src.dtype()) return copy_bits(dst, src);
  // Converting: both operands dense (strided ones go through a bit copy first).
  Tensor s = src.is_contiguous() ? src : dense_copy(src);
  Tensor d = dst.is_contiguous() ? dst : Tensor::empty(dst.shape(), dst.dtype(), dst.device());
  DeviceGuard guard(dst.device().index);
  TQ_DISPATCH(d.dtype(), D, TQ_DISPATCH(s.dtype(), S, {
    convert_contiguous<D, S>(static_cast<D*>(d.data_ptr()), static_cast<const S*>(s.data_ptr()), d.numel(),
                             dst.device().index, current_stream());
  }));
  if (!d.same(dst)) copy_bits(dst, d);
}

// The fill_ hook: every element of t (any strides) = value, converted as the CPU converts.
inline void fill_tensor(const Tensor& t, double value) {
  const int64_t n = t.numel();
  if (n == 0) return;
  DeviceGuard guard(t.device().index);
  cudaStream_t s = current_stream();
  const int dev = t.device().index;
  TQ_DISPATCH(t.dtype(), T, {
    const T v = ::tq::from_double<T>(value);
    using B = bits_t<sizeof(T)>;
    B bits;
    std::memcpy(&bits, &v, sizeof(T));
    B* base = static_cast<B*>(t.data_ptr());
    Geometry<1> g = make_geometry<1>(t.shape(), {&t.strides()}, "fill_");
    if (g.ndim == 0 || (g.ndim == 1 && g.strides[0][0] == 1)) {
      constexpr int V = kVecWidth<B>;
      fill_contiguous_kernel<B><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(
          base, n, bits, aligned_to(base, sizeof(B) * V));
    } else if (fits_u32(n)) {
      fill_strided_kernel<B, uint32_t><<<grid_for(n, kThreads, dev), kThreads, 0, s>>>(base, g, uint32_t(n), bits);
    } else {
      fill_strided_kernel<B, int64_t><<<grid_for(n, kThreads, dev), kThreads, 0, s>>>(base, g, n, bits);
    }
    check_launch();
  });
}

}  // namespace tq::cuda
