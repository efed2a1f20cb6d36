// Fused linear + cross-entropy over a large vocabulary: the tied lm_head and the loss as one op
// that never holds the logits of all rows at once.
//
//   logits = h (n, D) · W (V, D)ᵀ       fp32 accumulation, one rounding to T = promote(h, W)
//   y      = c·tanh(logits / c)          optional final softcap c (Gemma 2; 0 = off), every step
//                                        rounded to T as the unfused model's ops do:
//                                        y = T(T(tanh(T(x / c_T))) · c_T), c_T = c rounded to T
//   loss   = Σ_{r: t_r ≠ ignore} (logsumexp(y_r) − y_r[t_r]) / normalizer      (fp32; f64 for f64)
//
// normalizer > 0 is used as given (HF's num_items_in_batch, cross_entropy_normalized); 0 means
// the number of supervised rows (cross_entropy's mean; no supervised row → loss 0, zero grads).
//
// Forward numerics equal the unfused path of apps/paligemma (linear → softcap ops in the model
// dtype → .to(f32) → cross_entropy[_normalized]) up to fp32 summation order.
// Gradients: the unfused graph rounds dlogits to T after the loss, after ·c, after tanh' and after
// /c; here dlogits = s·(softmax − onehot)·(1 − tanh²(x/c)) is computed in fp32 and rounded once
// to T (s = 1/normalizer), then dh = dlogits·W and dW = dlogitsᵀ·h accumulate in fp32. The two
// differ by a few roundings of T, well inside the bf16 tolerance; this one is the more accurate.
//
// Memory: rows run in chunks; the chunk's logits (rows, V) in T are the only V-wide buffer, at most
// kLinearCeChunkBytes = 256 MiB (V = 257216 in bf16: 512 rows; fp32 logits are never formed). The
// gradient for a unit incoming gradient is produced during the forward — dlogits overwrite the
// chunk's logits and go straight into dh (and dW when W requires grad) — so backward only scales
// by the incoming gradient: one logits product per chunk in total. Kept for backward: dh (n, D)
// and, only when W requires grad, dW (V, D), both in fp32 (dW is 4·V·D bytes: 2.1 GB at V=257216,
// D=2048; in QLoRA W is frozen and this is never allocated).
//
// Targets (n) i64 or i32. On the CPU, and for CPU targets with a CUDA h, a target outside [0, V)
// that is not ignore_index throws tq::Error naming the row. Device targets are never read by the
// host (no synchronization inside the op): there, such a row's loss and gradients become NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "tq/autograd/node.hpp"
#include "tq/ops/loss.hpp"
#include "tq/ops/matmul.hpp"

