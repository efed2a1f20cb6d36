// Fused GeGLU: geglu(gate, up) = gelu_tanh(gate) ⊙ up, one autograd node with a hand-written
// backward — the Gemma MLP is down(geglu(gate(x), up(x))).
//
// Numerics: gelu_tanh is ops::apply_unary's formula (the one ops::unary uses), evaluated in the
// compute dtype (fp32 for f32/bf16/f16, double for f64); the product is taken in the same dtype
// and rounded once to the inputs' dtype. In f32 and f64 this equals the unfused
// `gelu(gate, true) * up` bit for bit; in bf16/f16 the unfused path rounds gelu(gate) to the
// storage dtype before multiplying, the fused one does not (it rounds once), so the two differ by
// at most about one bf16 ulp of the result.
// Backward, with g the output gradient (again the unfused path's operation order):
//   d gate = (g·up)·gelu_tanh'(gate),   d up = g·gelu_tanh(gate)
// each computed in the compute dtype and rounded once; gelu_tanh' of a bf16/f16 gate keeps f32
// internals, of an f32 gate double ones (unary_derivative's kNarrow).
// gate and up must have the same shape and float dtype and live on one device.
#pragma once

#include "tq/ops/elementwise.hpp"

namespace tq {

namespace ops {

struct GegluGrads {
  Tensor gate, up;
};

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/geglu.cuh); empty in a CPU-only program.
struct GegluCudaKernels {
  Tensor (*forward)(const Tensor& gate, const Tensor& up) = nullptr;
  GegluGrads (*backward)(const Tensor& grad_out, const Tensor& gate, const Tensor& up) = nullptr;
};
inline GegluCudaKernels& cuda_geglu_kernels() {
  static GegluCudaKernels k;
  return k;
}

// Per-element formulas shared by the CPU loops and the CUDA kernels.
template <class C>
TQ_HOST_DEVICE inline C geglu_value(C gate, C up) {
  return apply_unary<C>(UnaryOp::gelu_tanh, gate) * up;
}
// kNarrow: gate is stored in bf16/f16 (unary_derivative's flag, as the unfused path passes it).
template <class C, bool kNarrow = false>
TQ_HOST_DEVICE inline C geglu_grad_gate(C g, C gate, C up) {
  const C gu = g * up;  // the unfused mul's gradient, rounded in C first
  return gu * unary_derivative<C, kNarrow>(UnaryOp::gelu_tanh, gate);
}
template <class C>
TQ_HOST_DEVICE inline C geglu_grad_up(C g, C gate) {
  return g * apply_unary<C>(UnaryOp::gelu_tanh, gate);
}

namespace detail {
inline void check_geglu_args(const char* op, const Tensor& gate, const Tensor& up) {
  require_same_device(op, gate, up);
  require_float(op, gate, up);
  TQ_CHECK(gate.shape() == up.shape(), op, ": gate ", describe(gate), " and up ", describe(up), " differ in shape");
  TQ_CHECK(gate.dtype() == up.dtype(), op, ": gate ", describe(gate), " and up ", describe(up), " differ in dtype");
}
}  // namespace detail

// out = gelu_tanh(gate) ⊙ up in the inputs' dtype.
inline Tensor geglu(const Tensor& gate, const Tensor& up) {
  detail::check_geglu_args("geglu", gate, up);
  if (gate.device().is_cuda()) return call_cuda(cuda_geglu_kernels().forward, "geglu", gate, up);
  require_cpu("geglu", gate, up);
  const DType ct = compute_dtype(gate.dtype());
  Tensor gc = dense(gate, ct), uc = dense(up, ct);
  Tensor out = Tensor::empty(gate.shape(), ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    const C* pg = gc.data<C>();
    const C* pu = uc.data<C>();
    C* o = out.data<C>();
    parallel_for(out.numel(), 1 << 13, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = geglu_value<C>(pg[i], pu[i]);
    });
  });
  return out.to(gate.dtype());
}

// {d gate, d up} in the inputs' dtype, given grad_out of the output's shape (any float dtype).
inline GegluGrads geglu_backward(const Tensor& grad_out, const Tensor& gate, const Tensor& up) {
  const char* op = "geglu backward";
  detail::check_geglu_args(op, gate, up);
  require_same_device(op, gate, grad_out);
  require_float(op, grad_out);
  TQ_CHECK(grad_out.shape() == gate.shape(), op, ": gradient ", describe(grad_out), " does not match ", describe(gate));
  if (gate.device().is_cuda()) return call_cuda(cuda_geglu_kernels().backward, op, grad_out, gate, up);
  require_cpu(op, grad_out, gate, up);
  const DType ct = compute_dtype(gate.dtype());
  Tensor gc = dense(grad_out, ct), ac = dense(gate, ct), uc = dense(up, ct);
  Tensor dgate = Tensor::empty(gate.shape(), ct), dup = Tensor::empty(gate.shape(), ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    const C* pg = gc.data<C>();
    const C* pa = ac.data<C>();
    const C* pu = uc.data<C>();
    C* oa = dgate.data<C>();
    C* ou = dup.data<C>();
    const bool narrow = is_narrow_float(gate.dtype());
    parallel_for(dgate.numel(), 1 << 13, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        oa[i] = narrow ? geglu_grad_gate<C, true>(pg[i], pa[i], pu[i]) : geglu_grad_gate<C>(pg[i], pa[i], pu[i]);
        ou[i] = geglu_grad_up<C>(pg[i], pa[i]);
      }
    });
  });
  return {dgate.to(gate.dtype()), dup.to(up.dtype())};
}

}  // namespace ops

// ---- differentiable wrapper (one fused node) ----

inline Tensor geglu(const Tensor& gate, const Tensor& up) {
  Tensor out = ops::geglu(gate, up);
  Tensor gd = gate.detach(), ud = up.detach();
  return record("geglu", out, {gate, up}, [gd, ud](const Tensor& g) {
    ops::GegluGrads gr = ops::geglu_backward(g, gd, ud);
    return std::vector<Tensor>{gr.gate, gr.up};
  });
}

}  // namespace tq
