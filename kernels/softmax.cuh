// CUDA softmax / log_softmax over one dimension, forward and backward (the entries of
// ops::cuda_softmax_kernels()).
//
// Invariants (the CPU reference in ops/softmax.hpp is the contract):
// - The dimension is moved last first, as on the CPU (a transposed view made dense by the copy
//   kernels, and the result transposed back), so every kernel works on contiguous rows.
// - One block per row: the NaN-ignoring row max, then Σ exp(x − max), then the outputs, in
//   compute_t<T> (fp32 for f32/bf16/f16, double for f64) with IEEE expf/logf (never the fast
//   intrinsics), rounded once to the dtype on store. Each pass re-reads the row (L1/L2 for the
//   rows softmax sees); no intermediate (rows, n) buffer is materialized.
// - Backward uses only the saved output y: softmax gx = y ⊙ (g − Σ g⊙y), log_softmax
//   gx = g − exp(y) ⊙ Σ g, the final products and differences rounded as on the CPU (no FMA).
// - Reductions are block trees in a fixed order: deterministic. No host synchronization.
#pragma once

#include "kernels/ops_common.cuh"
#include "tq/ops/softmax.hpp"

namespace tq::cuda {

namespace softmax_detail {

// y (rows, n) = softmax or log_softmax of each row of x (rows, n).
template <class T>
__global__ void __launch_bounds__(256) forward_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t rows, int64_t n,
                                                      bool log) {
  using C = compute_t<T>;
  __shared__ C red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * n;  // (n)
    C m = -C(INFINITY);
    for_each_in_row<C>(xr, n, threadIdx.x, blockDim.x, [&](int64_t, C v) { m = max_ignore_nan(m, v); });
    m = block_max(m, red);
    C sum = 0;
    for_each_in_row<C>(xr, n, threadIdx.x, blockDim.x, [&](int64_t, C v) { sum += std::exp(v - m); });
    sum = block_sum(sum, red);
    const C lse = m + std::log(sum), inv = C(1) / sum;
    T* yr = y + r * n;
    for_each_in_row<C>(xr, n, threadIdx.x, blockDim.x, [&](int64_t j, C v) {
      yr[j] = convert<T>(log ? sub_rn(v, lse) : mul_rn(std::exp(v - m), inv));
    });
  }
}

// gx (rows, n) from the output y and its gradient g (both (rows, n)).
template <class T>
__global__ void __launch_bounds__(256) backward_kernel(T* __restrict__ gx, const T* __restrict__ g, const T* __restrict__ y,
                                                       int64_t rows, int64_t n, bool log) {
  using C = compute_t<T>;
  __shared__ C red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* gr = g + r * n;  // (n)
    const T* yr = y + r * n;  // (n)
    C dot = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      dot += log ? convert<C>(gr[j]) : convert<C>(gr[j]) * convert<C>(yr[j]);
    dot = block_sum(dot, red);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const C gv = convert<C>(gr[j]), yv = convert<C>(yr[j]);
      gx[r * n + j] = convert<T>(log ? sub_rn(gv, mul_rn(std::exp(yv), dot)) : mul_rn(yv, sub_rn(gv, dot)));
    }
  }
}

// The launch shape for rows of n elements.
inline void row_grid(int64_t rows, int64_t n, int dev, unsigned& blocks, int& threads) {
  threads = threads_for_row(n);
  blocks = unsigned(std::min<int64_t>(rows, int64_t(sm_count(dev)) * 32));
}

// x with `dim` swapped to the end, dense (no copy when dim is already last).
inline Tensor dim_last(const Tensor& x, int64_t dim) {
  Tensor d = x.detach();
  if (dim != d.dim() - 1) d = d.transpose(dim, -1);
  return d.contiguous();
}
inline Tensor undo_dim_last(const Tensor& y, int64_t dim) {
  return dim == y.dim() - 1 ? y : y.transpose(dim, -1).contiguous();
}

}  // namespace softmax_detail

inline Tensor softmax_forward(const Tensor& x_in, int64_t dim, bool log) {
  using namespace softmax_detail;
  const char* op = log ? "log_softmax" : "softmax";
  if (x_in.dim() == 0) return softmax_forward(x_in.reshape({1}), 0, log).reshape({});
  Tensor x = dim_last(x_in, dim);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  if (rows > 0) {
    const int dev = x.device().index;
    DeviceGuard guard(dev);
    unsigned blocks;
    int threads;
    row_grid(rows, n, dev, blocks, threads);
    dispatch_float(x.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      forward_kernel<T><<<blocks, threads, 0, current_stream()>>>(data_as<T>(y), data_as<const T>(x), rows, n, log);
      check_launch();
    });
  }
  return undo_dim_last(y, dim);
}

inline Tensor softmax_backward(const Tensor& grad_out, const Tensor& y_in, int64_t dim, bool log) {
  using namespace softmax_detail;
  const char* op = log ? "log_softmax backward" : "softmax backward";
  if (y_in.dim() == 0) return softmax_backward(grad_out.reshape({1}), y_in.reshape({1}), 0, log).reshape({});
  // One kernel instance per dtype: a gradient of another dtype brings both to the compute dtype.
  const DType kt = grad_out.dtype() == y_in.dtype() ? y_in.dtype() : ops::compute_dtype(y_in.dtype());
  Tensor y = dim_last(y_in.dtype() == kt ? y_in : y_in.detach().to(kt), dim);
  Tensor g = dim_last(grad_out.dtype() == kt ? grad_out : grad_out.detach().to(kt), dim);
  Tensor gx = Tensor::empty(y.shape(), kt, y.device());
  const int64_t n = y.size(-1), rows = n ? y.numel() / n : 0;
  if (rows > 0) {
    const int dev = y.device().index;
    DeviceGuard guard(dev);
    unsigned blocks;
    int threads;
    row_grid(rows, n, dev, blocks, threads);
    dispatch_float(kt, op, [&](auto tag) {
      using T = decltype(tag);
      backward_kernel<T><<<blocks, threads, 0, current_stream()>>>(data_as<T>(gx), data_as<const T>(g),
                                                                    data_as<const T>(y), rows, n, log);
      check_launch();
    });
  }
  Tensor out = undo_dim_last(gx, dim);
  return out.dtype() == y_in.dtype() ? out : out.to(y_in.dtype());
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_softmax_kernels() {
  ops::SoftmaxCudaKernels& k = ops::cuda_softmax_kernels();
  k.forward = &softmax_forward;
  k.backward = &softmax_backward;
}

}  // namespace tq::cuda
