// Scaled-dot-product attention as one fused autograd node with a hand-written backward.
//
//   q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) → out (B, Hq, Tq, Dv)
//   s   = scale · q·kᵀ                          scale defaults to 1/√D (Gemma 2: query_pre_attn_scalar^-½)
//   t   = softcap · tanh(s / softcap)           only when softcap > 0; BEFORE the mask, as HF eager
//   P   = softmax over the keys visible to the query (fp32 for f32/bf16/f16 inputs, f64 for f64)
//   out = P · v
//
// GQA/MQA: query head h reads KV head h / (Hq / Hkv), the layout of HF's repeat_kv; dk and dv sum
// over the query heads that share a KV head.
//
// Visibility of key j from the query at absolute position p = query_offset + i (spec §6.1):
//   valid(j)    key_padding[b, j] == 1 (all keys valid when no key_padding is given)
//   none        every valid key
//   causal      j <= p
//   prefix_lm   j <= p  OR  (pre(p) AND pre(j) AND p, j in the same contiguous prefix run), where
//               pre(x) = token_type_ids[b, x] == 0, or x < prefix_lengths[b]. This is HF ≥ 4.52's
//               (causal OR bidirectional-prefix) AND padding; for processor-built inputs it equals
//               the old `_update_causal_mask` on every non-pad query.
//   window      when sliding_window > 0, additionally p − j < sliding_window (AND-ed with all of the
//               above, as spec §6.1 and HF ≤ 4.51 Gemma 2; HF ≥ 4.52 OR-s the prefix block over the
//               window, which differs only for prefix pairs ≥ window apart, never at T ≈ 286).
//
// A query that sees no key (e.g. a pad query under causal + padding) gets an all-zero output row and
// passes zero gradient. HF adds finfo.min instead of excluding keys and gets a uniform average of
// all values there; those rows are garbage in HF and never reach the loss, so zeros (NaN-free,
// deterministic) are the defined behaviour here.
//
// Invariants: the (Tq, Tk) probability matrix is never materialized; the backward recomputes each
// row's probabilities from q and k (flash-attention style), so only q, k, v and the options are saved.
//
// CUDA: when q is on CUDA the op runs the kernels of kernels/attention/ through
// ops::cuda_attention_kernels(). The forward also returns each row's log-sum-exp, which the autograd
// node saves with the output (the backward recomputes P from q, k and lse). Mask tensors may live on
// the CPU (validated here, then uploaded) or on q's device (never read by the host: a CUDA mask is
// taken as nonzero = 1 and prefix_lengths is clamped to [0, Tk] instead of being checked).
#pragma once

#include <cmath>
#include <limits>
#include <optional>

#include "tq/ops/cpu_util.hpp"
#include "tq/ops/elementwise.hpp"

namespace tq {

enum class AttentionMask { none, causal, prefix_lm };

struct AttentionOptions {
  std::optional<double> scale;  // default 1/√D
  double softcap = 0;           // 0 = off
  int64_t sliding_window = 0;   // 0 = off
  AttentionMask mask = AttentionMask::none;
  Tensor token_type_ids;        // (B, Tk) of 0 (prefix) / 1 (suffix); prefix_lm takes this ...
  Tensor prefix_lengths;        // (B) ... or this (prefix = positions [0, len)); exactly one of them
  Tensor key_padding;           // (B, Tk) of 0 (pad) / 1 (valid): HF's attention_mask; optional
  std::optional<int64_t> query_offset;  // absolute position of query 0; default Tk − Tq (KV cache)
};

namespace ops {

// Sizes and resolved options shared by forward and backward.
struct AttentionGeometry {
  int64_t B = 0, Hq = 0, Hkv = 0, Tq = 0, Tk = 0, D = 0, Dv = 0, rep = 1, offset = 0;
  double scale = 1, softcap = 0;
  int64_t window = 0;
  AttentionMask mask = AttentionMask::none;
};

// Per-key mask data, precomputed once per call: valid (B, Tk) and prefix run id (B, Tk), −1 where
// the position is not a prefix token.
struct AttentionMaskPlan {
  AttentionGeometry g;
  std::vector<uint8_t> valid;
  std::vector<int64_t> run;

