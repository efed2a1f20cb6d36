// CUDA fused linear + cross-entropy over a large vocabulary, chunked (the entry of
// ops::cuda_linear_cross_entropy_kernels(); the contract and the CPU reference are in
// include/tq/ops/linear_cross_entropy.hpp).
//
// Per chunk of R rows (R from ops::linear_ce_chunk_rows: the chunk's logits ≤ 256 MiB):
//   1. logits (R, V) in T = h_chunk · Wᵀ            our GEMM (bf16) / the SIMT kernel (f16/f32/f64)
//   2-4 in three kernels (or, with TQ_LCE_TWO_PASS=0 on sm_90, row_cluster_kernel: one cluster of
//      8 CTAs per row holding the row in shared memory, each logit read once; slower, see cluster_slice):
//   2. partial_stats_kernel: each (row, segment) block folds its segment of the softcapped row
//      into an online (max, Σexp) pair in fp32 — one read of the logits
//   3. row_loss_kernel: per row, lse = merge of the segment pairs; loss_r = lse − y[t_r]
//   4. (gradients wanted) grad_kernel: dlogits = s·(softmax − onehot)·y'(x) in fp32, rounded once to
//      T, written over the logits in place; blocks run in the reverse order of step 2 so the rows
//      read last there are still in L2
//   5. dh[chunk] = dlogits · W  (fp32 out);  dW (+)= dlogitsᵀ · h_chunk  (fp32, beta = 1 after the
//      first chunk) when W requires grad
// then finalize_kernel sums the n per-row losses in double in a fixed order (deterministic) and
// divides by the normalizer (the supervised-row count in mean mode, counted on the device).
// The loss alone in bf16 on sm_90 skips the logits chunk: the GEMM's epilogue reduces each row's
// 256-column tiles to (max, Σexp) pairs and the target's logit (kernels::GemmRowStats, 8 bytes
// per tile instead of 512), and tile_stats_loss_kernel merges them (loss_through_gemm_stats).
// Invariants: fp32 math (f64 for f64) for everything but the stored logits/dlogits (T); the only
// V-wide buffer is the chunk's (R, V) in T — fp32 logits are never materialized; the host never
// reads device memory (graph-capturable); a device target outside [0, V) makes its row NaN.
#pragma once

#include <cooperative_groups.h>

#include <cfloat>
#include <cstdlib>

#include "kernels/copy.cuh"
#include "kernels/matmul.cuh"
#include "tq/ops/linear_cross_entropy.hpp"

