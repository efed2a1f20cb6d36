// Elementwise arithmetic with numpy broadcasting, and the unary activations.
//
// ops::binary / ops::unary are the pure forward functions; ops::unary_backward the pure backward
// of each unary op. The differentiable wrappers in namespace tq (add, mul, exp, gelu, ...) record
// nodes whose backward reduces broadcast gradients back to each input's shape.
#pragma once

#include <cmath>
#include <type_traits>

#include "tq/ops/cpu_util.hpp"

namespace tq {

// eq/gt/lt give 1 or 0 in the promoted dtype (not differentiable).
enum class BinaryOp { add, sub, mul, div, maximum, minimum, eq, gt, lt };
enum class UnaryOp { neg, exp, log, sqrt, rsqrt, tanh, sigmoid, gelu_erf, gelu_tanh, silu, abs, square };

namespace ops {

// CUDA entry points, filled in by <tq/cuda.hpp> (included by one CUDA translation unit of the
// program); empty in a CPU-only program.
struct ElementwiseCudaKernels {
  Tensor (*binary)(BinaryOp, const Tensor&, const Tensor&) = nullptr;
  Tensor (*unary)(UnaryOp, const Tensor&) = nullptr;
  Tensor (*unary_backward)(UnaryOp, const Tensor& grad_out, const Tensor& x) = nullptr;
};
inline ElementwiseCudaKernels& cuda_elementwise_kernels() {
  static ElementwiseCudaKernels k;
  return k;
}

// Calls a CUDA table entry, or throws when no CUDA backend was compiled into the program.
template <class R, class... Params, class... Args>
R call_cuda(R (*fn)(Params...), const char* op, Args&&... args) {
  TQ_CHECK(fn != nullptr, op, ": no CUDA kernel is available for CUDA tensors in this program"
           " (include <tq/cuda.hpp> in one CUDA translation unit)");
  return fn(std::forward<Args>(args)...);
}

// Per-element formulas, shared by the CPU loops and the CUDA kernels (kernels/elementwise.cuh).
template <class C>
TQ_HOST_DEVICE inline C apply_binary(BinaryOp op, C a, C b) {
  switch (op) {
    case BinaryOp::add: return a + b;
    case BinaryOp::sub: return a - b;
    case BinaryOp::mul: return a * b;
    case BinaryOp::div: return a / b;
    case BinaryOp::maximum: return a > b || a != a ? a : b;
    case BinaryOp::minimum: return a < b || a != a ? a : b;
    case BinaryOp::eq: return a == b ? C(1) : C(0);
    case BinaryOp::gt: return a > b ? C(1) : C(0);
    case BinaryOp::lt: return a < b ? C(1) : C(0);
  }
  return a;
}

// Integer tensors support neg, abs and square only (checked on the host before any loop).
inline bool unary_defined_for_integers(UnaryOp op) {
  return op == UnaryOp::neg || op == UnaryOp::abs || op == UnaryOp::square;
}

template <class C>
TQ_HOST_DEVICE inline C apply_unary(UnaryOp op, C x) {
  if constexpr (std::is_integral_v<C>) {
    switch (op) {
      case UnaryOp::neg: return -x;
      case UnaryOp::abs: return x < 0 ? -x : x;
      case UnaryOp::square: return x * x;
      default: return x;
    }
  } else {
    constexpr C kSqrt2OverPi = C(0.7978845608028654);
    switch (op) {
      case UnaryOp::neg: return -x;
      case UnaryOp::exp: return std::exp(x);
      case UnaryOp::log: return std::log(x);
      case UnaryOp::sqrt: return std::sqrt(x);
      case UnaryOp::rsqrt: return C(1) / std::sqrt(x);
      case UnaryOp::tanh: return std::tanh(x);
      case UnaryOp::sigmoid: return C(1) / (C(1) + std::exp(-x));
      // 1 + erf(x/√2) and 1 + tanh(z) cancel for negative x (erf(−2.6) = −0.9998: a float's ulp of 1
      // is 3e-4 of the sum there), so both are written without the subtraction: erfc(−x/√2), and
      // 1 + tanh(z) = 2 / (1 + e^(−2z)); each stays relative-accurate in float.
      case UnaryOp::gelu_erf: return C(0.5) * x * std::erfc(x * C(-0.7071067811865476));
      case UnaryOp::gelu_tanh: return x / (C(1) + std::exp(C(-2) * kSqrt2OverPi * (x + C(0.044715) * x * x * x)));
      case UnaryOp::silu: return x / (C(1) + std::exp(-x));
      case UnaryOp::abs: return std::abs(x);
      case UnaryOp::square: return x * x;
    }
  }
  return x;
}

// Whether a float tensor stores 16-bit values (bf16, f16): their compute dtype is f32, but an
// f32 result is rounded to 8 or 11 mantissa bits on store, so the f32 internals that a 1e-5 f32
// result needs (see gelu_tanh below) would buy nothing.
inline bool is_narrow_float(DType t) { return t == DType::bf16 || t == DType::f16; }

// d op(x) / dx. kNarrow: the result is stored in a 16-bit float (is_narrow_float), so gelu_tanh'
// keeps its internals in C = f32 instead of double. The CPU op and the CUDA kernels pass the same
// flag for the same storage dtype, so they evaluate the same formula.
template <class C, bool kNarrow = false>
TQ_HOST_DEVICE inline C unary_derivative(UnaryOp op, C x) {
  constexpr C kSqrt2OverPi = C(0.7978845608028654);
  switch (op) {
    case UnaryOp::neg: return C(-1);
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return C(1) / x;
    case UnaryOp::sqrt: return C(0.5) / std::sqrt(x);
    case UnaryOp::rsqrt: return C(-0.5) / (x * std::sqrt(x));
    case UnaryOp::tanh: {
      // sech²(x) = 4e/(1+e)², e = exp(−2|x|): relative-accurate where 1 − tanh² would cancel (|x| ≳ 3),
      // so the CPU's and the GPU's libm agree to a few ulps there too.
      const C e = std::exp(C(-2) * std::abs(x));
      return C(4) * e / ((C(1) + e) * (C(1) + e));
    }
    case UnaryOp::sigmoid: {
      C s = C(1) / (C(1) + std::exp(-x));
      return s * (C(1) - s);
    }
    case UnaryOp::gelu_erf: {
      C cdf = C(0.5) * std::erfc(x * C(-0.7071067811865476));  // Φ(x), relative-accurate for x < 0
      C pdf = std::exp(C(-0.5) * x * x) * C(0.3989422804014327);
      return cdf + x * pdf;
    }
    case UnaryOp::gelu_tanh: {
      // The two terms cancel near the root of gelu' (x ≈ −0.75) and 1 + tanh(z) cancels for negative
      // x: in fp32 the ulps in which the CPU's and the GPU's tanh (and FMA contraction) differ grow to
      // 1e-4 relative there. So float is computed in double (rounded once) and 1 + tanh(z),
      // 1 − tanh²(z) come from e = exp(−2|z|), each relative-accurate. For a result stored in bf16
      // or f16 (kNarrow) float internals suffice: the cancellation costs a few f32 ulps of the
      // terms (≈ 1e-7 absolute), far under a bf16 ulp of any gradient but the smallest; and the
      // double exp and divisions made the bf16 GeGLU backward compute-bound (0.57 of copy on an H100).
      using D = std::conditional_t<std::is_same_v<C, float> && !kNarrow, double, C>;
      const D xd = D(x);
      const D inner = D(kSqrt2OverPi) * (xd + D(0.044715) * xd * xd * xd);
      const D dinner = D(kSqrt2OverPi) * (D(1) + D(3 * 0.044715) * xd * xd);
      const D e = std::exp(D(-2) * std::abs(inner));
      const D one_plus_t = inner >= D(0) ? D(2) / (D(1) + e) : D(2) * e / (D(1) + e);
      const D sech2 = D(4) * e / ((D(1) + e) * (D(1) + e));
      return C(D(0.5) * one_plus_t + D(0.5) * xd * sech2 * dinner);
    }
    case UnaryOp::silu: {
      C s = C(1) / (C(1) + std::exp(-x));
      return s * (C(1) + x * (C(1) - s));
    }
    case UnaryOp::abs: return x > 0 ? C(1) : (x < 0 ? C(-1) : C(0));
    case UnaryOp::square: return C(2) * x;
  }
  return C(0);
}

// out = op(a, b) with broadcasting; result dtype = promote(a, b).
inline Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  require_same_device("binary op", a, b);
  if (a.device().is_cuda()) return call_cuda(cuda_elementwise_kernels().binary, "binary op", op, a, b);
  require_cpu("binary op", a, b);
  const DType out_dt = promote(a.dtype(), b.dtype());
  const DType ct = compute_dtype(out_dt);
  const Shape s = broadcast_shapes(a.shape(), b.shape(), "binary op");
  Tensor out = Tensor::empty(s, ct);
  TQ_DISPATCH_COMPUTE(ct, C, {
    {
      Tensor ac = dense(a, ct), bc = dense(b, ct);
      C* o = out.data<C>();
      const C* pa = ac.data<C>();
      const C* pb = bc.data<C>();
      if (a.shape() == s && b.shape() == s) {
        parallel_for(out.numel(), 1 << 14, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) o[i] = apply_binary<C>(op, pa[i], pb[i]);
        });
      } else {
        Tensor ae = ac.expand(s), be = bc.expand(s);
        int64_t i = 0;
        for_each_offset<2>(s, {&ae.strides(), &be.strides()}, {0, 0},
                           [&](int64_t ia, int64_t ib) { o[i++] = apply_binary<C>(op, pa[ia], pb[ib]); });
      }
    }
  });
  return out.to(out_dt);
}

