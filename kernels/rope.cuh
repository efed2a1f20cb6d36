// CUDA rotary position embedding, forward and backward (the entry of ops::cuda_rope_kernels()).
//
// Invariants (the CPU reference in ops/rope.hpp is the contract):
// - cos/sin are computed exactly as rope_cos_sin: the fp32 inverse frequencies come from the host
//   (the same std::pow, passed by value as a kernel parameter, so head_dim ≤ 2·kMaxHalf), the
//   angle is float(pos)·inv_freq[i] in fp32, cos/sin are evaluated in double, rounded to fp32 and
//   then to x's dtype. (The device's double cos/sin may differ from glibc's in the last double
//   bit; that reaches the fp32 value only at a rounding boundary.)
// - Each block owns P consecutive (b, t) positions. Its threads first issue the loads of their
//   first items, then evaluate the P·D/2 (position, frequency) cos/sin pairs once each, one or two
//   per thread, into shared memory (exactly the values above, stored in the compute dtype), and
//   then rotate all H heads of those positions from that table. The (Bp, T, D) tables are never
//   materialized in global memory; every (b, t, i) cos/sin is evaluated once (H-fold reuse), and
//   the double-precision trig is spread over all threads instead of serialized per thread.
// - Forward in bf16/f16 rounds each product and the sum to x's dtype (HF's eager bf16 ops); f32
//   and f64 round only at the end; backward rounds once. Products and sums are never contracted
//   into FMAs, so f32 results equal the CPU's bit for bit given the same cos/sin.
// - Each x element is read once and each output element written once (16-byte accesses when the
//   half head dim is a multiple of the vector width and x is aligned).
#pragma once

#include "kernels/ops_common.cuh"
#include "tq/ops/rope.hpp"

namespace tq::cuda {

namespace rope_detail {

inline constexpr int kMaxHalf = 512;
inline constexpr int kRopeThreads = 256;
inline constexpr int kPreload = 2;        // items per thread whose loads are issued before the trig
inline constexpr int kMaxPositions = 64;  // positions per block
inline constexpr int kMaxTableBytes = 32 * 1024;

struct Freqs {
  float inv_freq[kMaxHalf];  // (D / 2) fp32 inverse frequencies
};

struct Geom {
  int64_t B, H, T, D, Bp;
  int P;  // positions (b, t) per block
};

// The rotation of one item: V consecutive frequencies q·V.. of one (b, h, t) row, both halves.
template <class T, int V>
__device__ __forceinline__ void rotate(Vec<T, V>& o1, Vec<T, V>& o2, const Vec<T, V>& x1, const Vec<T, V>& x2,
                                       const compute_t<T>* cs, const compute_t<T>* sn, bool backward) {
  using C = compute_t<T>;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const C a = convert<C>(x1.v[e]), z = convert<C>(x2.v[e]), c = cs[e], s = sn[e];
    if (!backward) {
      // out[i] = x[i]·cos − x[i+D/2]·sin,  out[i+D/2] = x[i+D/2]·cos + x[i]·sin
      o1.v[e] = convert<T>(round_to<T>(add_rn(round_to<T>(mul_rn(a, c)), round_to<T>(mul_rn(-z, s)))));
      o2.v[e] = convert<T>(round_to<T>(add_rn(round_to<T>(mul_rn(z, c)), round_to<T>(mul_rn(a, s)))));
    } else {
      // g[i]·cos + g[i+D/2]·sin,  g[i+D/2]·cos − g[i]·sin
      o1.v[e] = convert<T>(add_rn(mul_rn(a, c), mul_rn(z, s)));
      o2.v[e] = convert<T>(add_rn(mul_rn(z, c), -mul_rn(a, s)));
    }
  }
}

// out (B, H, T, D) = rope(x) or its backward. A block takes positions bt0 .. bt0 + np − 1
// (bt = b·T + t); its items are (p, h, q) with q (a group of V frequencies) fastest.
// Dynamic shared memory: cos and sin tables (P, D/2) in the compute dtype.
template <class T, int V>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                        const int64_t* __restrict__ pos,  // (Bp, T)
                                                        Freqs f, Geom g, bool backward) {
  using C = compute_t<T>;
  using VT = Vec<T, V>;
  extern __shared__ __align__(16) unsigned char table_bytes[];
  const int half = int(g.D / 2), groups = half / V, per_pos = int(g.H) * groups;
  C* cs_tab = reinterpret_cast<C*>(table_bytes);  // (P, half)
  C* sn_tab = cs_tab + g.P * half;                // (P, half)
  const int64_t BT = g.B * g.T;
  // Start of x[b, h, t, :] for item `it` of the block at bt0, and its table row and group.
  auto locate = [&](int64_t bt0, int it, int64_t& row, int& tab) {
    const int p = it / per_pos, rest = it - p * per_pos, h = rest / groups, q = rest - h * groups;
    const int64_t bt = bt0 + p, b = bt / g.T, t = bt - b * g.T;
    row = ((b * g.H + h) * g.T + t) * g.D + int64_t(q) * V;
    tab = p * half + q * V;
  };
  for (int64_t bt0 = int64_t(blockIdx.x) * g.P; bt0 < BT; bt0 += int64_t(gridDim.x) * g.P) {
    const int np = int(BT - bt0 < g.P ? BT - bt0 : g.P), items = np * per_pos;
    // 1. Loads of the first items in flight while the trig runs.
    VT x1[kPreload], x2[kPreload];
#pragma unroll
    for (int k = 0; k < kPreload; ++k) {
      const int it = int(threadIdx.x) + k * kRopeThreads;
      if (it < items) {
        int64_t row;
        int tab;
        locate(bt0, it, row, tab);
        x1[k] = *reinterpret_cast<const VT*>(x + row);
        x2[k] = *reinterpret_cast<const VT*>(x + row + half);
      }
    }
    // 2. cos/sin of the block's (position, frequency) pairs, each once.
    for (int e = threadIdx.x; e < np * half; e += kRopeThreads) {
      const int p = e / half, i = e - p * half;
      const int64_t bt = bt0 + p, b = bt / g.T, t = bt - b * g.T;
      const float ang = __fmul_rn(float(pos[(g.Bp == 1 ? 0 : b) * g.T + t]), f.inv_freq[i]);
      double sd, cd;
      sincos(double(ang), &sd, &cd);
      cs_tab[e] = round_to<T>(C(float(cd)));
      sn_tab[e] = round_to<T>(C(float(sd)));
    }
    __syncthreads();
    // 3. Rotate: the preloaded items, then any further ones.
#pragma unroll
    for (int k = 0; k < kPreload; ++k) {
      const int it = int(threadIdx.x) + k * kRopeThreads;
      if (it < items) {
        int64_t row;
        int tab;
        locate(bt0, it, row, tab);
        VT o1, o2;
        rotate<T, V>(o1, o2, x1[k], x2[k], cs_tab + tab, sn_tab + tab, backward);
        *reinterpret_cast<VT*>(out + row) = o1;
        *reinterpret_cast<VT*>(out + row + half) = o2;
      }
    }
    for (int it = int(threadIdx.x) + kPreload * kRopeThreads; it < items; it += kRopeThreads) {
      int64_t row;
      int tab;
      locate(bt0, it, row, tab);
      const VT a = *reinterpret_cast<const VT*>(x + row), z = *reinterpret_cast<const VT*>(x + row + half);
      VT o1, o2;
      rotate<T, V>(o1, o2, a, z, cs_tab + tab, sn_tab + tab, backward);
      *reinterpret_cast<VT*>(out + row) = o1;
      *reinterpret_cast<VT*>(out + row + half) = o2;
    }
    __syncthreads();  // the table is rewritten by the next position block
  }
}

