// Elementwise CUDA kernels: binary ops with numpy broadcasting, unary ops and their backward.
//
// Invariants (the CPU reference in ops/elementwise.hpp is the contract):
// - Arithmetic runs in compute_t<T>: float for f32/bf16/f16 (bf16/f16 widened on load, rounded
//   once on store), double for f64, int64 for integers. Formulas follow the CPU's operation by
//   operation, so results differ only by the last-ulp behaviour of the math library.
// - Mixed-dtype operands are first converted to the compute dtype (as the CPU's dense(x, ct)
//   does), so one kernel instance per dtype serves every combination.
// - Outputs are fresh dense tensors; inputs may be strided or broadcast (strides by value).
// - No synchronization, no host-device traffic: every launch is capturable into a CUDA graph.
#pragma once

#include "kernels/copy.cuh"
#include "tq/ops/elementwise.hpp"

namespace tq::cuda {

// ---- per-element math: the CPU reference's own formulas (ops/elementwise.hpp, TQ_HOST_DEVICE) ----

using ops::apply_binary;
using ops::apply_unary;
using ops::unary_derivative;

// Runtime op -> compile-time op, once per kernel rather than once per element: with the op a
// constant, each instantiation folds apply_binary/apply_unary down to its one formula.
template <class F>
__device__ __forceinline__ void with_binary_op(BinaryOp op, F&& f) {
  using B = BinaryOp;
  switch (op) {
    case B::add: f(std::integral_constant<B, B::add>{}); break;
    case B::sub: f(std::integral_constant<B, B::sub>{}); break;
    case B::mul: f(std::integral_constant<B, B::mul>{}); break;
    case B::div: f(std::integral_constant<B, B::div>{}); break;
    case B::maximum: f(std::integral_constant<B, B::maximum>{}); break;
    case B::minimum: f(std::integral_constant<B, B::minimum>{}); break;
    case B::eq: f(std::integral_constant<B, B::eq>{}); break;
    case B::gt: f(std::integral_constant<B, B::gt>{}); break;
    case B::lt: f(std::integral_constant<B, B::lt>{}); break;
  }
}
template <class C, class F>
__device__ __forceinline__ void with_unary_op(UnaryOp op, F&& f) {
  using U = UnaryOp;
  switch (op) {
    case U::neg: f(std::integral_constant<U, U::neg>{}); break;
    case U::abs: f(std::integral_constant<U, U::abs>{}); break;
    case U::square: f(std::integral_constant<U, U::square>{}); break;
    default:
      if constexpr (!std::is_integral_v<C>) {  // integer tensors take only the three above
        switch (op) {
          case U::exp: f(std::integral_constant<U, U::exp>{}); break;
          case U::log: f(std::integral_constant<U, U::log>{}); break;
          case U::sqrt: f(std::integral_constant<U, U::sqrt>{}); break;
          case U::rsqrt: f(std::integral_constant<U, U::rsqrt>{}); break;
          case U::tanh: f(std::integral_constant<U, U::tanh>{}); break;
          case U::sigmoid: f(std::integral_constant<U, U::sigmoid>{}); break;
          case U::gelu_erf: f(std::integral_constant<U, U::gelu_erf>{}); break;
          case U::gelu_tanh: f(std::integral_constant<U, U::gelu_tanh>{}); break;
          case U::silu: f(std::integral_constant<U, U::silu>{}); break;
          default: break;
        }
      }
  }
}

// ---- kernels ----

// Index of element i in an operand that repeats with period p: p == n dense, p == 1 a single
// broadcast value, otherwise a dense trailing block broadcast over leading dims (a bias row).
__device__ __forceinline__ int64_t periodic(int64_t i, int64_t p, int64_t n) { return p == n ? i : (p == 1 ? 0 : i % p); }

// out[i] = op(a[i mod pa], b[i mod pb]) over n dense outputs; 16-byte accesses when every
// period is a multiple of the vector width and the pointers are aligned.
template <class T>
__global__ void binary_contiguous_kernel(BinaryOp op_rt, T* __restrict__ out, const T* __restrict__ a,
                                         const T* __restrict__ b, int64_t n, int64_t pa, int64_t pb, bool vec) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  with_binary_op(op_rt, [&](auto opc) {
    constexpr BinaryOp op = decltype(opc)::value;
    int64_t done = 0;
    if (vec) {
      const int64_t nv = n / V;
      const C sa = pa == 1 ? convert<C>(a[0]) : C(0), sb = pb == 1 ? convert<C>(b[0]) : C(0);
      for (int64_t v = tid; v < nv; v += stride) {
        Vec<T, V> va, vb, vo;
        if (pa != 1) va = reinterpret_cast<const Vec<T, V>*>(a + periodic(v * V, pa, n))[0];
        if (pb != 1) vb = reinterpret_cast<const Vec<T, V>*>(b + periodic(v * V, pb, n))[0];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const C x = pa == 1 ? sa : convert<C>(va.v[j]);
          const C y = pb == 1 ? sb : convert<C>(vb.v[j]);
          vo.v[j] = convert<T>(apply_binary<C>(op, x, y));
        }
        reinterpret_cast<Vec<T, V>*>(out)[v] = vo;
      }
      done = nv * V;
    }
    for (int64_t i = done + tid; i < n; i += stride)
      out[i] = convert<T>(apply_binary<C>(op, convert<C>(a[periodic(i, pa, n)]), convert<C>(b[periodic(i, pb, n)])));
  });
}

