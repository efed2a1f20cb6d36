// layer_norm and rms_norm over the last dimension, each one fused node with hand-written backward.
//
// Numerics follow HF (spec/paligemma.md §4, §5.3): bf16/f16/f32 inputs are normalized in fp32
// and rounded once to x's dtype at the end; f64 runs in double.
//   layer_norm: y = (x − mean) · rsqrt(var + eps) · w + b     (biased variance, SigLIP)
//   rms_norm:   y = x · rsqrt(mean(x²) + eps) · (offset + w)  (Gemma: offset = 1, in fp32 before
//               the downcast — HF PR #29402; offset = 0 is the plain Llama-style norm)
// weight and bias are optional (undefined = no affine part) and may have another float dtype
// than x (QLoRA keeps norms in fp32 next to bf16 activations); the output has x's dtype.
// Backward recomputes the row statistics from the saved x instead of storing them, and reduces
// the weight/bias gradients over rows in double (on CUDA: fp32 partial sums per block of rows,
// then a double sum of the partials, see kernels/norm.cuh).
#pragma once


#include <cmath>

#include "tq/ops/matmul.hpp"

namespace tq {

namespace ops {

// Gradients of both norms (see norm_backward).
struct NormGrads {
  Tensor x, weight, bias;
};

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/norm.cuh); empty in a CPU-only program.
// `center` selects layer norm (mean subtracted) over rms norm; `offset` is rms norm's weight offset.
struct NormCudaKernels {
  Tensor (*forward)(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, bool center,
                    double offset) = nullptr;
  NormGrads (*backward)(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                        bool center, double offset) = nullptr;
};
inline NormCudaKernels& cuda_norm_kernels() {
  static NormCudaKernels k;
  return k;
}

namespace detail {

inline void check_norm_args(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias) {
  require_same_device(op, x, weight, bias);
  require_float(op, x, weight, bias);
  TQ_CHECK(x.dim() >= 1, op, ": input must have at least one dimension, got ", describe(x));
  const int64_t D = x.size(-1);
  for (const Tensor* p : {&weight, &bias})
    TQ_CHECK(!p->defined() || (p->dim() == 1 && p->size(0) == D), op, ": ", (p == &weight ? "weight " : "bias "),
             describe(*p), " does not match the last dimension of the input ", describe(x));
}

// Per-row statistics: for layer norm (mean, rstd); for rms norm (0, rstd).
template <class C>
void row_stats(const C* x, int64_t rows, int64_t D, double eps, bool center, C* mean, C* rstd) {
  parallel_for(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const C* xr = x + r * D;
      C m = 0;
      if (center) {
        for (int64_t j = 0; j < D; ++j) m += xr[j];
        m /= C(D);
      }
      C v = 0;
      for (int64_t j = 0; j < D; ++j) v += (xr[j] - m) * (xr[j] - m);
      v /= C(D);
      mean[r] = m;
      rstd[r] = C(1) / std::sqrt(v + C(eps));
    }
  });
}

// Σ over rows of a[r, j] · b(r, j) for each column j, accumulated in double.
template <class C, class F>
std::vector<double> column_sums(int64_t rows, int64_t D, F&& term) {
  std::vector<double> out(size_t(D), 0.0);
  parallel_for(D, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = lo; j < hi; ++j) out[size_t(j)] += double(term(r, j));
  });
  return out;
}

inline Tensor column_tensor(const std::vector<double>& v, DType dt) {
  Tensor t = Tensor::empty({int64_t(v.size())}, DType::f64);
  std::copy(v.begin(), v.end(), t.data<double>());
  return t.to(dt);
}

// Normalizes x (rows, D) into y with scale s[j] = offset + w[j] (or 1) and shift b[j] (or 0).
template <class C>
void norm_forward_rows(const C* x, const C* w, const C* b, C* y, int64_t rows, int64_t D, double eps, bool center,
                       double offset) {
  std::vector<C> mean(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
  row_stats<C>(x, rows, D, eps, center, mean.data(), rstd.data());
  parallel_for(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t j = 0; j < D; ++j) {
        C v = (x[r * D + j] - mean[size_t(r)]) * rstd[size_t(r)];
        if (w) v *= C(offset) + w[j];
        if (b) v += b[j];
        y[r * D + j] = v;
      }
  });
}

}  // namespace detail

// y = layer_norm(x) over the last dim, in x's dtype.
inline Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5) {
  detail::check_norm_args("layer_norm", x, weight, bias);
  if (x.device().is_cuda()) return call_cuda(cuda_norm_kernels().forward, "layer_norm", x, weight, bias, eps, true, 0.0);
  require_cpu("layer_norm", x, weight, bias);
  const DType ct = compute_dtype(x.dtype());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  Tensor xc = dense(x, ct), y = Tensor::empty(x.shape(), ct);
  Tensor wc = weight.defined() ? dense(weight, ct) : Tensor(), bc = bias.defined() ? dense(bias, ct) : Tensor();
  TQ_DISPATCH_FLOAT(ct, C, {
    detail::norm_forward_rows<C>(xc.data<C>(), wc.defined() ? wc.data<C>() : nullptr,
                                 bc.defined() ? bc.data<C>() : nullptr, y.data<C>(), rows, D, eps, true, 0.0);
  });
  return y.to(x.dtype());
}

