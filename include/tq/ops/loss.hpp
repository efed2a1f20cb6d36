// Cross-entropy over logits (N, V) with integer targets (N), as HF's ForCausalLMLoss (spec §7):
//   loss_r = logsumexp(logits_r) − logits_r[target_r]      for rows with target_r != ignore_index
//   mean:       Σ loss_r / (number of supervised rows)      (token-level mean, HF's default)
//   sum:        Σ loss_r
//   normalized: Σ loss_r / normalizer                       (HF's num_items_in_batch: the training
//               loop divides by the supervised tokens of the whole effective batch, which spans
//               several micro-batches)
//
// Math is fp32 for f32/bf16/f16 logits (f64 for f64) whatever the logits dtype, but the logits
// are read in their own dtype row by row: no fp32 copy of (N, V) is ever made. Forward keeps one
// log-sum-exp per row (N values) for the backward, which writes dlogits in the logits' dtype.
//
// All rows ignored under `mean`: the loss is 0 with zero gradient (HF returns NaN from 0/0). A
// micro-batch without supervised tokens then adds nothing instead of poisoning the accumulation.
// A target outside [0, V) that is not ignore_index throws tq::Error naming the row.
//
// On CUDA the whole computation stays on the device — the loss is a device scalar, the count of
// supervised rows and the divisor never reach the host — so the op neither synchronizes nor
// reads the targets on the host. A bad target is recorded on the device, its row treated as
// ignored, and reported by ops::check_device_index_errors() (see shape_ops.hpp).
#pragma once

#include <cmath>

#include "tq/ops/shape_ops.hpp"  // IndexOp, check_device_index_errors

namespace tq {

enum class Reduction { mean, sum };

struct CrossEntropyOptions {
  int64_t ignore_index = -100;
  Reduction reduction = Reduction::mean;
};

namespace ops {

// What the summed loss is divided by: the supervised row count (mean), 1 (sum) or a given
// normalizer (cross_entropy_normalized).
enum class CrossEntropyDivisor { count, one, fixed };

// What the CUDA forward leaves on the device.
struct CrossEntropyCudaResult {
  Tensor loss;      // () compute dtype: Σ row_loss / divisor, 0 when the divisor is 0
  Tensor row_loss;  // (N) compute dtype, 0 on ignored rows
  Tensor lse;       // (N) compute dtype, 0 on ignored rows
  Tensor divisor;   // () f64
};

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/cross_entropy.cuh); empty in a CPU-only
// program. Arguments arrive checked for shape and dtype (check_cross_entropy_args).
struct CrossEntropyCudaKernels {
  CrossEntropyCudaResult (*forward)(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                                    CrossEntropyDivisor mode, double normalizer) = nullptr;
  // dlogits (N, V) in the logits' dtype = (grad / divisor)·(softmax − onehot) on supervised rows,
  // 0 elsewhere; grad () and divisor () live on the device.
  Tensor (*backward)(const Tensor& grad, const Tensor& divisor, const Tensor& logits, const Tensor& targets,
                     const Tensor& lse, int64_t ignore_index) = nullptr;
};
inline CrossEntropyCudaKernels& cuda_cross_entropy_kernels() {
  static CrossEntropyCudaKernels k;
  return k;
}

// Shapes, dtypes and devices of logits (N, V) and targets (N).
inline void check_cross_entropy_args(const Tensor& logits, const Tensor& targets) {
  const char* op = "cross_entropy";
  require_same_device(op, logits, targets);
  require_float(op, logits);
  TQ_CHECK(logits.dim() == 2, op, ": logits must be (N, V), got ", describe(logits));
  TQ_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must be (N) = [", logits.size(0),
           "], got ", describe(targets), " for logits ", describe(logits));
  TQ_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32, op, ": targets must be i64 (or i32), got ",
           describe(targets));
}

// What the forward leaves for the backward: per-row log-sum-exp and the loss sum.
struct CrossEntropyStats {
  double sum = 0;     // Σ loss_r over supervised rows, accumulated in double
  int64_t count = 0;  // supervised rows
  Tensor lse;         // (N) compute dtype; meaningless on ignored rows
};

// Targets as i64, checked against (N) and [0, V) ∪ {ignore_index}.
inline std::vector<int64_t> cross_entropy_targets(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const char* op = "cross_entropy";
  check_cross_entropy_args(logits, targets);
  require_cpu(op, logits, targets);
  std::vector<int64_t> t = dense(targets, DType::i64).to_vector<int64_t>();
  const int64_t V = logits.size(1);
  for (size_t r = 0; r < t.size(); ++r)
    TQ_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), op, ": target ", t[r], " of row ", r,
             " is outside [0, ", V, ") and is not ignore_index ", ignore_index);
  return t;
}

// Calls fn.template operator()<T, C>() with T the logits' storage type and C its compute type.
template <class F>
void dispatch_logits(DType dt, F&& fn) {
  switch (dt) {
    case DType::f32: fn.template operator()<float, float>(); break;
    case DType::f64: fn.template operator()<double, double>(); break;
    case DType::bf16: fn.template operator()<bf16, float>(); break;
    case DType::f16: fn.template operator()<f16, float>(); break;
    default: fail(str_cat("cross_entropy: logits must be a float tensor, got ", dt));
  }
}

