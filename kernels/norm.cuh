// CUDA layer_norm / rms_norm forward and backward (the entries of ops::cuda_norm_kernels()).
//
// Invariants (the CPU reference in ops/norm.hpp is the contract):
// - Statistics and the affine part run in compute_t<T> (fp32 for f32/bf16/f16, double for f64)
//   with the CPU's formulas: two-pass mean and biased variance, rstd = 1/sqrt(var + eps) with IEEE
//   sqrt and division, y = ((x − mean)·rstd)·(offset + w) + b with every product and sum rounded
//   as on the CPU (no FMA), one rounding to x's dtype on store. weight/bias are read in x's dtype
//   or the compute dtype (converted exactly on load, as the CPU's dense(w, ct)); another float
//   dtype is first converted to the compute dtype. The common cases launch no conversion kernel.
// - Rows that fit (at most 16 elements per thread at ≤ 512 threads, 16-byte aligned) are
//   held in registers: x (and g) are read from global memory once and y (dx) written once. Other
//   rows take a generic kernel that re-reads the row (from L1/L2) at any size and alignment.
// - dweight/dbias: each block keeps per-column partial sums over the rows it handles in the
//   compute dtype (registers in the cached kernel), written once into a (blocks, D) scratch; the
//   partials of each column are summed in double in a fixed order, by a second kernel or (the
//   warp kernel with TQ_NORM_BWD_SUM=block, cooperative launch) by the same kernel after a
//   grid-wide barrier. Deterministic, no atomics; the (rows, D) products g·x̂ are never materialized.
// - On sm_90 the warp backward kernel and the column sums are programmatic dependents of the kernel
//   before them (backward_pdl): each waits (griddepcontrol.wait) before its first global access, so
//   only its launch overlaps its predecessor's tail.
// - No host synchronization: every launch is capturable into a CUDA graph.
#pragma once

#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/ops_common.cuh"
#include "tq/ops/norm.hpp"

namespace tq::cuda {

namespace norm_detail {

inline constexpr int kMaxThreads = 512;  // threads per row in the cached kernels
// Vectors of a row one thread holds in registers: 16 elements (8 doubles), so that x, g and two
// sets of column partials fit in the 128 registers a thread has at kMaxThreads.
template <class T>
inline constexpr int kMaxVectors = (sizeof(T) == 8 ? 8 : 16) / kVecWidth<T>;

// C: compute type; W: storage type of weight and bias (x's dtype or C).
template <class C, class W>
struct Params {
  int64_t rows = 0;
  int D = 0;
  C eps = 0, offset = 0;
  bool center = false;
  const W* w = nullptr;  // (D) or null (no scale)
  const W* b = nullptr;  // (D) or null (no shift)
  bool affine_vec = false;  // w and b (those present) are 16-byte aligned
};

template <class C>
struct RowStats {
  C mean, rstd;
};

// x̂ = (x − mean)·rstd, rounded per operation like the CPU.
template <class C>
__device__ __forceinline__ C normalized(C x, const RowStats<C>& st) {
  return mul_rn(sub_rn(x, st.mean), st.rstd);
}
// The scale s_j = offset + w_j (1 without weight), and the shift b_j.
template <class C, class W>
__device__ __forceinline__ C scale_at(const Params<C, W>& p, int j) {
  return p.w ? add_rn(p.offset, convert<C>(p.w[j])) : C(1);
}
template <class C, class W>
__device__ __forceinline__ C shifted(C v, const Params<C, W>& p, int j) {
  return p.b ? add_rn(v, convert<C>(p.b[j])) : v;
}

template <class C, class P>
__device__ __forceinline__ RowStats<C> finish_stats(C sum_sq, const P& p, C mean) {
  const C var = sum_sq / C(p.D);
  return {mean, C(1) / std::sqrt(var + p.eps)};
}

// Row statistics of a row held in registers: buf[k] is vector first + k·step of the row, and
// reduce(v) sums v over the threads sharing the row (the block, or one warp).
// `center` is p.center, passed separately so that a kernel instance can make it a constant.
template <class T, int MAXV, class C, class P, class Reduce>
__device__ __forceinline__ RowStats<C> held_stats(const Vec<T, kVecWidth<T>> (&buf)[MAXV], int nvec, int first,
                                                  int step, const P& p, Reduce&& reduce, bool center) {
  constexpr int V = kVecWidth<T>;
  C mean = 0;
  if (center) {
    C s = 0;
#pragma unroll
    for (int k = 0; k < MAXV; ++k)
      if (first + k * step < nvec)
#pragma unroll
        for (int e = 0; e < V; ++e) s += convert<C>(buf[k].v[e]);
    mean = reduce(s) / C(p.D);
  }
  C ss = 0;
#pragma unroll
  for (int k = 0; k < MAXV; ++k)
    if (first + k * step < nvec)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C d = center ? convert<C>(buf[k].v[e]) - mean : convert<C>(buf[k].v[e]);
        ss += d * d;
      }
  return finish_stats(reduce(ss), p, mean);
}

// The same for the block-per-row kernels: buf[k] is vector threadIdx.x + k·blockDim.x.
template <class T, int MAXV, class C, class P>
__device__ __forceinline__ RowStats<C> cached_stats(const Vec<T, kVecWidth<T>> (&buf)[MAXV], int nvec, const P& p,
                                                    C* red) {
  return held_stats<T, MAXV, C>(buf, nvec, int(threadIdx.x), int(blockDim.x), p,
                                [red](C v) { return block_sum(v, red); }, p.center);
}

// out[e] = src[j0 + e], e < V, converted to C: 16-byte loads when `vec` (src 16-byte aligned;
// j0 is a multiple of V, and V elements of W are whole 16-byte vectors).
template <class C, class W, int V>
__device__ __forceinline__ void load_affine(const W* __restrict__ src, int j0, bool vec, C (&out)[V]) {
  constexpr int WV = kVecWidth<W>;
  if constexpr (V % WV == 0) {
    if (vec) {
#pragma unroll
      for (int u = 0; u < V / WV; ++u) {
        const Vec<W, WV> w = *reinterpret_cast<const Vec<W, WV>*>(src + j0 + u * WV);
#pragma unroll
        for (int f = 0; f < WV; ++f) out[u * WV + f] = convert<C>(w.v[f]);
      }
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = convert<C>(src[j0 + e]);
}

// s[e] = offset + w[j0 + e] (1 without weight): the scales of V consecutive columns.
template <class C, class W, int V>
__device__ __forceinline__ void load_scales(const Params<C, W>& p, int j0, C (&s)[V]) {
  if (!p.w) {
#pragma unroll
    for (int e = 0; e < V; ++e) s[e] = C(1);
    return;
  }
  load_affine<C, W, V>(p.w, j0, p.affine_vec, s);
#pragma unroll
  for (int e = 0; e < V; ++e) s[e] = add_rn(p.offset, s[e]);
}

// Statistics of row xr (D elements, any alignment) read from global memory.
template <class T, class C, class P>
__device__ __forceinline__ RowStats<C> generic_stats(const T* __restrict__ xr, const P& p, C* red) {
  C mean = 0;
  if (p.center) {
    C s = 0;
    for (int j = threadIdx.x; j < p.D; j += blockDim.x) s += convert<C>(xr[j]);
    mean = block_sum(s, red) / C(p.D);
  }
  C ss = 0;
  for (int j = threadIdx.x; j < p.D; j += blockDim.x) {
    const C d = convert<C>(xr[j]) - mean;
    ss += d * d;
  }
  return finish_stats(block_sum(ss, red), p, mean);
}

// ---- forward ----

// y (rows, D) = norm(x (rows, D)); one row per block iteration, the row in registers.
template <class T, class W, int MAXV>
__global__ void __launch_bounds__(kMaxThreads) forward_cached_kernel(T* __restrict__ y, const T* __restrict__ x,
                                                                     Params<compute_t<T>, W> p) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  using VT = Vec<T, V>;
  static_assert(MAXV <= kMaxVectors<T>, "a thread holds at most kMaxVectors vectors");
  __shared__ C red[32];
  const int nvec = p.D / V;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const VT* xr = reinterpret_cast<const VT*>(x + r * p.D);  // (D / V) vectors
    VT buf[MAXV];
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      if (vi < nvec) buf[k] = xr[vi];
    }
    const RowStats<C> st = cached_stats<T, MAXV>(buf, nvec, p, red);
    VT* yr = reinterpret_cast<VT*>(y + r * p.D);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      if (vi >= nvec) continue;
      VT o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int j = vi * V + e;
        o.v[e] = convert<T>(shifted(mul_rn(normalized(convert<C>(buf[k].v[e]), st), scale_at(p, j)), p, j));
      }
      yr[vi] = o;
    }
  }
}

