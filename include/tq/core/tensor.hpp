// Tensor: a typed, strided view of a Storage, plus its autograd state.
//
// Copying a Tensor copies the handle: both name the same TensorImpl, so a parameter's `.grad`
// accumulates wherever the handle went. Views (view/reshape/slice/narrow/select/transpose/
// permute/expand/squeeze/unsqueeze) share storage and never copy; they are differentiable.
// `contiguous()` copies only when the layout is not already row-major dense.
#pragma once

#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "tq/core/dtype.hpp"
#include "tq/core/shape.hpp"
#include "tq/core/storage.hpp"

namespace tq {

struct Node;

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;       // in elements
  int64_t offset = 0;  // in elements
  DType dtype = DType::f32;
  // autograd
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;  // accumulated gradient of a leaf (same shape and dtype)
  std::shared_ptr<Node> grad_fn;     // the node that produced this tensor (non-leaf)
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- factories ----
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor scalar(double value, DType dtype = DType::f32, Device device = Device::cpu()) {
    return full({}, value, dtype, device);
  }
  // Values are converted to `dtype` (default: T's own dtype).
  template <class T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape);
  template <class T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape, DType dtype) {
    return from_vector(values, shape).to(dtype);
  }
  static Tensor arange(int64_t n, DType dtype = DType::i64, Device device = Device::cpu());
  // A view of existing memory (no copy); `holder` keeps it alive.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device, std::shared_ptr<void> holder) {
    auto impl = std::make_shared<TensorImpl>();
    impl->storage = Storage::wrap(data, size_t(numel_of(shape)) * dtype_size(dtype), device, std::move(holder));
    impl->shape = shape;
    impl->strides = contiguous_strides(shape);
    impl->dtype = dtype;
    return Tensor(std::move(impl));
  }

  // ---- properties ----
  bool defined() const { return impl_ != nullptr; }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device(); }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t offset() const { return impl().offset; }
  int64_t dim() const { return int64_t(impl().shape.size()); }
  int64_t size(int64_t d) const { return shape()[wrap_dim(d, dim(), "size")]; }
  int64_t stride(int64_t d) const { return strides()[wrap_dim(d, dim(), "stride")]; }
  int64_t numel() const { return numel_of(shape()); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype()); }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int64_t d = dim() - 1; d >= 0; --d) {
      if (shape()[d] != 1 && strides()[d] != expect) return false;
      expect *= shape()[d];
    }
    return true;
  }
  const std::shared_ptr<Storage>& storage() const { return impl().storage; }
  TensorImpl& impl() const {
    TQ_CHECK(impl_ != nullptr, "use of an undefined tensor");
    return *impl_;
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

  // Pointer to the first element (offset applied).
  void* data_ptr() const {
    return static_cast<char*>(storage()->data()) + offset() * int64_t(dtype_size(dtype()));
  }
  template <class T>
  T* data() const {
    TQ_CHECK(dtype_v<T> == dtype(), "data<", dtype_name(dtype_v<T>), ">(): tensor has dtype ", dtype_name(dtype()));
    return static_cast<T*>(data_ptr());
  }

  // ---- views (no copy; differentiable) ----
  Tensor view(const Shape& shape) const;     // requires a compatible layout
  Tensor reshape(const Shape& shape) const;  // view when possible, else copy
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const { return slice(dim, start, start + length); }
  Tensor select(int64_t dim, int64_t index) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor t() const { return transpose(-2, -1); }
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor expand(const Shape& shape) const;
  Tensor squeeze(int64_t dim) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor flatten(int64_t start = 0, int64_t end = -1) const;

  // ---- copies ----
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(DType dtype) const;     // differentiable for float dtypes
  Tensor to(Device device) const;   // differentiable
  Tensor to(Device device, DType dtype) const { return to(device).to(dtype); }
  Tensor cpu() const { return to(Device::cpu()); }
  // Copies src (broadcast to this shape, converted to this dtype) into this tensor in place.
  Tensor& copy_(const Tensor& src);
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }

  // Host access for tests and tools (copies to CPU, converts).
  template <class T = double>
  std::vector<T> to_vector() const;
  template <class T = double>
  T item() const {
    TQ_CHECK(numel() == 1, "item(): tensor has ", numel(), " elements, shape ", shape());
    return to_vector<T>()[0];
  }

  // ---- autograd ----
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& requires_grad_(bool on = true) {
    TQ_CHECK(!on || is_floating(dtype()), "requires_grad_: only float tensors can require gradients, got ",
             dtype_name(dtype()));
    TQ_CHECK(!on || !impl().grad_fn, "requires_grad_: call it on leaf tensors only");
    impl().requires_grad = on;
    return *this;
  }
  bool is_leaf() const { return !impl().grad_fn; }
  Tensor grad() const { return impl().grad ? Tensor(impl().grad) : Tensor(); }
  void set_grad(const Tensor& g) { impl().grad = g.impl_; }
  void zero_grad() { impl().grad.reset(); }
  const std::shared_ptr<Node>& grad_fn() const { return impl().grad_fn; }
  // A new leaf that shares storage and has no history.
  Tensor detach() const {
    auto d = std::make_shared<TensorImpl>();
    d->storage = impl().storage;
    d->shape = impl().shape;
    d->strides = impl().strides;
    d->offset = impl().offset;
    d->dtype = impl().dtype;
    return Tensor(std::move(d));
  }
  // Backpropagates from this tensor; `grad` defaults to 1 for a one-element tensor.
  void backward(const Tensor& grad = Tensor()) const;

  std::string to_string(int64_t max_per_dim = 6) const;

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// A view sharing t's storage with the given geometry (no autograd; internal building block).
inline Tensor make_view(const Tensor& t, Shape shape, Shape strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = t.storage();
  impl->shape = std::move(shape);
  impl->strides = std::move(strides);
  impl->offset = offset;
  impl->dtype = t.dtype();
  return Tensor(std::move(impl));
}

inline std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.to_string(); }

// Names a tensor in error messages: "f32[2, 3] on cpu".
inline std::string describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return str_cat(dtype_name(t.dtype()), t.shape(), " on ", t.device().str());
}

}  // namespace tq

#include "tq/autograd/node.hpp"
#include "tq/core/tensor_impl.hpp"
