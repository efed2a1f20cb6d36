// CUDA cross-entropy over (N, V) logits, forward and backward (the entries of
// ops::cuda_cross_entropy_kernels()).
//
// Invariants (the CPU reference in ops/loss.hpp is the contract):
// - Math in compute_t<T> (fp32 for f32/bf16/f16 logits, double for f64); logits are read in their
//   own dtype with 16-byte loads and never copied or widened in memory.
// - Forward: one block per row and ONE pass over it: each thread keeps an online (max, Σ exp(x −
//   max)) pair, the block combines the pairs in a fixed tree, lse = max + log(Σ). Per-row loss
//   lse − x[target] and lse go to (N) buffers; a one-block kernel sums the row losses in double in
//   a fixed order, counts the supervised rows and writes the loss and the divisor as device
//   scalars. Nothing reaches the host; deterministic.
// - Backward: dlogits = (grad/divisor)·(exp(x − lse) − onehot), computed as the CPU does (the
//   weight rounded to the compute dtype, one subtraction, one multiply, no FMA), one rounding to
//   the logits' dtype; ignored rows get 0. Logits read once, dlogits written once.
// - A target outside [0, V) that is not ignore_index is recorded in the device error record
//   (ops::check_device_index_errors) and its row treated as ignored.
#pragma once

#include "kernels/ops_common.cuh"
#include "tq/ops/loss.hpp"

