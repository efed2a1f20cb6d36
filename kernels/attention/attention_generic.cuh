// Generic attention on CUDA cores: any head dims, any float dtype (f32, f64, bf16, f16). The
// reference-grade path (f32/f64 models, odd head dims); the tensor-core path is flash_*.cuh.
//
// Invariants:
// - One warp per output row (a query row in the forward and for dq, a key row for dk/dv); lanes split
//   the head dim, dot products are reduced with an xor butterfly (every lane ends with the same
//   value, so all branches on it are warp-uniform).
// - Arithmetic in C = float for bf16/f16 storage, double for f32 and f64; one rounding on store. The
//   logit, softcap and softmax formulas are the CPU op's, term for term. f32 takes double because fp32
//   arithmetic cannot meet the f32 tolerance (1e-5) on its own: a logit of magnitude ~10 carries
//   ~1e-6 absolute rounding error into every probability, and the gradients (dS = P·(dP − Σ P·dP))
//   cancel on top of that; measured against an f64 reference, the CPU op in f32 and this kernel in
//   float both reach the tolerance. In double the result is the exact one rounded once to f32.
//   lse is stored in C (f64 for f32 inputs), so the backward's P = exp(logit − lse) keeps it.
// - Nothing of size (Tq, Tk) exists anywhere: each row streams over the keys it can see and
//   recomputes logits instead of storing them (the output and gradient columns are done in chunks of
//   32·kCols per pass over the keys).
// - The backward needs no saved output: the dq kernel computes each row's Σ_j P_j·dP_j exactly as the
//   CPU does and stores it (row_dot) for the dk/dv kernel, which runs after it on the same stream.
#pragma once

#include <cmath>

#include "kernels/attention/attention_common.cuh"

