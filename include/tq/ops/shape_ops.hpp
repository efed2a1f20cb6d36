// Shape-changing copies: concat, stack, index_select, masked_scatter (PyTorch semantics).
//
// Forward passes move raw bytes, so they work for every dtype and never round. Backward passes
// accumulate in the compute dtype (fp32 for bf16/f16/f32, double for f64) and round once.
// Inputs must share dtype and device; indices must lie in range (no negative wrap-around, as
// torch.index_select). masked_scatter fills the positions where the broadcast mask is true, in
// row-major order, with consecutive elements of the flattened source — how PaliGemma puts image
// features into the `<image>` token slots.
//
// On CUDA, index values live on the device and are checked there, never read by the host inside
// an op (ops stay asynchronous and graph-capturable): a kernel that meets an out-of-range index
// records it (first one wins), and ops::check_device_index_errors() — called by the caller at a
// point where it synchronizes anyway, e.g. after reading the loss — throws the tq::Error naming
// the op, the index and the bound. Until then the offending element is handled safely: a gathered
// row is zero-filled, a scattered gradient row is dropped, a masked_scatter position beyond the
// source keeps the input's value. On the CPU the same checks throw at once.
#pragma once


#include <cstring>

#include "tq/ops/matmul.hpp"

namespace tq {

namespace ops {

// Ops whose CUDA kernels validate indices on the device (named in the error).
enum class IndexOp : int {
  embedding,
  embedding_backward,
  index_select,
  index_select_backward,
  masked_scatter,
  cross_entropy,
  cross_entropy_backward
};

inline const char* index_op_name(IndexOp op) {
  switch (op) {
    case IndexOp::embedding: return "embedding";
    case IndexOp::embedding_backward: return "embedding backward";
    case IndexOp::index_select: return "index_select";
    case IndexOp::index_select_backward: return "index_select backward";
    case IndexOp::masked_scatter: return "masked_scatter";
    case IndexOp::cross_entropy: return "cross_entropy";
    case IndexOp::cross_entropy_backward: return "cross_entropy backward";
  }
  return "?";
}

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/index.cuh); empty in a CPU-only program.
struct IndexCudaKernels {
  // x with dimension `dim` replaced by the slices named by `index` (1-D i64/i32 on x's device).
  Tensor (*gather)(IndexOp, const Tensor& x, int64_t dim, const Tensor& index) = nullptr;
  // zeros(x_shape, x_dtype) with grad's slices added at their indices; slices whose index equals
  // `skip` (embedding's padding_idx; −1 = none) add nothing.
  Tensor (*scatter_add)(IndexOp, const Tensor& grad, const Shape& x_shape, DType x_dtype, int64_t dim,
                        const Tensor& index, int64_t skip) = nullptr;
  // `mask` is dense bool of x's shape.
  Tensor (*masked_scatter)(const Tensor& x, const Tensor& mask, const Tensor& source) = nullptr;
  std::vector<Tensor> (*masked_scatter_backward)(const Tensor& grad, const Tensor& mask, const Shape& source_shape,
                                                 DType source_dtype) = nullptr;
  void (*check_errors)(Device) = nullptr;
};
inline IndexCudaKernels& cuda_index_kernels() {
  static IndexCudaKernels k;
  return k;
}

// Throws tq::Error if a kernel on `device` met an out-of-range index (embedding ids,
// index_select indices, masked_scatter positions beyond the source, cross_entropy targets) since
// the last call, and clears the record. It waits for the current stream: call it where the host
// synchronizes anyway (after a step, when reading the loss). A no-op for CPU devices and in
// programs without the CUDA backend.
inline void check_device_index_errors(Device device = Device::cuda()) {
  if (!device.is_cuda() || cuda_index_kernels().check_errors == nullptr) return;
  cuda_index_kernels().check_errors(device);
}

namespace detail {

// Splits `shape` around `dim`: (outer, n, inner), element (o, j, i) at (o·n + j)·inner + i.
struct DimSplit {
  int64_t outer = 1, n = 1, inner = 1;
};
inline DimSplit split_at(const Shape& shape, int64_t dim) {
  DimSplit s;
  for (int64_t d = 0; d < int64_t(shape.size()); ++d) {
    if (d < dim) s.outer *= shape[d];
    else if (d == dim) s.n = shape[d];
    else s.inner *= shape[d];
  }
  return s;
}

inline const char* bytes_of(const Tensor& t) { return static_cast<const char*>(t.data_ptr()); }

inline void check_index_dtype(const char* op, const Tensor& index) {
  TQ_CHECK(index.dtype() == DType::i64 || index.dtype() == DType::i32, op, ": index must be i64 or i32, got ",
           describe(index));
}

// Values of an integer index tensor (i64 or i32), checked to lie in [0, n).
inline std::vector<int64_t> checked_indices(const char* op, const Tensor& index, int64_t n, const std::string& what) {
  check_index_dtype(op, index);
  std::vector<int64_t> v = index.to_vector<int64_t>();
  for (size_t k = 0; k < v.size(); ++k)
    TQ_CHECK(v[k] >= 0 && v[k] < n, op, ": index ", v[k], " (at position ", k, ") out of range for ", what, " of size ",
             n);
  return v;
}

}  // namespace detail

// ---- concat ----

// out = tensors joined along `dim`; all shapes equal except at dim.
inline Tensor concat(const std::vector<Tensor>& tensors, int64_t dim) {
  TQ_CHECK(!tensors.empty(), "concat: no tensors given");
  const Tensor& first = tensors[0];
  TQ_CHECK(first.dim() > 0, "concat: zero-dimensional tensor ", describe(first), " cannot be concatenated");
  dim = wrap_dim(dim, first.dim(), "concat");
  Shape out_shape = first.shape();
  out_shape[dim] = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    require_same_device("concat", first, t);
    TQ_CHECK(t.dtype() == first.dtype(), "concat: dtype mismatch: tensor 0 is ", describe(first), ", tensor ", i, " is ",
             describe(t));
    bool ok = t.dim() == first.dim();
    for (int64_t d = 0; ok && d < t.dim(); ++d) ok = d == dim || t.shape()[d] == first.shape()[d];
    TQ_CHECK(ok, "concat: shapes differ outside dimension ", dim, ": tensor 0 is ", describe(first), ", tensor ", i,
             " is ", describe(t));
    out_shape[dim] += t.shape()[dim];
  }
  if (first.device().is_cuda()) {
    // Each input is copied into its slab of the output by the strided copy kernels (one launch per
    // input; the KV cache's dim-2 concat moves 16-byte runs of D).
    Tensor out = Tensor::empty(out_shape, first.dtype(), first.device());
    int64_t at = 0;
    for (const Tensor& t : tensors) {
      out.narrow(dim, at, t.shape()[dim]).copy_(t.detach());
      at += t.shape()[dim];
    }
    return out;
  }
  require_cpu("concat", first);
  Tensor out = Tensor::empty(out_shape, first.dtype());
  const auto so = detail::split_at(out_shape, dim);
  const size_t es = dtype_size(first.dtype());
  char* po = static_cast<char*>(out.data_ptr());
  int64_t at = 0;  // running offset along dim
  for (const Tensor& t : tensors) {
    Tensor tc = t.detach().contiguous();
    const int64_t block = t.shape()[dim] * so.inner;  // elements per outer index
    const char* pt = detail::bytes_of(tc);
    for (int64_t o = 0; o < so.outer; ++o)
      std::memcpy(po + size_t((o * so.n + at) * so.inner) * es, pt + size_t(o * block) * es, size_t(block) * es);
    at += t.shape()[dim];
  }
  return out;
}