  bool visible(int64_t b, int64_t p, int64_t j) const {
    const int64_t row = b * g.Tk;
    if (!valid[size_t(row + j)]) return false;
    if (g.window > 0 && p - j >= g.window) return false;
    switch (g.mask) {
      case AttentionMask::none: return true;
      case AttentionMask::causal: return j <= p;
      case AttentionMask::prefix_lm: {
        const int64_t rp = run[size_t(row + p)];
        return j <= p || (rp >= 0 && rp == run[size_t(row + j)]);
      }
    }
    return false;
  }
};

// (B, Tk) integer tensor of 0/1 values as i64, or an error naming `what`.
inline std::vector<int64_t> attention_binary_mask(const Tensor& t, const AttentionGeometry& g, const char* what) {
  TQ_CHECK(t.dim() == 2 && t.size(0) == g.B && t.size(1) == g.Tk, "scaled_dot_product_attention: ", what,
           " must be (B, Tk) = [", g.B, ", ", g.Tk, "], got ", describe(t));
  require_cpu("scaled_dot_product_attention", t);
  std::vector<int64_t> v = dense(t, DType::i64).to_vector<int64_t>();
  for (size_t i = 0; i < v.size(); ++i)
    TQ_CHECK(v[i] == 0 || v[i] == 1, "scaled_dot_product_attention: ", what, " must hold 0/1, got ", v[i],
             " at [", int64_t(i) / std::max<int64_t>(g.Tk, 1), ", ", int64_t(i) % std::max<int64_t>(g.Tk, 1), "]");
  return v;
}

// Prefix run ids: contiguous runs of prefix tokens get ids 0, 1, ...; suffix tokens −1.
inline std::vector<int64_t> attention_prefix_runs(const AttentionOptions& opt, const AttentionGeometry& g) {
  const bool by_type = opt.token_type_ids.defined(), by_len = opt.prefix_lengths.defined();
  TQ_CHECK(by_type != by_len, "scaled_dot_product_attention: the prefix_lm mask needs exactly one of token_type_ids "
                              "and prefix_lengths, got ", describe(opt.token_type_ids), " and ", describe(opt.prefix_lengths));
  std::vector<int64_t> run(size_t(g.B * g.Tk), -1);
  if (by_len) {
    const Tensor& pl = opt.prefix_lengths;
    TQ_CHECK(pl.dim() == 1 && pl.size(0) == g.B, "scaled_dot_product_attention: prefix_lengths must be (B) = [", g.B,
             "], got ", describe(pl));
    require_cpu("scaled_dot_product_attention", pl);
    std::vector<int64_t> len = dense(pl, DType::i64).to_vector<int64_t>();
    for (int64_t b = 0; b < g.B; ++b) {
      TQ_CHECK(len[size_t(b)] >= 0 && len[size_t(b)] <= g.Tk, "scaled_dot_product_attention: prefix_lengths[", b,
               "] = ", len[size_t(b)], " is outside [0, Tk = ", g.Tk, "]");
      for (int64_t x = 0; x < len[size_t(b)]; ++x) run[size_t(b * g.Tk + x)] = 0;
    }
    return run;
  }
  std::vector<int64_t> tt = attention_binary_mask(opt.token_type_ids, g, "token_type_ids");
  for (int64_t b = 0; b < g.B; ++b) {
    int64_t next = 0;
    for (int64_t x = 0; x < g.Tk; ++x) {
      const size_t i = size_t(b * g.Tk + x);
      if (tt[i] != 0) continue;
      const bool continues = x > 0 && tt[i - 1] == 0;
      run[i] = continues ? run[i - 1] : next++;
    }
  }
  return run;
}

// Validates shapes, dtypes and options and resolves them, without reading any tensor's data (the CUDA
// path runs on this alone); throws tq::Error naming what is wrong.
inline AttentionGeometry attention_geometry(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt) {
  const char* op = "scaled_dot_product_attention";
  require_same_device(op, q, k, v);
  require_float(op, q, k, v);
  TQ_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be (B, H, T, D), got ", describe(q), ", ",
           describe(k), ", ", describe(v));
  TQ_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype(), op, ": q, k, v dtypes differ: ", describe(q), ", ",
           describe(k), ", ", describe(v));
  AttentionGeometry g;
  g.B = q.size(0), g.Hq = q.size(1), g.Tq = q.size(2), g.D = q.size(3);
  g.Hkv = k.size(1), g.Tk = k.size(2), g.Dv = v.size(3);
  TQ_CHECK(k.size(0) == g.B && v.size(0) == g.B && k.size(3) == g.D && v.size(1) == g.Hkv && v.size(2) == g.Tk, op,
           ": shapes do not fit q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv): ", describe(q), ", ",
           describe(k), ", ", describe(v));
  TQ_CHECK(g.D >= 1 && g.Hkv >= 1 && g.Hq % g.Hkv == 0, op, ": query heads ", g.Hq,
           " must be a multiple of KV heads ", g.Hkv, " (and D ≥ 1): ", describe(q), ", ", describe(k));
  g.rep = g.Hq / g.Hkv;
  g.scale = opt.scale.value_or(1.0 / std::sqrt(double(g.D)));
  TQ_CHECK(std::isfinite(g.scale), op, ": scale must be finite, got ", g.scale);
  TQ_CHECK(opt.softcap >= 0 && std::isfinite(opt.softcap), op, ": softcap must be ≥ 0 (0 = off), got ", opt.softcap);
  TQ_CHECK(opt.sliding_window >= 0, op, ": sliding_window must be ≥ 0 (0 = off), got ", opt.sliding_window);
  g.softcap = opt.softcap, g.window = opt.sliding_window, g.mask = opt.mask;
  g.offset = opt.query_offset.value_or(g.Tk - g.Tq);
  if (g.mask != AttentionMask::none || g.window > 0)
    TQ_CHECK(g.offset >= 0 && g.offset + g.Tq <= g.Tk, op, ": query positions [", g.offset, ", ", g.offset + g.Tq,
             ") must lie inside the Tk = ", g.Tk, " key positions for positional masks");
  TQ_CHECK(g.mask == AttentionMask::prefix_lm || (!opt.token_type_ids.defined() && !opt.prefix_lengths.defined()), op,
           ": token_type_ids / prefix_lengths are only used by the prefix_lm mask; set mask = prefix_lm");
  return g;
}