// out[i] = op(a[offa(i)], b[offb(i)]) with broadcast (0-stride) or strided operands.
template <class T, class Index>
__global__ void binary_strided_kernel(BinaryOp op, T* __restrict__ out, const T* __restrict__ a,
                                      const T* __restrict__ b, Geometry<2> g, Index n) {
  using C = compute_t<T>;
  for (Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += Index(gridDim.x) * blockDim.x) {
    int64_t off[2];
    offsets_of<Index, 2>(g, i, off);
    out[i] = convert<T>(apply_binary<C>(op, convert<C>(a[off[0]]), convert<C>(b[off[1]])));
  }
}

template <class T>
__global__ void unary_kernel(UnaryOp op_rt, T* __restrict__ out, const T* __restrict__ x, int64_t n, bool vec) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  with_unary_op<C>(op_rt, [&](auto opc) {
    constexpr UnaryOp op = decltype(opc)::value;
    int64_t done = 0;
    if (vec) {
      const int64_t nv = n / V;
      for (int64_t v = tid; v < nv; v += stride) {
        Vec<T, V> vx = reinterpret_cast<const Vec<T, V>*>(x)[v], vo;
#pragma unroll
        for (int j = 0; j < V; ++j) vo.v[j] = convert<T>(apply_unary<C>(op, convert<C>(vx.v[j])));
        reinterpret_cast<Vec<T, V>*>(out)[v] = vo;
      }
      done = nv * V;
    }
    for (int64_t i = done + tid; i < n; i += stride) out[i] = convert<T>(apply_unary<C>(op, convert<C>(x[i])));
  });
}

// out[i] = g[i] * op'(x[i]); G is X or X's compute type.
template <class X, class G>
__global__ void unary_backward_kernel(UnaryOp op_rt, X* __restrict__ out, const G* __restrict__ g,
                                      const X* __restrict__ x, int64_t n, bool vec) {
  using C = compute_t<X>;
  constexpr int V = kVecWidth<X, G>;
  constexpr bool kNarrow = sizeof(X) == 2;  // ops::is_narrow_float(x's dtype), as the CPU op decides
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  with_unary_op<C>(op_rt, [&](auto opc) {
    constexpr UnaryOp op = decltype(opc)::value;
    int64_t done = 0;
    if (vec) {
      const int64_t nv = n / V;
      for (int64_t v = tid; v < nv; v += stride) {
        Vec<X, V> vx = reinterpret_cast<const Vec<X, V>*>(x)[v], vo;
        Vec<G, V> vg = reinterpret_cast<const Vec<G, V>*>(g)[v];
#pragma unroll
        for (int j = 0; j < V; ++j)
          vo.v[j] = convert<X>(C(convert<C>(vg.v[j]) * unary_derivative<C, kNarrow>(op, convert<C>(vx.v[j]))));
        reinterpret_cast<Vec<X, V>*>(out)[v] = vo;
      }
      done = nv * V;
    }
    for (int64_t i = done + tid; i < n; i += stride)
      out[i] = convert<X>(C(convert<C>(g[i]) * unary_derivative<C, kNarrow>(op, convert<C>(x[i]))));
  });
}

// ---- launchers (host): the entries of ops::cuda_elementwise_kernels() ----

// A detached tensor in dtype dt (no copy when it already is).
inline Tensor as_dtype(const Tensor& t, DType dt) {
  Tensor d = t.detach();
  return d.dtype() == dt ? d : d.to(dt);
}

// The period with which a dense operand repeats over the broadcast shape s (numel(s) when it has
// shape s, 1 for a single value, the size of its trailing block when it is a bias-like row), or
// 0 when it is strided some other way.
inline int64_t broadcast_period(const Tensor& t, const Shape& s) {
  if (t.numel() == 1) return 1;
  if (!t.is_contiguous()) return 0;
  const size_t lead = s.size() - t.shape().size();
  size_t k = 0;  // first dim of s that the operand spans
  while (k < s.size() && (k < lead || t.shape()[k - lead] == 1) && s[k] != 1) ++k;
  int64_t period = 1;
  for (size_t d = k; d < s.size(); ++d) {
    const int64_t td = d < lead ? 1 : t.shape()[d - lead];
    if (td != s[d]) return 0;
    period *= s[d];
  }
  return period;
}

