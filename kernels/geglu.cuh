// CUDA fused GeGLU forward and backward (the entries of ops::cuda_geglu_kernels()).
//
// Invariants (the CPU reference in ops/geglu.hpp is the contract):
// - Per element, the CPU's own TQ_HOST_DEVICE formulas (ops::geglu_value, geglu_grad_gate,
//   geglu_grad_up, built on ops::apply_unary / unary_derivative) in compute_t<T>, one rounding
//   per output on store, with the CPU op's choice of internals for gelu_tanh' (f32 for a bf16/f16
//   gate, double for f32). gelu(gate) is never materialized.
// - Memory-bound: gate and up (and g) are read once, out (d gate, d up) written once, with 16-byte
//   accesses when every pointer is aligned (the dense outputs of linear always are).
// - No host synchronization.
#pragma once

#include "kernels/ops_common.cuh"
#include "tq/ops/geglu.hpp"

namespace tq::cuda {

// out (n) = gelu_tanh(gate (n)) ⊙ up (n).
template <class T>
__global__ void geglu_forward_kernel(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, int64_t n,
                                     bool vec) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    for (int64_t k = tid; k < nv; k += stride) {
      const Vec<T, V> a = reinterpret_cast<const Vec<T, V>*>(gate)[k], u = reinterpret_cast<const Vec<T, V>*>(up)[k];
      Vec<T, V> o;
#pragma unroll
      for (int e = 0; e < V; ++e) o.v[e] = convert<T>(ops::geglu_value<C>(convert<C>(a.v[e]), convert<C>(u.v[e])));
      reinterpret_cast<Vec<T, V>*>(out)[k] = o;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) out[i] = convert<T>(ops::geglu_value<C>(convert<C>(gate[i]), convert<C>(up[i])));
}

// d_gate (n), d_up (n) from g, gate, up (n). kNarrow: the caller's gate is bf16/f16 (T may be f32
// when the gradient's dtype differs), geglu_grad_gate's flag as the CPU op sets it.
template <class T, bool kNarrow>
__global__ void geglu_backward_kernel(T* __restrict__ d_gate, T* __restrict__ d_up, const T* __restrict__ g,
                                      const T* __restrict__ gate, const T* __restrict__ up, int64_t n, bool vec) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    for (int64_t k = tid; k < nv; k += stride) {
      const Vec<T, V> gv = reinterpret_cast<const Vec<T, V>*>(g)[k];
      const Vec<T, V> a = reinterpret_cast<const Vec<T, V>*>(gate)[k], u = reinterpret_cast<const Vec<T, V>*>(up)[k];
      Vec<T, V> oa, ou;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C gc = convert<C>(gv.v[e]), ac = convert<C>(a.v[e]);
        oa.v[e] = convert<T>(ops::geglu_grad_gate<C, kNarrow>(gc, ac, convert<C>(u.v[e])));
        ou.v[e] = convert<T>(ops::geglu_grad_up<C>(gc, ac));
      }
      reinterpret_cast<Vec<T, V>*>(d_gate)[k] = oa;
      reinterpret_cast<Vec<T, V>*>(d_up)[k] = ou;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const C gc = convert<C>(g[i]), ac = convert<C>(gate[i]);
    d_gate[i] = convert<T>(ops::geglu_grad_gate<C, kNarrow>(gc, ac, convert<C>(up[i])));
    d_up[i] = convert<T>(ops::geglu_grad_up<C>(gc, ac));
  }
}

inline Tensor geglu_forward(const Tensor& gate_in, const Tensor& up_in) {
  Tensor gate = gate_in.detach().contiguous(), up = up_in.detach().contiguous();
  Tensor out = Tensor::empty(gate.shape(), gate.dtype(), gate.device());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int dev = gate.device().index;
  DeviceGuard guard(dev);
  dispatch_float(gate.dtype(), "geglu", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVecWidth<T>;
    T* po = data_as<T>(out);
    const T *pa = data_as<const T>(gate), *pu = data_as<const T>(up);
    const bool vec = aligned_to(po, 16) && aligned_to(pa, 16) && aligned_to(pu, 16);
    geglu_forward_kernel<T><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, current_stream()>>>(po, pa, pu, n, vec);
    check_launch();
  });
  return out;
}

inline ops::GegluGrads geglu_backward(const Tensor& grad_out, const Tensor& gate_in, const Tensor& up_in) {
  // One kernel instance per dtype: a gradient of another dtype brings all three to the compute dtype.
  const DType kt = grad_out.dtype() == gate_in.dtype() ? gate_in.dtype() : ops::compute_dtype(gate_in.dtype());
  Tensor g = dense_as(grad_out, kt), gate = dense_as(gate_in, kt), up = dense_as(up_in, kt);
  Tensor d_gate = Tensor::empty(gate.shape(), kt, gate.device()), d_up = Tensor::empty(gate.shape(), kt, gate.device());
  const int64_t n = gate.numel();
  if (n > 0) {
    const int dev = gate.device().index;
    DeviceGuard guard(dev);
    dispatch_float(kt, "geglu backward", [&](auto tag) {
      using T = decltype(tag);
      constexpr int V = kVecWidth<T>;
      T *pda = data_as<T>(d_gate), *pdu = data_as<T>(d_up);
      const T *pg = data_as<const T>(g), *pa = data_as<const T>(gate), *pu = data_as<const T>(up);
      const bool vec = aligned_to(pda, 16) && aligned_to(pdu, 16) && aligned_to(pg, 16) && aligned_to(pa, 16) &&
                       aligned_to(pu, 16);
      const unsigned grid = grid_for((n + V - 1) / V, kThreads, dev);
      if (ops::is_narrow_float(gate_in.dtype()))
        geglu_backward_kernel<T, true><<<grid, kThreads, 0, current_stream()>>>(pda, pdu, pg, pa, pu, n, vec);
      else
        geglu_backward_kernel<T, false><<<grid, kThreads, 0, current_stream()>>>(pda, pdu, pg, pa, pu, n, vec);
      check_launch();
    });
  }
  if (kt == gate_in.dtype()) return {d_gate, d_up};
  return {d_gate.to(gate_in.dtype()), d_up.to(up_in.dtype())};
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_geglu_kernels() {
  ops::GegluCudaKernels& k = ops::cuda_geglu_kernels();
  k.forward = &geglu_forward;
  k.backward = &geglu_backward;
}

}  // namespace tq::cuda
