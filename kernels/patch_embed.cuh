// CUDA patch gather/scatter for patch_embed (the entries of ops::cuda_patch_embed_kernels()): the
// im2col of a stride = kernel conv and its inverse. The products themselves run in ops::matmul /
// linear (our GEMM) — see ops/conv.hpp.
//
// Invariants:
// - Pure data movement in the pixels' dtype (raw bits): patches (B·N, C·P·P), row r = (b, patch
//   row, patch col), column (c, i, j) = c·P² + i·P + j, exactly ops::detail::patches_copy's layout.
// - stride = kernel, so every pixel belongs to at most one patch: the inverse writes every pixel
//   exactly once (0 where no patch covers it), with no accumulation and no zero-fill pass.
// - One thread per output element, index arithmetic only; no host synchronization.
#pragma once

#include "kernels/ops_common.cuh"
#include "tq/ops/conv.hpp"

namespace tq::cuda {

namespace patch_detail {

struct Geom {
  int64_t B, C, H, W, P, Nh, Nw;
  __host__ __device__ int64_t N() const { return Nh * Nw; }
  __host__ __device__ int64_t K() const { return C * P * P; }
};

// patches (B·N, K) from pixels (B, C, H, W).
template <class U>
__global__ void to_patches_kernel(U* __restrict__ patches, const U* __restrict__ pixels, Geom g) {
  const int64_t total = g.B * g.N() * g.K();
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / g.K(), k = idx - r * g.K();
    const int64_t b = r / g.N(), p = r - b * g.N(), prow = p / g.Nw, pcol = p - prow * g.Nw;
    const int64_t c = k / (g.P * g.P), ij = k - c * g.P * g.P, i = ij / g.P, j = ij - i * g.P;
    patches[idx] = pixels[((b * g.C + c) * g.H + prow * g.P + i) * g.W + pcol * g.P + j];
  }
}

// pixels (B, C, H, W) from patches (B·N, K); pixels outside the Nh·P × Nw·P patch grid are 0.
template <class U>
__global__ void from_patches_kernel(U* __restrict__ pixels, const U* __restrict__ patches, Geom g) {
  const int64_t total = g.B * g.C * g.H * g.W;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = idx % g.W, h = (idx / g.W) % g.H, c = (idx / (g.W * g.H)) % g.C, b = idx / (g.W * g.H * g.C);
    const int64_t prow = h / g.P, pcol = w / g.P;
    if (prow >= g.Nh || pcol >= g.Nw) {
      pixels[idx] = U{};
      continue;
    }
    const int64_t i = h - prow * g.P, j = w - pcol * g.P;
    const int64_t r = b * g.N() + prow * g.Nw + pcol, k = (c * g.P + i) * g.P + j;
    pixels[idx] = patches[r * g.K() + k];
  }
}

template <class F>
void with_element_bits(DType dt, F&& f) {
  switch (dtype_size(dt)) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: fail(str_cat("patch_embed: unsupported dtype ", dtype_name(dt)));
  }
}

}  // namespace patch_detail

inline Tensor to_patches(const Tensor& pixels_in, int64_t P) {
  using namespace patch_detail;
  Tensor pixels = pixels_in.detach().contiguous();
  const Geom g{pixels.size(0), pixels.size(1), pixels.size(2), pixels.size(3), P, pixels.size(2) / P, pixels.size(3) / P};
  Tensor patches = Tensor::empty({g.B * g.N(), g.K()}, pixels.dtype(), pixels.device());
  const int64_t total = patches.numel();
  if (total == 0) return patches;
  const int dev = pixels.device().index;
  DeviceGuard guard(dev);
  with_element_bits(pixels.dtype(), [&](auto tag) {
    using U = decltype(tag);
    to_patches_kernel<U><<<grid_for(total, kThreads, dev), kThreads, 0, current_stream()>>>(
        data_as<U>(patches), data_as<const U>(pixels), g);
    check_launch();
  });
  return patches;
}

inline Tensor from_patches(const Tensor& patches_in, const Shape& pixel_shape, int64_t P) {
  using namespace patch_detail;
  Tensor patches = patches_in.detach().contiguous();
  const Geom g{pixel_shape[0], pixel_shape[1], pixel_shape[2], pixel_shape[3], P, pixel_shape[2] / P, pixel_shape[3] / P};
  TQ_CHECK(patches.dim() == 2 && patches.size(0) == g.B * g.N() && patches.size(1) == g.K(),
           "patch_embed backward: patch gradient ", describe(patches), " does not match pixels ", pixel_shape);
  Tensor pixels = Tensor::empty(pixel_shape, patches.dtype(), patches.device());
  const int64_t total = pixels.numel();
  if (total == 0) return pixels;
  const int dev = patches.device().index;
  DeviceGuard guard(dev);
  with_element_bits(patches.dtype(), [&](auto tag) {
    using U = decltype(tag);
    from_patches_kernel<U><<<grid_for(total, kThreads, dev), kThreads, 0, current_stream()>>>(
        data_as<U>(pixels), data_as<const U>(patches), g);
    check_launch();
  });
  return pixels;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_patch_embed_kernels() {
  ops::PatchEmbedCudaKernels& k = ops::cuda_patch_embed_kernels();
  k.to_patches = &to_patches;
  k.from_patches = &from_patches;
}

}  // namespace tq::cuda