namespace tq {

struct LinearCrossEntropyOptions {
  int64_t ignore_index = -100;
  double softcap = 0.0;     // final-logit softcap c (logits → c·tanh(logits/c)); 0 = off
  double normalizer = 0.0;  // > 0: Σ loss_r / normalizer; 0: mean over the supervised rows
  int64_t chunk_rows = 0;   // rows per chunk; 0 = as many as fit kLinearCeChunkBytes (tests force it)
};

namespace ops {

// Upper bound of the chunk's logits buffer (rows · V · sizeof(T)).
inline constexpr int64_t kLinearCeChunkBytes = int64_t(256) << 20;

// Rows per chunk: as many as fit the budget, in whole 128-row GEMM tiles when that many fit.
inline int64_t linear_ce_chunk_rows(int64_t n, int64_t V, DType logits_dtype, int64_t forced = 0) {
  const int64_t cap = std::max<int64_t>(n, 1);
  if (forced > 0) return std::min(forced, cap);
  int64_t r = kLinearCeChunkBytes / (std::max<int64_t>(V, 1) * int64_t(dtype_size(logits_dtype)));
  if (r >= 128) r = r / 128 * 128;
  return std::clamp<int64_t>(r, 1, cap);
}

// What the forward produces: the loss and, when asked, the gradients for an incoming gradient of 1.
struct LinearCrossEntropyResult {
  Tensor loss;    // () f32 (f64 when T is f64)
  Tensor grad_h;  // (n, D) f32 (f64), undefined unless asked
  Tensor grad_w;  // (V, D) f32 (f64), undefined unless asked
};

// CUDA entry point, filled in by <tq/cuda.hpp> (kernels/linear_cross_entropy.cuh). Inputs arrive
// validated (linear_ce_check); targets may be on the CPU or on h's device.
struct LinearCrossEntropyCudaKernels {
  LinearCrossEntropyResult (*forward)(const Tensor& h, const Tensor& w, const Tensor& targets,
                                      const LinearCrossEntropyOptions& opt, bool want_grad_h, bool want_grad_w) = nullptr;
};
inline LinearCrossEntropyCudaKernels& cuda_linear_cross_entropy_kernels() {
  static LinearCrossEntropyCudaKernels k;
  return k;
}

inline void linear_ce_check(const Tensor& h, const Tensor& w, const Tensor& targets, const LinearCrossEntropyOptions& opt) {
  const char* op = "linear_cross_entropy";
  TQ_CHECK(h.dim() == 2, op, ": hidden states must be (n, D), got ", describe(h));
  TQ_CHECK(w.dim() == 2 && w.size(1) == h.size(1), op, ": weight must be (V, D) with D = ", h.size(1), ", got ",
           describe(w));
  TQ_CHECK(w.size(0) >= 1 && h.size(1) >= 1, op, ": empty vocabulary or hidden size: ", describe(w));
  require_float(op, h, w);
  require_same_device(op, h, w);
  TQ_CHECK(targets.dim() == 1 && targets.size(0) == h.size(0), op, ": targets must be (n) = [", h.size(0), "], got ",
           describe(targets));
  TQ_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32, op, ": targets must be i64 (or i32), got ",
           describe(targets));
  TQ_CHECK(targets.device() == h.device() || targets.device().is_cpu(), op, ": targets ", describe(targets),
           " must be on the CPU or on ", h.device().str());
  TQ_CHECK(std::isfinite(opt.normalizer) && opt.normalizer >= 0, op, ": normalizer must be >= 0 (0 = mean), got ",
           opt.normalizer);
  TQ_CHECK(std::isfinite(opt.softcap) && opt.softcap >= 0, op, ": softcap must be >= 0 (0 = off), got ", opt.softcap);
}

// Host targets as i64, checked against [0, V) ∪ {ignore_index}.
inline std::vector<int64_t> linear_ce_host_targets(const Tensor& targets, int64_t V, int64_t ignore_index) {
  std::vector<int64_t> t = dense(targets, DType::i64).to_vector<int64_t>();
  for (size_t r = 0; r < t.size(); ++r)
    TQ_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), "linear_cross_entropy: target ", t[r], " of row ", r,
             " is outside [0, ", V, ") and is not ignore_index ", ignore_index);
  return t;
}

// The logit the loss sees for a stored logit x (already rounded to T), and dy/dx in `deriv`.
template <class T, class C>
inline C softcap_logit(C x, C cap, C& deriv) {
  if (cap == C(0)) {
    deriv = C(1);
    return x;
  }
  const C a = C(T(x / cap));
  const C th = std::tanh(a);
  deriv = C(1) - th * th;  // d(c·tanh(x/c))/dx; the ·c and /c cancel
  return C(T(C(T(th)) * cap));
}

// Rows of one chunk: per-row loss (lse − y_t) and, when dlogits is given, s·(p − onehot)·y'(x).
template <class T, class C>
void linear_ce_rows_cpu(const T* logits, T* dlogits, int64_t rows, int64_t V, const int64_t* t, int64_t ignore_index,
                        C cap, C scale, double* row_loss) {
  parallel_for(rows, std::max<int64_t>(1, 65536 / V), [&](int64_t lo, int64_t hi) {
    std::vector<C> y(static_cast<size_t>(V)), dy(static_cast<size_t>(V));
    for (int64_t r = lo; r < hi; ++r) {
      const T* x = logits + r * V;  // (V)
      T* g = dlogits ? dlogits + r * V : nullptr;
      if (t[r] == ignore_index) {
        if (g) std::fill(g, g + V, T(C(0)));
        row_loss[r] = 0.0;
        continue;
      }
      C mx = -std::numeric_limits<C>::infinity();
      for (int64_t c = 0; c < V; ++c) {
        y[size_t(c)] = softcap_logit<T, C>(C(x[c]), cap, dy[size_t(c)]);
        mx = std::max(mx, y[size_t(c)]);
      }
      C sum = 0;
      for (int64_t c = 0; c < V; ++c) sum += std::exp(y[size_t(c)] - mx);
      const C lse = mx + std::log(sum);
      row_loss[r] = double(lse - y[size_t(t[r])]);
      if (!g) continue;
      for (int64_t c = 0; c < V; ++c) {
        const C p = std::exp(y[size_t(c)] - lse);
        g[c] = T(scale * (p - (c == t[r] ? C(1) : C(0))) * dy[size_t(c)]);
      }
    }
  });
}

