// Helpers for the GPU GEMM tests and benchmarks: device buffers, random bf16 fill on the device
// (fresh seed per call), poisoning, and the GPU-presence check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <vector>

#include <kernels/cuda_check.cuh>

namespace tq::testing {

inline bool gpu_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (bytes) TQ_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~DevBuf() {
    if (ptr_) cudaFree(ptr_);
  }
  DevBuf(DevBuf&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  template <class T = void>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

__device__ inline uint32_t hash_u32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Uniform in [-scale, scale), rounded to bf16.
__global__ void fill_uniform_bf16_kernel(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float u = hash_u32(seed * 0x9E3779B97F4A7C15ull + i) * (1.0f / 4294967296.0f);
    p[i] = __float2bfloat16((2.0f * u - 1.0f) * scale);
  }
}
__global__ void fill_uniform_f32_kernel(float* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float u = hash_u32(seed * 0x9E3779B97F4A7C15ull + i) * (1.0f / 4294967296.0f);
    p[i] = (2.0f * u - 1.0f) * scale;
  }
}

inline uint64_t fresh_seed() {
  static std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

inline void fill_bf16(void* p, size_t n, uint64_t seed, float scale = 1.0f) {
  fill_uniform_bf16_kernel<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), n, seed, scale);
  TQ_CUDA_CHECK_LAUNCH();
}
inline void fill_f32(void* p, size_t n, uint64_t seed, float scale = 1.0f) {
  fill_uniform_f32_kernel<<<1024, 256>>>(static_cast<float*>(p), n, seed, scale);
  TQ_CUDA_CHECK_LAUNCH();
}
// All-ones bytes: NaN in both bf16 and fp32, so an unwritten output element cannot pass.
inline void poison(void* p, size_t bytes) { TQ_CUDA_CHECK(cudaMemset(p, 0xFF, bytes)); }

inline std::vector<float> to_host_f32(const void* dev, size_t n, bool is_f32) {
  std::vector<float> out(n);
  if (is_f32) {
    TQ_CUDA_CHECK(cudaMemcpy(out.data(), dev, n * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<__nv_bfloat16> h(n);
    TQ_CUDA_CHECK(cudaMemcpy(h.data(), dev, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(h[i]);
  }
  return out;
}

}  // namespace tq::testing