namespace tq::cuda {

namespace ce_detail {

using ops::CrossEntropyDivisor;
using ops::IndexOp;

// Online log-sum-exp state: max m and Σ exp(x − m).
template <class C>
struct Lse {
  C m, s;
};

template <class C>
__device__ __forceinline__ Lse<C> lse_add(Lse<C> a, C v) {
  if (v > a.m) return {v, a.s * std::exp(a.m - v) + C(1)};  // m = −inf: s is 0 and stays 0
  if (v != -C(INFINITY)) a.s += std::exp(v - a.m);          // −inf adds 0; NaN poisons s
  return a;
}

template <class C>
__device__ __forceinline__ Lse<C> lse_combine(Lse<C> a, Lse<C> b) {
  const C m = max_ignore_nan(a.m, b.m);
  if (m == -C(INFINITY)) return {m, a.s + b.s};
  return {m, a.s * std::exp(a.m - m) + b.s * std::exp(b.m - m)};
}

template <class C>
__device__ __forceinline__ Lse<C> warp_lse(Lse<C> v) {
#pragma unroll
  for (int k = 16; k > 0; k >>= 1)
    v = lse_combine(v, Lse<C>{__shfl_xor_sync(0xffffffffu, v.m, k), __shfl_xor_sync(0xffffffffu, v.s, k)});
  return v;
}

// Whether row r is supervised; records a bad target once (thread 0 of the block only).
__device__ __forceinline__ bool supervised(int64_t t, int64_t ignore_index, int64_t V, int64_t r, IndexOp op) {
  if (t == ignore_index) return false;
  if (t < 0 || t >= V) {
    if (threadIdx.x == 0) raise_index_error(op, t, V, r);
    return false;
  }
  return true;
}

// lse (N), row_loss (N) from logits (N, V) and targets (N).
template <class T>
__global__ void __launch_bounds__(512) forward_kernel(compute_t<T>* __restrict__ lse, compute_t<T>* __restrict__ row_loss,
                                                      const T* __restrict__ logits, const int64_t* __restrict__ targets,
                                                      int64_t N, int64_t V, int64_t ignore_index) {
  using C = compute_t<T>;
  __shared__ C red_m[32], red_s[32];
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const int64_t t = targets[r];
    if (!supervised(t, ignore_index, V, r, IndexOp::cross_entropy)) {
      if (threadIdx.x == 0) lse[r] = row_loss[r] = C(0);
      continue;
    }
    const T* row = logits + r * V;  // (V)
    Lse<C> acc{-C(INFINITY), C(0)};
    for_each_in_row<C>(row, V, threadIdx.x, blockDim.x, [&](int64_t, C v) { acc = lse_add(acc, v); });
    acc = warp_lse(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();  // red_* of the previous row are read
    if (lane == 0) {
      red_m[warp] = acc.m;
      red_s[warp] = acc.s;
    }
    __syncthreads();
    if (warp == 0) {
      acc = lane < nwarps ? Lse<C>{red_m[lane], red_s[lane]} : Lse<C>{-C(INFINITY), C(0)};
      acc = warp_lse(acc);
      if (lane == 0) {
        const C l = acc.m + std::log(acc.s);
        lse[r] = l;
        row_loss[r] = l - convert<C>(row[t]);
      }
    }
  }
}

// loss () = Σ row_loss / divisor (0 if the divisor is 0), divisor () — one block of 1024 threads.
template <class C>
__global__ void __launch_bounds__(1024) finalize_kernel(C* __restrict__ loss, double* __restrict__ divisor,
                                                        const C* __restrict__ row_loss, const int64_t* __restrict__ targets,
                                                        int64_t N, int64_t V, int64_t ignore_index,
                                                        CrossEntropyDivisor mode, double normalizer) {
  __shared__ double red[32];
  double sum = 0, count = 0;
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) {
    const int64_t t = targets[r];
    if (t == ignore_index || t < 0 || t >= V) continue;
    sum += double(row_loss[r]);
    count += 1;
  }
  sum = block_sum(sum, red);
  count = block_sum(count, red);
  if (threadIdx.x == 0) {
    const double div = mode == CrossEntropyDivisor::count ? count : mode == CrossEntropyDivisor::one ? 1.0 : normalizer;
    *divisor = div;
    *loss = double_to<C>(div > 0 ? sum / div : 0.0);
  }
}

// dlogits (N, V) from logits (N, V), lse (N), targets (N), grad () (the loss's compute dtype)
// and divisor () (f64).
template <class T>
__global__ void __launch_bounds__(512) backward_kernel(T* __restrict__ dlogits, const T* __restrict__ logits,
                                                       const compute_t<T>* __restrict__ lse,
                                                       const int64_t* __restrict__ targets,
                                                       const compute_t<T>* __restrict__ grad,
                                                       const double* __restrict__ divisor, int64_t N, int64_t V,
                                                       int64_t ignore_index) {
  using C = compute_t<T>;
  constexpr int VW = kVecWidth<T>;
  const double div = *divisor;
  const C w = C(div > 0 ? double(*grad) / div : 0.0);  // the CPU's g.item<double>() / div, then C(·)
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const int64_t t = targets[r];
    const bool sup = supervised(t, ignore_index, V, r, IndexOp::cross_entropy_backward);
    const C l = sup ? lse[r] : C(0);
    const T* in = logits + r * V;  // (V)
    T* out = dlogits + r * V;      // (V)
    auto value = [&](int64_t c, C x) {
      return sup ? mul_rn(w, sub_rn(std::exp(x - l), c == t ? C(1) : C(0))) : C(0);
    };
    // 16-byte accesses between an element-wise head and tail; in and out share their alignment
    // whenever the row stride is a multiple of 16 bytes (always for the model's V = 257216).
    const uintptr_t ai = reinterpret_cast<uintptr_t>(in) % 16, ao = reinterpret_cast<uintptr_t>(out) % 16;
    int64_t head = V, nv = 0;
    if (ai == ao && ai % sizeof(T) == 0) {
      head = int64_t((16 - ai) % 16 / sizeof(T));
      head = head < V ? head : V;
      nv = (V - head) / VW;
    }
    for (int64_t c = threadIdx.x; c < head; c += blockDim.x) out[c] = convert<T>(value(c, convert<C>(in[c])));
    const Vec<T, VW>* vin = reinterpret_cast<const Vec<T, VW>*>(in + head);
    Vec<T, VW>* vout = reinterpret_cast<Vec<T, VW>*>(out + head);
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
      const Vec<T, VW> x = vin[k];
      Vec<T, VW> o;
#pragma unroll
      for (int e = 0; e < VW; ++e) o.v[e] = convert<T>(value(head + k * VW + e, convert<C>(x.v[e])));
      vout[k] = o;
    }
    for (int64_t c = head + nv * VW + threadIdx.x; c < V; c += blockDim.x)
      out[c] = convert<T>(value(c, convert<C>(in[c])));
  }
}

