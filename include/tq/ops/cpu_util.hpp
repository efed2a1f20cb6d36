// Helpers for the CPU reference backend: compute types and device checks.
//
// CPU math runs in float for f32/bf16/f16 tensors (bf16/f16 are widened on load and rounded once
// on store, i.e. fp32 accumulation), in double for f64 and in int64 for integer tensors.
#pragma once

#include "tq/core/tensor.hpp"
#include "tq/core/thread_pool.hpp"

namespace tq::ops {

inline DType compute_dtype(DType t) {
  if (t == DType::f64) return DType::f64;
  if (is_floating(t)) return DType::f32;
  return DType::i64;
}

// Dense CPU copy of t in dtype dt (no copy when it already is one); never records autograd.
inline Tensor dense(const Tensor& t, DType dt) {
  Tensor d = t.detach();
  if (d.dtype() != dt) d = d.to(dt);
  return d.contiguous();
}

// Throws unless every defined tensor is on the CPU (the CUDA backend dispatches before this).
template <class... Ts>
void require_cpu(const char* op, const Ts&... ts) {
  auto one = [&](const Tensor& t) {
    TQ_CHECK(!t.defined() || t.device().is_cpu(), op, ": no CUDA kernel is available for ", describe(t),
             " in this build (include <tq/cuda.hpp> in a CUDA translation unit)");
  };
  (one(ts), ...);
}

template <class... Ts>
void require_same_device(const char* op, const Tensor& first, const Ts&... rest) {
  auto one = [&](const Tensor& t) {
    TQ_CHECK(!t.defined() || t.device() == first.device(), op, ": tensors on different devices: ",
             describe(first), " and ", describe(t));
  };
  (one(rest), ...);
}

template <class... Ts>
void require_float(const char* op, const Ts&... ts) {
  auto one = [&](const Tensor& t) {
    TQ_CHECK(!t.defined() || is_floating(t.dtype()), op, ": expected a float tensor, got ", describe(t));
  };
  (one(ts), ...);
}

}  // namespace tq::ops