namespace tq::cuda {

namespace lce {

constexpr int kBlock = 256;
constexpr int kMaxSegments = 64;      // (max, Σexp) pairs per row merged by one thread in step 3
constexpr int64_t kMinSegment = 2048;  // elements per block below which segments stop splitting
static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block reductions assume whole warps");

__device__ __forceinline__ float dev_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_log(float x) { return ::logf(x); }
__device__ __forceinline__ double dev_log(double x) { return ::log(x); }
__device__ __forceinline__ float dev_tanh(float x) { return ::tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return ::tanh(x); }

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <class C>
__device__ __forceinline__ C lowest() {
  return std::is_same_v<C, double> ? -DBL_MAX : -FLT_MAX;
}

// The logit the loss sees, as ops::softcap_logit (every step rounded to T like the unfused ops), and
// the exp of a logit minus a running max or the lse. fast_exp (bf16/f16 logits only, the default):
// the hardware exp2 (__expf: a few fp32 ulps, far below the logits' own rounding; the baseline CE
// kernel of bench_linear_ce uses it too). The library expf, with one online update per logit whose
// divergent lanes take both branches, made the fused op 4-5% slower in three of four cases in one
// H100 run (e.g. 9.31 vs 8.92 ms for the loss of 4,576 rows). TQ_LCE_EXACT_EXP=1 keeps the library exp.
template <class T>
struct LogitMath {
  using C = compute_t<T>;
  C cap;  // already rounded to T; 0 = off
  bool fast_exp;
  __device__ __forceinline__ C exp(C x) const {
    if constexpr (sizeof(T) == 2) {
      if (fast_exp) return __expf(x);
    }
    return dev_exp(x);
  }
  __device__ __forceinline__ static C round(C v) { return convert<C>(convert<T>(v)); }
  __device__ __forceinline__ C value(C x) const {
    if (cap == C(0)) return x;
    return round(round(dev_tanh(round(x / cap))) * cap);
  }
  __device__ __forceinline__ C value_and_deriv(C x, C& deriv) const {
    if (cap == C(0)) {
      deriv = C(1);
      return x;
    }
    const C a = round(x / cap);
    const C th = dev_tanh(a);
    deriv = C(1) - th * th;
    return round(round(th) * cap);
  }
};

// Online log-sum-exp state: Σ exp(y − m) over the elements seen, m their running max. m starts at
// the lowest finite value (not −inf) so that no exp(−inf − (−inf)) = NaN can appear; a NaN
// element turns s into NaN, which then survives every merge (the loss of that row is NaN).
template <class C>
struct MaxSum {
  C m, s;
};
template <class C, class L>
__device__ __forceinline__ void absorb(MaxSum<C>& a, C y, const L& lm) {
  if (y > a.m) {
    a.s = a.s * lm.exp(a.m - y) + C(1);
    a.m = y;
  } else {
    a.s += lm.exp(y - a.m);
  }
}
// absorb of W values at once: one new max, then one exp per value and one for the old sum, with no
// divergent branch. exp(0) is taken as exactly 1, so a +inf max counts once as in absorb; a NaN never
// becomes the max and turns s into NaN.
template <int W, class C, class L>
__device__ __forceinline__ void absorb_all(MaxSum<C>& a, const C (&y)[W], const L& lm) {
  C m = a.m;
#pragma unroll
  for (int e = 0; e < W; ++e) m = y[e] > m ? y[e] : m;
  C s = a.m == m ? a.s : a.s * lm.exp(a.m - m);
#pragma unroll
  for (int e = 0; e < W; ++e) s += y[e] == m ? C(1) : lm.exp(y[e] - m);
  a = {m, s};
}
template <class C>
__device__ __forceinline__ MaxSum<C> merge(MaxSum<C> a, MaxSum<C> b) {
  const C m = a.m > b.m ? a.m : b.m;
  return {m, a.s * dev_exp(a.m - m) + b.s * dev_exp(b.m - m)};
}

// Merges every thread's pair; the result is valid in thread 0.
template <class C>
__device__ MaxSum<C> block_merge(MaxSum<C> v) {
  __shared__ C sm[kBlock / 32], ss[kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v = merge(v, MaxSum<C>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  if (lane == 0) sm[warp] = v.m, ss[warp] = v.s;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlock / 32 ? MaxSum<C>{sm[lane], ss[lane]} : MaxSum<C>{lowest<C>(), C(0)};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      v = merge(v, MaxSum<C>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  }
  return v;
}

// Walks x[j] for j in [begin, end), spread over the block: one(j) for the elements before the first
// 16-byte boundary and after the last whole vector, vec(j0, v) for each 16-byte vector v = x[j0 ..
// j0 + W) in between, v a register copy that kWrite stores back. A thread loads kBatch vectors before
// it works on (and stores) any, so kBatch loads are in flight whatever the compiler can prove about a
// store and the next load. (As a load-modify-store loop, the gradient pass over 416 rows of 257216
// logits moved 1.7 TB/s on an H100: grad_kernel 247 µs, ncu, 2026-12-07.)
template <bool kWrite, class T, class One, class Vecf>
__device__ __forceinline__ void walk_row(T* x, int64_t begin, int64_t end, One&& one, Vecf&& vec) {
  constexpr int W = kVecWidth<T>;
  constexpr int kBatch = 4;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x + begin);
  const int64_t head = imin(end - begin, int64_t((16 - addr % 16) % 16) / int64_t(sizeof(T)));
  for (int64_t j = begin + threadIdx.x; j < begin + head; j += blockDim.x) one(j);
  const int64_t vbegin = begin + head, nv = (end - vbegin) / W;
  Vec<T, W>* xv = reinterpret_cast<Vec<T, W>*>(x + vbegin);  // (nv) 16-byte vectors
  const int64_t step = blockDim.x;
  for (int64_t k0 = threadIdx.x; k0 < nv; k0 += kBatch * step) {
    Vec<T, W> v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (k0 + u * step < nv) v[u] = xv[k0 + u * step];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t k = k0 + u * step;
      if (k >= nv) break;
      vec(vbegin + k * W, v[u]);
      if constexpr (kWrite) xv[k] = v[u];
    }
  }
  for (int64_t j = vbegin + nv * W + threadIdx.x; j < end; j += blockDim.x) one(j);
}

// Calls f(j, x[j] as C) for j in [begin, end), spread over the block, with 16-byte loads where
// aligned. With kWrite, x[j] = T(f(...)) is stored back (16-byte stores likewise).
template <bool kWrite, class T, class F>
__device__ __forceinline__ void for_each_element(T* x, int64_t begin, int64_t end, F&& f) {
  using C = compute_t<T>;
  constexpr int W = kVecWidth<T>;
  walk_row<kWrite>(
      x, begin, end,
      [&](int64_t j) {
        const C r = f(j, convert<C>(x[j]));
        if constexpr (kWrite) x[j] = convert<T>(r);
      },
      [&](int64_t j0, Vec<T, W>& v) {
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const C r = f(j0 + e, convert<C>(v.v[e]));
          if constexpr (kWrite) v.v[e] = convert<T>(r);
        }
      });
}

// Geometry of the row segments: block u handles row u / segments, elements
// [s·seg_len, min(V, (s+1)·seg_len)) with s = u % segments.
struct Segments {
  int64_t V, seg_len;
  int count;
};
// Segments per row: enough for about 4 blocks per SM over a chunk of `rows` rows, at most
// kMaxSegments and none shorter than kMinSegment. (By V alone, 416 rows of 257216 logits made 64
// segments each: 26,624 blocks of 2 vectors per thread; the fused loss of 416 rows took 0.93 ms that
// way and 0.85-0.88 ms with the 2 segments per row chosen here, in H100 runs of 2026-12-07.)
template <class T>
Segments make_segments(int64_t V, int64_t rows, int sms) {
  const int64_t by_rows = (int64_t(4) * sms + rows - 1) / std::max<int64_t>(rows, 1);
  const int64_t want = std::clamp<int64_t>(std::min((V + kMinSegment - 1) / kMinSegment, by_rows), 1, kMaxSegments);
  constexpr int64_t W = kVecWidth<T>;
  const int64_t len = ((V + want - 1) / want + W - 1) / W * W;  // whole vectors, so segments stay aligned
  return {V, len, int((V + len - 1) / len)};
}

// Step 2. logits (rows, V) in T; targets (rows); part_max / part_sum (rows, segments).
template <class T>
__global__ void __launch_bounds__(kBlock)
    partial_stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t ignore_index,
                         Segments sg, LogitMath<T> sc, compute_t<T>* __restrict__ part_max,
                         compute_t<T>* __restrict__ part_sum) {
  using C = compute_t<T>;
  const int64_t unit = blockIdx.x, row = unit / sg.count;
  const int64_t begin = (unit % sg.count) * sg.seg_len, end = imin(sg.V, begin + sg.seg_len);
  MaxSum<C> acc{lowest<C>(), C(0)};
  constexpr int W = kVecWidth<T>;
  if (targets[row] != ignore_index)  // uniform over the block
    walk_row<false>(
        const_cast<T*>(logits) + row * sg.V, begin, end,
        [&](int64_t j) { absorb(acc, sc.value(convert<C>(logits[row * sg.V + j])), sc); },
        [&](int64_t, const Vec<T, W>& v) {
          C y[W];
#pragma unroll
          for (int e = 0; e < W; ++e) y[e] = sc.value(convert<C>(v.v[e]));
          absorb_all(acc, y, sc);
        });
  acc = block_merge(acc);
  if (threadIdx.x == 0) {
    part_max[unit] = acc.m;
    part_sum[unit] = acc.s;
  }
}

