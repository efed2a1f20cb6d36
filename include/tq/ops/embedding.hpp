// Embedding lookup: out[..., :] = weight[ids[...], :], with a scatter-add backward to the weight.
//
// ids: i64 or i32, any shape; weight (V, D) any float dtype; out (ids..., D) in weight's dtype
// (a byte copy: no rounding). Every id must lie in [0, V) — an out-of-range id is a tq::Error
// naming the id, its position and V (never a silent read past the table). Backward accumulates
// repeated ids in the compute dtype and rounds once; the row `padding_idx` (if ≥ 0) gets no
// gradient, as torch.nn.Embedding(padding_idx=...) (Gemma's embed_tokens uses padding_idx 0).
//
// On CUDA (ids on the weight's device) the lookup is index_select's gather kernel and the backward
// its deterministic scatter-add (ids sorted, each row's gradients summed in id-position order in
// fp32, written once in the weight's dtype: no (V, D) fp32 buffer). Ids are validated on the
// device; see shape_ops.hpp for how an out-of-range id is reported (check_device_index_errors).
#pragma once


#include <cstring>

#include "tq/ops/shape_ops.hpp"

namespace tq {

namespace ops {

namespace detail {
inline std::vector<int64_t> checked_ids(const char* op, const Tensor& ids, int64_t V) {
  TQ_CHECK(ids.dtype() == DType::i64 || ids.dtype() == DType::i32, op, ": ids must be i64 or i32, got ", describe(ids));
  std::vector<int64_t> v = ids.to_vector<int64_t>();
  for (size_t k = 0; k < v.size(); ++k)
    TQ_CHECK(v[k] >= 0 && v[k] < V, op, ": id ", v[k], " (at flat position ", k, ") out of range for an embedding of ",
             V, " rows");
  return v;
}
}  // namespace detail

// out (ids..., D) = weight (V, D) rows at ids.
inline Tensor embedding(const Tensor& ids, const Tensor& weight) {
  require_same_device("embedding", weight, ids);
  TQ_CHECK(weight.dim() == 2, "embedding: weight must be (V, D), got ", describe(weight));
  const int64_t V = weight.size(0), D = weight.size(1);
  if (weight.device().is_cuda()) {
    detail::check_index_dtype("embedding", ids);
    Shape out_shape = ids.shape();
    out_shape.push_back(D);
    Tensor flat = ids.detach().reshape({ids.numel()});
    return call_cuda(cuda_index_kernels().gather, "embedding", IndexOp::embedding, weight, int64_t(0), flat)
        .view(out_shape);
  }
  require_cpu("embedding", weight, ids);
  const auto id = detail::checked_ids("embedding", ids, V);
  Shape out_shape = ids.shape();
  out_shape.push_back(D);
  Tensor wc = weight.detach().contiguous();
  Tensor out = Tensor::empty(out_shape, weight.dtype());
  const size_t row = size_t(D) * dtype_size(weight.dtype());
  const char* pw = static_cast<const char*>(wc.data_ptr());
  char* po = static_cast<char*>(out.data_ptr());
  parallel_for(int64_t(id.size()), 64, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) std::memcpy(po + size_t(k) * row, pw + size_t(id[size_t(k)]) * row, row);
  });
  return out;
}

// gw (V, D) in weight_dtype: Σ of grad_out's rows (ids..., D) into the rows their ids name.
inline Tensor embedding_backward(const Tensor& grad_out, const Tensor& ids, int64_t V, DType weight_dtype,
                                 int64_t padding_idx = -1) {
  require_same_device("embedding backward", grad_out, ids);
  if (grad_out.device().is_cuda()) {
    detail::check_index_dtype("embedding backward", ids);
    TQ_CHECK(is_floating(weight_dtype), "embedding backward: the weight must be a float tensor, got ",
             dtype_name(weight_dtype));
    const int64_t D = grad_out.dim() ? grad_out.size(-1) : 1;
    TQ_CHECK(grad_out.numel() == ids.numel() * D, "embedding backward: gradient ", describe(grad_out),
             " does not match ids ", describe(ids));
    Tensor g = grad_out.detach().reshape({ids.numel(), D});
    return call_cuda(cuda_index_kernels().scatter_add, "embedding backward", IndexOp::embedding_backward, g,
                     Shape{V, D}, weight_dtype, int64_t(0), ids.detach().reshape({ids.numel()}), padding_idx);
  }
  require_cpu("embedding backward", grad_out, ids);
  const auto id = detail::checked_ids("embedding backward", ids, V);
  const int64_t D = grad_out.dim() ? grad_out.size(-1) : 1;
  TQ_CHECK(grad_out.numel() == int64_t(id.size()) * D, "embedding backward: gradient ", describe(grad_out),
           " does not match ids ", describe(ids));
  const DType ct = compute_dtype(weight_dtype);
  Tensor gc = dense(grad_out, ct);
  Tensor gw = Tensor::zeros({V, D}, ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    const C* pg = gc.data<C>();
    C* pw = gw.data<C>();
    // Columns are split across threads, so repeated ids never race.
    parallel_for(D, 64, [&](int64_t lo, int64_t hi) {
      for (size_t k = 0; k < id.size(); ++k) {
        if (id[k] == padding_idx) continue;
        C* dst = pw + id[k] * D;
        const C* src = pg + int64_t(k) * D;
        for (int64_t j = lo; j < hi; ++j) dst[j] += src[j];
      }
    });
  });
  return gw.to(weight_dtype);
}

}  // namespace ops

// ---- differentiable wrapper ----

inline Tensor embedding(const Tensor& ids, const Tensor& weight, int64_t padding_idx = -1) {
  Tensor out = ops::embedding(ids, weight);
  Tensor idd = ids.detach();
  const int64_t V = weight.size(0);
  const DType dt = weight.dtype();
  return record("embedding", out, {ids, weight}, [=](const Tensor& g) {
    return std::vector<Tensor>{Tensor(), ops::embedding_backward(g, idd, V, dt, padding_idx)};
  });
}

}  // namespace tq
