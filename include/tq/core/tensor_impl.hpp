// Out-of-line definitions of Tensor's members: factories, views, copies, host access, printing.
#pragma once

#include <cmath>
#include <iomanip>
#include <numeric>
#include <optional>
#include <sstream>

#include "tq/autograd/node.hpp"
#include "tq/core/tensor.hpp"

namespace tq {

Tensor sum_to_shape(const Tensor& t, const Shape& shape);  // ops/reduce.hpp

// Strided copy/convert between tensors on non-CPU devices: set by the CUDA backend.
inline std::function<void(const Tensor& dst, const Tensor& src)>& device_copy_hook() {
  static std::function<void(const Tensor&, const Tensor&)> hook;
  return hook;
}
inline std::function<void(const Tensor& dst, double value)>& device_fill_hook() {
  static std::function<void(const Tensor&, double)> hook;
  return hook;
}

namespace detail {

// dst[i] = convert(src[i]) over dst's shape; src already has dst's shape (possibly 0-strided).
template <class D, class S>
void cpu_copy_typed(const Tensor& dst, const Tensor& src) {
  D* d = static_cast<D*>(dst.storage()->data());
  const S* s = static_cast<const S*>(src.storage()->data());
  if (dst.is_contiguous() && src.is_contiguous()) {
    D* dp = d + dst.offset();
    const S* sp = s + src.offset();
    const int64_t n = dst.numel();
    if constexpr (std::is_same_v<D, S>) {
      std::memcpy(dp, sp, size_t(n) * sizeof(D));
    } else {
      for (int64_t i = 0; i < n; ++i) dp[i] = from_double<D>(to_double(sp[i]));
    }
    return;
  }
  for_each_offset<2>(dst.shape(), {&dst.strides(), &src.strides()}, {dst.offset(), src.offset()},
                     [&](int64_t od, int64_t os) {
                       if constexpr (std::is_same_v<D, S>) d[od] = s[os];
                       else d[od] = from_double<D>(to_double(s[os]));
                     });
}

inline void cpu_copy(const Tensor& dst, const Tensor& src) {
  TQ_DISPATCH(dst.dtype(), D, TQ_DISPATCH(src.dtype(), S, cpu_copy_typed<D, S>(dst, src)));
}

inline Shape checked_shape(const Shape& shape, const char* op) {
  for (int64_t d : shape) TQ_CHECK(d >= 0, op, ": negative dimension in shape ", shape);
  return shape;
}

// Stride layout for viewing `t` as `shape` without copying, or empty when impossible.
inline std::optional<Shape> view_strides(const Tensor& t, const Shape& shape) {
  if (t.is_contiguous()) return contiguous_strides(shape);
  // Walk the old dims in chunks that are contiguous among themselves, matching new dims to them.
  const Shape& os = t.shape();
  const Shape& ost = t.strides();
  Shape nst(shape.size());
  int64_t vi = int64_t(shape.size()) - 1;
  int64_t chunk_base_stride = 0, tensor_numel = 1, view_numel = 1;
  for (int64_t ti = int64_t(os.size()) - 1; ti >= 0; --ti) {
    if (tensor_numel == 1) chunk_base_stride = ost[ti];
    tensor_numel *= os[ti];
    if (ti == 0 || (os[ti - 1] != 1 && ost[ti - 1] != tensor_numel * chunk_base_stride)) {
      while (vi >= 0 && (view_numel < tensor_numel || shape[vi] == 1)) {
        nst[vi] = view_numel * chunk_base_stride;
        view_numel *= shape[vi];
        --vi;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (ti > 0) {
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (vi != -1) return std::nullopt;
  return nst;
}

inline Shape infer_shape(Shape shape, int64_t numel, const char* op) {
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      TQ_CHECK(infer < 0, op, ": only one dimension may be -1 in ", shape);
      infer = int64_t(i);
    } else {
      TQ_CHECK(shape[i] >= 0, op, ": invalid dimension in ", shape);
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    TQ_CHECK(known != 0 && numel % known == 0, op, ": cannot infer -1 in ", shape, " for ", numel, " elements");
    shape[infer] = numel / known;
  }
  TQ_CHECK(numel_of(shape) == numel, op, ": shape ", shape, " is invalid for ", numel, " elements");
  return shape;
}

}  // namespace detail

inline Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  detail::checked_shape(shape, "empty");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = Storage::allocate(size_t(numel_of(shape)) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}
inline Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  backend(device).fill_zero(t.data_ptr(), t.nbytes(), device);
  return t;
}
inline Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
inline Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}
template <class T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape) {
  TQ_CHECK(int64_t(values.size()) == numel_of(shape), "from_vector: ", values.size(), " values for shape ", shape);
  if constexpr (std::is_same_v<T, bool>) {
    Tensor t = empty(shape, DType::boolean);
    for (size_t i = 0; i < values.size(); ++i) t.data<bool>()[i] = values[i];
    return t;
  } else {
    Tensor t = empty(shape, dtype_v<T>);
    if (!values.empty()) std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(T));
    return t;
  }
}
inline Tensor Tensor::arange(int64_t n, DType dtype, Device device) {
  Tensor t = empty({n}, dtype);
  TQ_DISPATCH(dtype, T, {
    T* p = t.data<T>();
    for (int64_t i = 0; i < n; ++i) p[i] = from_double<T>(double(i));
  });
  return device.is_cpu() ? t : t.to(device);
}

