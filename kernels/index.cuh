// CUDA gather / scatter-add by index (embedding, index_select and their backward) and
// masked_scatter forward/backward (the entries of ops::cuda_index_kernels()). concat/stack need
// no kernel of their own: ops::concat copies each input into its slab with the copy kernels.
//
// Invariants (the CPU references in ops/embedding.hpp and ops/shape_ops.hpp are the contract):
// - Index validation happens on the device (the index tensor lives there; the host never reads
//   it inside an op). An out-of-range index is recorded once in the per-device error record
//   (kernels/ops_common.cuh) and ops::check_device_index_errors() turns it into a tq::Error later;
//   meanwhile a gathered row is zero-filled, a scattered gradient slice is dropped, and a
//   masked_scatter position beyond the source keeps the input's value. Nothing reads or writes
//   out of bounds.
// - Forward passes move raw bytes (16-byte units whenever the row size and alignment allow).
// - Scatter-add is deterministic and never uses atomics: (index, position) pairs are radix-sorted
//   by index (CUB, stable), and one block per distinct index sums its gradient slices in
//   ascending position order — the CPU's order — in the compute dtype (fp32, double for f64),
//   writing the row once in the input's dtype. Rows no index names are zero. No (V, D) fp32
//   buffer is materialized (embedding backward at V = 257216 needs only the output).
// - masked_scatter ranks the true mask positions with an exclusive scan (CUB, int64 counts).
// - Temporary buffers come from the stream-ordered allocator; no host synchronization except in
//   check_index_errors (not an op), so every op is capturable into a CUDA graph.
#pragma once

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "kernels/ops_common.cuh"
#include "tq/ops/embedding.hpp"

namespace tq::cuda {

namespace index_detail {

using ops::IndexOp;

// ---- gather ----

// out row r = (o, k) of (outer·K, upr units) = x row (o, index[k]) of (outer·n, upr units).
template <class U, class Id>
__global__ void __launch_bounds__(256) gather_rows_kernel(U* __restrict__ out, const U* __restrict__ x,
                                                          const Id* __restrict__ index,  // (K)
                                                          int64_t outer, int64_t K, int64_t n, int64_t upr, IndexOp op) {
  for (int64_t r = blockIdx.x; r < outer * K; r += gridDim.x) {
    const int64_t o = r / K, k = r - o * K;
    const int64_t id = int64_t(index[k]);
    U* dst = out + r * upr;
    if (id < 0 || id >= n) {
      if (threadIdx.x == 0) raise_index_error(op, id, n, k);
      for (int64_t c = threadIdx.x; c < upr; c += blockDim.x) dst[c] = U{};
      continue;
    }
    const U* src = x + (o * n + id) * upr;
    for (int64_t c = threadIdx.x; c < upr; c += blockDim.x) dst[c] = src[c];
  }
}

// The widest unit (16, 8, 4, 2 or 1 bytes) that divides the row and both base addresses.
inline size_t copy_unit(size_t row_bytes, const void* a, const void* b) {
  for (size_t w : {size_t(16), size_t(8), size_t(4), size_t(2)})
    if (row_bytes % w == 0 && aligned_to(a, w) && aligned_to(b, w)) return w;
  return 1;
}

template <class F>
void with_unit(size_t w, F&& f) {
  switch (w) {
    case 16: f(uint4{}); break;
    case 8: f(uint64_t{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

template <class F>
void with_index_type(const Tensor& index, F&& f) {
  if (index.dtype() == DType::i64) f(int64_t{});
  else f(int32_t{});
}

// ---- scatter-add ----

// keys[k] = index[k] when it is in range and not `skip`, else n (sorts last, ignored); pos[k] = k.
template <class Id>
__global__ void sort_keys_kernel(uint64_t* __restrict__ keys, int64_t* __restrict__ pos, const Id* __restrict__ index,
                                 int64_t K, int64_t n, int64_t skip, IndexOp op) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t id = int64_t(index[k]);
    const bool valid = id >= 0 && id < n;
    if (!valid) raise_index_error(op, id, n, k);
    keys[k] = valid && id != skip ? uint64_t(id) : uint64_t(n);
    pos[k] = k;
  }
}

// out (outer, n, inner) rows named by the sorted keys = Σ over their run of grad (outer, K, inner)
// rows, in ascending position order. Block (e, o): entry e of the sorted keys, outer index o.
template <class X, class G>
__global__ void __launch_bounds__(256) segment_sum_kernel(X* __restrict__ out, const G* __restrict__ grad,
                                                          const uint64_t* __restrict__ keys,  // (K) sorted
                                                          const int64_t* __restrict__ pos,    // (K) by key
                                                          int64_t outer, int64_t K, int64_t n, int64_t inner) {
  using C = compute_t<X>;
  for (int64_t e = blockIdx.x; e < K; e += gridDim.x) {
    const uint64_t id = keys[e];
    if (id >= uint64_t(n) || (e > 0 && keys[e - 1] == id)) continue;  // ignored, or not the run's first entry
    int64_t end = e + 1;
    while (end < K && keys[end] == id) ++end;
    for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
      X* dst = out + (o * n + int64_t(id)) * inner;
      for (int64_t c = threadIdx.x; c < inner; c += blockDim.x) {
        C acc = C(0);
        for (int64_t s = e; s < end; ++s) acc += convert<C>(grad[(o * K + pos[s]) * inner + c]);
        dst[c] = convert<X>(acc);
      }
    }
  }
}

// Bits of the smallest unsigned key type that sorts n + 1 distinct values (0..n).
inline int key_bits(int64_t n) {
  int bits = 1;
  while (bits < 63 && (uint64_t(1) << bits) <= uint64_t(n)) ++bits;
  return bits;
}

// ---- masked_scatter ----

// out[i] = mask[i] ? source[rank[i]] : x[i] (out already holds x); rank = exclusive scan of mask.
template <class U>
__global__ void masked_scatter_kernel(U* __restrict__ out, const bool* __restrict__ mask, const int64_t* __restrict__ rank,
                                      const U* __restrict__ source, int64_t n, int64_t ns) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!mask[i]) continue;
    const int64_t k = rank[i];
    if (k < ns) out[i] = source[k];
    else if (k == ns) raise_index_error(IndexOp::masked_scatter, k + 1, ns, i);  // the first position too many
  }
}