// Positions per block: enough items to give every thread kPreload of them, within the table's
// shared-memory budget (at least one position: half ≤ kMaxHalf keeps that within budget).
inline int positions_per_block(int64_t H, int64_t groups, int64_t half, size_t elem_bytes) {
  const int64_t per_pos = std::max<int64_t>(1, H * groups);
  int64_t p = (int64_t(kRopeThreads) * kPreload + per_pos - 1) / per_pos;
  p = std::min<int64_t>(p, kMaxPositions);
  p = std::min<int64_t>(p, std::max<int64_t>(1, kMaxTableBytes / int64_t(2 * half * elem_bytes)));
  return int(std::max<int64_t>(1, p));
}

}  // namespace rope_detail

// x (B, H, T, D) any float dtype; positions (Bp, T) i64 on x's device, Bp ∈ {1, B}.
inline Tensor rope_apply(const Tensor& x_in, const Tensor& positions, const std::vector<float>& inv_freq, bool backward) {
  using namespace rope_detail;
  const char* op = backward ? "rope backward" : "rope";
  Tensor x = x_in.detach().contiguous();
  Tensor pos = dense_as(positions, DType::i64);
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), pos.size(0), 1};
  TQ_CHECK(g.D / 2 <= kMaxHalf, op, ": head dim ", g.D, " exceeds the CUDA kernel's limit of ", 2 * kMaxHalf);
  TQ_CHECK(int64_t(inv_freq.size()) == g.D / 2, op, ": ", inv_freq.size(), " inverse frequencies for head dim ", g.D);
  TQ_CHECK(pos.dim() == 2 && pos.size(1) == g.T && (g.Bp == 1 || g.Bp == g.B), op, ": positions ", describe(positions),
           " do not match ", describe(x_in));
  TQ_CHECK(g.H * g.D <= INT32_MAX / 2, op, ": ", g.H, " heads of ", g.D, " are too many for the CUDA kernel");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (out.numel() == 0) return out;
  Freqs f{};
  std::copy(inv_freq.begin(), inv_freq.end(), f.inv_freq);
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    using C = compute_t<T>;
    constexpr int V = kVecWidth<T>;
    T* po = data_as<T>(out);
    const T* px = data_as<const T>(x);
    const int64_t* pp = data_as<const int64_t>(pos);
    const int64_t half = g.D / 2;
    const bool vec = half % V == 0 && aligned_to(px, 16) && aligned_to(po, 16);
    g.P = positions_per_block(g.H, vec ? half / V : half, half, sizeof(C));
    const size_t smem = size_t(2 * g.P * half) * sizeof(C);
    const int64_t blocks = std::min<int64_t>((g.B * g.T + g.P - 1) / g.P, int64_t(sm_count(dev)) * 64);
    if (vec) rope_kernel<T, V><<<unsigned(blocks), kRopeThreads, smem, current_stream()>>>(po, px, pp, f, g, backward);
    else rope_kernel<T, 1><<<unsigned(blocks), kRopeThreads, smem, current_stream()>>>(po, px, pp, f, g, backward);
    check_launch();
  });
  return out;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_rope_kernels() { ops::cuda_rope_kernels().apply = &rope_apply; }

}  // namespace tq::cuda