inline Tensor& Tensor::copy_(const Tensor& src) {
  TQ_CHECK(src.defined(), "copy_: undefined source");
  Shape bs = broadcast_shapes(src.shape(), shape(), "copy_");
  TQ_CHECK(bs == shape(), "copy_: source shape ", src.shape(), " does not broadcast to ", shape());
  Tensor s = src.shape() == shape() ? src : src.expand(shape());
  if (numel() == 0) return *this;
  if (device() != s.device()) {
    // Stage through a dense buffer of the destination dtype on the source device.
    Tensor dense = Tensor::empty(shape(), dtype(), s.device());
    dense.copy_(s);
    Tensor moved = Tensor::empty(shape(), dtype(), device());
    DeviceBackend& b = backend(device().is_cpu() ? s.device() : device());
    b.copy(moved.data_ptr(), device(), dense.data_ptr(), s.device(), moved.nbytes());
    if (device().is_cpu()) backend(s.device()).synchronize(s.device());
    return copy_(moved);
  }
  if (device().is_cpu()) {
    detail::cpu_copy(*this, s);
  } else {
    TQ_CHECK(device_copy_hook() != nullptr, "copy_: no kernels for device ", device().str());
    device_copy_hook()(*this, s);
  }
  return *this;
}

inline Tensor& Tensor::fill_(double value) {
  if (device().is_cpu()) {
    TQ_DISPATCH(dtype(), T, {
      T v = from_double<T>(value);
      T* base = static_cast<T*>(storage()->data());
      for_each_offset<1>(shape(), {&strides()}, {offset()}, [&](int64_t o) { base[o] = v; });
    });
  } else {
    TQ_CHECK(device_fill_hook() != nullptr, "fill_: no kernels for device ", device().str());
    device_fill_hook()(*this, value);
  }
  return *this;
}

inline Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  Tensor out = empty(shape(), dtype(), device());
  out.copy_(detach());
  return record("contiguous", out, {*this}, [](const Tensor& g) { return std::vector<Tensor>{g}; });
}

inline Tensor Tensor::clone() const {
  Tensor out = empty(shape(), dtype(), device());
  out.copy_(detach());
  return record("clone", out, {*this}, [](const Tensor& g) { return std::vector<Tensor>{g}; });
}

inline Tensor Tensor::to(DType dt) const {
  if (dt == dtype()) return *this;
  Tensor out = empty(shape(), dt, device());
  out.copy_(detach());
  if (!is_floating(dt) || !is_floating(dtype())) return out;
  DType src = dtype();
  return record("to_dtype", out, {*this}, [src](const Tensor& g) { return std::vector<Tensor>{g.to(src)}; });
}

inline Tensor Tensor::to(Device dev) const {
  if (dev == device()) return *this;
  Tensor out = empty(shape(), dtype(), dev);
  out.copy_(detach());
  Device src = device();
  return record("to_device", out, {*this}, [src](const Tensor& g) { return std::vector<Tensor>{g.to(src)}; });
}

