// CUDA rotary position embedding, forward and backward (the entry of ops::cuda_rope_kernels()).
//
// Invariants (the CPU reference in ops/rope.hpp is the contract):
// - cos/sin are computed exactly as rope_cos_sin: the fp32 inverse frequencies come from the host
//   (the same std::pow, passed by value as a kernel parameter, so head_dim ≤ 2·kMaxHalf), the
//   angle is float(pos)·inv_freq[i] in fp32, cos/sin are evaluated in double, rounded to fp32 and
//   then to x's dtype. (The device's double cos/sin may differ from glibc's in the last double
//   bit; that reaches the fp32 value only at a rounding boundary.)
// - The (Bp, T, D) cos/sin tables are never materialized: one thread computes the cos/sin of V
//   consecutive frequencies of one (b, t) once and applies them to every head.
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

struct Freqs {
  float inv_freq[kMaxHalf];  // (D / 2) fp32 inverse frequencies
};

struct Geom {
  int64_t B, H, T, D, Bp;
};

inline constexpr int kHeadsPerBatch = 4;  // heads loaded together (their loads overlap the trig)

// out (B, H, T, D) = rope(x) or its backward; item = (b, t, group of V frequencies), all heads.
template <class T, int V>
__global__ void __launch_bounds__(256) rope_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                   const int64_t* __restrict__ pos,  // (Bp, T)
                                                   Freqs f, Geom g, bool backward) {
  using C = compute_t<T>;
  using VT = Vec<T, V>;
  const int64_t half = g.D / 2, groups = half / V, items = g.B * g.T * groups;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bt = item / groups, q = item - bt * groups;
    const int64_t b = bt / g.T, t = bt - b * g.T;
    C cs[V], sn[V];
    for (int64_t h0 = 0; h0 < g.H; h0 += kHeadsPerBatch) {
      VT x1[kHeadsPerBatch], x2[kHeadsPerBatch];  // x[..., i] and x[..., i + D/2] of heads h0 + u
#pragma unroll
      for (int u = 0; u < kHeadsPerBatch; ++u) {
        if (h0 + u >= g.H) break;
        const int64_t row = ((b * g.H + h0 + u) * g.T + t) * g.D;  // start of x[b, h, t, :]
        x1[u] = *reinterpret_cast<const VT*>(x + row + q * V);
        x2[u] = *reinterpret_cast<const VT*>(x + row + half + q * V);
      }
      if (h0 == 0) {  // cos/sin once per (b, t, i), evaluated while the first loads are in flight
        const float p = float(pos[(g.Bp == 1 ? 0 : b) * g.T + t]);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float ang = __fmul_rn(p, f.inv_freq[q * V + e]);
          double sd, cd;
          sincos(double(ang), &sd, &cd);
          cs[e] = round_to<T>(C(float(cd)));
          sn[e] = round_to<T>(C(float(sd)));
        }
      }
#pragma unroll
      for (int u = 0; u < kHeadsPerBatch; ++u) {
        if (h0 + u >= g.H) break;
        VT o1, o2;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const C a = convert<C>(x1[u].v[e]), z = convert<C>(x2[u].v[e]);
          if (!backward) {
            // out[i] = x[i]·cos − x[i+D/2]·sin,  out[i+D/2] = x[i+D/2]·cos + x[i]·sin
            o1.v[e] = convert<T>(round_to<T>(add_rn(round_to<T>(mul_rn(a, cs[e])), round_to<T>(mul_rn(-z, sn[e])))));
            o2.v[e] = convert<T>(round_to<T>(add_rn(round_to<T>(mul_rn(z, cs[e])), round_to<T>(mul_rn(a, sn[e])))));
          } else {
            // g[i]·cos + g[i+D/2]·sin,  g[i+D/2]·cos − g[i]·sin
            o1.v[e] = convert<T>(add_rn(mul_rn(a, cs[e]), mul_rn(z, sn[e])));
            o2.v[e] = convert<T>(add_rn(mul_rn(z, cs[e]), -mul_rn(a, sn[e])));
          }
        }
        const int64_t row = ((b * g.H + h0 + u) * g.T + t) * g.D;
        *reinterpret_cast<VT*>(out + row + q * V) = o1;
        *reinterpret_cast<VT*>(out + row + half + q * V) = o2;
      }
    }
  }
}

}  // namespace rope_detail

// x (B, H, T, D) any float dtype; positions (Bp, T) i64 on x's device, Bp ∈ {1, B}.
inline Tensor rope_apply(const Tensor& x_in, const Tensor& positions, const std::vector<float>& inv_freq, bool backward) {
  using namespace rope_detail;
  const char* op = backward ? "rope backward" : "rope";
  Tensor x = x_in.detach().contiguous();
  Tensor pos = dense_as(positions, DType::i64);
  const Geom g{x.size(0), x.size(1), x.size(2), x.size(3), pos.size(0)};
  TQ_CHECK(g.D / 2 <= kMaxHalf, op, ": head dim ", g.D, " exceeds the CUDA kernel's limit of ", 2 * kMaxHalf);
  TQ_CHECK(int64_t(inv_freq.size()) == g.D / 2, op, ": ", inv_freq.size(), " inverse frequencies for head dim ", g.D);
  TQ_CHECK(pos.dim() == 2 && pos.size(1) == g.T && (g.Bp == 1 || g.Bp == g.B), op, ": positions ", describe(positions),
           " do not match ", describe(x_in));
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (out.numel() == 0) return out;
  Freqs f{};
  std::copy(inv_freq.begin(), inv_freq.end(), f.inv_freq);
  const int dev = x.device().index;
  DeviceGuard guard(dev);
  dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVecWidth<T>;
    T* po = data_as<T>(out);
    const T* px = data_as<const T>(x);
    const int64_t* pp = data_as<const int64_t>(pos);
    const int64_t half = g.D / 2;
    if (half % V == 0 && aligned_to(px, 16) && aligned_to(po, 16)) {
      const int64_t items = g.B * g.T * (half / V);
      rope_kernel<T, V><<<grid_for(items, 256, dev), 256, 0, current_stream()>>>(po, px, pp, f, g, backward);
    } else {
      const int64_t items = g.B * g.T * half;
      rope_kernel<T, 1><<<grid_for(items, 256, dev), 256, 0, current_stream()>>>(po, px, pp, f, g, backward);
    }
    check_launch();
  });
  return out;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_rope_kernels() { ops::cuda_rope_kernels().apply = &rope_apply; }

}  // namespace tq::cuda