// The same at any D and alignment: the row is re-read instead of held.
template <class T, class W>
__global__ void __launch_bounds__(256) forward_generic_kernel(T* __restrict__ y, const T* __restrict__ x,
                                                              Params<compute_t<T>, W> p) {
  using C = compute_t<T>;
  __shared__ C red[32];
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* xr = x + r * p.D;  // (D)
    const RowStats<C> st = generic_stats<T, C>(xr, p, red);
    for (int j = threadIdx.x; j < p.D; j += blockDim.x)
      y[r * p.D + j] = convert<T>(shifted(mul_rn(normalized(convert<C>(xr[j]), st), scale_at(p, j)), p, j));
  }
}

// ---- backward ----
//
// With x̂ = (x − mean)·rstd, ĝ = g·s:  dx = rstd·((ĝ − mean(ĝ)) − x̂·mean(ĝ·x̂))  (rms: no mean(ĝ));
// dw_j = Σ_rows g·x̂,  db_j = Σ_rows g.

// dx (rows, D); part_w / part_b (gridDim.x, D) column partials of this block's rows (or null).
template <class T, class W, int MAXV>
__global__ void __launch_bounds__(kMaxThreads) backward_cached_kernel(T* __restrict__ dx, compute_t<T>* __restrict__ part_w,
                                                                      compute_t<T>* __restrict__ part_b,
                                                                      const T* __restrict__ g, const T* __restrict__ x,
                                                                      Params<compute_t<T>, W> p) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  using VT = Vec<T, V>;
  static_assert(MAXV <= kMaxVectors<T>, "a thread holds at most kMaxVectors vectors");
  __shared__ C red[64];
  const int nvec = p.D / V;
  C acc_w[MAXV][V], acc_b[MAXV][V];
#pragma unroll
  for (int k = 0; k < MAXV; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) acc_w[k][e] = acc_b[k][e] = C(0);

  // Rows of x and g (D / V vectors each) into registers.
  auto load = [&](int64_t r, VT (&xs)[MAXV], VT (&gs)[MAXV]) {
    const VT* xr = reinterpret_cast<const VT*>(x + r * p.D);
    const VT* gr = reinterpret_cast<const VT*>(g + r * p.D);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      if (vi < nvec) {
        xs[k] = xr[vi];
        gs[k] = gr[vi];
      }
    }
  };
  VT xb[MAXV], gb[MAXV];
  if (int64_t(blockIdx.x) < p.rows) load(blockIdx.x, xb, gb);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    // The next row's loads are in flight while this row is reduced (few blocks run per SM).
    VT xn[MAXV], gn[MAXV];
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      xn[k] = xb[k];  // defined values on the last row
      gn[k] = gb[k];
    }
    if (r + gridDim.x < p.rows) load(r + gridDim.x, xn, gn);
    const RowStats<C> st = cached_stats<T, MAXV>(xb, nvec, p, red);
    C sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      if (vi >= nvec) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C gh = mul_rn(convert<C>(gb[k].v[e]), scale_at(p, vi * V + e));
        sum_g += gh;
        sum_gx += gh * normalized(convert<C>(xb[k].v[e]), st);
      }
    }
    block_sum2(sum_g, sum_gx, red);
    const C mg = p.center ? sum_g / C(p.D) : C(0), mgx = sum_gx / C(p.D);
    VT* dr = reinterpret_cast<VT*>(dx + r * p.D);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      if (vi >= nvec) continue;
      VT o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C gv = convert<C>(gb[k].v[e]);
        const C xh = normalized(convert<C>(xb[k].v[e]), st);
        const C gh = mul_rn(gv, scale_at(p, vi * V + e));
        o.v[e] = convert<T>(mul_rn(st.rstd, sub_rn(sub_rn(gh, mg), mul_rn(xh, mgx))));
        acc_w[k][e] += gv * xh;
        acc_b[k][e] += gv;
      }
      dr[vi] = o;
    }
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      xb[k] = xn[k];
      gb[k] = gn[k];
    }
  }
  // Every column is owned by exactly one thread of the block: write the partials once.
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int vi = threadIdx.x + k * blockDim.x;
    if (vi >= nvec) continue;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t at = int64_t(blockIdx.x) * p.D + vi * V + e;
      if (part_w) part_w[at] = acc_w[k][e];
      if (part_b) part_b[at] = acc_b[k][e];
    }
  }
}