// gx[i] = mask[i] ? 0 : g[i];  gs[rank[i]] = g[i] where mask[i] (gs zeroed beforehand).
template <class U>
__global__ void masked_scatter_backward_kernel(U* __restrict__ gx, U* __restrict__ gs, const U* __restrict__ g,
                                               const bool* __restrict__ mask, const int64_t* __restrict__ rank,
                                               int64_t n, int64_t ns) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!mask[i]) {
      gx[i] = g[i];
      continue;
    }
    gx[i] = U{};
    const int64_t k = rank[i];
    if (k < ns) gs[k] = g[i];
  }
}

// The scan's operator. Our own type rather than ::cuda::std::plus: nvcc's generated host stub
// names kernel template arguments unqualified (`cuda::std::...`), which is ambiguous with tq::cuda
// in any translation unit that says `using namespace tq;`.
struct AddCounts {
  __host__ __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// rank (n) i64 = exclusive prefix count of the dense bool mask (n).
inline Tensor mask_ranks(const Tensor& mask) {
  const int64_t n = mask.numel();
  Tensor rank = Tensor::empty({n}, DType::i64, mask.device());
  const uint8_t* pm = data_as<const uint8_t>(mask);
  int64_t* pr = data_as<int64_t>(rank);
  size_t bytes = 0;
  TQ_CUDA_CHECK(cub::DeviceScan::ExclusiveScan(nullptr, bytes, pm, pr, AddCounts{}, int64_t(0), n,
                                               current_stream()));
  Tensor temp = Tensor::empty({int64_t(std::max<size_t>(bytes, 1))}, DType::u8, mask.device());
  TQ_CUDA_CHECK(cub::DeviceScan::ExclusiveScan(temp.data_ptr(), bytes, pm, pr, AddCounts{}, int64_t(0), n,
                                               current_stream()));
  return rank;
}

}  // namespace index_detail

// ---- entry points ----

// out = x with dimension dim replaced by index.numel() slices named by index (1-D i64/i32).
inline Tensor index_gather(ops::IndexOp op, const Tensor& x_in, int64_t dim, const Tensor& index_in) {
  using namespace index_detail;
  Tensor x = x_in.detach().contiguous(), index = index_in.detach().reshape({index_in.numel()}).contiguous();
  const auto s = ops::detail::split_at(x.shape(), dim);
  const int64_t K = index.numel();
  Shape out_shape = x.shape();
  out_shape[size_t(dim)] = K;
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  if (out.numel() == 0) return out;
  const size_t row_bytes = size_t(s.inner) * dtype_size(x.dtype());
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  with_unit(copy_unit(row_bytes, x.data_ptr(), out.data_ptr()), [&](auto utag) {
    using U = decltype(utag);
    const int64_t upr = int64_t(row_bytes / sizeof(U));
    const int threads = threads_for_row(upr);
    const unsigned blocks = unsigned(std::min<int64_t>(s.outer * K, int64_t(sm_count(dev)) * 64));
    with_index_type(index, [&](auto itag) {
      using Id = decltype(itag);
      gather_rows_kernel<U, Id><<<blocks, threads, 0, current_stream()>>>(
          data_as<U>(out), data_as<const U>(x), data_as<const Id>(index), s.outer, K, s.n, upr, op);
      check_launch();
    });
  });
  return out;
}

