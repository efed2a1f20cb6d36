// Rotary position embedding in HF's rotate_half ("split halves", NeoX) convention with explicit
// position ids (spec/paligemma.md §5.4–5.5: HF PaliGemma's positions are 1-based; the caller
// passes them).
//
// For x (B, H, T, D) and position_ids (B, T) (or (1, T) / (T), shared by the batch):
//   inv_freq[i] = 1 / theta^(2i/D)                     fp32, i < D/2
//   ang[b, t, i] = float(pos[b, t]) · inv_freq[i]       fp32 (one rounding, as HF's K=1 matmul)
//   cos/sin = cos/sin(cat(ang, ang))                    evaluated in double from the fp32 angle,
//                                                       rounded to fp32, then to x's dtype
//   out = x·cos + rotate_half(x)·sin,  rotate_half(v) = cat(−v[D/2:], v[:D/2])
// In bf16/f16 the two products and the sum are each rounded to x's dtype, as HF's eager bf16
// tensor ops do; f32/f64 round only at the end. Backward (to x only; ids are integers):
//   gx = g·cos + rotate_halfᵀ(g·sin),  rotate_halfᵀ(v) = cat(v[D/2:], −v[:D/2]).
#pragma once


#include <cmath>
#include <utility>

#include "tq/ops/matmul.hpp"