// The same at any D and alignment. The partial row of this block lives in global memory (each
// element owned by one thread), written on the block's first row and accumulated afterwards.
template <class T, class W>
__global__ void __launch_bounds__(256) backward_generic_kernel(T* __restrict__ dx, compute_t<T>* __restrict__ part_w,
                                                               compute_t<T>* __restrict__ part_b,
                                                               const T* __restrict__ g, const T* __restrict__ x,
                                                               Params<compute_t<T>, W> p) {
  using C = compute_t<T>;
  __shared__ C red[64];
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* xr = x + r * p.D;  // (D)
    const T* gr = g + r * p.D;  // (D)
    const RowStats<C> st = generic_stats<T, C>(xr, p, red);
    C sum_g = 0, sum_gx = 0;
    for (int j = threadIdx.x; j < p.D; j += blockDim.x) {
      const C gh = mul_rn(convert<C>(gr[j]), scale_at(p, j));
      sum_g += gh;
      sum_gx += gh * normalized(convert<C>(xr[j]), st);
    }
    block_sum2(sum_g, sum_gx, red);
    const C mg = p.center ? sum_g / C(p.D) : C(0), mgx = sum_gx / C(p.D);
    const bool first = r == int64_t(blockIdx.x);
    for (int j = threadIdx.x; j < p.D; j += blockDim.x) {
      const C gv = convert<C>(gr[j]);
      const C xh = normalized(convert<C>(xr[j]), st);
      const C gh = mul_rn(gv, scale_at(p, j));
      dx[r * p.D + j] = convert<T>(mul_rn(st.rstd, sub_rn(sub_rn(gh, mg), mul_rn(xh, mgx))));
      const int64_t at = int64_t(blockIdx.x) * p.D + j;
      if (part_w) part_w[at] = (first ? C(0) : part_w[at]) + gv * xh;
      if (part_b) part_b[at] = (first ? C(0) : part_b[at]) + gv;
    }
  }
}

// ---- one warp per row ----
//
// Rows of up to 32·kWarpMaxVectors 16-byte vectors (Gemma's 2048 and SigLIP's 1152 in bf16): a
// warp owns a row, held in registers (lane l holds vectors l, l + 32, ...), reduced with shuffles
// only; kWarpThreads / 32 warps per block take consecutive rows. No block barrier stalls a row,
// and each warp has its whole row's loads in flight at once.

inline constexpr int kWarpThreads = 128;
inline constexpr int kWarpMaxVectors = 8;
// f64 (a reference dtype) keeps the block kernels: no warp-kernel instances for it.
template <class T>
inline constexpr bool kWarpRows = !std::is_same_v<T, double>;

// y (rows, D) = norm(x (rows, D)).
template <class T, class W, int MAXV>
__global__ void __launch_bounds__(kWarpThreads) forward_warp_kernel(T* __restrict__ y, const T* __restrict__ x,
                                                                    Params<compute_t<T>, W> p) {
  using C = compute_t<T>;
  constexpr int V = kVecWidth<T>;
  using VT = Vec<T, V>;
  static_assert(MAXV <= kWarpMaxVectors, "a lane holds at most kWarpMaxVectors vectors");
  const int lane = threadIdx.x & 31, nvec = p.D / V;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < p.rows; r += warps) {
    const VT* xr = reinterpret_cast<const VT*>(x + r * p.D);  // (D / V) vectors
    VT buf[MAXV];
#pragma unroll
    for (int k = 0; k < MAXV; ++k)
      if (lane + 32 * k < nvec) buf[k] = xr[lane + 32 * k];
    const RowStats<C> st = held_stats<T, MAXV, C>(buf, nvec, lane, 32, p, [](C v) { return warp_sum(v); }, p.center);
    VT* yr = reinterpret_cast<VT*>(y + r * p.D);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = lane + 32 * k;
      if (vi >= nvec) continue;
      C s[V], b[V];
      load_scales<C, W, V>(p, vi * V, s);
      if (p.b) load_affine<C, W, V>(p.b, vi * V, p.affine_vec, b);
      VT o;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C v = mul_rn(normalized(convert<C>(buf[k].v[e]), st), s[e]);
        o.v[e] = convert<T>(p.b ? add_rn(v, b[e]) : v);
      }
      yr[vi] = o;
    }
  }
}

// Shared-memory floats of one warp's column accumulators for one of dw / db: lane l's slot
// (k, e) of vector l + 32k, element e, at ((k·V/4 + e/4)·32 + l)·4 + e%4 (16-byte accesses by
// consecutive lanes: conflict-free).
template <int MAXV, int V>
inline constexpr int kWarpAccFloats = MAXV * V * 32;