// Shapes and devices of the mask tensors (CPU or `device`), for paths that do not read them on the host.
inline void attention_check_mask_tensors(const AttentionOptions& opt, const AttentionGeometry& g, Device device) {
  const char* op = "scaled_dot_product_attention";
  auto on_host_or = [&](const Tensor& t, const char* what) {
    TQ_CHECK(t.device().is_cpu() || t.device() == device, op, ": ", what, " must be on the CPU or on ", device.str(),
             ", got ", describe(t));
  };
  if (opt.key_padding.defined()) {
    const Tensor& t = opt.key_padding;
    TQ_CHECK(t.dim() == 2 && t.size(0) == g.B && t.size(1) == g.Tk, op, ": key_padding must be (B, Tk) = [", g.B,
             ", ", g.Tk, "], got ", describe(t));
    on_host_or(t, "key_padding");
  }
  if (g.mask != AttentionMask::prefix_lm) return;
  const bool by_type = opt.token_type_ids.defined(), by_len = opt.prefix_lengths.defined();
  TQ_CHECK(by_type != by_len, op, ": the prefix_lm mask needs exactly one of token_type_ids and prefix_lengths, got ",
           describe(opt.token_type_ids), " and ", describe(opt.prefix_lengths));
  if (by_type) {
    const Tensor& t = opt.token_type_ids;
    TQ_CHECK(t.dim() == 2 && t.size(0) == g.B && t.size(1) == g.Tk, op, ": token_type_ids must be (B, Tk) = [", g.B,
             ", ", g.Tk, "], got ", describe(t));
    on_host_or(t, "token_type_ids");
  } else {
    const Tensor& t = opt.prefix_lengths;
    TQ_CHECK(t.dim() == 1 && t.size(0) == g.B, op, ": prefix_lengths must be (B) = [", g.B, "], got ", describe(t));
    on_host_or(t, "prefix_lengths");
  }
}

