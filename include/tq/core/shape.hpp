// Shapes, strides and index helpers shared by tensors and ops.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "tq/core/error.hpp"

namespace tq {

using Shape = std::vector<int64_t>;

inline int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

inline Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (size_t i = s.size(); i-- > 0;) {
    st[i] = acc;
    acc *= std::max<int64_t>(s[i], 1);
  }
  return st;
}

// Wraps a possibly negative dimension index into [0, ndim).
inline int64_t wrap_dim(int64_t d, int64_t ndim, const char* op = "dim") {
  int64_t w = d < 0 ? d + ndim : d;
  TQ_CHECK(w >= 0 && w < ndim, op, ": dimension ", d, " out of range for a tensor of ", ndim, " dims");
  return w;
}

// numpy broadcasting of two shapes.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op = "broadcast") {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    TQ_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", a, " and ", b, " do not broadcast");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Calls fn(offset_0, offset_1, ...) for every index of `shape` in row-major order, where each
// offset is the dot product of the index with that operand's strides (elements).
template <size_t N, class F>
void for_each_offset(const Shape& shape, const std::array<const Shape*, N>& strides,
                     std::array<int64_t, N> base, F&& fn) {
  const int64_t nd = int64_t(shape.size());
  if (numel_of(shape) == 0) return;
  if (nd == 0) {
    std::apply(fn, base);
    return;
  }
  std::vector<int64_t> idx(nd, 0);
  std::array<int64_t, N> off = base;
  const int64_t inner = shape[nd - 1];
  std::array<int64_t, N> inner_stride;
  for (size_t k = 0; k < N; ++k) inner_stride[k] = (*strides[k])[nd - 1];
  while (true) {
    std::array<int64_t, N> o = off;
    for (int64_t i = 0; i < inner; ++i) {
      std::apply(fn, o);
      for (size_t k = 0; k < N; ++k) o[k] += inner_stride[k];
    }
    int64_t d = nd - 2;
    for (; d >= 0; --d) {
      ++idx[d];
      for (size_t k = 0; k < N; ++k) off[k] += (*strides[k])[d];
      if (idx[d] < shape[d]) break;
      for (size_t k = 0; k < N; ++k) off[k] -= (*strides[k])[d] * shape[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

}  // namespace tq