// ---- views ----

inline Tensor Tensor::view(const Shape& s) const {
  Shape shape = detail::infer_shape(s, numel(), "view");
  auto st = detail::view_strides(*this, shape);
  TQ_CHECK(st.has_value(), "view: cannot view ", describe(*this), " with strides ", strides(), " as ", shape,
           " without a copy (use reshape)");
  Tensor out = make_view(*this, shape, *st, offset());
  Shape in_shape = this->shape();
  return record("view", out, {*this}, [in_shape](const Tensor& g) { return std::vector<Tensor>{g.reshape(in_shape)}; });
}

inline Tensor Tensor::reshape(const Shape& s) const {
  Shape shape = detail::infer_shape(s, numel(), "reshape");
  if (detail::view_strides(*this, shape)) return view(shape);
  return contiguous().view(shape);
}

inline Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = wrap_dim(d, dim(), "slice");
  TQ_CHECK(step > 0, "slice: step must be positive, got ", step);
  const int64_t n = shape()[d];
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::clamp<int64_t>(start, 0, n);
  end = std::clamp<int64_t>(end, start, n);
  Shape sh = shape(), st = strides();
  sh[d] = (end - start + step - 1) / step;
  st[d] *= step;
  Tensor out = make_view(*this, sh, st, offset() + start * strides()[d]);
  Shape in_shape = shape();
  DType dt = dtype();
  Device dev = device();
  return record("slice", out, {*this}, [=](const Tensor& g) {
    Tensor gi = Tensor::zeros(in_shape, dt, dev);
    gi.slice(d, start, end, step).copy_(g);
    return std::vector<Tensor>{gi};
  });
}

inline Tensor Tensor::select(int64_t d, int64_t index) const {
  d = wrap_dim(d, dim(), "select");
  const int64_t n = shape()[d];
  TQ_CHECK(index >= -n && index < n, "select: index ", index, " out of range for dimension ", d, " of size ", n);
  if (index < 0) index += n;
  Shape sh = shape(), st = strides();
  sh.erase(sh.begin() + d);
  st.erase(st.begin() + d);
  Tensor out = make_view(*this, sh, st, offset() + index * strides()[d]);
  Shape in_shape = shape();
  DType dt = dtype();
  Device dev = device();
  return record("select", out, {*this}, [=](const Tensor& g) {
    Tensor gi = Tensor::zeros(in_shape, dt, dev);
    gi.select(d, index).copy_(g);
    return std::vector<Tensor>{gi};
  });
}

inline Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  d0 = wrap_dim(d0, dim(), "transpose");
  d1 = wrap_dim(d1, dim(), "transpose");
  Shape sh = shape(), st = strides();
  std::swap(sh[d0], sh[d1]);
  std::swap(st[d0], st[d1]);
  Tensor out = make_view(*this, sh, st, offset());
  return record("transpose", out, {*this},
                [=](const Tensor& g) { return std::vector<Tensor>{g.transpose(d0, d1)}; });
}

inline Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  TQ_CHECK(int64_t(dims.size()) == dim(), "permute: ", dims.size(), " dims given for a tensor of ", dim());
  Shape sh(dims.size()), st(dims.size());
  std::vector<int64_t> inverse(dims.size(), -1);
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = wrap_dim(dims[i], dim(), "permute");
    TQ_CHECK(inverse[d] < 0, "permute: dimension ", d, " repeated in ", dims);
    inverse[d] = int64_t(i);
    sh[i] = shape()[d];
    st[i] = strides()[d];
  }
  Tensor out = make_view(*this, sh, st, offset());
  return record("permute", out, {*this}, [inverse](const Tensor& g) { return std::vector<Tensor>{g.permute(inverse)}; });
}