// Validates every argument, resolves the options and reads the masks (CPU tensors only).
inline AttentionMaskPlan attention_plan(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt) {
  const char* op = "scaled_dot_product_attention";
  require_same_device(op, q, k, v);
  require_cpu(op, q, k, v);
  AttentionMaskPlan plan;
  plan.g = attention_geometry(q, k, v, opt);
  const AttentionGeometry& g = plan.g;
  plan.valid.assign(size_t(g.B * g.Tk), 1);
  if (opt.key_padding.defined()) {
    std::vector<int64_t> kp = attention_binary_mask(opt.key_padding, g, "key_padding");
    for (size_t i = 0; i < kp.size(); ++i) plan.valid[i] = uint8_t(kp[i]);
  }
  if (g.mask == AttentionMask::prefix_lm) plan.run = attention_prefix_runs(opt, g);
  return plan;
}

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/attention/attention.cuh); arguments arrive
// validated (attention_geometry, attention_check_mask_tensors) and on one CUDA device.
struct AttentionCudaKernels {
  // {out (B, Hq, Tq, Dv) in q's dtype, lse (B, Hq, Tq)}: lse is each row's log-sum-exp of its visible
  // logits (after softcap), f32 for bf16/f16 inputs and f64 for f32/f64 inputs (the precision the
  // kernels compute in), −inf where the row sees no key.
  std::vector<Tensor> (*forward)(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt,
                                 const AttentionGeometry& g) = nullptr;
  // {dq, dk, dv} in the dtype of q from dout and the forward's lse (P is recomputed from q, k, lse; out
  // is checked for shape but not read: the kernels recompute Σ_j P·dP rather than use the rounded dO·out).
  std::vector<Tensor> (*backward)(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, const AttentionOptions& opt,
                                  const AttentionGeometry& g) = nullptr;
};
inline AttentionCudaKernels& cuda_attention_kernels() {
  static AttentionCudaKernels k;
  return k;
}

// The CUDA forward: validates on the host, then {out, lse}.
inline std::vector<Tensor> attention_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const AttentionOptions& opt) {
  const AttentionGeometry g = attention_geometry(q, k, v, opt);
  attention_check_mask_tensors(opt, g, q.device());
  return call_cuda(cuda_attention_kernels().forward, "scaled_dot_product_attention", q, k, v, opt, g);
}

// The CUDA backward from a saved forward (out, lse).
inline std::vector<Tensor> attention_backward_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& out, const Tensor& lse,
                                                   const AttentionOptions& opt) {
  const AttentionGeometry g = attention_geometry(q, k, v, opt);
  attention_check_mask_tensors(opt, g, q.device());
  require_same_device("scaled_dot_product_attention backward", q, dout, out, lse);
  TQ_CHECK(dout.shape() == Shape({g.B, g.Hq, g.Tq, g.Dv}), "scaled_dot_product_attention backward: gradient ",
           describe(dout), " does not match the output shape ", Shape({g.B, g.Hq, g.Tq, g.Dv}));
  require_float("scaled_dot_product_attention backward", dout);
  return call_cuda(cuda_attention_kernels().backward, "scaled_dot_product_attention backward", dout, q, k, v, out, lse,
                   opt, g);
}