// Block size of the backward warp kernel: each block writes one partial row, so bigger blocks mean
// fewer partials to write and sum: one block holds all the warps an SM runs. Rows of up to 5
// vectors per lane (SigLIP's 1152) fit 128 registers: 16 warps. Longer rows (Gemma's 2048) need
// 168 registers (capped at 128 they spill, and the spills miss L1 — measured 20% slower on the
// H200): 12 warps, 168 · 384 of the SM's 65,536 registers. Blocks of 4 and 8 warps (3 and 2 per
// SM) wrote 3× and 2× the partial rows; on an H100 this took rms_norm backward (4576 × 2048) from
// 33.1 to 29.7 µs and layer_norm backward (4096 × 1152) from 20.2 to 19.6 µs (RESULTS.md, 2026-12-07).
template <int MAXV>
inline constexpr int kWarpBackwardThreads = MAXV > 5 ? 384 : 512;
template <int MAXV>
inline constexpr int kWarpBackwardMinBlocks = 1;

__host__ __device__ constexpr int warp_acc_index(int k, int e, int lane, int V) {
  return ((k * (V / 4) + e / 4) * 32 + lane) * 4 + e % 4;
}

// Each block's share of the column sums of the (gridDim.x, D) partial rows part0 (and part1):
// out0[j] (out1[j]) = Σ_b part[b][j] in double in a fixed order, rounded once to O, for the block's
// ⌈D / gridDim.x⌉ columns. Runs after a grid-wide barrier: the partials were written by other SMs
// in this launch, so they are read from L2 (ld.global.cg). `stage`: blockDim.x doubles of shared
// memory. Threads split a chunk of columns into groups of partial rows; the groups are then summed
// in order, so the result does not depend on timing.
template <class C, class O>
__device__ void block_column_sums(O* __restrict__ out0, O* __restrict__ out1, const C* part0, const C* part1, int D,
                                  double* stage) {
  const int per = (D + int(gridDim.x) - 1) / int(gridDim.x);
  const int j0 = int(blockIdx.x) * per, j1 = min(D, j0 + per);
  if (j0 >= j1) return;  // block-uniform
  const int nparts = int(gridDim.x), t = int(threadIdx.x);
  const int ncols = min(j1 - j0, int(blockDim.x)), groups = int(blockDim.x) / ncols;
  const int col = t % ncols, grp = t / ncols;
  for (int kind = 0; kind < (out1 ? 2 : 1); ++kind) {
    const C* part = kind ? part1 : part0;
    O* out = kind ? out1 : out0;
    for (int c0 = j0; c0 < j1; c0 += ncols) {
      const int j = c0 + col;
      double acc = 0;
      if (grp < groups && j < j1) {
#pragma unroll 4
        for (int b = grp; b < nparts; b += groups) acc += double(__ldcg(part + int64_t(b) * D + j));
      }
      stage[t] = acc;
      __syncthreads();
      if (grp == 0 && j < j1) {
        double sum = 0;
        for (int k = 0; k < groups; ++k) sum += stage[k * ncols + col];
        out[j] = double_to<O>(sum);
      }
      __syncthreads();
    }
  }
}

// dx (rows, D); part_w / part_b (gridDim.x, D): the column sums of g·x̂ and g over the block's
// rows (or null). sum_w / sum_b (D) non-null (the launch is then cooperative: every block is
// resident): after a grid-wide barrier the blocks also sum the partial rows into them
// (block_column_sums), so no second kernel runs. Each lane accumulates its own columns over its warp's rows in fp32 in shared
// memory (registers hold the row: at 64 more registers per lane occupancy would halve); at the
// end the block's warps are folded per column in warp order (deterministic) into one partial row
// per block. The scales offset + w are staged once per block in shared memory. Dynamic shared
// memory: (kWarpBackwardThreads<MAXV> / 32, 1 + kBias, kWarpAccFloats) accumulators, then (D) scales,
// floats. kCenter: layer_norm (x̂ centered, mean of g·s subtracted); rms_norm skips that work.
template <class T, class W, int MAXV, bool kBias, bool kCenter>
__global__ void __launch_bounds__(kWarpBackwardThreads<MAXV>, kWarpBackwardMinBlocks<MAXV>)
    backward_warp_kernel(T* __restrict__ dx, float* __restrict__ part_w, float* __restrict__ part_b,
                         W* __restrict__ sum_w, W* __restrict__ sum_b, const T* __restrict__ g,
                         const T* __restrict__ x, Params<float, W> p) {
  using C = float;
  constexpr int V = kVecWidth<T>;
  using VT = Vec<T, V>;
  using C4 = Vec<C, 4>;
  static_assert(std::is_same_v<compute_t<T>, float> && V % 4 == 0, "the warp kernels run f32/bf16/f16");
  static_assert(MAXV <= kWarpMaxVectors, "a lane holds at most kWarpMaxVectors vectors");
  constexpr int kAcc = kWarpAccFloats<MAXV, V>, kKinds = kBias ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5, nvec = p.D / V;
  C* acc = reinterpret_cast<C*>(smem_bytes);   // (nwarps, kKinds, kAcc)
  C* scale = acc + nwarps * kKinds * kAcc;      // (D) offset + w
  C* my_w = acc + warp * kKinds * kAcc;         // this warp's dw accumulators (kAcc)
  C* my_b = my_w + kAcc;                        // its db accumulators (kAcc, kBias only)
  grid_dependents_launch();  // the column sums may be scheduled as this grid's blocks leave
  for (int i = lane * 4; i < kKinds * kAcc; i += 128) *reinterpret_cast<C4*>(my_w + i) = C4{};
  grid_dependency_wait();  // as a programmatic dependent: the previous kernel's writes are visible from here
  for (int j = threadIdx.x; j < p.D; j += blockDim.x) scale[j] = p.w ? add_rn(p.offset, convert<C>(p.w[j])) : C(1);
  __syncthreads();
  for (int64_t r = int64_t(blockIdx.x) * nwarps + warp; r < p.rows; r += int64_t(gridDim.x) * nwarps) {
    const VT* xr = reinterpret_cast<const VT*>(x + r * p.D);  // (D / V) vectors
    const VT* gr = reinterpret_cast<const VT*>(g + r * p.D);  // (D / V) vectors
    VT xb[MAXV], gb[MAXV];
#pragma unroll
    for (int k = 0; k < MAXV; ++k)
      if (lane + 32 * k < nvec) {
        xb[k] = xr[lane + 32 * k];
        gb[k] = gr[lane + 32 * k];
      }
    const RowStats<C> st = held_stats<T, MAXV, C>(xb, nvec, lane, 32, p, [](C v) { return warp_sum(v); }, kCenter);
    // x̂ (the mean is 0 without centering: x − 0 is x, so the products round as before).
    auto xhat = [&](C v) { return kCenter ? normalized(v, st) : mul_rn(v, st.rstd); };
    C sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = lane + 32 * k;
      if (vi >= nvec) continue;
      C s[V];
      load_affine<C, C, V>(scale, vi * V, true, s);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C gh = mul_rn(convert<C>(gb[k].v[e]), s[e]);
        if constexpr (kCenter) sum_g += gh;
        sum_gx += gh * xhat(convert<C>(xb[k].v[e]));
      }
    }
    if constexpr (kCenter) sum_g = warp_sum(sum_g);
    sum_gx = warp_sum(sum_gx);
    __syncwarp();  // a memory barrier to the compiler: the scales are loaded again, not held
    const C mg = kCenter ? sum_g / C(p.D) : C(0), mgx = sum_gx / C(p.D);
    VT* dr = reinterpret_cast<VT*>(dx + r * p.D);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int vi = lane + 32 * k;
      if (vi >= nvec) continue;
      C s[V];
      load_affine<C, C, V>(scale, vi * V, true, s);
      VT o;