// Step 3, one thread per row: lse (rows) and the row's loss (rows; 0 on ignored rows).
template <class T>
__global__ void __launch_bounds__(kBlock)
    row_loss_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t ignore_index,
                    Segments sg, LogitMath<T> sc, const compute_t<T>* __restrict__ part_max,
                    const compute_t<T>* __restrict__ part_sum, int64_t rows, compute_t<T>* __restrict__ lse,
                    compute_t<T>* __restrict__ row_loss) {
  using C = compute_t<T>;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t t = targets[row];
  if (t == ignore_index) {
    lse[row] = C(0);
    row_loss[row] = C(0);
    return;
  }
  MaxSum<C> acc{lowest<C>(), C(0)};
  for (int s = 0; s < sg.count; ++s) acc = merge(acc, MaxSum<C>{part_max[row * sg.count + s], part_sum[row * sg.count + s]});
  const C nan = C(NAN);
  const bool valid = t >= 0 && t < sg.V;
  const C l = valid ? acc.m + dev_log(acc.s) : nan;
  lse[row] = l;
  row_loss[row] = valid ? l - sc.value(convert<C>(logits[row * sg.V + t])) : nan;
}

// Step 4: logits (rows, V) in T become dlogits in place; scale (1) = 1/normalizer on the device.
template <class T>
__global__ void __launch_bounds__(kBlock)
    grad_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t ignore_index, Segments sg,
                LogitMath<T> sc, const compute_t<T>* __restrict__ lse, const compute_t<T>* __restrict__ scale,
                int64_t units) {
  using C = compute_t<T>;
  const int64_t unit = units - 1 - int64_t(blockIdx.x);  // reverse of step 2's order (L2 reuse)
  const int64_t row = unit / sg.count;
  const int64_t begin = (unit % sg.count) * sg.seg_len, end = imin(sg.V, begin + sg.seg_len);
  T* x = logits + row * sg.V;  // (V)
  const int64_t t = targets[row];
  if (t == ignore_index) {
    for_each_element<true>(x, begin, end, [](int64_t, C) { return C(0); });
    return;
  }
  const C l = lse[row], s = *scale;  // l is NaN for an invalid target: the whole row becomes NaN
  for_each_element<true>(x, begin, end, [&](int64_t j, C v) {
    C d;
    const C y = sc.value_and_deriv(v, d);
    const C p = sc.exp(y - l);
    return s * (p - (j == t ? C(1) : C(0))) * d;
  });
}