// One query row: fills s[j] = scale·q·k_j and p[j] = softmax probability (0 for hidden keys).
// Returns false (p all zero) when the query sees no key.
template <class C>
bool attention_row_probs(const AttentionMaskPlan& plan, int64_t b, int64_t pos, const C* qi /* (D) */,
                         const C* kb /* (Tk, D) */, C* s, C* p) {
  const AttentionGeometry& g = plan.g;
  C mx = -std::numeric_limits<C>::infinity();
  bool any = false;
  for (int64_t j = 0; j < g.Tk; ++j) {
    p[j] = C(0);
    if (!plan.visible(b, pos, j)) continue;
    const C* kj = kb + j * g.D;
    C dot = 0;
    for (int64_t d = 0; d < g.D; ++d) dot += qi[d] * kj[d];
    s[j] = C(g.scale) * dot;
    const C t = g.softcap > 0 ? C(g.softcap) * std::tanh(s[j] / C(g.softcap)) : s[j];
    p[j] = t;  // logit for now
    mx = any ? std::max(mx, t) : t;
    any = true;
  }
  if (!any) return false;
  C sum = 0;
  for (int64_t j = 0; j < g.Tk; ++j) {
    if (!plan.visible(b, pos, j)) continue;
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  const C inv = C(1) / sum;
  for (int64_t j = 0; j < g.Tk; ++j) p[j] *= inv;  // hidden keys stay 0
  return true;
}

// Pure forward; out (B, Hq, Tq, Dv) in q's dtype (CUDA tensors run kernels/attention/, CPU ones the loop below).
inline Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt = {}) {
  if (q.device().is_cuda()) return attention_forward_cuda(q, k, v, opt)[0];
  const AttentionMaskPlan plan = attention_plan(q, k, v, opt);
  const AttentionGeometry& g = plan.g;
  const DType ct = compute_dtype(q.dtype());
  Tensor out = Tensor::empty({g.B, g.Hq, g.Tq, g.Dv}, ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    {
      Tensor qc = dense(q, ct), kc = dense(k, ct), vc = dense(v, ct);
      const C* pq = qc.data<C>();  // (B, Hq, Tq, D)
      const C* pk = kc.data<C>();  // (B, Hkv, Tk, D)
      const C* pv = vc.data<C>();  // (B, Hkv, Tk, Dv)
      C* po = out.data<C>();       // (B, Hq, Tq, Dv)
      parallel_for(g.B * g.Hq * g.Tq, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.Tk * g.D)),
                   [&](int64_t lo, int64_t hi) {
        std::vector<C> s(size_t(g.Tk)), p(size_t(g.Tk));
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t i = r % g.Tq, h = (r / g.Tq) % g.Hq, b = r / (g.Tq * g.Hq);
          const int64_t kv = b * g.Hkv + h / g.rep;
          C* o = po + r * g.Dv;
          std::fill(o, o + g.Dv, C(0));
          if (!attention_row_probs<C>(plan, b, g.offset + i, pq + r * g.D, pk + kv * g.Tk * g.D, s.data(), p.data()))
            continue;
          const C* vb = pv + kv * g.Tk * g.Dv;
          for (int64_t j = 0; j < g.Tk; ++j) {
            if (p[size_t(j)] == C(0)) continue;
            for (int64_t d = 0; d < g.Dv; ++d) o[d] += p[size_t(j)] * vb[j * g.Dv + d];
          }
        }
      });
    }
  });
  return out.to(q.dtype());
}

// Backward of one (b, KV head) group: every query head sharing the KV head, every query. The group
// owns its dk/dv slices and its heads' dq rows, so groups run in parallel without races.
template <class C>
void attention_backward_group(const AttentionMaskPlan& plan, int64_t b, int64_t kvh, const C* pq, const C* pk,
                              const C* pv, const C* pdo, C* dq, C* dk, C* dv) {
  const AttentionGeometry& g = plan.g;
  const int64_t kv = b * g.Hkv + kvh;
  const C* kb = pk + kv * g.Tk * g.D;   // (Tk, D)
  const C* vb = pv + kv * g.Tk * g.Dv;  // (Tk, Dv)
  C* dkb = dk + kv * g.Tk * g.D;
  C* dvb = dv + kv * g.Tk * g.Dv;
  std::vector<C> s(size_t(g.Tk)), p(size_t(g.Tk)), dp(size_t(g.Tk));
  for (int64_t h = kvh * g.rep; h < (kvh + 1) * g.rep; ++h) {
    for (int64_t i = 0; i < g.Tq; ++i) {
      const int64_t r = (b * g.Hq + h) * g.Tq + i;
      const C* qi = pq + r * g.D;
      const C* doi = pdo + r * g.Dv;
      if (!attention_row_probs<C>(plan, b, g.offset + i, qi, kb, s.data(), p.data())) continue;
      // dP_j = dO·v_j;  dT_j = P_j (dP_j − Σ_k P_k dP_k)  (softmax backward)
      C row_dot = 0;
      for (int64_t j = 0; j < g.Tk; ++j) {
        if (p[size_t(j)] == C(0)) continue;
        C acc = 0;
        for (int64_t d = 0; d < g.Dv; ++d) acc += doi[d] * vb[j * g.Dv + d];
        dp[size_t(j)] = acc;
        row_dot += p[size_t(j)] * acc;
      }
      C* dqi = dq + r * g.D;
      for (int64_t j = 0; j < g.Tk; ++j) {
        const C pj = p[size_t(j)];
        if (pj == C(0)) continue;
        C ds = pj * (dp[size_t(j)] - row_dot);
        if (g.softcap > 0) {  // d(c·tanh(s/c))/ds = 1 − tanh²(s/c)
          const C th = std::tanh(s[size_t(j)] / C(g.softcap));
          ds *= C(1) - th * th;
        }
        ds *= C(g.scale);
        for (int64_t d = 0; d < g.D; ++d) {
          dqi[d] += ds * kb[j * g.D + d];
          dkb[j * g.D + d] += ds * qi[d];
        }
        for (int64_t d = 0; d < g.Dv; ++d) dvb[j * g.Dv + d] += pj * doi[d];
      }
    }
  }
}