#pragma unroll
      for (int e4 = 0; e4 < V; e4 += 4) {
        C4& aw = *reinterpret_cast<C4*>(my_w + warp_acc_index(k, e4, lane, V));
        C4 w4 = aw, b4;
        if constexpr (kBias) b4 = *reinterpret_cast<C4*>(my_b + warp_acc_index(k, e4, lane, V));
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          const int e = e4 + f;
          const C gv = convert<C>(gb[k].v[e]);
          const C xh = xhat(convert<C>(xb[k].v[e]));
          const C gm = kCenter ? sub_rn(mul_rn(gv, s[e]), mg) : mul_rn(gv, s[e]);  // g·s − 0 is g·s
          o.v[e] = convert<T>(mul_rn(st.rstd, sub_rn(gm, mul_rn(xh, mgx))));
          w4.v[f] += gv * xh;
          if constexpr (kBias) b4.v[f] += gv;
        }
        aw = w4;
        if constexpr (kBias) *reinterpret_cast<C4*>(my_b + warp_acc_index(k, e4, lane, V)) = b4;
      }
      dr[vi] = o;
    }
  }
  __syncthreads();
  // Column j of warp w's accumulators: vector vi = j / V = lane + 32k, element e = j % V.
  for (int j = threadIdx.x; j < p.D; j += blockDim.x) {
    const int vi = j / V, at = warp_acc_index(vi / 32, j % V, vi % 32, V);
    C sw = 0, sb = 0;
    for (int w = 0; w < nwarps; ++w) {
      sw += acc[w * kKinds * kAcc + at];
      if constexpr (kBias) sb += acc[w * kKinds * kAcc + kAcc + at];
    }
    if (part_w) part_w[int64_t(blockIdx.x) * p.D + j] = sw;
    if constexpr (kBias) part_b[int64_t(blockIdx.x) * p.D + j] = sb;
  }
  if (sum_w || sum_b) {  // launch-uniform
    cooperative_groups::this_grid().sync();
    block_column_sums<C, W>(part_w ? sum_w : sum_b, part_w ? sum_b : nullptr, part_w ? part_w : part_b, part_b, p.D,
                            reinterpret_cast<double*>(smem_bytes));
  }
}

// Dynamic shared memory of backward_warp_kernel (at least a double per thread: block_column_sums).
template <class T, int MAXV, bool kBias>
size_t backward_warp_smem(int64_t D) {
  return std::max(
      (size_t(kWarpBackwardThreads<MAXV> / 32) * (kBias ? 2 : 1) * kWarpAccFloats<MAXV, kVecWidth<T>> + size_t(D)) *
          sizeof(float),
      size_t(kWarpBackwardThreads<MAXV>) * sizeof(double));
}