// Pure forward: per-row log-sum-exp (max-shifted) and the summed loss of the supervised rows.
inline CrossEntropyStats cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100) {
  const std::vector<int64_t> t = cross_entropy_targets(logits, targets, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  const DType ct = compute_dtype(logits.dtype());
  Tensor x = dense(logits, logits.dtype());  // contiguous, still in the logits' own dtype
  CrossEntropyStats st;
  st.lse = Tensor::zeros({N}, ct);
  std::vector<double> row_loss(size_t(N), 0.0);
  dispatch_logits(logits.dtype(), [&]<class T, class C>() {
    const T* px = x.data<T>();  // (N, V)
    C* lse = st.lse.data<C>();  // (N)
    parallel_for(N, std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        if (t[size_t(r)] == ignore_index) continue;
        const T* row = px + r * V;
        C mx = C(row[0]);
        for (int64_t c = 1; c < V; ++c) mx = std::max(mx, C(row[c]));
        C sum = 0;
        for (int64_t c = 0; c < V; ++c) sum += std::exp(C(row[c]) - mx);
        lse[r] = mx + std::log(sum);
        row_loss[size_t(r)] = double(lse[r] - C(row[t[size_t(r)]]));
      }
    });
  });
  for (int64_t r = 0; r < N; ++r) {  // serial sum: deterministic whatever the thread count
    if (t[size_t(r)] == ignore_index) continue;
    st.sum += row_loss[size_t(r)];
    ++st.count;
  }
  return st;
}

// Pure backward: dlogits (N, V) in the logits' dtype = weight · (softmax(logits_r) − onehot(target_r))
// on supervised rows, 0 on ignored rows; `weight` is dL/d(Σ loss_r).
inline Tensor cross_entropy_backward(double weight, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int64_t ignore_index = -100) {
  const std::vector<int64_t> t = cross_entropy_targets(logits, targets, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  const DType ct = compute_dtype(logits.dtype());
  TQ_CHECK(lse.dim() == 1 && lse.size(0) == N, "cross_entropy backward: lse ", describe(lse), " for logits ",
           describe(logits));
  Tensor x = dense(logits, logits.dtype()), l = dense(lse, ct);
  Tensor grad = Tensor::empty({N, V}, logits.dtype());
  dispatch_logits(logits.dtype(), [&]<class T, class C>() {
    const T* px = x.data<T>();       // (N, V)
    const C* pl = l.data<C>();       // (N)
    T* pg = grad.data<T>();          // (N, V)
    const C w = C(weight);
    parallel_for(N, std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* row = px + r * V;
        T* g = pg + r * V;
        const int64_t tr = t[size_t(r)];
        if (tr == ignore_index) {
          std::fill(g, g + V, T(C(0)));
          continue;
        }
        for (int64_t c = 0; c < V; ++c) {
          const C p = std::exp(C(row[c]) - pl[r]);
          g[c] = T(w * (p - (c == tr ? C(1) : C(0))));
        }
      }
    });
  });
  return grad;
}

// The loss as one autograd node: Σ loss_r / divisor (0 when the divisor is 0).
inline Tensor cross_entropy_node(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                                 CrossEntropyDivisor mode, double normalizer = 1.0) {
  Tensor ld = logits.detach(), td = targets.detach();
  if (ld.device().is_cuda()) {
    check_cross_entropy_args(ld, td);
    CrossEntropyCudaResult r =
        call_cuda(cuda_cross_entropy_kernels().forward, "cross_entropy", ld, td, ignore_index, mode, normalizer);
    Tensor lse = r.lse, divisor = r.divisor;
    return record("cross_entropy", r.loss, {logits}, [ld, td, lse, divisor, ignore_index](const Tensor& g) {
      return std::vector<Tensor>{call_cuda(cuda_cross_entropy_kernels().backward, "cross_entropy backward", g, divisor,
                                           ld, td, lse, ignore_index)};
    });
  }
  CrossEntropyStats st = cross_entropy_forward(ld, td, ignore_index);
  const double div = mode == CrossEntropyDivisor::count ? double(st.count)
                     : mode == CrossEntropyDivisor::one ? 1.0
                                                        : normalizer;
  const DType ct = compute_dtype(logits.dtype());
  Tensor out = Tensor::full({}, div > 0 ? st.sum / div : 0.0, ct);
  Tensor lse = st.lse;
  return record("cross_entropy", out, {logits}, [ld, td, lse, div, ignore_index](const Tensor& g) {
    const double w = div > 0 ? g.item<double>() / div : 0.0;
    return std::vector<Tensor>{cross_entropy_backward(w, ld, td, lse, ignore_index)};
  });
}

}  // namespace ops

// Differentiable cross-entropy; a scalar in fp32 (f64 for f64 logits). Gradient flows to logits only.
inline Tensor cross_entropy(const Tensor& logits, const Tensor& targets, const CrossEntropyOptions& opt = {}) {
  // mean with no supervised row divides by 0: the node then gives 0.
  return ops::cross_entropy_node(logits, targets, opt.ignore_index,
                                 opt.reduction == Reduction::sum ? ops::CrossEntropyDivisor::one
                                                                 : ops::CrossEntropyDivisor::count);
}

// Σ loss_r / normalizer, for gradient accumulation over micro-batches (normalizer > 0: the number of
// supervised tokens in the whole effective batch).
inline Tensor cross_entropy_normalized(const Tensor& logits, const Tensor& targets, double normalizer,
                                       int64_t ignore_index = -100) {
  TQ_CHECK(normalizer > 0 && std::isfinite(normalizer), "cross_entropy_normalized: normalizer must be > 0, got ",
           normalizer);
  return ops::cross_entropy_node(logits, targets, ignore_index, ops::CrossEntropyDivisor::fixed, normalizer);
}

}  // namespace tq
