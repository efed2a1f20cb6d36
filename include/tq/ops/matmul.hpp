// Matrix products: matmul (batched, numpy batch broadcasting, optional transposed operands) and
// linear (y = x·Wᵀ + b). bf16/f16 operands are multiplied in fp32 with fp32 accumulation and
// rounded once on output, as tensor cores do.
#pragma once

#include <optional>

#include "tq/ops/reduce.hpp"

namespace tq {

namespace ops {

// C (M, N) = A (M, K) · B (K, N); all row-major dense, C overwritten.
template <class C>
void gemm_rowmajor(int64_t M, int64_t N, int64_t K, const C* A, const C* B, C* out) {
  parallel_for(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * K / 64 + 1)), [&](int64_t lo, int64_t hi) {
    std::vector<C> acc(static_cast<size_t>(N));
    for (int64_t i = lo; i < hi; ++i) {
      std::fill(acc.begin(), acc.end(), C(0));
      const C* a = A + i * K;
      for (int64_t k = 0; k < K; ++k) {
        const C av = a[k];
        const C* b = B + k * N;
        for (int64_t j = 0; j < N; ++j) acc[j] += av * b[j];
      }
      std::copy(acc.begin(), acc.end(), out + i * N);
    }
  });
}

// The operands of a product after numpy's rules: 1-D operands promoted to matrices, the
// transposes applied as views, batch dims broadcast. a (batch..., M, K) and b (batch..., K, N)
// are views (any strides, 0-strided broadcast batch dims); nothing is copied.
struct MatmulOperands {
  Tensor a, b;
  Shape batch;
  int64_t M = 0, K = 0, N = 0;
  DType out_dtype = DType::f32;
  bool a_vec = false, b_vec = false;  // the 1-D operands whose unit dim the result drops
};

inline MatmulOperands matmul_operands(const Tensor& a_in, const Tensor& b_in, bool trans_a, bool trans_b) {
  require_same_device("matmul", a_in, b_in);
  TQ_CHECK(a_in.dim() >= 1 && b_in.dim() >= 1, "matmul: scalars are not matrices: ", describe(a_in), ", ", describe(b_in));
  MatmulOperands o;
  Tensor a = a_in.detach(), b = b_in.detach();
  o.a_vec = a.dim() == 1;
  o.b_vec = b.dim() == 1;
  if (o.a_vec) a = a.unsqueeze(0);
  if (o.b_vec) b = b.unsqueeze(1);
  if (trans_a) a = a.transpose(-2, -1);
  if (trans_b) b = b.transpose(-2, -1);
  o.M = a.size(-2);
  o.K = a.size(-1);
  o.N = b.size(-1);
  TQ_CHECK(o.K == b.size(-2), "matmul: inner dimensions differ: ", describe(a_in), (trans_a ? "ᵀ" : ""), " · ",
           describe(b_in), (trans_b ? "ᵀ" : ""));
  Shape ba(a.shape().begin(), a.shape().end() - 2), bb(b.shape().begin(), b.shape().end() - 2);
  o.batch = broadcast_shapes(ba, bb, "matmul batch");
  Shape sa = o.batch, sb = o.batch;
  sa.insert(sa.end(), {o.M, o.K});
  sb.insert(sb.end(), {o.K, o.N});
  o.out_dtype = promote(a.dtype(), b.dtype());
  require_float("matmul", a, b);
  o.a = a.expand(sa);
  o.b = b.expand(sb);
  return o;
}

// CPU reference: both operands widened to the compute dtype, fp32 (f64) accumulation, one
// rounding to out_dtype. Returns (batch..., M, N).
inline Tensor matmul_cpu(const MatmulOperands& o) {
  require_cpu("matmul", o.a, o.b);
  const DType ct = compute_dtype(o.out_dtype);
  Tensor ac = dense(o.a, ct), bc = dense(o.b, ct);
  const int64_t nb = numel_of(o.batch), M = o.M, K = o.K, N = o.N;
  Shape os = o.batch;
  os.insert(os.end(), {M, N});
  Tensor out = Tensor::empty(os, ct);
  TQ_DISPATCH_FLOAT(ct, T, {
    {
      for (int64_t i = 0; i < nb; ++i)
        gemm_rowmajor<T>(M, N, K, ac.data<T>() + i * M * K, bc.data<T>() + i * K * N, out.data<T>() + i * M * N);
    }
  });
  return out.to(o.out_dtype);
}

// CUDA entry point, filled in by <tq/cuda.hpp> (kernels/matmul.cuh). a (batch..., M, K) and
// b (batch..., K, N) share one batch shape (any strides); the result (batch..., M, N) is dense in
// out_dtype. A defined bias (N) is added in the accumulation precision before the single rounding
// to out_dtype (linear's fused epilogue); out_dtype may then be wider than the operands' promoted
// dtype (bf16 operands with an f32 bias give f32, as on the CPU).
struct MatmulCudaKernels {
  Tensor (*matmul)(const Tensor& a, const Tensor& b, DType out_dtype, const Tensor& bias) = nullptr;
};
inline MatmulCudaKernels& cuda_matmul_kernels() {
  static MatmulCudaKernels k;
  return k;
}

// out = op(a) · op(b), where op transposes the last two dims when asked. Batch dims broadcast.
inline Tensor matmul(const Tensor& a_in, const Tensor& b_in, bool trans_a = false, bool trans_b = false) {
  const MatmulOperands o = matmul_operands(a_in, b_in, trans_a, trans_b);
  Tensor res = o.a.device().is_cuda() ? call_cuda(cuda_matmul_kernels().matmul, "matmul", o.a, o.b, o.out_dtype, Tensor())
                                      : matmul_cpu(o);
  if (o.a_vec) res = res.squeeze(-2);
  if (o.b_vec) res = res.squeeze(-1);
  return res;
}