// Steps 2-4 in one kernel that reads each logit once (sm_90, clusters): a cluster of
// kClusterSize CTAs owns one row; each CTA copies its slice of the row into shared memory while
// folding it into (max, Σexp), the CTAs exchange their pairs through distributed shared memory
// (every CTA merges the same pairs in rank order, so all see the same lse), and the gradient is
// written from shared memory. logits (rows, V) in T, 16-byte aligned rows; `slice` elements per
// CTA, a multiple of the vector width; row_loss (rows).
constexpr int kClusterSize = 8;
constexpr size_t kClusterSliceBytes = 200 << 10;  // the largest slice kept in shared memory

template <class T>
__global__ void __launch_bounds__(kBlock)
    row_cluster_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t ignore_index, int64_t V,
                       int64_t slice, LogitMath<T> sc, const compute_t<T>* __restrict__ scale, bool grad,
                       compute_t<T>* __restrict__ row_loss) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using C = compute_t<T>;
  namespace cg = cooperative_groups;
  constexpr int W = kVecWidth<T>;
  extern __shared__ __align__(16) unsigned char lce_slice_raw[];
  Vec<T, W>* xs = reinterpret_cast<Vec<T, W>*>(lce_slice_raw);  // (slice / W) this CTA's part of the row
  __shared__ C pair_m, pair_s, lse_shared;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank());
  const int64_t row = blockIdx.x / kClusterSize, t = targets[row];
  const bool ignored = t == ignore_index;
  const int64_t begin = rank * slice, end = imin(V, begin + slice);
  const int64_t nv = end > begin ? (end - begin) / W : 0;
  Vec<T, W>* xg = reinterpret_cast<Vec<T, W>*>(logits + row * V + begin);  // (nv) the same part in global
  MaxSum<C> acc{lowest<C>(), C(0)};
  if (!ignored)
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
      const Vec<T, W> v = xg[k];
      xs[k] = v;
      C y[W];
#pragma unroll
      for (int e = 0; e < W; ++e) y[e] = sc.value(convert<C>(v.v[e]));
      absorb_all(acc, y, sc);
    }
  acc = block_merge(acc);
  if (threadIdx.x == 0) pair_m = acc.m, pair_s = acc.s;
  cluster.sync();  // every CTA's pair (and its whole slice) is written
  if (threadIdx.x == 0) {
    MaxSum<C> all{lowest<C>(), C(0)};
    for (int r = 0; r < kClusterSize; ++r)
      all = merge(all, MaxSum<C>{*cluster.map_shared_rank(&pair_m, r), *cluster.map_shared_rank(&pair_s, r)});
    const bool valid = t >= 0 && t < V;
    lse_shared = valid ? all.m + dev_log(all.s) : C(NAN);  // an invalid target: NaN loss and gradient
  }
  cluster.sync();  // lse_shared is visible, and no CTA leaves while another still reads its pair
  if (ignored) {
    if (rank == 0 && threadIdx.x == 0) row_loss[row] = C(0);
    if (grad)
      for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
        Vec<T, W> z;
#pragma unroll
        for (int e = 0; e < W; ++e) z.v[e] = convert<T>(C(0));
        xg[k] = z;
      }
    return;
  }
  const C lse = lse_shared;
  if (threadIdx.x == 0) {
    if (t >= begin && t < end) {
      const Vec<T, W> v = xs[(t - begin) / W];
      row_loss[row] = lse - sc.value(convert<C>(v.v[(t - begin) % W]));
    } else if (rank == 0 && !(t >= 0 && t < V)) {
      row_loss[row] = lse;  // NaN
    }
  }
  if (!grad) return;
  const C s = *scale;
  for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
    Vec<T, W> v = xs[k];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      C d;
      const C y = sc.value_and_deriv(convert<C>(v.v[e]), d);
      const C p = sc.exp(y - lse);
      v.v[e] = convert<T>(s * (p - (begin + k * W + e == t ? C(1) : C(0))) * d);
    }
    xg[k] = v;
  }