// out{y} (D) = Σ over the nparts rows of part[y] (part: (gridDim.y ≤ 2, nparts, D)), per column:
// kGroups strided groups of rows summed in double, then the groups in order, rounded once from
// double to O (as the CPU's double column sums .to(weight dtype)). Block (kCols, kGroups) covers
// kCols columns; the partial rows were just written, so these reads come from L2. The order is
// fixed: deterministic. Two shapes (column_sum_wide_blocks): 32 columns × 32 groups (the default; a warp
// reads 128 contiguous bytes of a partial row, each thread about nparts / 32 of them, and one warp
// folds the 32 groups), or 8 columns × 128 groups folded in two levels (D / 8 blocks, one read per
// thread; the previous default: 6.1 µs of a 20 µs layer_norm backward under ncu on an H100, in
// blocks too small for their two barriers).
template <int kCols, int kGroups, class C, class O>
__global__ void __launch_bounds__(kCols * kGroups) column_sum_kernel(O* __restrict__ out0, O* __restrict__ out1,
                                                                    const C* __restrict__ part, int64_t nparts,
                                                                    int64_t D) {
  __shared__ double tile[kGroups][kCols + 1];
  grid_dependents_launch();
  grid_dependency_wait();  // launched as a programmatic dependent of the kernel that wrote `part`
  const C* src = part + int64_t(blockIdx.y) * nparts * D;  // (nparts, D)
  O* out = blockIdx.y == 0 ? out0 : out1;                   // (D)
  const int64_t j = int64_t(blockIdx.x) * kCols + threadIdx.x;
  double acc = 0;
  if (j < D) {
#pragma unroll 4
    for (int64_t b = threadIdx.y; b < nparts; b += kGroups) acc += double(src[b * D + j]);
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if constexpr (kGroups <= 32) {
    if (threadIdx.y == 0 && j < D) {
      double s = 0;
#pragma unroll 8
      for (int k = 0; k < kGroups; ++k) s += tile[k][threadIdx.x];
      out[j] = double_to<O>(s);
    }
  } else {
    // Each of 16 threads per column sums kGroups / 16 consecutive groups, then one thread the 16 in order.
    constexpr int kFold = kGroups / 16;
    __shared__ double folded[16][kCols + 1];
    if (threadIdx.y < 16) {
      double s = 0;
#pragma unroll
      for (int k = 0; k < kFold; ++k) s += tile[threadIdx.y * kFold + k][threadIdx.x];
      folded[threadIdx.y][threadIdx.x] = s;
    }
    __syncthreads();
    if (threadIdx.y == 0 && j < D) {
      double s = 0;
#pragma unroll
      for (int k = 0; k < 16; ++k) s += folded[k][threadIdx.x];
      out[j] = double_to<O>(s);
    }
  }
}

// The column-sum block shape: 32 × 32 unless TQ_NORM_COLSUM=8 (8 × 128, the A/B). Read once.
inline bool column_sum_wide_blocks() {
  static const bool v = [] {
    const char* e = std::getenv("TQ_NORM_COLSUM");
    return !(e && e[0] == '8');
  }();
  return v;
}

// ---- launch planning ----

// How a row of D elements of T is spread over a block: `maxv` 16-byte vectors per thread over
// `threads` threads, or maxv == 0 for the generic kernel.
struct Plan {
  int maxv = 0, threads = 256;
};

template <class T>
Plan plan_rows(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int V = kVecWidth<T>;
  Plan plan;
  bool aligned = D % V == 0;
  for (const void* q : ptrs) aligned = aligned && aligned_to(q, 16);
  if (!aligned) {
    plan.threads = threads_for_row(D);
    return plan;
  }
  const int64_t nvec = D / V;
  const int cap = kMaxVectors<T>;
  for (int m = 1; m <= cap; m *= 2) {
    const int64_t t = (nvec + m - 1) / m;
    if (t <= 256 || (m == cap && t <= kMaxThreads)) {
      plan.maxv = m;
      plan.threads = threads_for_row(t, kMaxThreads);
      return plan;
    }
  }
  plan.threads = threads_for_row(D);
  return plan;
}

// Runs launch(std::integral_constant<int, MAXV>) for the plan's maxv (only instances that fit).
template <class T, class F>
void with_maxv(int maxv, F&& launch) {
  constexpr int cap = kMaxVectors<T>;
  switch (maxv) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (2 <= cap) launch(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (4 <= cap) launch(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr (8 <= cap) launch(std::integral_constant<int, 8>{}); break;
    default: fail(str_cat("norm: internal error: no kernel for ", maxv, " vectors per thread"));
  }
}

template <class C, class W>
Params<C, W> make_params(int64_t rows, int64_t D, double eps, bool center, double offset, const Tensor& w,
                         const Tensor& b) {
  Params<C, W> p;
  p.rows = rows;
  p.D = int(D);
  p.eps = C(eps);
  p.offset = C(offset);
  p.center = center;
  p.w = w.defined() ? data_as<const W>(w) : nullptr;
  p.b = b.defined() ? data_as<const W>(b) : nullptr;
  p.affine_vec = (!p.w || aligned_to(p.w, 16)) && (!p.b || aligned_to(p.b, 16));
  return p;
}

// The dtype weight and bias are read in: x's dtype when both (those defined) have it, else the
// compute dtype (what the CPU converts them to).
inline DType affine_dtype(DType x, const Tensor& weight, const Tensor& bias) {
  const bool as_x = (!weight.defined() || weight.dtype() == x) && (!bias.defined() || bias.dtype() == x);
  return as_x ? x : ops::compute_dtype(x);
}

// Calls fn(W{}) for W the storage type of the affine dtype wdt (x's storage type T or compute_t<T>).
template <class T, class F>
void with_affine_type(DType wdt, F&& fn) {
  if (wdt == dtype_of<T>::value) fn(T{});
  else fn(compute_t<T>{});
}

// Whether the backward kernels are launched as programmatic dependents (the warp kernel of the
// previous kernel, the column sums of the kernel that wrote the partial rows): each starts as its
// predecessor's blocks leave instead of after a launch gap. TQ_NORM_BWD_PDL=0 turns it off (the A/B
// in RESULTS.md). Read once.
inline bool backward_pdl() {
  static const bool v = env_switch_on("TQ_NORM_BWD_PDL");
  return v;
}

// Σ over the partial rows, per column, of each (nparts, D) slice k of part (kinds, nparts, D) in
// the compute dtype, as a (D) tensor of out_dtypes[k]. One launch when the dtypes agree.
inline std::vector<Tensor> column_sums(const Tensor& part, int64_t nparts, int64_t D, const std::vector<DType>& out_dtypes) {
  const int kinds = int(out_dtypes.size());
  std::vector<Tensor> out;
  for (DType dt : out_dtypes) out.push_back(Tensor::empty({D}, dt, part.device()));
  auto launch = [&](auto ctag) {
    using C = decltype(ctag);
    const C* base = data_as<const C>(part);
    const bool together = kinds == 2 && out_dtypes[0] == out_dtypes[1];
    for (int k = 0; k < kinds; k += together ? 2 : 1) {
      dispatch_float(out_dtypes[size_t(k)], "norm backward", [&](auto otag) {
        using O = decltype(otag);
        O* o1 = together ? data_as<O>(out[1]) : nullptr;
        auto run = [&]<int kCols, int kGroups>() {
          launch_kernel(column_sum_kernel<kCols, kGroups, C, O>,
                        dim3(unsigned((D + kCols - 1) / kCols), together ? 2u : 1u), dim3(kCols, kGroups), 0,
                        current_stream(), dependent_launch(backward_pdl(), part.device().index),
                        data_as<O>(out[size_t(k)]), o1, base + int64_t(k) * nparts * D, nparts, D);
        };
        if (column_sum_wide_blocks()) run.template operator()<32, 32>();
        else run.template operator()<8, 128>();
      });
    }
  };
  if (part.dtype() == DType::f64) launch(double{});
  else launch(float{});
  return out;
}

// Whether backward_warp_kernel sums the column partials itself (TQ_NORM_BWD_SUM=block: one
// launch, a cooperative grid barrier) or leaves them to column_sum_kernel (the default: in the same
// H100 run the in-kernel sums were 2–5% slower, 30.3 vs 29.7 µs and 20.5 vs 19.6 µs: the grid
// barrier costs more than the second launch it saves). Read once.
inline bool warp_kernel_sums_columns() {
  static const bool v = [] {
    const char* e = std::getenv("TQ_NORM_BWD_SUM");
    return e && std::strcmp(e, "block") == 0;
  }();
  return v;
}

// The warp-per-row kernels' vectors per lane for a row of nvec 16-byte vectors of T (0: the row
// does not fit, or T is double, whose rows take the block kernels). Few instances: 3 → 4, 6..7 → 8.
template <class T>
int warp_vectors(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int V = kVecWidth<T>;
  if (!kWarpRows<T>) return 0;
  bool aligned = D % V == 0;
  for (const void* q : ptrs) aligned = aligned && aligned_to(q, 16);
  const int64_t per_lane = (D / V + 31) / 32;
  if (!aligned || per_lane > kWarpMaxVectors) return 0;
  for (int m : {1, 2, 4, 5, 8})
    if (per_lane <= m) return m;
  return 0;
}

// Runs launch(std::integral_constant<int, MAXV>) for a warp_vectors() result.
template <class F>
void with_warp_vectors(int maxv, F&& launch) {
  switch (maxv) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 5: launch(std::integral_constant<int, 5>{}); break;
    case 8: launch(std::integral_constant<int, 8>{}); break;
    default: fail(str_cat("norm: internal error: no warp kernel for ", maxv, " vectors per lane"));
  }
}

// Resident blocks per SM of a kernel at `threads` threads and `smem` dynamic shared memory, queried
// once per (kernel, threads, smem, device) (SM resources do not change); a kernel is allowed
// the shared memory first. Every launch of a kernel goes through here before it.
template <class K>
int resident_blocks(K* kernel, int threads, size_t smem, int device) {
  using Key = std::tuple<const void*, int, size_t, int>;
  static std::mutex mu;
  static std::map<Key, int> known;
  const Key key{reinterpret_cast<const void*>(kernel), threads, smem, device};
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  if (smem > 48 * 1024)  // above the default limit of dynamic shared memory: opt in
    TQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int b = 0;
  TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, threads, smem));
  return known[key] = std::max(1, b);
}

}  // namespace norm_detail

