// Reductions over dimensions: sum, mean, max (values), argmax; and sum_to_shape, which undoes
// broadcasting in backward passes. Accumulation is in double on the CPU.
#pragma once

#include <limits>

#include "tq/ops/elementwise.hpp"

namespace tq {

namespace ops {

// Normalized, sorted, unique dims; empty input = all dims.
inline std::vector<int64_t> reduce_dims(const std::vector<int64_t>& dims, int64_t ndim, const char* op) {
  std::vector<int64_t> out;
  if (dims.empty()) {
    for (int64_t d = 0; d < ndim; ++d) out.push_back(d);
    return out;
  }
  for (int64_t d : dims) out.push_back(wrap_dim(d, ndim, op));
  std::sort(out.begin(), out.end());
  TQ_CHECK(std::adjacent_find(out.begin(), out.end()) == out.end(), op, ": repeated dimension in ", dims);
  return out;
}

inline Shape reduced_shape(const Shape& s, const std::vector<int64_t>& dims, bool keepdim) {
  Shape out;
  for (int64_t d = 0; d < int64_t(s.size()); ++d) {
    bool r = std::find(dims.begin(), dims.end(), d) != dims.end();
    if (!r) out.push_back(s[d]);
    else if (keepdim) out.push_back(1);
  }
  return out;
}

enum class ReduceKind { sum, max, argmax };

// The permutation that moves the reduced `dims` (sorted, unique) last, so each output element
// reduces one contiguous row; `inner` receives that row's length. Shared by the CPU and CUDA paths.
inline std::vector<int64_t> reduced_dims_last(const Shape& shape, const std::vector<int64_t>& dims, int64_t& inner) {
  std::vector<int64_t> perm;
  for (int64_t d = 0; d < int64_t(shape.size()); ++d)
    if (std::find(dims.begin(), dims.end(), d) == dims.end()) perm.push_back(d);
  inner = 1;
  for (int64_t d : dims) {
    perm.push_back(d);
    inner *= shape[size_t(d)];
  }
  return perm;
}

// CUDA entry point, filled in by <tq/cuda.hpp>; `dims` arrive normalized (reduce_dims).
struct ReduceCudaKernels {
  Tensor (*reduce)(ReduceKind, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) = nullptr;
};
inline ReduceCudaKernels& cuda_reduce_kernels() {
  static ReduceCudaKernels k;
  return k;
}

// Core loop: the reduced dims are moved last, so each output element reduces a contiguous row.
inline Tensor reduce(ReduceKind kind, const Tensor& x, const std::vector<int64_t>& dims_in, bool keepdim, const char* op) {
  const auto dims = reduce_dims(dims_in, x.dim(), op);
  if (x.device().is_cuda()) {
    int64_t count = 1;
    for (int64_t d : dims) count *= x.shape()[d];
    TQ_CHECK(kind == ReduceKind::sum || count > 0, op, ": cannot reduce an empty dimension of ", describe(x));
    return call_cuda(cuda_reduce_kernels().reduce, op, kind, x, dims, keepdim);
  }
  require_cpu(op, x);
  int64_t inner = 1;
  const std::vector<int64_t> perm = reduced_dims_last(x.shape(), dims, inner);
  const DType ct = DType::f64;  // reference accumulation in double for every dtype
  Tensor xc = dense(x.detach().permute(perm), ct);
  const Shape out_shape = reduced_shape(x.shape(), dims, keepdim);
  const int64_t outer = numel_of(out_shape);
  TQ_CHECK(kind == ReduceKind::sum || inner > 0, op, ": cannot reduce an empty dimension of ", describe(x));
  const double* px = xc.data<double>();
  if (kind == ReduceKind::argmax) {
    Tensor out = Tensor::empty(out_shape, DType::i64);
    int64_t* o = out.data<int64_t>();
    parallel_for(outer, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const double* row = px + i * inner;
        int64_t best = 0;
        for (int64_t j = 1; j < inner; ++j)
          if (row[j] > row[best] || (row[j] != row[j] && row[best] == row[best])) best = j;
        o[i] = best;
      }
    });
    return out;
  }
  Tensor out = Tensor::empty(out_shape, DType::f64);
  double* o = out.data<double>();
  parallel_for(outer, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const double* row = px + i * inner;
      double acc = kind == ReduceKind::sum ? 0.0 : -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < inner; ++j) {
        if (kind == ReduceKind::sum) acc += row[j];
        else if (row[j] > acc || row[j] != row[j]) acc = row[j];
      }
      o[i] = acc;
    }
  });
  return out.to(x.dtype());
}

}  // namespace ops

