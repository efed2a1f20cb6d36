// CUDA multi-tensor AdamW step and gradient-norm clipping (the entries of
// optim::cuda_adamw_kernels()).
//
// Invariants:
// - A launch covers up to kMaxTensors tensors, described in the kernel's parameter block (no
//   device metadata buffers, no host→device copies: graph-capturable). Each CTA owns one chunk of
//   kChunk elements of one tensor and finds it by binary search over the chunk prefix sums.
// - AdamW performs the CPU loop's fp32 operations (detail::adamw_update_cpu) in the same order with
//   IEEE intrinsics (__fmul_rn, __fadd_rn, __fsub_rn, __fsqrt_rn, __fdiv_rn), so nothing is
//   contracted into an FMA and each element's update equals the CPU's bit for bit.
// - clip_grad_norm accumulates squares in fp32 (torch's _foreach_norm for fp32 grads): per-thread
//   sums, a fixed block tree into one partial per chunk, the chunk partials of a tensor summed in a
//   fixed order, norm = sqrt; the total = sqrt(Σ norm²) and the coefficient min(1, max_norm ·
//   1/(total + 1e-6)) (torch computes max_norm / t as t.reciprocal() · max_norm) are computed on
//   the device and the scale reads the coefficient from device memory. Deterministic (no atomics);
//   the only host synchronization is reading back the total.
// The kernels that are not otherwise templates are templates on an unused parameter: every
// translation unit that includes this header may instantiate them (a plain __global__ definition
// in a header is a duplicate symbol at link time).
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "kernels/copy.cuh"
#include "tq/optim/adamw.hpp"

namespace tq::cuda {

namespace adamw {

constexpr int kMaxTensors = 256;      // tensors per launch (the parameter block stays ~16 KB)
constexpr int kBlock = 256;           // threads per CTA
constexpr int kPerThread = 16;        // elements per thread per chunk
constexpr int kChunk = kBlock * kPerThread;
constexpr int kUnroll = 4;            // elements in flight per thread per array
static_assert(kPerThread % kUnroll == 0, "whole unrolled rounds per chunk");

// Up to kMaxTensors dense f32 tensors of one launch. AdamW: a = θ, b = g, c = m, d = v (and the
// per-tensor scalars); clipping: a = the gradient.
struct TensorBatch {
  int count = 0;
  int64_t chunk_start[kMaxTensors + 1];  // prefix sums of ceil(n / kChunk); chunk_start[count] = CTAs
  int64_t n[kMaxTensors];
  float* a[kMaxTensors];
  float* b[kMaxTensors];
  float* c[kMaxTensors];
  float* d[kMaxTensors];
  float decay[kMaxTensors], step_size[kMaxTensors], bc2_sqrt[kMaxTensors];
};

// The tensor whose chunks contain CTA `blk` (chunk_start[i] <= blk < chunk_start[i + 1]).
__device__ __forceinline__ int tensor_of_block(const TensorBatch& tb, int64_t blk) {
  int lo = 0, hi = tb.count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tb.chunk_start[mid] <= blk) lo = mid;
    else hi = mid;
  }
  return lo;
}

// θ, m, v updated in place; w1 = 1−β1, b2 = β2, w2 = 1−β2 and eps are the same for every tensor.
template <class = void>
__global__ void __launch_bounds__(kBlock) adamw_kernel(TensorBatch tb, float w1, float b2, float w2, float eps) {
  const int i = tensor_of_block(tb, blockIdx.x);
  const int64_t base = (int64_t(blockIdx.x) - tb.chunk_start[i]) * kChunk;
  const int64_t n = tb.n[i];
  float* __restrict__ p = tb.a[i];        // (n) θ
  const float* __restrict__ g = tb.b[i];  // (n) gradient
  float* __restrict__ m = tb.c[i];        // (n) exp_avg
  float* __restrict__ v = tb.d[i];        // (n) exp_avg_sq
  const float decay = tb.decay[i], ss = tb.step_size[i], bc2s = tb.bc2_sqrt[i];
  for (int r = 0; r < kPerThread; r += kUnroll) {
    float pr[kUnroll], gr[kUnroll], mr[kUnroll], vr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + int64_t(r + u) * kBlock + threadIdx.x;
      if (e < n) pr[u] = p[e], gr[u] = g[e], mr[u] = m[e], vr[u] = v[e];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + int64_t(r + u) * kBlock + threadIdx.x;
      if (e >= n) continue;
      float pe = __fmul_rn(pr[u], decay);
      const float me = __fadd_rn(mr[u], __fmul_rn(w1, __fsub_rn(gr[u], mr[u])));
      const float ve = __fadd_rn(__fmul_rn(vr[u], b2), __fmul_rn(w2, __fmul_rn(gr[u], gr[u])));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(ve), bc2s), eps);
      pe = __fsub_rn(pe, __fmul_rn(ss, __fdiv_rn(me, denom)));
      p[e] = pe;
      m[e] = me;
      v[e] = ve;
    }
  }
}