// zeros(x_shape, x_dtype) plus grad's slices (x_shape with dim → K) added at index (K); `skip`
// names an index whose slices add nothing (−1: none).
inline Tensor index_scatter_add(ops::IndexOp op, const Tensor& grad_in, const Shape& x_shape, DType x_dtype, int64_t dim,
                                const Tensor& index_in, int64_t skip) {
  using namespace index_detail;
  const char* name = ops::index_op_name(op);
  Tensor index = index_in.detach().reshape({index_in.numel()}).contiguous();
  const int64_t K = index.numel();
  const auto s = ops::detail::split_at(x_shape, dim);
  TQ_CHECK(grad_in.numel() == s.outer * K * s.inner, name, ": gradient ", describe(grad_in), " does not match ",
           K, " indices into ", x_shape);
  TQ_CHECK(K <= INT32_MAX, name, ": ", K, " indices exceed the CUDA sort's limit");
  Tensor out = Tensor::zeros(x_shape, x_dtype, grad_in.device());
  if (K == 0 || s.outer == 0 || s.inner == 0) return out;
  const DType ct = ops::compute_dtype(x_dtype);
  Tensor grad = dense_as(grad_in, grad_in.dtype() == x_dtype ? x_dtype : ct);
  const Device device = grad.device();
  const int dev = device.index;
  DeviceGuard guard(dev);
  cudaStream_t st = current_stream();

  // Sort (key, position) pairs by key; stable, so equal keys keep ascending positions.
  Tensor keys = Tensor::empty({K}, DType::i64, device), keys_sorted = Tensor::empty({K}, DType::i64, device);
  Tensor pos = Tensor::empty({K}, DType::i64, device), pos_sorted = Tensor::empty({K}, DType::i64, device);
  with_index_type(index, [&](auto itag) {
    using Id = decltype(itag);
    sort_keys_kernel<Id><<<grid_for(K, kThreads, dev), kThreads, 0, st>>>(
        data_as<uint64_t>(keys), data_as<int64_t>(pos), data_as<const Id>(index), K, s.n, skip, op);
    check_launch();
  });
  const int end_bit = key_bits(s.n);
  size_t bytes = 0;
  TQ_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, data_as<const uint64_t>(keys),
                                                data_as<uint64_t>(keys_sorted), data_as<const int64_t>(pos),
                                                data_as<int64_t>(pos_sorted), int(K), 0, end_bit, st));
  Tensor temp = Tensor::empty({int64_t(std::max<size_t>(bytes, 1))}, DType::u8, device);
  TQ_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), bytes, data_as<const uint64_t>(keys),
                                                data_as<uint64_t>(keys_sorted), data_as<const int64_t>(pos),
                                                data_as<int64_t>(pos_sorted), int(K), 0, end_bit, st));

  const dim3 grid(unsigned(std::min<int64_t>(K, int64_t(sm_count(dev)) * 64)), unsigned(std::min<int64_t>(s.outer, 65535)));
  const int threads = threads_for_row(s.inner);
  auto launch = [&](auto xtag, auto gtag) {
    using X = decltype(xtag);
    using G = decltype(gtag);
    segment_sum_kernel<X, G><<<grid, threads, 0, st>>>(data_as<X>(out), data_as<const G>(grad),
                                                       data_as<const uint64_t>(keys_sorted),
                                                       data_as<const int64_t>(pos_sorted), s.outer, K, s.n, s.inner);
    check_launch();
  };
  const bool same = grad.dtype() == x_dtype;
  switch (x_dtype) {
    case DType::f32: launch(float{}, float{}); break;
    case DType::f64: launch(double{}, double{}); break;
    case DType::bf16: same ? launch(::tq::bf16{}, ::tq::bf16{}) : launch(::tq::bf16{}, float{}); break;
    case DType::f16: same ? launch(::tq::f16{}, ::tq::f16{}) : launch(::tq::f16{}, float{}); break;
    default: fail(str_cat(name, ": expected a float input dtype, got ", dtype_name(x_dtype)));
  }
  return out;
}

