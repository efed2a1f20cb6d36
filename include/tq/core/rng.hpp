// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11).
//
// Element i of a draw made at (seed, offset) uses the 128-bit counter
// (i / 4, 0, offset_lo, offset_hi) under key (seed_lo, seed_hi) and takes output word i % 4.
// Nothing depends on thread scheduling, so CPU and CUDA produce the same numbers for the same
// (seed, offset): the CUDA kernels evaluate the same function (philox4x32_10 is host+device).
// A Generator hands out offsets so successive draws never reuse counters.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "tq/core/tensor.hpp"


namespace tq {

struct Philox {
  static constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  static constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

  TQ_HOST_DEVICE static inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
    uint64_t p = uint64_t(a) * uint64_t(b);
    hi = uint32_t(p >> 32);
    lo = uint32_t(p);
  }
  // Ten rounds over counter c with key k.
  TQ_HOST_DEVICE static inline void block(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
      uint32_t hi0, lo0, hi1, lo1;
      mulhilo(kM0, c[0], hi0, lo0);
      mulhilo(kM1, c[2], hi1, lo1);
      uint32_t n0 = hi1 ^ c[1] ^ k0, n1 = lo1, n2 = hi0 ^ c[3] ^ k1, n3 = lo0;
      c[0] = n0; c[1] = n1; c[2] = n2; c[3] = n3;
      k0 += kW0;
      k1 += kW1;
    }
  }
  // The 32-bit word for element i of the draw at (seed, offset).
  TQ_HOST_DEVICE static inline uint32_t word(uint64_t seed, uint64_t offset, uint64_t i) {
    uint32_t c[4] = {uint32_t(i >> 2), uint32_t(i >> 34), uint32_t(offset), uint32_t(offset >> 32)};
    block(c, uint32_t(seed), uint32_t(seed >> 32));
    return c[i & 3];
  }
  // Uniform in [0, 1) with 24 random bits (exactly representable in float).
  TQ_HOST_DEVICE static inline float uniform(uint64_t seed, uint64_t offset, uint64_t i) {
    return float(word(seed, offset, i) >> 8) * (1.0f / 16777216.0f);
  }
  // Standard normal for element i: Box–Muller on the words of elements 2·i and 2·i + 1 of a
  // separate stream (the counter's high word is flagged), evaluated in double for portability.
  TQ_HOST_DEVICE static inline float normal(uint64_t seed, uint64_t offset, uint64_t i) {
    uint64_t j = (i << 1) | (uint64_t(1) << 62);
    double u1 = (double(word(seed, offset, j) >> 8) + 1.0) * (1.0 / 16777216.0);  // (0, 1]
    double u2 = double(word(seed, offset, j + 1) >> 8) * (1.0 / 16777216.0);
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

// Seeded source of fresh (seed, offset) pairs.
class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_offset(uint64_t o) { offset_ = o; }
  // Reserves one draw and returns its offset.
  uint64_t next() { return offset_++; }

 private:
  uint64_t seed_;
  uint64_t offset_ = 0;
};

enum class Distribution { uniform, normal, bernoulli };

// CUDA entry point, filled in by <tq/cuda.hpp> (kernels/random.cuh).
struct RandomCudaKernels {
  Tensor (*fill)(Distribution, const Shape&, uint64_t seed, uint64_t offset, double a, double b, DType, Device) = nullptr;
};
inline RandomCudaKernels& cuda_random_kernels() {
  static RandomCudaKernels k;
  return k;
}

// Fills a new tensor of `shape` on `device` from the draw (seed, offset). uniform: lo + (hi-lo)·u;
// normal: mean + std·z; bernoulli: 1 with probability p (u < p), else 0. The same (seed, offset)
// gives the same numbers on every device (normal: to within the last bit of float).
inline Tensor random_tensor(Distribution dist, const Shape& shape, uint64_t seed, uint64_t offset, double a, double b,
                            DType dtype = DType::f32, Device device = Device::cpu()) {
  if (device.is_cuda()) {
    auto fill = cuda_random_kernels().fill;
    TQ_CHECK(fill != nullptr, "random_tensor: no CUDA kernel is available for ", device.str(),
             " in this program (include <tq/cuda.hpp> in one CUDA translation unit)");
    return fill(dist, shape, seed, offset, a, b, dtype, device);
  }
  Tensor t = Tensor::empty(shape, DType::f64);
  double* p = t.data<double>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (dist) {
      case Distribution::uniform: p[i] = a + (b - a) * double(Philox::uniform(seed, offset, uint64_t(i))); break;
      case Distribution::normal: p[i] = a + b * double(Philox::normal(seed, offset, uint64_t(i))); break;
      case Distribution::bernoulli: p[i] = double(Philox::uniform(seed, offset, uint64_t(i))) < a ? 1.0 : 0.0; break;
    }
  }
  return t.to(dtype);
}

inline Tensor rand(const Shape& shape, Generator& g, DType dtype = DType::f32, double lo = 0.0, double hi = 1.0,
                   Device device = Device::cpu()) {
  return random_tensor(Distribution::uniform, shape, g.seed(), g.next(), lo, hi, dtype, device);
}
inline Tensor randn(const Shape& shape, Generator& g, DType dtype = DType::f32, double mean = 0.0, double std = 1.0,
                    Device device = Device::cpu()) {
  return random_tensor(Distribution::normal, shape, g.seed(), g.next(), mean, std, dtype, device);
}
inline Tensor bernoulli(const Shape& shape, double p, Generator& g, DType dtype = DType::f32,
                        Device device = Device::cpu()) {
  return random_tensor(Distribution::bernoulli, shape, g.seed(), g.next(), p, 0.0, dtype, device);
}

}  // namespace tq