// y = rms_norm(x) · (offset + w) over the last dim, in x's dtype.
inline Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps = 1e-6, double weight_offset = 0.0) {
  detail::check_norm_args("rms_norm", x, weight, Tensor());
  if (x.device().is_cuda())
    return call_cuda(cuda_norm_kernels().forward, "rms_norm", x, weight, Tensor(), eps, false, weight_offset);
  require_cpu("rms_norm", x, weight);
  const DType ct = compute_dtype(x.dtype());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  Tensor xc = dense(x, ct), y = Tensor::empty(x.shape(), ct);
  Tensor wc = weight.defined() ? dense(weight, ct) : Tensor();
  TQ_DISPATCH_FLOAT(ct, C, {
    detail::norm_forward_rows<C>(xc.data<C>(), wc.defined() ? wc.data<C>() : nullptr, nullptr, y.data<C>(), rows, D, eps,
                                 false, weight_offset);
  });
  return y.to(x.dtype());
}

// Gradients of both norms. With x̂ = (x − mean)·rstd, s = offset + w (or 1) and ĝ = g·s:
//   gx = rstd · (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))   (layer norm; rms norm drops the mean(ĝ) term)
//   gw = Σ_rows g·x̂,  gb = Σ_rows g.
// `bias` is only consulted for whether it exists and its dtype.
inline NormGrads norm_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               double eps, bool center, double offset) {
  const char* op = center ? "layer_norm backward" : "rms_norm backward";
  detail::check_norm_args(op, x, weight, bias);
  require_same_device(op, x, grad_out);
  require_float(op, grad_out);
  TQ_CHECK(grad_out.shape() == x.shape(), op, ": gradient ", describe(grad_out), " does not match input ", describe(x));
  if (x.device().is_cuda())
    return call_cuda(cuda_norm_kernels().backward, op, grad_out, x, weight, bias, eps, center, offset);
  require_cpu(op, grad_out, x, weight);
  const DType ct = compute_dtype(x.dtype());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  Tensor xc = dense(x, ct), gc = dense(grad_out, ct), gx = Tensor::empty(x.shape(), ct);
  Tensor wc = weight.defined() ? dense(weight, ct) : Tensor();
  NormGrads out;
  TQ_DISPATCH_FLOAT(ct, C, {
    const C* px = xc.data<C>();
    const C* pg = gc.data<C>();
    const C* pw = wc.defined() ? wc.data<C>() : nullptr;
    std::vector<C> mean(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
    detail::row_stats<C>(px, rows, D, eps, center, mean.data(), rstd.data());
    auto xhat = [&](int64_t r, int64_t j) { return (px[r * D + j] - mean[size_t(r)]) * rstd[size_t(r)]; };
    C* o = gx.data<C>();
    parallel_for(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        C sum_g = 0, sum_gx = 0;
        for (int64_t j = 0; j < D; ++j) {
          const C gh = pg[r * D + j] * (pw ? C(offset) + pw[j] : C(1));
          sum_g += gh;
          sum_gx += gh * xhat(r, j);
        }
        const C mg = center ? sum_g / C(D) : C(0), mgx = sum_gx / C(D);
        for (int64_t j = 0; j < D; ++j) {
          const C gh = pg[r * D + j] * (pw ? C(offset) + pw[j] : C(1));
          o[r * D + j] = rstd[size_t(r)] * (gh - mg - xhat(r, j) * mgx);
        }
      }
    });
    if (pw)
      out.weight = detail::column_tensor(
          detail::column_sums<C>(rows, D, [&](int64_t r, int64_t j) { return pg[r * D + j] * xhat(r, j); }),
          weight.dtype());
    if (bias.defined())
      out.bias = detail::column_tensor(detail::column_sums<C>(rows, D, [&](int64_t r, int64_t j) { return pg[r * D + j]; }),
                                          bias.dtype());
  });
  out.x = gx.to(x.dtype());
  return out;
}

}  // namespace ops

// ---- differentiable wrappers (one fused node each) ----

inline Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5) {
  Tensor y = ops::layer_norm(x, weight, bias, eps);
  Tensor xd = x.detach(), wd = weight.defined() ? weight.detach() : Tensor();
  Tensor bd = bias.defined() ? bias.detach() : Tensor();
  return record("layer_norm", y, {x, weight, bias}, [=](const Tensor& g) {
    ops::NormGrads gr = ops::norm_backward(g, xd, wd, bd, eps, true, 0.0);
    return std::vector<Tensor>{gr.x, gr.weight, gr.bias};
  });
}

inline Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps = 1e-6, double weight_offset = 0.0) {
  Tensor y = ops::rms_norm(x, weight, eps, weight_offset);
  Tensor xd = x.detach(), wd = weight.defined() ? weight.detach() : Tensor();
  return record("rms_norm", y, {x, weight}, [=](const Tensor& g) {
    ops::NormGrads gr = ops::norm_backward(g, xd, wd, Tensor(), eps, false, weight_offset);
    return std::vector<Tensor>{gr.x, gr.weight};
  });
}

}  // namespace tq