// CPU reference of the whole op, chunked like the CUDA path.
inline LinearCrossEntropyResult linear_cross_entropy_cpu(const Tensor& h, const Tensor& w, const Tensor& targets,
                                                         const LinearCrossEntropyOptions& opt, bool want_h, bool want_w) {
  require_cpu("linear_cross_entropy", h, w, targets);
  const int64_t n = h.size(0), D = h.size(1), V = w.size(0);
  const std::vector<int64_t> t = linear_ce_host_targets(targets, V, opt.ignore_index);
  const DType ldt = promote(h.dtype(), w.dtype()), cdt = compute_dtype(ldt);
  int64_t count = 0;
  for (int64_t v : t) count += v != opt.ignore_index;
  const double div = opt.normalizer > 0 ? opt.normalizer : double(count);
  LinearCrossEntropyResult res;
  if (want_h) res.grad_h = Tensor::zeros({n, D}, cdt);
  if (want_w) res.grad_w = Tensor::zeros({V, D}, cdt);
  Tensor wc = want_h ? dense(w, cdt) : Tensor();  // (V, D) widened once (exact) for dh
  std::vector<double> row_loss(size_t(n), 0.0);
  const int64_t R = linear_ce_chunk_rows(n, V, ldt, opt.chunk_rows);
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rows = std::min(R, n - r0);
    Tensor hc = h.narrow(0, r0, rows);
    Tensor logits = dense(ops::matmul(hc, w, false, true), ldt);  // (rows, V): the lm_head's one rounding
    Tensor dl = want_h || want_w ? Tensor::empty({rows, V}, ldt) : Tensor();
    dispatch_logits(ldt, [&]<class T, class C>() {
      const C cap = C(to_double(from_double<T>(opt.softcap)));  // as scalar_like rounds it
      const C scale = div > 0 ? C(1.0 / div) : C(0);
      linear_ce_rows_cpu<T, C>(logits.data<T>(), dl.defined() ? dl.data<T>() : nullptr, rows, V, t.data() + r0,
                               opt.ignore_index, cap, scale, row_loss.data() + r0);
    });
    if (!dl.defined()) continue;
    Tensor dla = dl.to(cdt);  // exact: the products below see the rounded dlogits
    if (want_h) res.grad_h.narrow(0, r0, rows).copy_(ops::matmul(dla, wc));                          // (rows, V)·(V, D)
    if (want_w) res.grad_w = binary(BinaryOp::add, res.grad_w, ops::matmul(dla, dense(hc, cdt), true, false));  // (V, D)
  }
  double sum = 0;  // serial: deterministic whatever the thread count
  for (int64_t r = 0; r < n; ++r) sum += row_loss[size_t(r)];
  res.loss = Tensor::full({}, div > 0 ? sum / div : 0.0, cdt);
  return res;
}

// Pure forward (loss, and the unit-gradient dh / dW when asked) on h's device.
inline LinearCrossEntropyResult linear_cross_entropy_forward(const Tensor& h, const Tensor& w, const Tensor& targets,
                                                             const LinearCrossEntropyOptions& opt, bool want_h,
                                                             bool want_w) {
  linear_ce_check(h, w, targets, opt);
  const DType cdt = compute_dtype(promote(h.dtype(), w.dtype()));
  if (h.size(0) == 0) {
    LinearCrossEntropyResult res;
    res.loss = Tensor::zeros({}, cdt, h.device());
    if (want_h) res.grad_h = Tensor::zeros(h.shape(), cdt, h.device());
    if (want_w) res.grad_w = Tensor::zeros(w.shape(), cdt, h.device());
    return res;
  }
  if (h.device().is_cuda())
    return call_cuda(cuda_linear_cross_entropy_kernels().forward, "linear_cross_entropy", h, w, targets, opt, want_h,
                     want_w);
  return linear_cross_entropy_cpu(h, w, targets, opt, want_h, want_w);
}

}  // namespace ops

// Differentiable fused lm_head + cross-entropy: a scalar in fp32 (f64 for f64 inputs). Gradients
// flow to h, and to W when it requires grad; targets get none.
inline Tensor linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                                   const LinearCrossEntropyOptions& opt = {}) {
  const bool want_h = grad_enabled() && h.requires_grad(), want_w = grad_enabled() && w.requires_grad();
  ops::LinearCrossEntropyResult r =
      ops::linear_cross_entropy_forward(h.detach(), w.detach(), targets.detach(), opt, want_h, want_w);
  const DType h_dtype = h.dtype(), w_dtype = w.dtype();
  Tensor gh = r.grad_h, gw = r.grad_w;
  return record("linear_cross_entropy", r.loss, {h, w}, [gh, gw, h_dtype, w_dtype](const Tensor& g) {
    // The unit-gradient results, scaled by the incoming gradient on the device (no host read).
    auto scaled = [&g](const Tensor& unit, DType dt) {
      return unit.defined() ? ops::binary(BinaryOp::mul, unit, g).to(dt) : Tensor();
    };
    return std::vector<Tensor>{scaled(gh, h_dtype), scaled(gw, w_dtype)};
  });
}

}  // namespace tq