#else
  __trap();  // launched only on sm_90 devices (cluster_path_fits)
#endif
}

// Elements of the row each CTA of a cluster keeps (whole vectors), or 0 for the three-kernel path.
// The three kernels are the default: once their passes keep several loads in flight per thread
// (walk_row), loss + dh of 416 rows of 257216 logits took 1.77-2.13 ms that way and 1.93-2.16 ms
// with the cluster kernel (H100, 2026-12-07/08, bench/RESULTS.md; at 4,576 rows the two were within
// the runs' spread). The cluster kernel reads each logit once, but its CTAs all load, then all write,
// at 26% of DRAM (ncu on the H200). TQ_LCE_TWO_PASS=0, read on every call (the tests set it around
// single calls), takes the cluster kernel where it applies: sm_90, not f64, rows tiled by 16-byte
// vectors, a slice within the shared-memory budget.
template <class T>
int64_t cluster_slice(int64_t V, const void* logits, int device) {
  constexpr int64_t W = kVecWidth<T>;
  if (std::is_same_v<T, double> || device_properties(device).major < 9) return 0;
  const char* e = std::getenv("TQ_LCE_TWO_PASS");
  if (e == nullptr || e[0] != '0') return 0;
  if (V % W != 0 || !aligned_to(logits, 16)) return 0;
  const int64_t slice = (V / W + kClusterSize - 1) / kClusterSize * W;
  return slice * int64_t(sizeof(T)) <= int64_t(kClusterSliceBytes) ? slice : 0;
}

template <class T>
void launch_row_cluster(T* logits, const int64_t* targets, int64_t ignore_index, int64_t rows, int64_t V,
                        int64_t slice, LogitMath<T> sc, const compute_t<T>* scale, bool grad,
                        compute_t<T>* row_loss, cudaStream_t st) {
  static const bool attr_set = [] {
    TQ_CUDA_CHECK(cudaFuncSetAttribute(row_cluster_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(kClusterSliceBytes)));
    return true;
  }();
  (void)attr_set;
  TQ_CHECK(rows * kClusterSize <= int64_t(INT32_MAX), "linear_cross_entropy: too many rows in one chunk (", rows, ")");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(rows * kClusterSize));
  cfg.blockDim = dim3(kBlock);
  cfg.dynamicSmemBytes = size_t(slice) * sizeof(T);
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kClusterSize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  TQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, row_cluster_kernel<T>, logits, targets, ignore_index, V, slice, sc, scale,
                                   grad, row_loss));
}

// Before the chunks: the divisor (normalizer, or the supervised-row count) and scale = 1/divisor.
template <class C>
__global__ void __launch_bounds__(kBlock)
    prepare_kernel(const int64_t* __restrict__ targets, int64_t n, int64_t ignore_index, double normalizer,
                   C* __restrict__ scale, double* __restrict__ divisor) {
  __shared__ long long part[kBlock];
  long long count = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) count += targets[i] != ignore_index;
  part[threadIdx.x] = count;
  __syncthreads();
  for (int half = kBlock / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double div = normalizer > 0 ? normalizer : double(part[0]);
    *divisor = div;
    *scale = div > 0 ? C(1.0 / div) : C(0);
  }
}

// After the chunks: loss () = Σ row_loss / divisor (0 when the divisor is 0), summed in double in a
// fixed order.
template <class C>
__global__ void __launch_bounds__(kBlock)
    finalize_kernel(const C* __restrict__ row_loss, int64_t n, const double* __restrict__ divisor, C* __restrict__ loss) {
  __shared__ double part[kBlock];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += double(row_loss[i]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kBlock / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double div = *divisor;
    *loss = div > 0 ? C(part[0] / div) : C(0);
  }
}
static_assert((kBlock & (kBlock - 1)) == 0, "the tree reductions halve kBlock");

// The loss without gradients on sm_90 (bf16): the GEMM's epilogue reduces each (row, 256-column
// tile) of logits to (max, Σexp) and picks out the target's logit (kernels::GemmRowStats), so the
// logits never reach memory; tile_stats_loss_kernel merges a row's tile pairs in tile order, one
// warp per row, into the row's loss (0 on ignored rows, NaN for a target outside [0, V)).
constexpr int kStatsTile = 256;

