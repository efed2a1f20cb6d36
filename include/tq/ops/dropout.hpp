// Dropout with a counter-based mask: element i (row-major over x's shape) is dropped exactly when
// Philox::uniform(seed, offset, i) < p, compared in double (u is a multiple of 2⁻²⁴, exact in
// double; comparing against float(p) would differ for some p), and kept elements are scaled by
// 1/(1 − p).
//
// The mask is a pure function of (seed, offset, i) — no state, no thread-order dependence — so
// the CUDA kernel reproduces it bit for bit, and backward regenerates it instead of storing it.
// The product x·scale is computed in fp32 (double for f64) and rounded once. Not training, or
// p = 0: the identity (the input itself is returned). p = 1 drops everything (zeros).
#pragma once


#include "tq/core/rng.hpp"
#include "tq/ops/matmul.hpp"

namespace tq {

namespace ops {

// CUDA entry point, filled in by <tq/cuda.hpp> (kernels/dropout.cuh); empty in a CPU-only program.
struct DropoutCudaKernels {
  Tensor (*apply)(const Tensor& x, double p, uint64_t seed, uint64_t offset) = nullptr;
};
inline DropoutCudaKernels& cuda_dropout_kernels() {
  static DropoutCudaKernels k;
  return k;
}

inline void check_dropout_p(double p) {
  TQ_CHECK(p >= 0.0 && p <= 1.0, "dropout: probability must be in [0, 1], got ", p);
}

// keep[i] = !(uniform(seed, offset, i) < p), as a bool tensor of `shape`.
inline Tensor dropout_mask(const Shape& shape, double p, uint64_t seed, uint64_t offset) {
  check_dropout_p(p);
  Tensor m = Tensor::empty(shape, DType::boolean);
  bool* pm = m.data<bool>();
  parallel_for(m.numel(), 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) pm[i] = !(Philox::uniform(seed, offset, uint64_t(i)) < p);
  });
  return m;
}

// out = x ⊙ keep / (1 − p), in x's dtype; used for both directions (backward passes grad_out).
inline Tensor dropout_apply(const char* op, const Tensor& x, double p, uint64_t seed, uint64_t offset) {
  require_float(op, x);
  check_dropout_p(p);
  if (x.device().is_cuda()) return call_cuda(cuda_dropout_kernels().apply, op, x, p, seed, offset);
  require_cpu(op, x);
  const DType ct = compute_dtype(x.dtype());
  Tensor xc = dense(x, ct), out = Tensor::empty(x.shape(), ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    const C scale = p < 1.0 ? C(1) / (C(1) - C(p)) : C(0);
    const C* px = xc.data<C>();
    C* o = out.data<C>();
    parallel_for(out.numel(), 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = Philox::uniform(seed, offset, uint64_t(i)) < p ? C(0) : px[i] * scale;
    });
  });
  return out.to(x.dtype());
}

inline Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, bool training = true) {
  check_dropout_p(p);
  if (!training || p == 0.0) return x;
  return dropout_apply("dropout", x, p, seed, offset);
}

inline Tensor dropout_backward(const Tensor& grad_out, double p, uint64_t seed, uint64_t offset) {
  return dropout_apply("dropout backward", grad_out, p, seed, offset);
}

}  // namespace ops

// ---- differentiable wrappers ----

inline Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, bool training = true) {
  ops::check_dropout_p(p);
  if (!training || p == 0.0) return x;
  Tensor out = ops::dropout_apply("dropout", x, p, seed, offset);
  return record("dropout", out, {x}, [=](const Tensor& g) {
    return std::vector<Tensor>{ops::dropout_backward(g, p, seed, offset)};
  });
}

// Draws a fresh offset from `gen` (only when dropout is active, so eval runs consume nothing).
inline Tensor dropout(const Tensor& x, double p, Generator& gen, bool training = true) {
  ops::check_dropout_p(p);
  if (!training || p == 0.0) return x;
  return dropout(x, p, gen.seed(), gen.next(), training);
}

}  // namespace tq