inline Tensor unary(UnaryOp op, const Tensor& x) {
  TQ_CHECK(is_floating(x.dtype()) || unary_defined_for_integers(op), "unary op ", int(op),
           " is not defined for integer tensors: ", describe(x));
  if (x.device().is_cuda()) return call_cuda(cuda_elementwise_kernels().unary, "unary op", op, x);
  require_cpu("unary op", x);
  const DType ct = compute_dtype(x.dtype());
  Tensor xc = dense(x, ct);
  Tensor out = Tensor::empty(x.shape(), ct);
  TQ_DISPATCH_COMPUTE(ct, C, {
    {
      const C* px = xc.data<C>();
      C* o = out.data<C>();
      parallel_for(out.numel(), 1 << 13, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) o[i] = apply_unary<C>(op, px[i]);
      });
    }
  });
  return out.to(x.dtype());
}

// grad_in = grad_out * op'(x), in x's dtype.
inline Tensor unary_backward(UnaryOp op, const Tensor& grad_out, const Tensor& x) {
  require_same_device("unary op backward", x, grad_out);
  if (x.device().is_cuda())
    return call_cuda(cuda_elementwise_kernels().unary_backward, "unary op backward", op, grad_out, x);
  require_cpu("unary op backward", grad_out, x);
  require_float("unary op backward", x);
  const DType ct = compute_dtype(x.dtype());
  Tensor xc = dense(x, ct), gc = dense(grad_out, ct);
  Tensor out = Tensor::empty(x.shape(), ct);
  const bool narrow = is_narrow_float(x.dtype());
  TQ_DISPATCH_FLOAT(ct, C, {
    {
      const C* px = xc.data<C>();
      const C* pg = gc.data<C>();
      C* o = out.data<C>();
      parallel_for(out.numel(), 1 << 13, [&](int64_t lo, int64_t hi) {
        if (narrow)
          for (int64_t i = lo; i < hi; ++i) o[i] = pg[i] * unary_derivative<C, true>(op, px[i]);
        else
          for (int64_t i = lo; i < hi; ++i) o[i] = pg[i] * unary_derivative<C>(op, px[i]);
      });
    }
  });
  return out.to(x.dtype());
}