// partial[blockIdx.x] = Σ g² over this CTA's chunk (fp32, fixed reduction tree).
template <class = void>
__global__ void __launch_bounds__(kBlock) sum_squares_kernel(TensorBatch tb, float* __restrict__ partial) {
  __shared__ float warp_sum[kBlock / 32];
  const int i = tensor_of_block(tb, blockIdx.x);
  const int64_t base = (int64_t(blockIdx.x) - tb.chunk_start[i]) * kChunk;
  const int64_t n = tb.n[i];
  const float* __restrict__ g = tb.a[i];
  float s = 0.0f;
#pragma unroll 4
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t e = base + int64_t(r) * kBlock + threadIdx.x;
    if (e < n) s = fmaf(g[e], g[e], s);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int w = 0; w < kBlock / 32; ++w) t += warp_sum[w];
    partial[blockIdx.x] = t;
  }
}

// norms[i] = sqrt(Σ of tensor i's chunk partials): one warp per tensor, lane-strided partials then a
// shuffle tree. partial is this launch's slice (indexed by its chunk numbers).
template <class = void>
__global__ void tensor_norms_kernel(TensorBatch tb, const float* __restrict__ partial, float* __restrict__ norms) {
  const int lane = int(threadIdx.x & 31);
  const int i = int((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);
  if (i >= tb.count) return;  // whole warps leave together
  float s = 0.0f;
  for (int64_t c = tb.chunk_start[i] + lane; c < tb.chunk_start[i + 1]; c += 32) s += partial[c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) norms[i] = sqrtf(s);
}

// out[0] = total = sqrt(Σ norms²), out[1] = clip coefficient (one block).
template <class = void>
__global__ void clip_coefficient_kernel(const float* __restrict__ norms, int64_t count, float max_norm,
                                        float* __restrict__ out) {
  __shared__ float warp_sum[kBlock / 32];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += kBlock) s = fmaf(norms[i], norms[i], s);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int w = 0; w < kBlock / 32; ++w) t += warp_sum[w];
    const float total = sqrtf(t);
    const float coef = __fmul_rn(__frcp_rn(__fadd_rn(total, 1e-6f)), max_norm);
    out[0] = total;
    out[1] = fminf(coef, 1.0f);
  }
}

// g *= coef[0] for every gradient of the batch.
template <class = void>
__global__ void __launch_bounds__(kBlock) scale_kernel(TensorBatch tb, const float* __restrict__ coef) {
  const int i = tensor_of_block(tb, blockIdx.x);
  const int64_t base = (int64_t(blockIdx.x) - tb.chunk_start[i]) * kChunk;
  const int64_t n = tb.n[i];
  float* __restrict__ g = tb.a[i];
  const float c = coef[0];
#pragma unroll 4
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t e = base + int64_t(r) * kBlock + threadIdx.x;
    if (e < n) g[e] = __fmul_rn(g[e], c);
  }
}

// ---- host side ----

// Splits `count` items into batches of at most kMaxTensors that share one device, skipping empty
// tensors; `fill(batch, slot, item)` sets a slot's pointers. Calls `run(batch, device)` per batch.
template <class Fill, class Run>
void for_each_batch(size_t count, const std::function<const Tensor&(size_t)>& tensor_of, Fill fill, Run run) {
  auto batch = std::make_unique<TensorBatch>();
  int device = -1;
  auto flush = [&] {
    if (batch->count > 0) run(*batch, device);
    batch = std::make_unique<TensorBatch>();
  };
  for (size_t k = 0; k < count; ++k) {
    const Tensor& t = tensor_of(k);
    if (t.numel() == 0) continue;
    if (batch->count == kMaxTensors || (batch->count > 0 && t.device().index != device)) flush();
    device = t.device().index;
    const int s = batch->count++;
    if (s == 0) batch->chunk_start[0] = 0;
    batch->n[s] = t.numel();
    batch->chunk_start[s + 1] = batch->chunk_start[s] + (t.numel() + kChunk - 1) / kChunk;
    fill(*batch, s, k);
  }
  flush();
}

inline void require_dense_f32(const Tensor& t, const Tensor& like, const char* what, const char* op) {
  TQ_CHECK(t.defined() && t.device().is_cuda() && t.dtype() == DType::f32 && t.is_contiguous() &&
               t.shape() == like.shape() && t.device() == like.device(),
           op, ": ", what, " ", describe(t), " must be a dense f32 CUDA tensor like the parameter ", describe(like));
}

