// Device Philox fill for random_tensor (the entry of cuda_random_kernels()).
//
// Invariants: element i of a draw at (seed, offset) is the same function of (seed, offset, i) as
// on the CPU (core/rng.hpp), so uniform and bernoulli tensors are bit-identical to the CPU's and
// normal ones agree to within the last bit of float (the device's double log/cos may differ from
// the host's in their last double bit). The affine maps are written with __dmul_rn/__dadd_rn so
// the compiler cannot fuse them into an FMA the CPU does not do.
// One thread evaluates one Philox block (4 words): 4 uniform/bernoulli elements or 2 normals.
#pragma once

#include "kernels/copy.cuh"
#include "tq/core/rng.hpp"

namespace tq::cuda {

template <class T>
__global__ void random_kernel(T* __restrict__ out, int64_t n, Distribution dist, uint64_t seed, uint64_t offset,
                              double a, double b, bool vec) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  if (dist == Distribution::normal) {
    // Element i uses words 2i and 2i+1 of the flagged stream: elements 2q and 2q+1 share block q.
    for (int64_t q = tid; 2 * q < n; q += stride) {
      const uint64_t c = uint64_t(q) | (uint64_t(1) << 60);
      uint32_t w[4] = {uint32_t(c), uint32_t(c >> 32), uint32_t(offset), uint32_t(offset >> 32)};
      Philox::block(w, k0, k1);
      Vec<T, 2> r;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        double u1 = (double(w[2 * h] >> 8) + 1.0) * (1.0 / 16777216.0);
        double u2 = double(w[2 * h + 1] >> 8) * (1.0 / 16777216.0);
        float z = float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
        r.v[h] = double_to<T>(__dadd_rn(a, __dmul_rn(b, double(z))));
      }
      if (vec && 2 * q + 1 < n) {
        reinterpret_cast<Vec<T, 2>*>(out)[q] = r;
      } else {
        for (int h = 0; h < 2 && 2 * q + h < n; ++h) out[2 * q + h] = r.v[h];
      }
    }
    return;
  }
  const double span = __dadd_rn(b, -a);
  for (int64_t q = tid; 4 * q < n; q += stride) {
    uint32_t w[4] = {uint32_t(q), uint32_t(uint64_t(q) >> 32), uint32_t(offset), uint32_t(offset >> 32)};
    Philox::block(w, k0, k1);
    Vec<T, 4> r;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const double u = double(float(w[h] >> 8) * (1.0f / 16777216.0f));
      const double v = dist == Distribution::uniform ? __dadd_rn(a, __dmul_rn(span, u)) : (u < a ? 1.0 : 0.0);
      r.v[h] = double_to<T>(v);
    }
    if (vec && 4 * q + 3 < n) {
      reinterpret_cast<Vec<T, 4>*>(out)[q] = r;
    } else {
      for (int h = 0; h < 4 && 4 * q + h < n; ++h) out[4 * q + h] = r.v[h];
    }
  }
}

inline Tensor random_fill(Distribution dist, const Shape& shape, uint64_t seed, uint64_t offset, double a, double b,
                          DType dtype, Device device) {
  if (!is_floating(dtype)) return random_fill(dist, shape, seed, offset, a, b, DType::f64, device).to(dtype);
  Tensor out = Tensor::empty(shape, dtype, device);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int dev = device.index;
  DeviceGuard guard(dev);
  const int64_t per = dist == Distribution::normal ? 2 : 4;
  const unsigned blocks = grid_for((n + per - 1) / per, kThreads, dev);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(out.data_ptr());
    random_kernel<T><<<blocks, kThreads, 0, current_stream()>>>(p, n, dist, seed, offset, a, b,
                                                                  aligned_to(p, sizeof(T) * size_t(per)));
    check_launch();
  };
  switch (dtype) {
    case DType::f32: launch(float{}); break;
    case DType::f64: launch(double{}); break;
    case DType::bf16: launch(::tq::bf16{}); break;
    case DType::f16: launch(::tq::f16{}); break;
    default: fail(str_cat("random_tensor: unsupported dtype ", dtype_name(dtype)));
  }
  return out;
}

}  // namespace tq::cuda