// Gradients of concat: the slices of grad_out along dim, of the given sizes.
inline std::vector<Tensor> concat_backward(const Tensor& grad_out, const std::vector<int64_t>& sizes, int64_t dim) {
  std::vector<Tensor> grads;
  int64_t at = 0;
  for (int64_t n : sizes) {
    grads.push_back(grad_out.detach().narrow(dim, at, n).contiguous());
    at += n;
  }
  TQ_CHECK(at == grad_out.size(dim), "concat backward: sizes ", sizes, " do not add up to ", describe(grad_out));
  return grads;
}

// ---- stack ----

// out = tensors stacked along a new dimension `dim` (in [-(ndim+1), ndim]); all shapes equal.
inline Tensor stack(const std::vector<Tensor>& tensors, int64_t dim) {
  TQ_CHECK(!tensors.empty(), "stack: no tensors given");
  dim = wrap_dim(dim, tensors[0].dim() + 1, "stack");
  std::vector<Tensor> parts;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TQ_CHECK(tensors[i].shape() == tensors[0].shape(), "stack: shape mismatch: tensor 0 is ", describe(tensors[0]),
             ", tensor ", i, " is ", describe(tensors[i]));
    parts.push_back(tensors[i].detach().unsqueeze(dim));  // a view, no copy
  }
  return concat(parts, dim);
}

inline std::vector<Tensor> stack_backward(const Tensor& grad_out, int64_t count, int64_t dim) {
  std::vector<Tensor> grads;
  for (int64_t i = 0; i < count; ++i) grads.push_back(grad_out.detach().select(dim, i).contiguous());
  return grads;
}