inline void multi_step(const std::vector<optim::AdamWTensorStep>& items) {
  if (items.empty()) return;
  const optim::AdamWScalars& s0 = items[0].scalars;
  for (const optim::AdamWTensorStep& it : items) {
    require_dense_f32(it.param, it.param, "parameter", "AdamW");
    require_dense_f32(it.grad, it.param, "gradient", "AdamW");
    require_dense_f32(it.m, it.param, "exp_avg", "AdamW");
    require_dense_f32(it.v, it.param, "exp_avg_sq", "AdamW");
    const optim::AdamWScalars& s = it.scalars;
    TQ_CHECK(s.w1 == s0.w1 && s.b2 == s0.b2 && s.w2 == s0.w2 && s.eps == s0.eps,
             "AdamW: one fused step takes one set of betas and eps");
  }
  for_each_batch(
      items.size(), [&](size_t k) -> const Tensor& { return items[k].param; },
      [&](TensorBatch& b, int slot, size_t k) {
        const optim::AdamWTensorStep& it = items[k];
        b.a[slot] = it.param.data<float>();
        b.b[slot] = it.grad.data<float>();
        b.c[slot] = it.m.data<float>();
        b.d[slot] = it.v.data<float>();
        b.decay[slot] = it.scalars.decay;
        b.step_size[slot] = it.scalars.step_size;
        b.bc2_sqrt[slot] = it.scalars.bc2_sqrt;
      },
      [&](const TensorBatch& b, int device) {
        DeviceGuard guard(device);
        const int64_t ctas = b.chunk_start[b.count];
        TQ_CHECK(ctas <= int64_t(INT32_MAX), "AdamW: too many elements in one launch");
        adamw_kernel<><<<unsigned(ctas), kBlock, 0, current_stream()>>>(b, s0.w1, s0.b2, s0.w2, s0.eps);
        check_launch();
      });
}

// The single-parameter entry (kept for callers that step one tensor).
inline void step_one(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr, double wd,
                     double beta1, double beta2, double eps, double step_size, double bc2_sqrt) {
  multi_step({{param, grad, m, v, optim::adamw_scalars(lr, wd, beta1, beta2, eps, step_size, bc2_sqrt)}});
}

inline double clip_grad_norm(const std::vector<Tensor>& grads, double max_norm) {
  if (grads.empty()) return 0.0;
  const Device dev = grads[0].device();
  int64_t chunks = 0, nonempty = 0;
  for (const Tensor& g : grads) {
    require_dense_f32(g, g, "gradient", "clip_grad_norm");
    TQ_CHECK(g.device() == dev, "clip_grad_norm: gradients on ", dev.str(), " and ", g.device().str());
    chunks += (g.numel() + kChunk - 1) / kChunk;
    nonempty += g.numel() > 0;
  }
  if (nonempty == 0) return 0.0;
  DeviceGuard guard(dev.index);
  cudaStream_t st = current_stream();
  Tensor partial = Tensor::empty({chunks}, DType::f32, dev);  // one sum of squares per chunk
  Tensor norms = Tensor::empty({nonempty}, DType::f32, dev);  // one norm per non-empty gradient, in order
  Tensor result = Tensor::empty({2}, DType::f32, dev);        // total, coefficient
  std::vector<std::unique_ptr<TensorBatch>> batches;
  for_each_batch(
      grads.size(), [&](size_t k) -> const Tensor& { return grads[k]; },
      [&](TensorBatch& b, int slot, size_t k) { b.a[slot] = grads[k].data<float>(); },
      [&](const TensorBatch& b, int) { batches.push_back(std::make_unique<TensorBatch>(b)); });
  int64_t chunk_base = 0, norm_base = 0;
  for (const auto& b : batches) {
    const int64_t ctas = b->chunk_start[b->count];
    sum_squares_kernel<><<<unsigned(ctas), kBlock, 0, st>>>(*b, partial.data<float>() + chunk_base);
    check_launch();
    tensor_norms_kernel<><<<unsigned((b->count + 7) / 8), kBlock, 0, st>>>(*b, partial.data<float>() + chunk_base,
                                                                         norms.data<float>() + norm_base);
    check_launch();
    chunk_base += ctas;
    norm_base += b->count;
  }
  clip_coefficient_kernel<><<<1, kBlock, 0, st>>>(norms.data<float>(), nonempty, float(max_norm), result.data<float>());
  check_launch();
  for (const auto& b : batches) {
    scale_kernel<><<<unsigned(b->chunk_start[b->count]), kBlock, 0, st>>>(*b, result.data<float>() + 1);
    check_launch();
  }
  return double(result.slice(0, 0, 1).item<float>());  // the one host read
}

}  // namespace adamw

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_adamw_kernels() {
  optim::AdamWCudaKernels& k = optim::cuda_adamw_kernels();
  k.step = &adamw::step_one;
  k.multi_step = &adamw::multi_step;
  k.clip_grad_norm = &adamw::clip_grad_norm;
}

}  // namespace tq::cuda
