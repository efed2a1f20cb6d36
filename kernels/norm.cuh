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
//   compute dtype (registers in the cached kernel), written once into a (blocks, D) scratch; a
//   second kernel sums the partials of each column in double in a fixed order. Deterministic, no
//   atomics; the (rows, D) products g·x̂ are never materialized.
// - No host synchronization: every launch is capturable into a CUDA graph.
#pragma once

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

// Row statistics of a row held in registers: buf[k] is vector threadIdx.x + k·blockDim.x.
template <class T, int MAXV, class C, class P>
__device__ __forceinline__ RowStats<C> cached_stats(const Vec<T, kVecWidth<T>> (&buf)[MAXV], int nvec, const P& p,
                                                    C* red) {
  constexpr int V = kVecWidth<T>;
  C mean = 0;
  if (p.center) {
    C s = 0;
#pragma unroll
    for (int k = 0; k < MAXV; ++k)
      if (int(threadIdx.x) + k * int(blockDim.x) < nvec)
#pragma unroll
        for (int e = 0; e < V; ++e) s += convert<C>(buf[k].v[e]);
    mean = block_sum(s, red) / C(p.D);
  }
  C ss = 0;
#pragma unroll
  for (int k = 0; k < MAXV; ++k)
    if (int(threadIdx.x) + k * int(blockDim.x) < nvec)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const C d = convert<C>(buf[k].v[e]) - mean;
        ss += d * d;
      }
  return finish_stats(block_sum(ss, red), p, mean);
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

// out (D) = Σ over the nparts rows of part (nparts, D), per column: 16 strided groups of rows
// summed in double, then the groups in order, rounded once from double to O (as the CPU's
// double column sums .to(weight dtype)). Block (32, 16) covers 32 columns.
template <class C, class O>
__global__ void column_sum_kernel(O* __restrict__ out, const C* __restrict__ part, int64_t nparts, int64_t D) {
  __shared__ double tile[16][33];
  const int64_t j = int64_t(blockIdx.x) * 32 + threadIdx.x;
  double acc = 0;
  if (j < D) {
#pragma unroll 4
    for (int64_t b = threadIdx.y; b < nparts; b += 16) acc += double(part[b * D + j]);
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < D) {
    double s = 0;
    for (int k = 0; k < 16; ++k) s += tile[k][threadIdx.x];
    out[j] = double_to<O>(s);
  }
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

// Σ over the partial rows (nparts, D) of the compute dtype, per column, in `out_dtype`.
inline Tensor column_sums(const Tensor& part, int64_t nparts, int64_t D, DType out_dtype) {
  Tensor out = Tensor::empty({D}, out_dtype, part.device());
  const dim3 block(32, 16);
  const unsigned blocks = unsigned((D + 31) / 32);
  auto launch = [&](auto ctag) {
    using C = decltype(ctag);
    dispatch_float(out_dtype, "norm backward", [&](auto otag) {
      using O = decltype(otag);
      column_sum_kernel<C, O><<<blocks, block, 0, current_stream()>>>(data_as<O>(out), data_as<const C>(part), nparts, D);
    });
  };
  if (part.dtype() == DType::f64) launch(double{});
  else launch(float{});
  check_launch();
  return out;
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
      const Plan plan = plan_rows<T>(D, {pdx, px, pg});
      // Few enough blocks that the (blocks, D) partials stay small (and in L2) next to the rows.
      const int per_sm = std::max(1, std::min(4, 2048 / plan.threads));
      const int64_t blocks = std::min<int64_t>(rows, int64_t(sm_count(dev)) * per_sm);
      Tensor part_w = weight.defined() ? Tensor::empty({blocks, D}, ct, x.device()) : Tensor();
      Tensor part_b = bias.defined() ? Tensor::empty({blocks, D}, ct, x.device()) : Tensor();
      C* pw = part_w.defined() ? data_as<C>(part_w) : nullptr;
      C* pb = part_b.defined() ? data_as<C>(part_b) : nullptr;
      if (plan.maxv == 0) {
        backward_generic_kernel<T, W><<<unsigned(blocks), plan.threads, 0, current_stream()>>>(pdx, pw, pb, pg, px, p);
      } else {
        with_maxv<T>(plan.maxv, [&](auto m) {
          backward_cached_kernel<T, W, decltype(m)::value><<<unsigned(blocks), plan.threads, 0, current_stream()>>>(
              pdx, pw, pb, pg, px, p);
        });
      }
      check_launch();
      if (pw) out.weight = column_sums(part_w, blocks, D, weight.dtype());
      if (pb) out.bias = column_sums(part_b, blocks, D, bias.dtype());
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