namespace tq::cuda::attention {

inline constexpr int kGenericWarps = 4;  // rows per block
inline constexpr int kCols = 4;          // output columns per lane per pass

// exp / log / tanh in the compute type (tq::exp and friends are tensor ops, hence the names).
__device__ __forceinline__ float exp_c(float x) { return expf(x); }
__device__ __forceinline__ double exp_c(double x) { return ::exp(x); }
__device__ __forceinline__ float log_c(float x) { return logf(x); }
__device__ __forceinline__ double log_c(double x) { return ::log(x); }
__device__ __forceinline__ float tanh_c(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_c(double x) { return ::tanh(x); }

template <class T, class C>
__device__ __forceinline__ C warp_dot(const T* __restrict__ a, const T* __restrict__ b, int n, int lane) {
  C s = C(0);
  for (int d = lane; d < n; d += 32) s += convert<C>(a[d]) * convert<C>(b[d]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// The logit of one (query, key) pair from its dot product, and tanh(s / softcap) for the backward.
template <class C>
__device__ __forceinline__ C logit(const Params& p, C dot, C& th) {
  const C s = C(p.scale) * dot;
  if (p.softcap > 0) {
    th = tanh_c(s / C(p.softcap));
    return C(p.softcap) * th;
  }
  th = C(0);
  return s;
}

// One warp per query row r of (B, Hq, Tq): out (B, Hq, Tq, Dv), lse (B, Hq, Tq).
template <class T, class C>
__global__ void __launch_bounds__(kGenericWarps * 32) generic_forward_kernel(Params p, const T* __restrict__ q,
                                                                             const T* __restrict__ k,
                                                                             const T* __restrict__ v,
                                                                             T* __restrict__ out, C* __restrict__ lse) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Tq;
  const int64_t r = int64_t(blockIdx.x) * kGenericWarps + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const int i = int(r % p.Tq), h = int((r / p.Tq) % p.Hq), b = int(r / (int64_t(p.Tq) * p.Hq));
  const int64_t kv = int64_t(b) * p.Hkv + h / p.rep;
  const T* qi = q + r * p.D;                  // (D)
  const T* kb = k + kv * p.Tk * p.D;          // (Tk, D)
  const T* vb = v + kv * p.Tk * p.Dv;         // (Tk, Dv)
  T* o = out + r * p.Dv;                      // (Dv)
  const RowMask rm = row_mask(p.mask, b, i);
  int lo, hi;
  key_range(p.mask, b, rm, lo, hi);
  C m = -C(INFINITY), l = C(0), th;
  for (int j = lo; j < hi; ++j) {
    if (!visible(p.mask, rm, j, key_code(p.mask, b, j))) continue;
    const C t = logit<C>(p, warp_dot<T, C>(qi, kb + int64_t(j) * p.D, p.D, lane), th);
    if (t > m) {
      l = l * exp_c(m - t) + C(1);
      m = t;
    } else {
      l += exp_c(t - m);
    }
  }
  const C inv = l > C(0) ? C(1) / l : C(0);
  if (lane == 0) lse[r] = l > C(0) ? m + log_c(l) : -C(INFINITY);
  for (int d0 = 0; d0 < p.Dv; d0 += 32 * kCols) {
    C acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = C(0);
    for (int j = lo; j < hi && l > C(0); ++j) {
      if (!visible(p.mask, rm, j, key_code(p.mask, b, j))) continue;
      const C t = logit<C>(p, warp_dot<T, C>(qi, kb + int64_t(j) * p.D, p.D, lane), th);
      const C pj = exp_c(t - m) * inv;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = d0 + lane + 32 * c;
        if (d < p.Dv) acc[c] += pj * convert<C>(vb[int64_t(j) * p.Dv + d]);
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = d0 + lane + 32 * c;
      if (d < p.Dv) o[d] = convert<T>(acc[c]);
    }
  }
}

// dS of one visible (query, key) pair: P (dP − row_dot) · d(softcap) · scale, with P from the saved lse.
template <class C>
struct PairGrad {
  C p, ds;
};
template <class T, class C>
__device__ __forceinline__ PairGrad<C> pair_grad(const Params& prm, const T* qi, const T* kj, const T* doi,
                                                    const T* vj, C row_lse, C row_dot, int lane) {
  C th;
  const C t = logit<C>(prm, warp_dot<T, C>(qi, kj, prm.D, lane), th);
  const C pj = exp_c(t - row_lse);
  const C dp = warp_dot<T, C>(doi, vj, prm.Dv, lane);
  C ds = pj * (dp - row_dot);
  if (prm.softcap > 0) ds *= C(1) - th * th;
  return {pj, ds * C(prm.scale)};
}

// One warp per query row: row_dot = Σ_j P_j dP_j (stored for the dk/dv kernel), then dq (B, Hq, Tq, D).
template <class T, class C>
__global__ void __launch_bounds__(kGenericWarps * 32) generic_backward_dq_kernel(
    Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const C* __restrict__ lse, C* __restrict__ row_dot, T* __restrict__ dq) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Tq;
  const int64_t r = int64_t(blockIdx.x) * kGenericWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int i = int(r % p.Tq), h = int((r / p.Tq) % p.Hq), b = int(r / (int64_t(p.Tq) * p.Hq));
  const int64_t kv = int64_t(b) * p.Hkv + h / p.rep;
  const T* qi = q + r * p.D;           // (D)
  const T* doi = dout + r * p.Dv;      // (Dv)
  const T* kb = k + kv * p.Tk * p.D;   // (Tk, D)
  const T* vb = v + kv * p.Tk * p.Dv;  // (Tk, Dv)
  T* dqi = dq + r * p.D;               // (D)
  const RowMask rm = row_mask(p.mask, b, i);
  int lo, hi;
  key_range(p.mask, b, rm, lo, hi);
  const C L = lse[r];
  const bool any = L != -C(INFINITY);
  C dot = C(0), th;
  for (int j = lo; j < hi && any; ++j) {
    if (!visible(p.mask, rm, j, key_code(p.mask, b, j))) continue;
    const C t = logit<C>(p, warp_dot<T, C>(qi, kb + int64_t(j) * p.D, p.D, lane), th);
    dot += exp_c(t - L) * warp_dot<T, C>(doi, vb + int64_t(j) * p.Dv, p.Dv, lane);
  }
  if (lane == 0) row_dot[r] = dot;
  for (int d0 = 0; d0 < p.D; d0 += 32 * kCols) {
    C acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[c] = C(0);
    for (int j = lo; j < hi && any; ++j) {
      if (!visible(p.mask, rm, j, key_code(p.mask, b, j))) continue;
      const T* kj = kb + int64_t(j) * p.D;
      const PairGrad<C> g = pair_grad<T, C>(p, qi, kj, doi, vb + int64_t(j) * p.Dv, L, dot, lane);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = d0 + lane + 32 * c;
        if (d < p.D) acc[c] += g.ds * convert<C>(kj[d]);
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = d0 + lane + 32 * c;
      if (d < p.D) dqi[d] = convert<T>(acc[c]);
    }
  }
}

// One warp per key row (b, KV head, j): dk (B, Hkv, Tk, D) and dv (B, Hkv, Tk, Dv), summed over every
// query row of the query heads that share the KV head (GQA/MQA).
template <class T, class C>
__global__ void __launch_bounds__(kGenericWarps * 32) generic_backward_dkdv_kernel(
    Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const C* __restrict__ lse, const C* __restrict__ row_dot, T* __restrict__ dk, T* __restrict__ dv) {
  const int64_t keys = int64_t(p.B) * p.Hkv * p.Tk;
  const int64_t kr = int64_t(blockIdx.x) * kGenericWarps + threadIdx.x / 32;
  if (kr >= keys) return;
  const int lane = threadIdx.x % 32;
  const int j = int(kr % p.Tk);
  const int64_t kv = kr / p.Tk;  // b * Hkv + KV head
  const int b = int(kv / p.Hkv), kvh = int(kv % p.Hkv);
  const T* kj = k + kr * p.D;    // (D)
  const T* vj = v + kr * p.Dv;   // (Dv)
  const int code = key_code(p.mask, b, j);
  const int64_t row0 = (int64_t(b) * p.Hq + int64_t(kvh) * p.rep) * p.Tq;  // first query row of the group
  const int64_t nrows = int64_t(p.rep) * p.Tq;                             // rows of the group, contiguous
  const int width = ::max(p.D, p.Dv);
  for (int d0 = 0; d0 < width; d0 += 32 * kCols) {
    C acc_k[kCols], acc_v[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc_k[c] = acc_v[c] = C(0);
    for (int64_t m = 0; m < nrows; ++m) {
      const RowMask rm = row_mask(p.mask, b, int(m % p.Tq));
      if (!visible(p.mask, rm, j, code)) continue;
      const int64_t r = row0 + m;
      const T* qi = q + r * p.D;
      const T* doi = dout + r * p.Dv;
      const PairGrad<C> g = pair_grad<T, C>(p, qi, kj, doi, vj, lse[r], row_dot[r], lane);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = d0 + lane + 32 * c;
        if (d < p.Dv) acc_v[c] += g.p * convert<C>(doi[d]);
        if (d < p.D) acc_k[c] += g.ds * convert<C>(qi[d]);
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = d0 + lane + 32 * c;
      if (d < p.Dv) dv[kr * p.Dv + d] = convert<T>(acc_v[c]);
      if (d < p.D) dk[kr * p.D + d] = convert<T>(acc_k[c]);
    }
  }
}

}  // namespace tq::cuda::attention