// ---- index_select ----

// out[..., k, ...] = x[..., index[k], ...] along dim; index is 1-D (or 0-D) i64/i32.
inline Tensor index_select(const Tensor& x, int64_t dim, const Tensor& index) {
  require_same_device("index_select", x, index);
  TQ_CHECK(index.dim() <= 1, "index_select: index must be 1-D, got ", describe(index));
  TQ_CHECK(x.dim() > 0, "index_select: cannot index a zero-dimensional tensor ", describe(x));
  dim = wrap_dim(dim, x.dim(), "index_select");
  if (x.device().is_cuda()) {
    detail::check_index_dtype("index_select", index);
    return call_cuda(cuda_index_kernels().gather, "index_select", IndexOp::index_select, x, dim, index);
  }
  require_cpu("index_select", x, index);
  const auto idx = detail::checked_indices("index_select", index, x.shape()[dim], str_cat("dimension ", dim, " of ", describe(x)));
  Shape out_shape = x.shape();
  out_shape[dim] = int64_t(idx.size());
  Tensor xc = x.detach().contiguous();
  Tensor out = Tensor::empty(out_shape, x.dtype());
  const auto s = detail::split_at(x.shape(), dim);
  const size_t es = dtype_size(x.dtype()), row = size_t(s.inner) * es;
  const char* px = detail::bytes_of(xc);
  char* po = static_cast<char*>(out.data_ptr());
  const int64_t K = int64_t(idx.size());
  for (int64_t o = 0; o < s.outer; ++o)
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(po + size_t(o * K + k) * row, px + size_t(o * s.n + idx[size_t(k)]) * row, row);
  return out;
}

// gx = zeros(x_shape) with grad_out's slices added at their indices (repeats accumulate).
inline Tensor index_select_backward(const Tensor& grad_out, const Shape& x_shape, DType x_dtype, int64_t dim,
                                    const Tensor& index) {
  require_same_device("index_select backward", grad_out, index);
  dim = wrap_dim(dim, int64_t(x_shape.size()), "index_select backward");
  if (grad_out.device().is_cuda()) {
    detail::check_index_dtype("index_select backward", index);
    TQ_CHECK(is_floating(x_dtype), "index_select backward: the input must be a float tensor, got ", dtype_name(x_dtype));
    Shape gs = x_shape;
    gs[size_t(dim)] = index.numel();
    TQ_CHECK(grad_out.shape() == gs, "index_select backward: gradient ", describe(grad_out), " does not match ", gs);
    return call_cuda(cuda_index_kernels().scatter_add, "index_select backward", IndexOp::index_select_backward,
                     grad_out, x_shape, x_dtype, dim, index, int64_t(-1));
  }
  require_cpu("index_select backward", grad_out, index);
  const auto idx = detail::checked_indices("index_select backward", index, x_shape[dim], "the input");
  const DType ct = compute_dtype(x_dtype);
  Tensor gc = dense(grad_out, ct);
  Tensor gx = Tensor::zeros(x_shape, ct);
  const auto s = detail::split_at(x_shape, dim);
  const int64_t K = int64_t(idx.size());
  TQ_DISPATCH_FLOAT(ct, C, {
    const C* pg = gc.data<C>();
    C* px = gx.data<C>();
    parallel_for(s.outer, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o)
        for (int64_t k = 0; k < K; ++k) {
          C* dst = px + (o * s.n + idx[size_t(k)]) * s.inner;
          const C* src = pg + (o * K + k) * s.inner;
          for (int64_t i = 0; i < s.inner; ++i) dst[i] += src[i];
        }
    });
  });
  return gx.to(x_dtype);
}

// ---- masked_scatter ----

namespace detail {
// The mask broadcast to `shape` as dense bools, after checking it.
inline Tensor dense_mask(const char* op, const Tensor& mask, const Tensor& x) {
  TQ_CHECK(mask.dtype() == DType::boolean, op, ": mask must be bool, got ", describe(mask));
  const Shape bs = broadcast_shapes(x.shape(), mask.shape(), op);
  TQ_CHECK(bs == x.shape(), op, ": mask ", describe(mask), " does not broadcast to the input ", describe(x));
  return mask.detach().expand(x.shape()).contiguous();
}
}  // namespace detail