inline Tensor binary(BinaryOp op, const Tensor& a_in, const Tensor& b_in) {
  const DType out_dt = promote(a_in.dtype(), b_in.dtype());
  const Shape s = broadcast_shapes(a_in.shape(), b_in.shape(), "binary op");
  // Mixed dtypes: compute on both operands converted to the compute dtype, round once at the end.
  const bool mixed = a_in.dtype() != out_dt || b_in.dtype() != out_dt;
  const DType kt = mixed ? ops::compute_dtype(out_dt) : out_dt;
  Tensor a = as_dtype(a_in, kt), b = as_dtype(b_in, kt);
  Tensor out = Tensor::empty(s, kt, a.device());
  const int64_t n = out.numel();
  if (n > 0) {
    const int dev = a.device().index;
    DeviceGuard guard(dev);
    cudaStream_t st = current_stream();
    TQ_DISPATCH(kt, T, {
      T* o = static_cast<T*>(out.data_ptr());
      const T* pa = static_cast<const T*>(a.data_ptr());
      const T* pb = static_cast<const T*>(b.data_ptr());
      const int64_t per_a = broadcast_period(a, s), per_b = broadcast_period(b, s);
      if (per_a > 0 && per_b > 0) {
        constexpr int V = kVecWidth<T>;
        // A vector never straddles a period: dense operands end where the vector loop ends.
        auto vec_ok = [&](const void* p, int64_t per) { return per == 1 || ((per == n || per % V == 0) && aligned_to(p, 16)); };
        const bool vec = aligned_to(o, 16) && vec_ok(pa, per_a) && vec_ok(pb, per_b);
        binary_contiguous_kernel<T><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, st>>>(
            op, o, pa, pb, n, per_a, per_b, vec);
      } else {
        Tensor ae = a.expand(s), be = b.expand(s);
        Geometry<2> g = make_geometry<2>(s, {&ae.strides(), &be.strides()}, "binary op");
        if (fits_u32(n))
          binary_strided_kernel<T, uint32_t><<<grid_for(n, kThreads, dev), kThreads, 0, st>>>(op, o, pa, pb, g, uint32_t(n));
        else
          binary_strided_kernel<T, int64_t><<<grid_for(n, kThreads, dev), kThreads, 0, st>>>(op, o, pa, pb, g, n);
      }
      check_launch();
    });
  }
  return kt == out_dt ? out : out.to(out_dt);
}

inline Tensor unary(UnaryOp op, const Tensor& x_in) {
  const bool int_ok = op == UnaryOp::neg || op == UnaryOp::abs || op == UnaryOp::square;
  TQ_CHECK(is_floating(x_in.dtype()) || int_ok, "unary op not defined for integer tensors (", describe(x_in), ")");
  Tensor x = x_in.detach().contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  TQ_DISPATCH(x.dtype(), T, {
    constexpr int V = kVecWidth<T>;
    T* o = static_cast<T*>(out.data_ptr());
    const T* px = static_cast<const T*>(x.data_ptr());
    unary_kernel<T><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, current_stream()>>>(
        op, o, px, n, aligned_to(o, 16) && aligned_to(px, 16));
    check_launch();
  });
  return out;
}

inline Tensor unary_backward(UnaryOp op, const Tensor& grad_out, const Tensor& x_in) {
  ops::require_float("unary op backward", x_in);
  TQ_CHECK(grad_out.numel() == x_in.numel(), "unary op backward: gradient ", describe(grad_out), " does not match input ",
           describe(x_in));
  Tensor x = x_in.detach().contiguous();
  const DType ct = ops::compute_dtype(x.dtype());
  // The gradient stays in x's dtype when it already is; otherwise it is widened to the compute type.
  Tensor g = as_dtype(grad_out, grad_out.dtype() == x.dtype() ? x.dtype() : ct).contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  auto launch = [&](auto xtag, auto gtag) {
    using X = decltype(xtag);
    using G = decltype(gtag);
    constexpr int V = kVecWidth<X, G>;
    X* o = static_cast<X*>(out.data_ptr());
    const X* px = static_cast<const X*>(x.data_ptr());
    const G* pg = static_cast<const G*>(g.data_ptr());
    const bool vec = aligned_to(o, sizeof(X) * V) && aligned_to(px, sizeof(X) * V) && aligned_to(pg, sizeof(G) * V);
    unary_backward_kernel<X, G><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, current_stream()>>>(
        op, o, pg, px, n, vec);
    check_launch();
  };
  const bool same = g.dtype() == x.dtype();
  switch (x.dtype()) {
    case DType::f32: launch(float{}, float{}); break;
    case DType::f64: launch(double{}, double{}); break;
    case DType::bf16: same ? launch(::tq::bf16{}, ::tq::bf16{}) : launch(::tq::bf16{}, float{}); break;
    case DType::f16: same ? launch(::tq::f16{}, ::tq::f16{}) : launch(::tq::f16{}, float{}); break;
    default: fail(str_cat("unary op backward: unsupported dtype ", describe(x)));
  }
  return out;
}

}  // namespace tq::cuda
