// softmax and log_softmax over one dimension.
//
// Invariants: the row max is subtracted before exponentiating (no overflow for large logits);
// bf16/f16/f32 inputs are computed in fp32 and rounded once on output (HF's eager attention runs
// softmax in fp32); f64 runs in double. Backward uses only the saved output y:
//   softmax:     gx = y ⊙ (g − Σ g⊙y)
//   log_softmax: gx = g − exp(y) ⊙ Σ g
// so the input need not be kept alive.
#pragma once


#include <cmath>
#include <limits>

#include "tq/ops/shape_ops.hpp"  // detail::split_at

namespace tq {

namespace ops {

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/softmax.cuh); empty in a CPU-only
// program. `dim` arrives wrapped (non-negative).
struct SoftmaxCudaKernels {
  Tensor (*forward)(const Tensor& x, int64_t dim, bool log) = nullptr;
  Tensor (*backward)(const Tensor& grad_out, const Tensor& y, int64_t dim, bool log) = nullptr;
};
inline SoftmaxCudaKernels& cuda_softmax_kernels() {
  static SoftmaxCudaKernels k;
  return k;
}

namespace detail {

template <class C>
void softmax_rows(const C* x, C* y, DimSplit s, bool log) {
  parallel_for(s.outer * s.inner, std::max<int64_t>(1, 4096 / std::max<int64_t>(s.n, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t base = (r / s.inner) * s.n * s.inner + r % s.inner;
      C m = -std::numeric_limits<C>::infinity();
      for (int64_t j = 0; j < s.n; ++j) m = std::max(m, x[base + j * s.inner]);
      C sum = 0;
      for (int64_t j = 0; j < s.n; ++j) sum += std::exp(x[base + j * s.inner] - m);
      if (log) {
        const C lse = m + std::log(sum);
        for (int64_t j = 0; j < s.n; ++j) y[base + j * s.inner] = x[base + j * s.inner] - lse;
      } else {
        const C inv = C(1) / sum;
        for (int64_t j = 0; j < s.n; ++j) y[base + j * s.inner] = std::exp(x[base + j * s.inner] - m) * inv;
      }
    }
  });
}

template <class C>
void softmax_backward_rows(const C* g, const C* y, C* gx, DimSplit s, bool log) {
  parallel_for(s.outer * s.inner, std::max<int64_t>(1, 4096 / std::max<int64_t>(s.n, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t base = (r / s.inner) * s.n * s.inner + r % s.inner;
      C dot = 0;
      for (int64_t j = 0; j < s.n; ++j) {
        const int64_t k = base + j * s.inner;
        dot += log ? g[k] : g[k] * y[k];
      }
      for (int64_t j = 0; j < s.n; ++j) {
        const int64_t k = base + j * s.inner;
        gx[k] = log ? g[k] - std::exp(y[k]) * dot : y[k] * (g[k] - dot);
      }
    }
  });
}

}  // namespace detail

// y = softmax(x) (or log_softmax) along `dim`, in x's dtype.
inline Tensor softmax(const Tensor& x, int64_t dim, bool log = false) {
  const char* op = log ? "log_softmax" : "softmax";
  require_float(op, x);
  dim = wrap_dim(dim, std::max<int64_t>(x.dim(), 1), op);
  if (x.device().is_cuda()) return call_cuda(cuda_softmax_kernels().forward, op, x, dim, log);
  require_cpu(op, x);
  const DType ct = compute_dtype(x.dtype());
  Tensor xc = dense(x, ct);
  Tensor y = Tensor::empty(x.shape(), ct);
  const auto s = detail::split_at(x.shape(), dim);
  TQ_DISPATCH_FLOAT(ct, C, detail::softmax_rows<C>(xc.data<C>(), y.data<C>(), s, log));
  return y.to(x.dtype());
}

// Gradient wrt x of softmax / log_softmax given the forward output y, in y's dtype.
inline Tensor softmax_backward(const Tensor& grad_out, const Tensor& y, int64_t dim, bool log = false) {
  const char* op = log ? "log_softmax backward" : "softmax backward";
  require_same_device(op, grad_out, y);
  require_float(op, grad_out, y);
  TQ_CHECK(grad_out.shape() == y.shape(), op, ": gradient ", describe(grad_out), " does not match output ", describe(y));
  dim = wrap_dim(dim, std::max<int64_t>(y.dim(), 1), op);
  if (y.device().is_cuda()) return call_cuda(cuda_softmax_kernels().backward, op, grad_out, y, dim, log);
  require_cpu(op, grad_out, y);
  const DType ct = compute_dtype(y.dtype());
  Tensor gc = dense(grad_out, ct), yc = dense(y, ct);
  Tensor gx = Tensor::empty(y.shape(), ct);
  const auto s = detail::split_at(y.shape(), dim);
  TQ_DISPATCH_FLOAT(ct, C, detail::softmax_backward_rows<C>(gc.data<C>(), yc.data<C>(), gx.data<C>(), s, log));
  return gx.to(y.dtype());
}

}  // namespace ops

// ---- differentiable wrappers ----

inline Tensor softmax(const Tensor& x, int64_t dim) {
  Tensor y = ops::softmax(x, dim, false);
  Tensor yd = y.detach();
  return record("softmax", y, {x}, [yd, dim](const Tensor& g) {
    return std::vector<Tensor>{ops::softmax_backward(g, yd, dim, false)};
  });
}

inline Tensor log_softmax(const Tensor& x, int64_t dim) {
  Tensor y = ops::softmax(x, dim, true);
  Tensor yd = y.detach();
  return record("log_softmax", y, {x}, [yd, dim](const Tensor& g) {
    return std::vector<Tensor>{ops::softmax_backward(g, yd, dim, true)};
  });
}

}  // namespace tq