// Pure backward: {dq, dk, dv} in the dtypes of q, k, v, from dout (B, Hq, Tq, Dv).
inline std::vector<Tensor> attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                              const AttentionOptions& opt = {}) {
  if (q.device().is_cuda()) {  // no saved forward here: recompute out and lse first
    const std::vector<Tensor> fw = attention_forward_cuda(q, k, v, opt);
    return attention_backward_cuda(dout, q, k, v, fw[0], fw[1], opt);
  }
  const AttentionMaskPlan plan = attention_plan(q, k, v, opt);
  const AttentionGeometry& g = plan.g;
  require_cpu("scaled_dot_product_attention backward", dout);
  TQ_CHECK(dout.shape() == Shape({g.B, g.Hq, g.Tq, g.Dv}), "scaled_dot_product_attention backward: gradient ",
           describe(dout), " does not match the output shape ", Shape({g.B, g.Hq, g.Tq, g.Dv}));
  const DType ct = compute_dtype(q.dtype());
  Tensor dq = Tensor::zeros(q.shape(), ct), dk = Tensor::zeros(k.shape(), ct), dv = Tensor::zeros(v.shape(), ct);
  TQ_DISPATCH_FLOAT(ct, C, {
    {
      Tensor qc = dense(q, ct), kc = dense(k, ct), vc = dense(v, ct), dc = dense(dout, ct);
      parallel_for(g.B * g.Hkv, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo; t < hi; ++t)
          attention_backward_group<C>(plan, t / g.Hkv, t % g.Hkv, qc.data<C>(), kc.data<C>(), vc.data<C>(),
                                      dc.data<C>(), dq.data<C>(), dk.data<C>(), dv.data<C>());
      });
    }
  });
  return {dq.to(q.dtype()), dk.to(k.dtype()), dv.to(v.dtype())};
}

}  // namespace ops

// Differentiable attention: one autograd node; gradients flow to q, k and v (never to the masks).
inline Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const AttentionOptions& opt = {}) {
  Tensor qd = q.detach(), kd = k.detach(), vd = v.detach();
  // Masks are copied so that in-place edits by the caller before backward cannot change it.
  AttentionOptions saved = opt;
  auto save_masks = [&] {
    for (Tensor* t : {&saved.token_type_ids, &saved.prefix_lengths, &saved.key_padding})
      if (t->defined()) *t = t->detach().clone();
  };
  if (qd.device().is_cuda()) {
    // The node keeps the output (detached: no cycle through its own grad_fn) and the per-row lse,
    // so the backward only recomputes P. Editing the output in place before backward is not allowed.
    const std::vector<Tensor> fw = ops::attention_forward_cuda(qd, kd, vd, opt);
    if (!grad_enabled() || !any_requires_grad({q, k, v})) return fw[0];
    save_masks();
    Tensor saved_out = fw[0].detach(), lse = fw[1];
    return record("scaled_dot_product_attention", fw[0], {q, k, v}, [qd, kd, vd, saved, saved_out, lse](const Tensor& g) {
      return ops::attention_backward_cuda(g, qd, kd, vd, saved_out, lse, saved);
    });
  }
  Tensor out = ops::attention_forward(qd, kd, vd, opt);
  save_masks();
  return record("scaled_dot_product_attention", out, {q, k, v}, [qd, kd, vd, saved](const Tensor& g) {
    return ops::attention_backward(g, qd, kd, vd, saved);
  });
}

}  // namespace tq