template <class = void>
__global__ void __launch_bounds__(kBlock)
    tile_stats_loss_kernel(const float2* __restrict__ stats, int64_t ld, int tiles,
                           const float* __restrict__ target_logit, const int64_t* __restrict__ targets,
                           int64_t ignore_index, int64_t V, int64_t rows, float* __restrict__ row_loss) {
  const int64_t row = int64_t(blockIdx.x) * (kBlock / 32) + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  if (row >= rows) return;  // the whole warp
  const int64_t t = targets[row];
  if (t == ignore_index) {
    if (lane == 0) row_loss[row] = 0.0f;
    return;
  }
  MaxSum<float> acc{lowest<float>(), 0.0f};
  for (int i = lane; i < tiles; i += 32) {
    const float2 v = stats[row * ld + i];
    acc = merge(acc, MaxSum<float>{v.x, v.y});
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    acc = merge(acc, MaxSum<float>{__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)});
  if (lane == 0) row_loss[row] = t >= 0 && t < V ? acc.m + dev_log(acc.s) - target_logit[row] : NAN;
}

// TQ_LCE_EPILOGUE=0 turns the statistics epilogue off (the loss then takes the logits chunk and the
// three-kernel path). Read per call: the tests compare both paths.
inline bool stats_epilogue_enabled() {
  const char* e = std::getenv("TQ_LCE_EPILOGUE");
  return e == nullptr || e[0] != '0';
}

// The row losses (n) of n rows through the statistics epilogue; false (nothing enqueued) where the
// sm90 GEMM cannot take these operands. h (n, D), w (V, D) bf16 with unit column stride.
inline bool loss_through_gemm_stats(const Tensor& h, const Tensor& w, const int64_t* tg,
                                    const LinearCrossEntropyOptions& opt, const LogitMath<bf16>& sc, float* row_loss,
                                    cudaStream_t st) {
  const int64_t n = h.size(0), D = h.size(1), V = w.size(0);
  if (n > std::numeric_limits<int>::max() || V > std::numeric_limits<int>::max() ||
      D > std::numeric_limits<int>::max())
    return false;
  kernels::GemmParams g;
  g.N = int(V), g.K = int(D);
  g.A = static_cast<const __nv_bfloat16*>(h.data_ptr());
  g.lda = h.stride(0);
  g.B = static_cast<const __nv_bfloat16*>(w.data_ptr());
  g.ldb = w.stride(0);
  g.trans_b = true;
  g.split_k = 1;
  g.tile_n = kStatsTile;
  if (!stats_epilogue_enabled() || !kernels::gemm_row_stats_available(g)) return false;
  const Device dev = h.device();
  const int64_t tiles = (V + kStatsTile - 1) / kStatsTile;
  // Rows per GEMM: the (rows, tiles) pairs stay within 64 MiB (all 4,576 rows of a PaliGemma batch
  // at V = 257216: 36.8 MB), whole 128-row tiles.
  const int64_t per = std::max<int64_t>(128, (int64_t(64) << 20) / (tiles * int64_t(sizeof(float2))) / 128 * 128);
  const int64_t R = std::min(n, per);
  Tensor stats = Tensor::empty({R * tiles * 2}, DType::f32, dev), target_logit = Tensor::empty({R}, DType::f32, dev);
  g.row_stats.stats = static_cast<float2*>(stats.data_ptr());
  g.row_stats.ld = tiles;
  g.row_stats.target_logit = target_logit.data<float>();
  g.row_stats.cap = sc.cap;
  g.row_stats.fast_exp = sc.fast_exp;
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rows = std::min(R, n - r0);
    g.M = int(rows);
    g.A = static_cast<const __nv_bfloat16*>(h.data_ptr()) + r0 * h.stride(0);
    g.row_stats.targets = tg + r0;
    kernels::gemm(g, st);
    constexpr int kRowsPerBlock = kBlock / 32;
    tile_stats_loss_kernel<<<unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock), kBlock, 0, st>>>(
        g.row_stats.stats, tiles, int(tiles), g.row_stats.target_logit, tg + r0, opt.ignore_index, V, rows,
        row_loss + r0);
    check_launch();
  }
  return true;
}