// The dtype of linear(x, w, bias) when its bias can be added inside the CUDA product's epilogue
// (the dtype the CPU's matmul-then-add gives), or nothing when it cannot: the bias must not widen
// the result, except an f32 bias on bf16 operands, which the GEMM writes as f32.
inline std::optional<DType> linear_fused_bias_dtype(DType mm_dtype, DType bias_dtype) {
  if (!is_floating(bias_dtype)) return std::nullopt;
  const DType out = promote(mm_dtype, bias_dtype);
  if (out == mm_dtype) return out;
  if (mm_dtype == DType::bf16 && bias_dtype == DType::f32) return DType::f32;
  return std::nullopt;
}

// Pure forward of linear with the bias fused (CUDA only): x (M, K), w (N, K), bias (N).
inline Tensor linear_fused_bias(const Tensor& x, const Tensor& w, const Tensor& bias) {
  const MatmulOperands o = matmul_operands(x, w, false, true);
  require_same_device("linear", x, bias);
  TQ_CHECK(x.device().is_cuda(), "linear: the fused bias epilogue is the CUDA path, got ", describe(x));
  const std::optional<DType> out = linear_fused_bias_dtype(o.out_dtype, bias.dtype());
  TQ_CHECK(out.has_value(), "linear: bias ", describe(bias), " cannot be fused with ", dtype_name(o.out_dtype),
           " operands");
  return call_cuda(cuda_matmul_kernels().matmul, "linear", o.a, o.b, *out, bias.detach());
}

}  // namespace ops

// Differentiable batched matmul; gradients reduce over broadcast batch dims. Only the inputs that
// require grad get one (the frozen weights of QLoRA cost no weight-gradient product).
inline Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false) {
  TQ_CHECK(a.dim() >= 2 && b.dim() >= 2, "matmul: differentiable matmul takes matrices (≥ 2 dims), got ", describe(a),
           " and ", describe(b));
  Tensor out = ops::matmul(a, b, trans_a, trans_b);
  Tensor ad = a.detach(), bd = b.detach();
  const bool need_a = a.requires_grad(), need_b = b.requires_grad();
  return record("matmul", out, {a, b}, [=](const Tensor& g) {
    // C = op(A)·op(B):  dop(A) = G·op(B)ᵀ,  dop(B) = op(A)ᵀ·G.
    Tensor ga, gb;
    if (need_a) {
      ga = trans_a ? ops::matmul(bd, g, trans_b, true) : ops::matmul(g, bd, false, !trans_b);
      ga = sum_to_shape(ga, ad.shape()).to(ad.dtype());
    }
    if (need_b) {
      gb = trans_b ? ops::matmul(g, ad, true, trans_a) : ops::matmul(ad, g, !trans_a, false);
      gb = sum_to_shape(gb, bd.shape()).to(bd.dtype());
    }
    return std::vector<Tensor>{ga, gb};
  });
}

// y (..., N) = x (..., K) · W (N, K)ᵀ + b (N).
// CPU: the product is rounded to promote(x, W), then the bias is added (a second rounding, to
// promote(product, bias)). CUDA: when the bias dtype allows (linear_fused_bias_dtype) it is added
// in fp32 inside the GEMM epilogue before the single rounding, so bf16 results may differ from the
// CPU by one bf16 rounding of the product (and an f32 result from bf16 operands is not rounded to
// bf16 first). Gradients are the same formulas either way.
inline Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor()) {
  TQ_CHECK(w.dim() == 2, "linear: weight must be (out, in), got ", describe(w));
  TQ_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear: input ", describe(x), " does not match weight ", describe(w));
  TQ_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(0)), "linear: bias ", describe(bias),
           " does not match weight ", describe(w));
  Shape lead(x.shape().begin(), x.shape().end() - 1);
  Shape os = lead;
  os.push_back(w.size(0));
  Tensor x2 = x.reshape({-1, x.size(-1)});
  const bool fuse = bias.defined() && x.device().is_cuda() && w.device() == x.device() &&
                    bias.device() == x.device() && is_floating(x.dtype()) && is_floating(w.dtype()) &&
                    ops::linear_fused_bias_dtype(promote(x.dtype(), w.dtype()), bias.dtype()).has_value();
  if (!fuse) {
    Tensor y = matmul(x2, w, false, true);
    if (bias.defined()) y = y + bias;
    return y.reshape(os);
  }
  Tensor y = ops::linear_fused_bias(x2, w, bias);
  Tensor xd = x2.detach(), wd = w.detach();
  const DType mm_dtype = promote(x.dtype(), w.dtype()), bias_dtype = bias.dtype();
  const bool need_x = x2.requires_grad(), need_w = w.requires_grad(), need_b = bias.requires_grad();
  y = record("linear", y, {x2, w, bias}, [=](const Tensor& g) {
    // As the unfused graph: the add passes g to the product in its dtype and sums it for the bias.
    Tensor gm = g.to(mm_dtype), gx, gw, gb;
    if (need_x) gx = ops::matmul(gm, wd, false, false).to(xd.dtype());  // (M, N)·(N, K)
    if (need_w) gw = ops::matmul(gm, xd, true, false).to(wd.dtype());   // (M, N)ᵀ·(M, K)
    if (need_b) gb = sum_to_shape(g, {g.size(-1)}).to(bias_dtype);
    return std::vector<Tensor>{gx, gw, gb};
  });
  return y.reshape(os);
}

}  // namespace tq