// Fill-like helper: a tensor of t's dtype/device holding `v`, for scalar operands.
inline Tensor scalar_like(const Tensor& t, double v) { return Tensor::full({}, v, t.dtype(), t.device()); }

}  // namespace ops

// ---- differentiable wrappers ----

inline Tensor binary_op(BinaryOp op, const Tensor& a, const Tensor& b) {
  Tensor out = ops::binary(op, a.detach(), b.detach());
  Tensor ad = a.detach(), bd = b.detach();
  Shape sa = a.shape(), sb = b.shape();
  return record("binary", out, {a, b}, [=](const Tensor& g) {
    Tensor ga, gb;
    switch (op) {
      case BinaryOp::add: ga = g; gb = g; break;
      case BinaryOp::sub: ga = g; gb = ops::unary(UnaryOp::neg, g); break;
      case BinaryOp::mul:
        ga = ops::binary(BinaryOp::mul, g, bd);
        gb = ops::binary(BinaryOp::mul, g, ad);
        break;
      case BinaryOp::div: {
        ga = ops::binary(BinaryOp::div, g, bd);
        Tensor q = ops::binary(BinaryOp::div, ops::binary(BinaryOp::mul, g, ad), ops::binary(BinaryOp::mul, bd, bd));
        gb = ops::unary(UnaryOp::neg, q);
        break;
      }
      case BinaryOp::maximum:
      case BinaryOp::minimum: {
        // The gradient goes to the selected operand (to a on ties).
        Tensor is_a = ops::binary(BinaryOp::eq, ops::binary(op, ad, bd), ad);
        ga = ops::binary(BinaryOp::mul, g, is_a);
        gb = ops::binary(BinaryOp::mul, g, ops::binary(BinaryOp::sub, ops::scalar_like(is_a, 1.0), is_a));
        break;
      }
      default: fail("comparison ops are not differentiable");
    }
    return std::vector<Tensor>{sum_to_shape(ga, sa).to(ad.dtype()), sum_to_shape(gb, sb).to(bd.dtype())};
  });
}