// The per-row losses and the divisor of one call, whichever path computes the rows: prepare()
// before them counts the divisor (and scale = 1/divisor, the gradients' factor), finalize() after
// them sums the row losses into the loss.
template <class C>
struct LossTotals {
  Tensor row_loss;  // (n) C
  Tensor scale;     // (1) C
  Tensor divisor;   // (1) f64
  LossTotals(int64_t n, Device dev)
      : row_loss(Tensor::empty({n}, dtype_v<C>, dev)),
        scale(Tensor::empty({1}, dtype_v<C>, dev)),
        divisor(Tensor::empty({1}, DType::f64, dev)) {}
  void prepare(const int64_t* tg, const LinearCrossEntropyOptions& opt, cudaStream_t st) {
    prepare_kernel<C><<<1, kBlock, 0, st>>>(tg, row_loss.numel(), opt.ignore_index, opt.normalizer, scale.data<C>(),
                                            divisor.data<double>());
    check_launch();
  }
  Tensor finalize(cudaStream_t st) {
    Tensor loss = Tensor::empty({}, dtype_v<C>, row_loss.device());
    finalize_kernel<C><<<1, kBlock, 0, st>>>(row_loss.data<C>(), row_loss.numel(), divisor.data<double>(),
                                             loss.data<C>());
    check_launch();
    return loss;
  }
};

// The chunk buffers of the logits path, allocated once per call (reused by every chunk).
template <class T>
struct Workspace {
  using C = compute_t<T>;
  Tensor logits;              // (R, V) T: logits, then dlogits, of the current chunk
  Tensor part_max, part_sum;  // (R, segments) C
  Tensor lse;                 // (R) C
  Workspace(int64_t R, int64_t V, const Segments& sg, Device dev) {
    const DType cdt = dtype_v<C>;
    logits = Tensor::empty({R, V}, dtype_v<T>, dev);
    part_max = Tensor::empty({R * sg.count}, cdt, dev);
    part_sum = Tensor::empty({R * sg.count}, cdt, dev);
    lse = Tensor::empty({R}, cdt, dev);
  }
  template <class U>
  U* p(const Tensor& t) const {
    return static_cast<U*>(t.data_ptr());
  }
};

// Steps 2-4 as three kernels (any dtype, any V): one read for the statistics, one read and one
// write for the gradient (its blocks run in reverse, so the rows read last are still in L2).
template <class T>
void two_pass_rows(const Workspace<T>& k, T* lg, const int64_t* tg, int64_t ignore_index, int64_t rows,
                   const Segments& sg, const LogitMath<T>& sc, const compute_t<T>* scale, bool grad,
                   compute_t<T>* row_loss, cudaStream_t st) {
  using C = compute_t<T>;
  const int64_t units = rows * sg.count;
  TQ_CHECK(units <= int64_t(INT32_MAX), "linear_cross_entropy: too many row segments in one chunk (", units, ")");
  partial_stats_kernel<T><<<unsigned(units), kBlock, 0, st>>>(lg, tg, ignore_index, sg, sc, k.template p<C>(k.part_max),
                                                              k.template p<C>(k.part_sum));
  check_launch();
  row_loss_kernel<T><<<unsigned((rows + kBlock - 1) / kBlock), kBlock, 0, st>>>(
      lg, tg, ignore_index, sg, sc, k.template p<C>(k.part_max), k.template p<C>(k.part_sum), rows,
      k.template p<C>(k.lse), row_loss);
  check_launch();
  if (!grad) return;
  grad_kernel<T><<<unsigned(units), kBlock, 0, st>>>(lg, tg, ignore_index, sg, sc, k.template p<C>(k.lse), scale,
                                                     units);
  check_launch();
}