namespace tq {

namespace ops {

// CUDA entry point, filled in by <tq/cuda.hpp> (kernels/rope.cuh); empty in a CPU-only program.
// positions: (Bp, T) i64 on x's device (Bp = 1 or B); inv_freq: the head_dim / 2 fp32 inverse
// frequencies, computed on the host exactly as rope_cos_sin does.
struct RopeCudaKernels {
  Tensor (*apply)(const Tensor& x, const Tensor& positions, const std::vector<float>& inv_freq, bool backward) = nullptr;
};
inline RopeCudaKernels& cuda_rope_kernels() {
  static RopeCudaKernels k;
  return k;
}

// inv_freq[i] = 1 / theta^(2i/D) in fp32, i < D/2 (HF: an int64 arange cast to float).
inline std::vector<float> rope_inv_freq(int64_t head_dim, double theta) {
  std::vector<float> inv_freq(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[size_t(i)] = 1.0f / std::pow(float(theta), float(2 * i) / float(head_dim));
  return inv_freq;
}

namespace detail {

// position_ids as (Bp, T) int64 values after checking them against x (B, H, T, D).
inline Tensor checked_positions(const char* op, const Tensor& pos, const Tensor& x) {
  require_same_device(op, x, pos);
  TQ_CHECK(pos.dtype() == DType::i64 || pos.dtype() == DType::i32, op, ": position_ids must be i64 or i32, got ",
           describe(pos));
  Tensor p = pos.detach();
  if (p.dim() == 1) p = p.unsqueeze(0);
  TQ_CHECK(p.dim() == 2 && p.size(1) == x.size(2) && (p.size(0) == 1 || p.size(0) == x.size(0)), op,
           ": position_ids ", describe(pos), " do not match the input ", describe(x), " (expected (B, T) or (1, T))");
  return dense(p, DType::i64);
}

// Rounds v as a tensor of dtype dt would store it.
template <class C>
inline C round_as(C v, DType dt) {
  if (dt == DType::bf16) return C(float(bf16(float(v))));
  if (dt == DType::f16) return C(float(f16(float(v))));
  if (dt == DType::f32) return C(float(v));
  return v;
}

}  // namespace detail

// cos and sin tables (Bp, T, D) in `dtype` for positions (Bp, T) (see the header comment).
inline std::pair<Tensor, Tensor> rope_cos_sin(const Tensor& position_ids, int64_t head_dim, double theta, DType dtype) {
  TQ_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head dim must be even, got ", head_dim);
  require_cpu("rope_cos_sin", position_ids);
  Tensor p = dense(position_ids.dim() == 1 ? position_ids.detach().unsqueeze(0) : position_ids, DType::i64);
  const int64_t half = head_dim / 2, rows = p.numel();
  const std::vector<float> inv_freq = rope_inv_freq(head_dim, theta);
  Tensor c = Tensor::empty({p.size(0), p.size(1), head_dim}, DType::f32);
  Tensor s = Tensor::empty(c.shape(), DType::f32);
  const int64_t* pp = p.data<int64_t>();
  float *pc = c.data<float>(), *ps = s.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < half; ++i) {
      const float ang = float(pp[r]) * inv_freq[size_t(i)];
      pc[r * head_dim + i] = pc[r * head_dim + i + half] = float(std::cos(double(ang)));
      ps[r * head_dim + i] = ps[r * head_dim + i + half] = float(std::sin(double(ang)));
    }
  return {c.to(dtype), s.to(dtype)};
}

namespace detail {

// out = x·cos + rotate_half(x)·sin (forward) or g·cos + rotate_halfᵀ(g·sin) (backward), for
// x (B, H, T, D) dense in C and cos/sin (Bp, T, D) in C; `dt` is the storage dtype to round to.
template <class C>
void rope_apply(const C* x, const C* cs, const C* sn, C* out, int64_t B, int64_t H, int64_t T, int64_t D, int64_t Bp,
                DType dt, bool backward) {
  const int64_t half = D / 2;
  parallel_for(B * H * T, std::max<int64_t>(1, 4096 / D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / (H * T), t = r % T;
      const C* c = cs + ((Bp == 1 ? 0 : b) * T + t) * D;
      const C* s = sn + ((Bp == 1 ? 0 : b) * T + t) * D;
      const C* xr = x + r * D;
      C* o = out + r * D;
      for (int64_t j = 0; j < D; ++j) {
        if (!backward) {
          const C rot = j < half ? -xr[j + half] : xr[j - half];
          o[j] = round_as(round_as(xr[j] * c[j], dt) + round_as(rot * s[j], dt), dt);
        } else {
          const C rot = j < half ? xr[j + half] * s[j + half] : -xr[j - half] * s[j - half];
          o[j] = xr[j] * c[j] + rot;
        }
      }
    }
  });
}

inline Tensor rope_impl(const char* op, const Tensor& x, const Tensor& position_ids, double theta, bool backward) {
  require_float(op, x);
  TQ_CHECK(x.dim() == 4, op, ": input must be (B, H, T, D), got ", describe(x));
  TQ_CHECK(x.size(3) % 2 == 0, op, ": head dim must be even, got ", describe(x));
  Tensor pos = checked_positions(op, position_ids, x);
  if (x.device().is_cuda())
    return call_cuda(cuda_rope_kernels().apply, op, x, pos, rope_inv_freq(x.size(3), theta), backward);
  require_cpu(op, x, position_ids);
  const DType ct = compute_dtype(x.dtype());
  auto [c, s] = rope_cos_sin(pos, x.size(3), theta, x.dtype());
  Tensor xc = dense(x, ct), cc = dense(c, ct), sc = dense(s, ct), out = Tensor::empty(x.shape(), ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    rope_apply<C>(xc.data<C>(), cc.data<C>(), sc.data<C>(), out.data<C>(), x.size(0), x.size(1), x.size(2), x.size(3),
                  pos.size(0), x.dtype(), backward);
  });
  return out.to(x.dtype());
}

}  // namespace detail

// out (B, H, T, D) = rope(x (B, H, T, D)) at position_ids (B, T), in x's dtype.
inline Tensor rope(const Tensor& x, const Tensor& position_ids, double theta = 10000.0) {
  return detail::rope_impl("rope", x, position_ids, theta, false);
}

// Gradient wrt x of rope, given grad_out (B, H, T, D) in x's dtype.
inline Tensor rope_backward(const Tensor& grad_out, const Tensor& position_ids, double theta = 10000.0) {
  return detail::rope_impl("rope backward", grad_out, position_ids, theta, true);
}

}  // namespace ops

// ---- differentiable wrapper ----

inline Tensor rope(const Tensor& x, const Tensor& position_ids, double theta = 10000.0) {
  Tensor out = ops::rope(x, position_ids, theta);
  Tensor pd = position_ids.detach();
  return record("rope", out, {x}, [pd, theta](const Tensor& g) {
    return std::vector<Tensor>{ops::rope_backward(g, pd, theta)};
  });
}

}  // namespace tq