inline Tensor add(const Tensor& a, const Tensor& b) { return binary_op(BinaryOp::add, a, b); }
inline Tensor sub(const Tensor& a, const Tensor& b) { return binary_op(BinaryOp::sub, a, b); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return binary_op(BinaryOp::mul, a, b); }
inline Tensor div(const Tensor& a, const Tensor& b) { return binary_op(BinaryOp::div, a, b); }
inline Tensor maximum(const Tensor& a, const Tensor& b) { return binary_op(BinaryOp::maximum, a, b); }
inline Tensor minimum(const Tensor& a, const Tensor& b) { return binary_op(BinaryOp::minimum, a, b); }

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& a, double s) { return add(a, ops::scalar_like(a, s)); }
inline Tensor operator-(const Tensor& a, double s) { return sub(a, ops::scalar_like(a, s)); }
inline Tensor operator*(const Tensor& a, double s) { return mul(a, ops::scalar_like(a, s)); }
inline Tensor operator/(const Tensor& a, double s) { return div(a, ops::scalar_like(a, s)); }
inline Tensor operator*(double s, const Tensor& a) { return a * s; }
inline Tensor operator+(double s, const Tensor& a) { return a + s; }

inline Tensor unary_op(UnaryOp op, const Tensor& x) {
  Tensor out = ops::unary(op, x.detach());
  Tensor xd = x.detach();
  return record("unary", out, {x}, [op, xd](const Tensor& g) {
    return std::vector<Tensor>{ops::unary_backward(op, g, xd)};
  });
}

inline Tensor neg(const Tensor& x) { return unary_op(UnaryOp::neg, x); }
inline Tensor operator-(const Tensor& x) { return neg(x); }
inline Tensor exp(const Tensor& x) { return unary_op(UnaryOp::exp, x); }
inline Tensor log(const Tensor& x) { return unary_op(UnaryOp::log, x); }
inline Tensor sqrt(const Tensor& x) { return unary_op(UnaryOp::sqrt, x); }
inline Tensor rsqrt(const Tensor& x) { return unary_op(UnaryOp::rsqrt, x); }
inline Tensor tanh(const Tensor& x) { return unary_op(UnaryOp::tanh, x); }
inline Tensor sigmoid(const Tensor& x) { return unary_op(UnaryOp::sigmoid, x); }
// GELU: exact (erf) by default; `tanh_approx` is PyTorch's approximate="tanh" (gelu_pytorch_tanh).
inline Tensor gelu(const Tensor& x, bool tanh_approx = false) {
  return unary_op(tanh_approx ? UnaryOp::gelu_tanh : UnaryOp::gelu_erf, x);
}
inline Tensor silu(const Tensor& x) { return unary_op(UnaryOp::silu, x); }
inline Tensor abs(const Tensor& x) { return unary_op(UnaryOp::abs, x); }
inline Tensor square(const Tensor& x) { return unary_op(UnaryOp::square, x); }

}  // namespace tq