// h (n, D) and w (V, D) in T with unit column stride; targets (n) i64 dense on the device.
template <class T>
ops::LinearCrossEntropyResult forward_typed(const Tensor& h, const Tensor& w, const Tensor& targets,
                                            const LinearCrossEntropyOptions& opt, bool want_h, bool want_w) {
  using C = compute_t<T>;
  const DType ldt = dtype_v<T>, cdt = dtype_v<C>;
  const Device dev = h.device();
  const int64_t n = h.size(0), D = h.size(1), V = w.size(0), hs = h.stride(0), ws = w.stride(0);
  const int64_t R = ops::linear_ce_chunk_rows(n, V, ldt, opt.chunk_rows);
  const Segments sg = make_segments<T>(V, R, sm_count(dev.index));
  cudaStream_t st = current_stream();
  static const bool exact_exp = [] {
    const char* e = std::getenv("TQ_LCE_EXACT_EXP");
    return e != nullptr && e[0] == '1';
  }();
  const LogitMath<T> sc{C(to_double(from_double<T>(opt.softcap))), !exact_exp};
  const int64_t* tg = targets.data<int64_t>();
  LossTotals<C> totals(n, dev);
  totals.prepare(tg, opt, st);
  C* row_loss = totals.row_loss.template data<C>();
  const C* scale = totals.scale.template data<C>();
  ops::LinearCrossEntropyResult res;
  if constexpr (std::is_same_v<T, bf16>) {
    if (!want_h && !want_w && loss_through_gemm_stats(h, w, tg, opt, sc, row_loss, st)) {
      res.loss = totals.finalize(st);
      return res;
    }
  }
  Workspace<T> k(R, V, sg, dev);
  const T* hp = static_cast<const T*>(h.data_ptr());
  const T* wp = static_cast<const T*>(w.data_ptr());
  T* lg = k.template p<T>(k.logits);
  const int64_t slice = cluster_slice<T>(V, lg, dev.index);  // 0: the three-kernel path
  if (want_h) res.grad_h = Tensor::empty({n, D}, cdt, dev);  // every row written by its chunk
  if (want_w) res.grad_w = Tensor::empty({V, D}, cdt, dev);  // written by the first chunk (beta 0)
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rows = std::min(R, n - r0);
    Product2d p;  // logits (rows, V) = h[r0 : r0+rows] (rows, D) · Wᵀ (D, V)
    p.M = rows, p.N = V, p.K = D, p.ab_dtype = ldt;
    p.a = {hp + r0 * hs, hs, 1};
    p.b = {wp, 1, ws};
    p.c = lg, p.ldc = V, p.c_dtype = ldt;
    run_product_2d(p, st);
    if (slice > 0) {  // steps 2-4 reading every logit once
      launch_row_cluster<T>(lg, tg + r0, opt.ignore_index, rows, V, slice, sc, scale, want_h || want_w,
                            row_loss + r0, st);
    } else {
      two_pass_rows<T>(k, lg, tg + r0, opt.ignore_index, rows, sg, sc, scale, want_h || want_w, row_loss + r0, st);
    }
    if (!want_h && !want_w) continue;
    if (want_h) {
      Product2d q;  // dh[r0 : r0+rows] (rows, D) = dlogits (rows, V) · W (V, D), fp32 out
      q.M = rows, q.N = D, q.K = V, q.ab_dtype = ldt;
      q.a = {lg, V, 1};
      q.b = {wp, ws, 1};
      q.c = k.template p<C>(res.grad_h) + r0 * D, q.ldc = D, q.c_dtype = cdt;
      run_product_2d(q, st);
    }
    if (want_w) {
      Product2d q;  // dW (V, D) (+)= dlogitsᵀ (V, rows) · h[r0 : r0+rows] (rows, D), fp32
      q.M = V, q.N = D, q.K = rows, q.ab_dtype = ldt;
      q.a = {lg, 1, V};
      q.b = {hp + r0 * hs, hs, 1};
      q.c = res.grad_w.data_ptr(), q.ldc = D, q.c_dtype = cdt;
      q.beta = r0 == 0 ? 0.0 : 1.0;
      run_product_2d(q, st);
    }
  }
  res.loss = totals.finalize(st);
  return res;
}

}  // namespace lce

// The table entry: inputs arrive checked by ops::linear_ce_check.
inline ops::LinearCrossEntropyResult linear_cross_entropy_forward(const Tensor& h_in, const Tensor& w_in,
                                                                  const Tensor& targets_in,
                                                                  const LinearCrossEntropyOptions& opt, bool want_h,
                                                                  bool want_w) {
  const Device dev = h_in.device();
  DeviceGuard guard(dev.index);
  const DType ldt = promote(h_in.dtype(), w_in.dtype());
  // Operands in T with unit column stride (the tied embedding and selected rows already are).
  auto rows_of = [ldt](const Tensor& t) {
    Tensor x = t.detach().to(ldt);
    return x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
  };
  Tensor h = rows_of(h_in), w = rows_of(w_in);
  Tensor targets = targets_in.detach();
  if (targets.device().is_cpu()) {  // host targets: checked here, where reading them costs nothing
    const std::vector<int64_t> t = ops::linear_ce_host_targets(targets, w.size(0), opt.ignore_index);
    targets = Tensor::from_vector(t, {int64_t(t.size())}).to(dev);
  }
  targets = targets.to(DType::i64).contiguous();
  switch (ldt) {
    case DType::bf16: return lce::forward_typed<bf16>(h, w, targets, opt, want_h, want_w);
    case DType::f16: return lce::forward_typed<f16>(h, w, targets, opt, want_h, want_w);
    case DType::f32: return lce::forward_typed<float>(h, w, targets, opt, want_h, want_w);
    case DType::f64: return lce::forward_typed<double>(h, w, targets, opt, want_h, want_w);
    default: fail(str_cat("linear_cross_entropy: expected float operands, got ", describe(h_in), ", ", describe(w_in)));
  }
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_linear_cross_entropy_kernels() {
  ops::cuda_linear_cross_entropy_kernels().forward = &cuda::linear_cross_entropy_forward;
}

}  // namespace tq::cuda