inline Tensor Tensor::expand(const Shape& s) const {
  TQ_CHECK(s.size() >= shape().size(), "expand: cannot expand ", shape(), " to fewer dims ", s);
  const size_t lead = s.size() - shape().size();
  Shape sh(s.size()), st(s.size(), 0);
  for (size_t i = 0; i < s.size(); ++i) {
    if (i < lead) {
      TQ_CHECK(s[i] >= 0, "expand: invalid size in ", s);
      sh[i] = s[i];
      continue;
    }
    int64_t cur = shape()[i - lead];
    int64_t want = s[i] == -1 ? cur : s[i];
    TQ_CHECK(cur == want || cur == 1, "expand: cannot expand ", shape(), " to ", s);
    sh[i] = want;
    st[i] = cur == want ? strides()[i - lead] : 0;
  }
  Tensor out = make_view(*this, sh, st, offset());
  Shape in_shape = shape();
  return record("expand", out, {*this}, [in_shape](const Tensor& g) { return std::vector<Tensor>{sum_to_shape(g, in_shape)}; });
}

inline Tensor Tensor::squeeze(int64_t d) const {
  d = wrap_dim(d, dim(), "squeeze");
  if (shape()[d] != 1) return *this;
  Shape sh = shape(), st = strides();
  sh.erase(sh.begin() + d);
  st.erase(st.begin() + d);
  Tensor out = make_view(*this, sh, st, offset());
  Shape in_shape = shape();
  return record("squeeze", out, {*this}, [in_shape](const Tensor& g) { return std::vector<Tensor>{g.reshape(in_shape)}; });
}

inline Tensor Tensor::unsqueeze(int64_t d) const {
  d = wrap_dim(d, dim() + 1, "unsqueeze");
  Shape sh = shape(), st = strides();
  int64_t new_stride = d < dim() ? strides()[d] * shape()[d] : 1;
  sh.insert(sh.begin() + d, 1);
  st.insert(st.begin() + d, new_stride);
  Tensor out = make_view(*this, sh, st, offset());
  return record("unsqueeze", out, {*this}, [d](const Tensor& g) { return std::vector<Tensor>{g.squeeze(d)}; });
}

inline Tensor Tensor::flatten(int64_t start, int64_t end) const {
  if (dim() == 0) return reshape({1});
  start = wrap_dim(start, dim(), "flatten");
  end = wrap_dim(end, dim(), "flatten");
  TQ_CHECK(start <= end, "flatten: start ", start, " after end ", end);
  Shape sh(shape().begin(), shape().begin() + start);
  int64_t m = 1;
  for (int64_t i = start; i <= end; ++i) m *= shape()[i];
  sh.push_back(m);
  sh.insert(sh.end(), shape().begin() + end + 1, shape().end());
  return reshape(sh);
}

// ---- host access and printing ----

template <class T>
std::vector<T> Tensor::to_vector() const {
  NoGradGuard ng;
  Tensor c = detach().to(Device::cpu()).to(dtype_v<T>).contiguous();
  std::vector<T> out(size_t(c.numel()));
  if constexpr (std::is_same_v<T, bool>) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = c.data<bool>()[i];
  } else if (!out.empty()) {
    std::memcpy(out.data(), c.data_ptr(), out.size() * sizeof(T));
  }
  return out;
}

inline std::string Tensor::to_string(int64_t max_per_dim) const {
  if (!defined()) return "tensor(undefined)";
  std::vector<double> v = to_vector<double>();
  const bool fl = is_floating(dtype());
  std::ostringstream os;
  os << "tensor(";
  std::function<void(int64_t, int64_t)> rec = [&](int64_t d, int64_t base) {
    if (d == dim()) {
      if (fl) os << std::setprecision(5) << std::fixed << v[size_t(base)];
      else os << int64_t(v[size_t(base)]);
      return;
    }
    os << "[";
    int64_t n = shape()[d], inner = 1;
    for (int64_t k = d + 1; k < dim(); ++k) inner *= shape()[k];
    for (int64_t i = 0; i < n; ++i) {
      if (n > max_per_dim && i == max_per_dim / 2) {
        os << "..., ";
        i = n - max_per_dim / 2;
      }
      rec(d + 1, base + i * inner);
      if (i + 1 < n) os << (d + 1 == dim() ? ", " : ",\n        ");
    }
    os << "]";
  };
  if (numel() > 0) rec(0, 0);
  else os << "[]";
  os << ", dtype=" << dtype_name(dtype()) << ", shape=" << str_cat(shape());
  if (!device().is_cpu()) os << ", device=" << device().str();
  if (requires_grad()) os << ", requires_grad";
  os << ")";
  return os.str();
}

}  // namespace tq
