// Matrix products: matmul (batched, numpy batch broadcasting, optional transposed operands) and
// linear (y = x·Wᵀ + b). bf16/f16 operands are multiplied in fp32 with fp32 accumulation and
// rounded once on output, as tensor cores do.
#pragma once

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

// out = op(a) · op(b), where op transposes the last two dims when asked. Batch dims broadcast.
inline Tensor matmul(const Tensor& a_in, const Tensor& b_in, bool trans_a = false, bool trans_b = false) {
  require_same_device("matmul", a_in, b_in);
  require_cpu("matmul", a_in, b_in);
  TQ_CHECK(a_in.dim() >= 1 && b_in.dim() >= 1, "matmul: scalars are not matrices: ", describe(a_in), ", ", describe(b_in));
  Tensor a = a_in.detach(), b = b_in.detach();
  const bool a_vec = a.dim() == 1, b_vec = b.dim() == 1;
  if (a_vec) a = a.unsqueeze(0);
  if (b_vec) b = b.unsqueeze(1);
  if (trans_a) a = a.transpose(-2, -1);
  if (trans_b) b = b.transpose(-2, -1);
  const int64_t M = a.size(-2), K = a.size(-1), K2 = b.size(-2), N = b.size(-1);
  TQ_CHECK(K == K2, "matmul: inner dimensions differ: ", describe(a_in), (trans_a ? "ᵀ" : ""), " · ", describe(b_in),
           (trans_b ? "ᵀ" : ""));
  Shape ba(a.shape().begin(), a.shape().end() - 2), bb(b.shape().begin(), b.shape().end() - 2);
  Shape batch = broadcast_shapes(ba, bb, "matmul batch");
  Shape sa = batch, sb = batch;
  sa.insert(sa.end(), {M, K});
  sb.insert(sb.end(), {K, N});
  const DType out_dt = promote(a.dtype(), b.dtype());
  require_float("matmul", a, b);
  const DType ct = compute_dtype(out_dt);
  Tensor ac = dense(a.expand(sa), ct), bc = dense(b.expand(sb), ct);
  const int64_t nb = numel_of(batch);
  Shape os = batch;
  os.insert(os.end(), {M, N});
  Tensor out = Tensor::empty(os, ct);
  TQ_DISPATCH_FLOAT(ct, T, {
    {
      for (int64_t i = 0; i < nb; ++i)
        gemm_rowmajor<T>(M, N, K, ac.data<T>() + i * M * K, bc.data<T>() + i * K * N, out.data<T>() + i * M * N);
    }
  });
  Tensor res = out.to(out_dt);
  if (a_vec) res = res.squeeze(-2);
  if (b_vec) res = res.squeeze(-1);
  return res;
}

}  // namespace ops

// Differentiable batched matmul; gradients reduce over broadcast batch dims.
inline Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false) {
  TQ_CHECK(a.dim() >= 2 && b.dim() >= 2, "matmul: differentiable matmul takes matrices (≥ 2 dims), got ", describe(a),
           " and ", describe(b));
  Tensor out = ops::matmul(a, b, trans_a, trans_b);
  Tensor ad = a.detach(), bd = b.detach();
  return record("matmul", out, {a, b}, [=](const Tensor& g) {
    // C = op(A)·op(B):  dop(A) = G·op(B)ᵀ,  dop(B) = op(A)ᵀ·G.
    Tensor ga = trans_a ? ops::matmul(bd, g, trans_b, true) : ops::matmul(g, bd, false, !trans_b);
    Tensor gb = trans_b ? ops::matmul(g, ad, true, trans_a) : ops::matmul(ad, g, !trans_a, false);
    return std::vector<Tensor>{sum_to_shape(ga, ad.shape()).to(ad.dtype()), sum_to_shape(gb, bd.shape()).to(bd.dtype())};
  });
}

// y (..., N) = x (..., K) · W (N, K)ᵀ + b (N).
inline Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor()) {
  TQ_CHECK(w.dim() == 2, "linear: weight must be (out, in), got ", describe(w));
  TQ_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear: input ", describe(x), " does not match weight ", describe(w));
  TQ_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(0)), "linear: bias ", describe(bias),
           " does not match weight ", describe(w));
  Shape lead(x.shape().begin(), x.shape().end() - 1);
  Tensor x2 = x.reshape({-1, x.size(-1)});
  Tensor y = matmul(x2, w, false, true);
  if (bias.defined()) y = y + bias;
  Shape os = lead;
  os.push_back(w.size(0));
  return y.reshape(os);
}

}  // namespace tq