// out = x with the mask's true positions (row-major) filled by source's elements in order.
inline Tensor masked_scatter(const Tensor& x, const Tensor& mask, const Tensor& source) {
  require_same_device("masked_scatter", x, mask, source);
  TQ_CHECK(source.dtype() == x.dtype(), "masked_scatter: source ", describe(source), " must have the input's dtype, ",
           describe(x));
  if (x.device().is_cuda()) {
    // The true-position count lives on the device: positions beyond the source are reported
    // through check_device_index_errors() instead of here.
    Tensor m = detail::dense_mask("masked_scatter", mask, x);
    return call_cuda(cuda_index_kernels().masked_scatter, "masked_scatter", x, m, source);
  }
  require_cpu("masked_scatter", x, mask, source);
  Tensor m = detail::dense_mask("masked_scatter", mask, x);
  const bool* pm = m.data<bool>();
  const int64_t n = x.numel();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += pm[i];
  TQ_CHECK(source.numel() >= count, "masked_scatter: mask has ", count, " true positions but source ", describe(source),
           " has only ", source.numel(), " elements");
  Tensor out = x.detach().contiguous().clone();
  Tensor sc = source.detach().contiguous();
  const size_t es = dtype_size(x.dtype());
  char* po = static_cast<char*>(out.data_ptr());
  const char* ps = detail::bytes_of(sc);
  for (int64_t i = 0, k = 0; i < n; ++i)
    if (pm[i]) std::memcpy(po + size_t(i) * es, ps + size_t(k++) * es, es);
  return out;
}

// {gx, gsource}: gx = grad_out zeroed where the mask is true; gsource[k] = grad_out at the k-th
// true position (elements of source beyond the mask's count get 0).
inline std::vector<Tensor> masked_scatter_backward(const Tensor& grad_out, const Tensor& mask, const Shape& source_shape,
                                                   DType source_dtype) {
  require_same_device("masked_scatter backward", grad_out, mask);
  if (grad_out.device().is_cuda()) {
    require_float("masked_scatter backward", grad_out);
    TQ_CHECK(is_floating(source_dtype), "masked_scatter backward: the source must be a float tensor, got ",
             dtype_name(source_dtype));
    Tensor m = detail::dense_mask("masked_scatter backward", mask, grad_out);
    return call_cuda(cuda_index_kernels().masked_scatter_backward, "masked_scatter backward", grad_out, m, source_shape,
                     source_dtype);
  }
  require_cpu("masked_scatter backward", grad_out, mask);
  Tensor m = detail::dense_mask("masked_scatter backward", mask, grad_out);
  const DType ct = compute_dtype(grad_out.dtype());
  Tensor gx = dense(grad_out, ct).clone();
  Tensor gs = Tensor::zeros({numel_of(source_shape)}, ct);
  const bool* pm = m.data<bool>();
  TQ_DISPATCH_FLOAT(ct, C, {
    C* px = gx.data<C>();
    C* ps = gs.data<C>();
    for (int64_t i = 0, k = 0; i < gx.numel(); ++i)
      if (pm[i]) {
        ps[k++] = px[i];
        px[i] = C(0);
      }
  });
  return {gx.to(grad_out.dtype()), gs.reshape(source_shape).to(source_dtype)};
}

}  // namespace ops

// ---- differentiable wrappers ----

inline Tensor concat(const std::vector<Tensor>& tensors, int64_t dim) {
  Tensor out = ops::concat(tensors, dim);
  const int64_t d = wrap_dim(dim, tensors[0].dim(), "concat");
  std::vector<int64_t> sizes;
  for (const Tensor& t : tensors) sizes.push_back(t.shape()[d]);
  return record("concat", out, tensors, [sizes, d](const Tensor& g) { return ops::concat_backward(g, sizes, d); });
}

inline Tensor stack(const std::vector<Tensor>& tensors, int64_t dim) {
  Tensor out = ops::stack(tensors, dim);
  const int64_t d = wrap_dim(dim, tensors[0].dim() + 1, "stack");
  const int64_t count = int64_t(tensors.size());
  return record("stack", out, tensors, [count, d](const Tensor& g) { return ops::stack_backward(g, count, d); });
}

inline Tensor index_select(const Tensor& x, int64_t dim, const Tensor& index) {
  Tensor out = ops::index_select(x, dim, index);
  const Shape xs = x.shape();
  const DType dt = x.dtype();
  Tensor id = index.detach();
  return record("index_select", out, {x}, [=](const Tensor& g) {
    return std::vector<Tensor>{ops::index_select_backward(g, xs, dt, dim, id)};
  });
}

inline Tensor masked_scatter(const Tensor& x, const Tensor& mask, const Tensor& source) {
  Tensor out = ops::masked_scatter(x, mask, source);
  Tensor md = mask.detach();
  const Shape ss = source.shape();
  const DType sdt = source.dtype();
  return record("masked_scatter", out, {x, source}, [=](const Tensor& g) {
    return ops::masked_scatter_backward(g, md, ss, sdt);
  });
}

}  // namespace tq