// ---- entry points ----

inline Tensor norm_forward(const Tensor& x_in, const Tensor& weight, const Tensor& bias, double eps, bool center,
                           double offset) {
  using namespace norm_detail;
  const char* op = center ? "layer_norm" : "rms_norm";
  Tensor x = x_in.detach().contiguous();
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TQ_CHECK(D <= INT32_MAX, op, ": rows of ", D, " elements are too long for the CUDA kernel: ", describe(x_in));
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (rows == 0) return y;
  const DType wdt = affine_dtype(x.dtype(), weight, bias);
  Tensor w = weight.defined() ? dense_as(weight, wdt) : Tensor(), b = bias.defined() ? dense_as(bias, wdt) : Tensor();
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    with_affine_type<T>(wdt, [&](auto wtag) {
      using W = decltype(wtag);
      const Params<C, W> p = make_params<C, W>(rows, D, eps, center, offset, w, b);
      T* py = data_as<T>(y);
      const T* px = data_as<const T>(x);
      if (const int wv = warp_vectors<T>(D, {py, px})) {
        // One warp per row: (rows / 4) blocks of 4 warps, beyond 32 blocks per SM in a grid-stride loop.
        constexpr int wpb = kWarpThreads / 32;
        const int64_t blocks = std::min<int64_t>((rows + wpb - 1) / wpb, int64_t(sm_count(dev)) * 32);
        with_warp_vectors(wv, [&](auto m) {
          if constexpr (kWarpRows<T>)
            forward_warp_kernel<T, W, decltype(m)::value><<<unsigned(blocks), kWarpThreads, 0, current_stream()>>>(py, px, p);
        });
        check_launch();
        return;
      }
      const Plan plan = plan_rows<T>(D, {py, px});
      const unsigned blocks = unsigned(std::min<int64_t>(rows, int64_t(sm_count(dev)) * 64));
      if (plan.maxv == 0) {
        forward_generic_kernel<T, W><<<blocks, plan.threads, 0, current_stream()>>>(py, px, p);
      } else {
        with_maxv<T>(plan.maxv, [&](auto m) {
          forward_cached_kernel<T, W, decltype(m)::value><<<blocks, plan.threads, 0, current_stream()>>>(py, px, p);
        });
      }
      check_launch();
    });
  });
  return y;
}

