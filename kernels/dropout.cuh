// CUDA dropout (the entry of ops::cuda_dropout_kernels()); backward is the same kernel on the
// gradient, since the mask is regenerated from (seed, offset).
//
// Invariants (the CPU reference in ops/dropout.hpp is the contract):
// - Element i is dropped exactly when Philox::uniform(seed, offset, i) < p, compared in double —
//   the same host/device function of (seed, offset, i) the CPU evaluates, so the mask is
//   bit-identical to the CPU's. One thread evaluates one Philox block: elements 4q … 4q+3.
// - Kept elements are x·(1/(1 − p)) with the scale computed on the host in the compute dtype as
//   the CPU does, one multiply (no FMA) and one rounding; dropped ones are +0.
// - The mask is never materialized; x is read once and out written once. No host synchronization.
#pragma once

#include "kernels/ops_common.cuh"
#include "tq/ops/dropout.hpp"

namespace tq::cuda {

// out (n) = dropout(x (n)), dense.
template <class T>
__global__ void dropout_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t n, double p, compute_t<T> scale,
                               uint64_t seed, uint64_t offset, bool vec) {
  using C = compute_t<T>;
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; 4 * q < n; q += int64_t(gridDim.x) * blockDim.x) {
    // The counter of element i is (i / 4, i / 2³⁴, offset): word i % 4 of block q = i / 4.
    uint32_t w[4] = {uint32_t(q), uint32_t(uint64_t(q) >> 32), uint32_t(offset), uint32_t(offset >> 32)};
    Philox::block(w, k0, k1);
    const bool whole = vec && 4 * q + 3 < n;
    Vec<T, 4> xv, ov;
    if (whole) xv = reinterpret_cast<const Vec<T, 4>*>(x)[q];
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int64_t i = 4 * q + h;
      if (!whole && i >= n) break;
      const T xi = whole ? xv.v[h] : x[i];
      const float u = float(w[h] >> 8) * (1.0f / 16777216.0f);
      ov.v[h] = convert<T>(double(u) < p ? C(0) : mul_rn(convert<C>(xi), scale));
      if (!whole) out[i] = ov.v[h];
    }
    if (whole) reinterpret_cast<Vec<T, 4>*>(out)[q] = ov;
  }
}

inline Tensor dropout_apply(const Tensor& x_in, double p, uint64_t seed, uint64_t offset) {
  Tensor x = x_in.detach().contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  dispatch_float(x.dtype(), "dropout", [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    const C scale = p < 1.0 ? C(1) / (C(1) - C(p)) : C(0);
    T* po = data_as<T>(out);
    const T* px = data_as<const T>(x);
    const bool vec = aligned_to(po, 4 * sizeof(T)) && aligned_to(px, 4 * sizeof(T));
    dropout_kernel<T><<<grid_for((n + 3) / 4, kThreads, dev), kThreads, 0, current_stream()>>>(po, px, n, p, scale, seed,
                                                                                              offset, vec);
    check_launch();
  });
  return out;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_dropout_kernels() { ops::cuda_dropout_kernels().apply = &dropout_apply; }

}  // namespace tq::cuda