// out = x with mask's true positions (row-major) filled by source's elements in order.
inline Tensor masked_scatter(const Tensor& x, const Tensor& mask_in, const Tensor& source_in) {
  using namespace index_detail;
  Tensor out = x.detach().clone();
  const int64_t n = out.numel();
  if (n == 0) return out;
  Tensor mask = dense_as(mask_in, DType::boolean), source = source_in.detach().contiguous();
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  Tensor rank = mask_ranks(mask);
  with_unit(dtype_size(x.dtype()), [&](auto utag) {
    using U = decltype(utag);
    masked_scatter_kernel<U><<<grid_for(n, kThreads, dev), kThreads, 0, current_stream()>>>(
        data_as<U>(out), data_as<const bool>(mask), data_as<const int64_t>(rank), data_as<const U>(source), n,
        source.numel());
    check_launch();
  });
  return out;
}

// {gx, gsource}: gx = grad with the mask's positions zeroed; gsource[k] = grad at the k-th true
// position (0 beyond the mask's count), in source_dtype.
inline std::vector<Tensor> masked_scatter_backward(const Tensor& grad_in, const Tensor& mask_in,
                                                   const Shape& source_shape, DType source_dtype) {
  using namespace index_detail;
  Tensor g = grad_in.detach().contiguous();
  const int64_t n = g.numel(), ns = numel_of(source_shape);
  Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
  Tensor gs = Tensor::zeros({ns}, g.dtype(), g.device());
  if (n > 0) {
    Tensor mask = dense_as(mask_in, DType::boolean);
    const int dev = g.device().index;
    DeviceGuard guard(dev);
    Tensor rank = mask_ranks(mask);
    with_unit(dtype_size(g.dtype()), [&](auto utag) {
      using U = decltype(utag);
      masked_scatter_backward_kernel<U><<<grid_for(n, kThreads, dev), kThreads, 0, current_stream()>>>(
          data_as<U>(gx), data_as<U>(gs), data_as<const U>(g), data_as<const bool>(mask), data_as<const int64_t>(rank),
          n, ns);
      check_launch();
    });
  }
  return {gx, gs.reshape(source_shape).to(source_dtype)};
}

// Reads and clears the device's index error record; throws tq::Error naming the op if one was
// raised. Waits for the current stream (it is a host read, never called inside an op).
inline void check_index_errors(Device device) {
  DeviceGuard guard(device.index);
  cudaStream_t st = current_stream();
  IndexErrorRecord rec{};
  TQ_CUDA_CHECK(cudaMemcpyFromSymbolAsync(&rec, g_index_error, sizeof(rec), 0, cudaMemcpyDeviceToHost, st));
  TQ_CUDA_CHECK(cudaStreamSynchronize(st));
  if (rec.raised == 0) return;
  const IndexErrorRecord cleared{};
  TQ_CUDA_CHECK(cudaMemcpyToSymbolAsync(g_index_error, &cleared, sizeof(cleared), 0, cudaMemcpyHostToDevice, st));
  TQ_CUDA_CHECK(cudaStreamSynchronize(st));
  const auto op = ops::IndexOp(rec.op);
  const std::string where = str_cat(" (detected on ", device.str(), " by a kernel launched earlier)");
  switch (op) {
    case ops::IndexOp::embedding:
    case ops::IndexOp::embedding_backward:
      fail(str_cat(ops::index_op_name(op), ": id ", rec.value, " (at flat position ", rec.position,
                   ") out of range for an embedding of ", rec.bound, " rows", where));
    case ops::IndexOp::masked_scatter:
      fail(str_cat("masked_scatter: mask has at least ", rec.value, " true positions but source has only ", rec.bound,
                   " elements", where));
    case ops::IndexOp::cross_entropy:
    case ops::IndexOp::cross_entropy_backward:
      fail(str_cat(ops::index_op_name(op), ": target ", rec.value, " of row ", rec.position, " is outside [0, ",
                   rec.bound, ") and is not ignore_index", where));
    default:
      fail(str_cat(ops::index_op_name(op), ": index ", rec.value, " (at position ", rec.position,
                   ") out of range for a dimension of size ", rec.bound, where));
  }
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_index_kernels() {
  ops::IndexCudaKernels& k = ops::cuda_index_kernels();
  k.gather = &index_gather;
  k.scatter_add = &index_scatter_add;
  k.masked_scatter = &masked_scatter;
  k.masked_scatter_backward = &masked_scatter_backward;
  k.check_errors = &check_index_errors;
}

}  // namespace tq::cuda