inline ops::NormGrads norm_backward(const Tensor& grad_out, const Tensor& x_in, const Tensor& weight, const Tensor& bias,
                                    double eps, bool center, double offset) {
  using namespace norm_detail;
  const char* op = center ? "layer_norm backward" : "rms_norm backward";
  // One kernel instance per dtype: a gradient of another dtype than x brings both to the compute dtype.
  const DType ct = ops::compute_dtype(x_in.dtype());
  const DType kt = grad_out.dtype() == x_in.dtype() ? x_in.dtype() : ct;
  Tensor x = dense_as(x_in, kt), g = dense_as(grad_out, kt);
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TQ_CHECK(D <= INT32_MAX, op, ": rows of ", D, " elements are too long for the CUDA kernel: ", describe(x_in));
  const DType wdt = affine_dtype(kt, weight, Tensor());
  Tensor w = weight.defined() ? dense_as(weight, wdt) : Tensor();
  ops::NormGrads out;
  Tensor dx = Tensor::empty(x.shape(), kt, x.device());
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  if (rows == 0) {
    if (weight.defined()) out.weight = Tensor::zeros({D}, weight.dtype(), x.device());
    if (bias.defined()) out.bias = Tensor::zeros({D}, bias.dtype(), x.device());
    out.x = dx.to(x_in.dtype());
    return out;
  }
  dispatch_float(kt, op, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    with_affine_type<T>(wdt, [&](auto wtag) {
      using W = decltype(wtag);
      const Params<C, W> p = make_params<C, W>(rows, D, eps, center, offset, w, Tensor());
      T* pdx = data_as<T>(dx);
      const T* px = data_as<const T>(x);
      const T* pg = data_as<const T>(g);
      // Column partials of weight and bias: (kinds, blocks, D) in the compute dtype.
      const int kinds = int(weight.defined()) + int(bias.defined());
      auto partials = [&](int64_t blocks) {
        return kinds ? Tensor::empty({kinds, blocks, D}, ct, x.device()) : Tensor();
      };
      Tensor part;
      int64_t blocks = 0;
      // With TQ_NORM_BWD_SUM=block the warp kernel sums its own partial rows (one launch) when the
      // gradients are stored in the dtype it reads the weight in.
      const bool in_kernel_sums = kinds > 0 && warp_kernel_sums_columns() &&
                                  (!weight.defined() || weight.dtype() == wdt) && (!bias.defined() || bias.dtype() == wdt);
      if (const int wv = warp_vectors<T>(D, {pdx, px, pg})) {
        // One warp per row; as many blocks as are resident at once (each writes one partial row),
        // never more than there are rows for.
        with_warp_vectors(wv, [&](auto m) {
          constexpr int threads = kWarpBackwardThreads<decltype(m)::value>, wpb = threads / 32;
          auto run = [&](auto kernel, size_t smem) {
            const int64_t resident = int64_t(sm_count(dev)) * resident_blocks(kernel, threads, smem, dev);
            blocks = std::min<int64_t>((rows + wpb - 1) / wpb, resident);
            part = partials(blocks);
            C* pw = weight.defined() ? data_as<C>(part) : nullptr;
            C* pb = bias.defined() ? data_as<C>(part) + (weight.defined() ? blocks * D : 0) : nullptr;
            W *sw = nullptr, *sb = nullptr;
            if (in_kernel_sums) {
              if (weight.defined()) out.weight = Tensor::empty({D}, wdt, x.device());
              if (bias.defined()) out.bias = Tensor::empty({D}, wdt, x.device());
              sw = weight.defined() ? data_as<W>(out.weight) : nullptr;
              sb = bias.defined() ? data_as<W>(out.bias) : nullptr;
            }
            // Cooperative for the in-kernel sums: the launch fails rather than run blocks that are
            // not all resident at the grid barrier.
            launch_kernel(kernel, dim3(unsigned(blocks)), dim3(unsigned(threads)), smem, current_stream(),
                          in_kernel_sums ? LaunchMode::cooperative : dependent_launch(backward_pdl(), dev), pdx, pw,
                          pb, sw, sb, pg, px, p);
          };
          if constexpr (kWarpRows<T>) {
            constexpr int M = decltype(m)::value;
            const bool b = bias.defined();
            if (center && b) run(backward_warp_kernel<T, W, M, true, true>, backward_warp_smem<T, M, true>(D));
            else if (center) run(backward_warp_kernel<T, W, M, false, true>, backward_warp_smem<T, M, false>(D));
            else if (b) run(backward_warp_kernel<T, W, M, true, false>, backward_warp_smem<T, M, true>(D));
            else run(backward_warp_kernel<T, W, M, false, false>, backward_warp_smem<T, M, false>(D));
          }
        });
      } else {
        const Plan plan = plan_rows<T>(D, {pdx, px, pg});
        // Few enough blocks that the (blocks, D) partials stay small (and in L2) next to the rows.
        const int per_sm = std::max(1, std::min(4, 2048 / plan.threads));
        blocks = std::min<int64_t>(rows, int64_t(sm_count(dev)) * per_sm);
        part = partials(blocks);
        C* pw = weight.defined() ? data_as<C>(part) : nullptr;
        C* pb = bias.defined() ? data_as<C>(part) + (weight.defined() ? blocks * D : 0) : nullptr;
        if (plan.maxv == 0) {
          backward_generic_kernel<T, W><<<unsigned(blocks), plan.threads, 0, current_stream()>>>(pdx, pw, pb, pg, px, p);
        } else {
          with_maxv<T>(plan.maxv, [&](auto m) {
            backward_cached_kernel<T, W, decltype(m)::value><<<unsigned(blocks), plan.threads, 0, current_stream()>>>(
                pdx, pw, pb, pg, px, p);
          });
        }
      }
      check_launch();
      std::vector<DType> out_dtypes;
      if (weight.defined()) out_dtypes.push_back(weight.dtype());
      if (bias.defined()) out_dtypes.push_back(bias.dtype());
      const bool summed = (!weight.defined() || out.weight.defined()) && (!bias.defined() || out.bias.defined());
      if (kinds && !summed) {
        std::vector<Tensor> sums = column_sums(part, blocks, D, out_dtypes);
        if (weight.defined()) out.weight = sums[0];
        if (bias.defined()) out.bias = sums.back();
      }
    });
  });
  out.x = dx.dtype() == x_in.dtype() ? dx : dx.to(x_in.dtype());
  return out;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_norm_kernels() {
  ops::NormCudaKernels& k = ops::cuda_norm_kernels();
  k.forward = &norm_forward;
  k.backward = &norm_backward;
}

}  // namespace tq::cuda