// Sums `t` down to `shape` (which broadcasts to t's shape): the backward of broadcasting.
inline Tensor sum_to_shape(const Tensor& t, const Shape& shape) {
  if (t.shape() == shape) return t;
  std::vector<int64_t> dims;
  const int64_t lead = t.dim() - int64_t(shape.size());
  TQ_CHECK(lead >= 0, "sum_to_shape: cannot reduce ", t.shape(), " to ", shape);
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d < lead) dims.push_back(d);
    else if (shape[d - lead] == 1 && t.shape()[d] != 1) dims.push_back(d);
    else TQ_CHECK(shape[d - lead] == t.shape()[d], "sum_to_shape: cannot reduce ", t.shape(), " to ", shape);
  }
  if (dims.empty()) return t.reshape(shape);
  return ops::reduce(ops::ReduceKind::sum, t, dims, true, "sum_to_shape").reshape(shape);
}

inline Tensor sum(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false) {
  Tensor out = ops::reduce(ops::ReduceKind::sum, x, dims, keepdim, "sum");
  Shape in_shape = x.shape();
  Shape kept = ops::reduced_shape(x.shape(), ops::reduce_dims(dims, x.dim(), "sum"), true);
  return record("sum", out, {x}, [in_shape, kept](const Tensor& g) {
    return std::vector<Tensor>{g.reshape(kept).expand(in_shape).contiguous()};
  });
}

inline Tensor mean(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false) {
  int64_t count = 1;
  for (int64_t d : ops::reduce_dims(dims, x.dim(), "mean")) count *= x.shape()[d];
  TQ_CHECK(count > 0, "mean: empty reduction over ", describe(x));
  return sum(x, dims, keepdim) * (1.0 / double(count));
}

// Maximum over one dimension; the gradient flows to the first maximal element.
inline Tensor max(const Tensor& x, int64_t dim, bool keepdim = false) {
  dim = wrap_dim(dim, x.dim(), "max");
  Tensor idx = ops::reduce(ops::ReduceKind::argmax, x, {dim}, true, "max");
  Tensor out = ops::reduce(ops::ReduceKind::max, x, {dim}, keepdim, "max");
  Shape in_shape = x.shape();
  DType dt = x.dtype();
  Device dev = x.device();
  return record("max", out, {x}, [=](const Tensor& g) {
    if (!dev.is_cpu()) {
      // On a device: the gradient times a one-hot mask of the argmax along `dim` (device ops only).
      Shape pos_shape(in_shape.size(), 1);
      pos_shape[size_t(dim)] = in_shape[size_t(dim)];
      Tensor pos = Tensor::arange(in_shape[size_t(dim)], DType::i64, dev).reshape(pos_shape);
      Tensor hit = ops::binary(BinaryOp::eq, pos, idx).to(dt);  // in_shape, 1 at the argmax
      return std::vector<Tensor>{ops::binary(BinaryOp::mul, hit, g.detach().reshape(idx.shape())).to(dt)};
    }
    Tensor gk = g.reshape(idx.shape()).to(DType::f64).contiguous();
    Tensor gi = Tensor::zeros(in_shape, DType::f64);
    // Scatter each output gradient to its argmax position along `dim`.
    Tensor gi_perm = gi.transpose(dim, -1);
    Tensor idx_perm = idx.transpose(dim, -1).contiguous();
    Tensor gk_perm = gk.transpose(dim, -1).contiguous();
    const int64_t n = in_shape[dim];
    const int64_t rows = idx_perm.numel();
    Tensor gi_c = gi_perm.contiguous();
    double* pg = gi_c.data<double>();
    for (int64_t r = 0; r < rows; ++r) pg[r * n + idx_perm.data<int64_t>()[r]] = gk_perm.data<double>()[r];
    gi_perm.copy_(gi_c);
    return std::vector<Tensor>{gi.to(dt)};
  });
}

inline Tensor argmax(const Tensor& x, int64_t dim, bool keepdim = false) {
  return ops::reduce(ops::ReduceKind::argmax, x, {wrap_dim(dim, x.dim(), "argmax")}, keepdim, "argmax");
}

}  // namespace tq