inline unsigned row_blocks(int64_t N, int dev) { return unsigned(std::min<int64_t>(N, int64_t(sm_count(dev)) * 16)); }

}  // namespace ce_detail

inline ops::CrossEntropyCudaResult cross_entropy_forward(const Tensor& logits_in, const Tensor& targets_in,
                                                         int64_t ignore_index, ops::CrossEntropyDivisor mode,
                                                         double normalizer) {
  using namespace ce_detail;
  Tensor logits = logits_in.detach().contiguous(), targets = dense_as(targets_in, DType::i64);
  const int64_t N = logits.size(0), V = logits.size(1);
  const DType ct = ops::compute_dtype(logits.dtype());
  const Device device = logits.device();
  ops::CrossEntropyCudaResult res;
  res.lse = Tensor::empty({N}, ct, device);
  res.row_loss = Tensor::empty({N}, ct, device);
  res.loss = Tensor::empty({}, ct, device);
  res.divisor = Tensor::empty({}, DType::f64, device);
  const int dev = device.index;
  DeviceGuard guard(dev);
  dispatch_float(logits.dtype(), "cross_entropy", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    if (N > 0) {
      forward_kernel<T><<<row_blocks(N, dev), 512, 0, current_stream()>>>(
          data_as<C>(res.lse), data_as<C>(res.row_loss), data_as<const T>(logits), data_as<const int64_t>(targets), N, V,
          ignore_index);
      check_launch();
    }
    finalize_kernel<C><<<1, 1024, 0, current_stream()>>>(data_as<C>(res.loss), data_as<double>(res.divisor),
                                                          data_as<const C>(res.row_loss), data_as<const int64_t>(targets),
                                                          N, V, ignore_index, mode, normalizer);
    check_launch();
  });
  return res;
}

inline Tensor cross_entropy_backward(const Tensor& grad, const Tensor& divisor, const Tensor& logits_in,
                                     const Tensor& targets_in, const Tensor& lse_in, int64_t ignore_index) {
  using namespace ce_detail;
  Tensor logits = logits_in.detach().contiguous(), targets = dense_as(targets_in, DType::i64);
  const int64_t N = logits.size(0), V = logits.size(1);
  const DType ct = ops::compute_dtype(logits.dtype());
  TQ_CHECK(grad.numel() == 1 && divisor.numel() == 1, "cross_entropy backward: expected scalar gradient and divisor, got ",
           describe(grad), " and ", describe(divisor));
  Tensor g = dense_as(grad, ct), div = dense_as(divisor, DType::f64), lse = dense_as(lse_in, ct);
  Tensor out = Tensor::empty({N, V}, logits.dtype(), logits.device());
  if (out.numel() == 0) return out;
  const int dev = logits.device().index;
  DeviceGuard guard(dev);
  dispatch_float(logits.dtype(), "cross_entropy backward", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    backward_kernel<T><<<row_blocks(N, dev), 512, 0, current_stream()>>>(
        data_as<T>(out), data_as<const T>(logits), data_as<const C>(lse), data_as<const int64_t>(targets),
        data_as<const C>(g), data_as<const double>(div), N, V, ignore_index);
    check_launch();
  });
  return out;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_cross_entropy_kernels() {
  ops::CrossEntropyCudaKernels& k = ops::cuda_cross_entropy_kernels();
  k.forward = &cross_entropy_forward;
  k.backward = &cross_entropy_backward;
}

}  // namespace tq::cuda
