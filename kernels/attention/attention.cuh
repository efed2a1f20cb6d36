// CUDA fused (flash-style) attention forward and backward: the host side. Fills
// ops::cuda_attention_kernels() (include/tq/ops/attention.hpp defines the function computed).
//
// Paths:
// - Tensor cores (flash_forward.cuh, flash_backward.cuh): bf16/f16, D = Dv ∈ kFlashHeadDims, enough
//   shared memory on the device. Runtime head dim → constexpr template argument through
//   with_flash_head_dim, so only those instances exist.
// - CUDA cores (attention_generic.cuh): everything else (f32, f64, any head dims), fp32/f64 math.
//
// Invariants:
// - Nothing synchronizes the device or reads device memory on the host: shapes and options are
//   validated from metadata (ops::attention_geometry); a CUDA mask tensor is turned into per-key
//   records by key_mask_kernel on the stream; a CPU mask is validated on the host and uploaded.
// - Inputs are made dense (and 16-byte aligned for cp.async) on the device; every buffer comes from
//   the stream-ordered allocator, so temporaries may be dropped as soon as their kernels are enqueued.
// - The forward returns lse (B, Hq, Tq) in fp32 for bf16/f16 inputs, f64 for f32/f64 (lse_dtype_for);
//   the backward reads P back from q, k and lse, so forward and backward must see the same mask (the
//   autograd node saves it). The saved output is not read: Σ_j P_ij·dP_ij is recomputed (see
//   flash_backward.cuh for why dO·O, rounded to the input format, is not precise enough).
#pragma once

#include <array>
#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "kernels/attention/attention_generic.cuh"
#include "kernels/attention/flash_backward.cuh"
#include "kernels/attention/flash_forward.cuh"

namespace tq::cuda {

namespace attention {

// Calls f(std::integral_constant<int, D>) for the head dims that have tensor-core instances.
template <class F>
bool with_flash_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 72: f(std::integral_constant<int, 72>{}); return true;
    case 256: f(std::integral_constant<int, 256>{}); return true;
    default: return false;
  }
}

// Calls f(T{}, C{}) with the storage type T of `dt` and the generic path's compute type C.
template <class F>
void with_float_storage(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}, double{}); return;  // see attention_generic.cuh: f32 computes in double
    case DType::f64: f(double{}, double{}); return;
    case DType::bf16: f(::tq::bf16{}, float{}); return;
    case DType::f16: f(::tq::f16{}, float{}); return;
    default: fail(str_cat("scaled_dot_product_attention: no CUDA kernel for dtype ", dtype_name(dt)));
  }
}

// Dense, detached, 16-byte aligned (cp.async) view or copy of t.
inline Tensor dense_aligned(const Tensor& t) {
  Tensor c = t.detach().contiguous();
  if (!aligned_to(c.data_ptr(), 16)) c = c.detach().clone();
  return c;
}

// The dtype of the saved log-sum-exp: the generic path's compute type (f64 for f32 and f64 inputs),
// f32 for bf16/f16 (both paths).
inline DType lse_dtype_for(DType dt) { return dt == DType::bf16 || dt == DType::f16 ? DType::f32 : DType::f64; }

inline Params make_params(const AttentionGeometry& g, const MaskParams& mask) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TQ_CHECK(g.rep * g.Tq <= kIntMax && g.Tk <= kIntMax && g.D <= kIntMax && g.Dv <= kIntMax && g.B <= kIntMax &&
               g.Hq <= kIntMax,
           "scaled_dot_product_attention: CUDA kernels index rows and keys with int; got Hq/Hkv · Tq = ", g.rep * g.Tq,
           ", Tk = ", g.Tk);
  Params p;
  p.B = int(g.B), p.Hq = int(g.Hq), p.Hkv = int(g.Hkv), p.rep = int(g.rep);
  p.Tq = int(g.Tq), p.Tk = int(g.Tk), p.D = int(g.D), p.Dv = int(g.Dv);
  p.scale = g.scale, p.softcap = g.softcap;
  p.mask = mask;
  return p;
}

// ---- tensor-core path: per-instance setup ----

template <class Tag, int D>
struct FlashInstance {
  static constexpr size_t kForwardBytes = flash_forward_smem_bytes<D>();
  static constexpr size_t kRowDotBytes = flash_row_dot_smem_bytes<D>();
  static constexpr size_t kBackwardBytes = BackwardTiles<D>::kBytes;

  // Opts the kernels into their shared memory on `dev` (once) and returns the backward's resident
  // CTAs per SM (0 when the device cannot run it).
  static int prepare(int dev) {
    static std::array<std::once_flag, kMaxDevices> once;
    static std::array<int, kMaxDevices> backward_blocks{};
    std::call_once(once[size_t(dev)], [dev] {
      TQ_CUDA_CHECK(cudaFuncSetAttribute(flash_forward_kernel<Tag, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kForwardBytes)));
      TQ_CUDA_CHECK(cudaFuncSetAttribute(flash_row_dot_kernel<Tag, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kRowDotBytes)));
      TQ_CUDA_CHECK(cudaFuncSetAttribute(flash_backward_kernel<Tag, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kBackwardBytes)));
      int n = 0;
      TQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, flash_backward_kernel<Tag, D>,
                                                                  BackwardTiles<D>::kThreads, kBackwardBytes));
      backward_blocks[size_t(dev)] = n;
    });
    return backward_blocks[size_t(dev)];
  }
  static bool fits(int dev) {
    const size_t optin = device_properties(dev).sharedMemPerBlockOptin;
    return optin >= kForwardBytes && optin >= kRowDotBytes && optin >= kBackwardBytes;
  }
};

inline bool flash_eligible(const AttentionGeometry& g, DType dt, int dev) {
  if (dt != DType::bf16 && dt != DType::f16) return false;
  if (g.D != g.Dv || g.B * g.Hkv > 65535 || g.B * g.Hq * g.Tq == 0 || g.Tk == 0) return false;
  if (device_properties(dev).major < 8) return false;
  bool fits = false;
  with_flash_head_dim(g.D, [&](auto d) {
    fits = dt == DType::bf16 ? FlashInstance<Bf16, decltype(d)::value>::fits(dev)
                             : FlashInstance<F16, decltype(d)::value>::fits(dev);
  });
  return fits;
}

// Calls f(Tag{}, std::integral_constant<int, D>{}) for an eligible (dtype, D).
template <class F>
void with_flash_instance(DType dt, int64_t D, F&& f) {
  with_flash_head_dim(D, [&](auto d) {
    if (dt == DType::bf16) f(Bf16{}, d);
    else f(F16{}, d);
  });
}

// Query-row splits of the backward: enough CTAs to fill the device in whole waves, each split
// costing a little (dK/dV go through fp32 atomics). TQ_ATTN_BWD_SPLITS=n forces n (for tuning).
inline int backward_splits(int64_t ctas, int query_tiles, int blocks_per_sm, int dev) {
  static const int forced = [] {
    const char* e = std::getenv("TQ_ATTN_BWD_SPLITS");
    return e ? std::atoi(e) : 0;
  }();
  if (forced > 0) return std::max(1, std::min(forced, query_tiles));
  const int64_t slots = int64_t(std::max(1, blocks_per_sm)) * sm_count(dev);
  int best = 1;
  double best_cost = double((ctas + slots - 1) / slots);
  for (int s = 2; s <= std::min(query_tiles, 16); ++s) {
    const double waves = double((ctas * s + slots - 1) / slots);
    const double cost = waves / s * (1.0 + 0.03 * (s - 1));
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

// ---- forward ----

inline void launch_forward(const Params& prm, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                           Tensor& lse, const AttentionGeometry& g, int dev, cudaStream_t stream) {
  if (flash_eligible(g, q.dtype(), dev)) {
    with_flash_instance(q.dtype(), g.D, [&](auto tag, auto d) {
      using Tag = decltype(tag);
      constexpr int D = decltype(d)::value;
      FlashInstance<Tag, D>::prepare(dev);
      FlashForwardArgs a;
      a.p = prm;
      a.q = static_cast<const uint16_t*>(q.data_ptr());
      a.k = static_cast<const uint16_t*>(k.data_ptr());
      a.v = static_cast<const uint16_t*>(v.data_ptr());
      a.out = static_cast<uint16_t*>(out.data_ptr());
      a.lse = static_cast<float*>(lse.data_ptr());
      const dim3 grid(unsigned((g.rep * g.Tq + kFwdRows - 1) / kFwdRows), unsigned(g.B * g.Hkv));
      flash_forward_kernel<Tag, D><<<grid, kFwdThreads, FlashInstance<Tag, D>::kForwardBytes, stream>>>(a);
      check_launch();
    });
    return;
  }
  with_float_storage(q.dtype(), [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    const int64_t rows = g.B * g.Hq * g.Tq;
    generic_forward_kernel<T, C><<<unsigned((rows + kGenericWarps - 1) / kGenericWarps), kGenericWarps * 32, 0,
                                   stream>>>(prm, static_cast<const T*>(q.data_ptr()), static_cast<const T*>(k.data_ptr()),
                                             static_cast<const T*>(v.data_ptr()), static_cast<T*>(out.data_ptr()),
                                             static_cast<C*>(lse.data_ptr()));
    check_launch();
  });
}

inline std::vector<Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt,
                                   const AttentionGeometry& g) {
  const Device dev = q.device();
  DeviceGuard guard(dev.index);
  cudaStream_t stream = current_stream();
  const DType lse_dtype = lse_dtype_for(q.dtype());
  Tensor out = Tensor::empty({g.B, g.Hq, g.Tq, g.Dv}, q.dtype(), dev);
  Tensor lse = Tensor::empty({g.B, g.Hq, g.Tq}, lse_dtype, dev);
  if (g.B * g.Hq * g.Tq == 0) return {out, lse};
  const DeviceMask mask = build_mask(opt, g, dev, stream);
  const Params prm = make_params(g, mask.params);
  const Tensor qc = dense_aligned(q), kc = dense_aligned(k), vc = dense_aligned(v);
  launch_forward(prm, qc, kc, vc, out, lse, g, dev.index, stream);
  return {out, lse};
}

// ---- backward ----

inline void launch_flash_backward(const Params& prm, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& dout, const Tensor& lse, const AttentionGeometry& g, int dev,
                                  cudaStream_t stream, std::vector<Tensor>& grads) {
  const Device device = q.device();
  const DType dt = q.dtype();
  Tensor row_dot = Tensor::empty({g.B, g.Hq, g.Tq}, DType::f32, device);
  Tensor dq_acc = Tensor::zeros(q.shape(), DType::f32, device);
  with_flash_instance(dt, g.D, [&](auto tag, auto d) {
    using Tag = decltype(tag);
    constexpr int D = decltype(d)::value;
    using Tiles = BackwardTiles<D>;
    const int blocks_per_sm = FlashInstance<Tag, D>::prepare(dev);
    FlashRowDotArgs r;
    r.p = prm;
    r.q = static_cast<const uint16_t*>(q.data_ptr());
    r.k = static_cast<const uint16_t*>(k.data_ptr());
    r.v = static_cast<const uint16_t*>(v.data_ptr());
    r.dout = static_cast<const uint16_t*>(dout.data_ptr());
    r.lse = static_cast<const float*>(lse.data_ptr());
    r.row_dot = static_cast<float*>(row_dot.data_ptr());
    const dim3 row_grid(unsigned((g.rep * g.Tq + kFwdRows - 1) / kFwdRows), unsigned(g.B * g.Hkv));
    flash_row_dot_kernel<Tag, D><<<row_grid, kFwdThreads, FlashInstance<Tag, D>::kRowDotBytes, stream>>>(r);
    check_launch();
    const int key_tiles = int((g.Tk + Tiles::kKeys - 1) / Tiles::kKeys);
    const int query_tiles = int((g.rep * g.Tq + Tiles::kRows - 1) / Tiles::kRows);
    FlashBackwardArgs a;
    a.p = prm;
    a.splits = backward_splits(int64_t(key_tiles) * g.B * g.Hkv, query_tiles, blocks_per_sm, dev);
    a.q = static_cast<const uint16_t*>(q.data_ptr());
    a.k = static_cast<const uint16_t*>(k.data_ptr());
    a.v = static_cast<const uint16_t*>(v.data_ptr());
    a.dout = static_cast<const uint16_t*>(dout.data_ptr());
    a.lse = static_cast<const float*>(lse.data_ptr());
    a.row_dot = static_cast<const float*>(row_dot.data_ptr());
    a.dq_acc = static_cast<float*>(dq_acc.data_ptr());
    Tensor dk_acc, dv_acc;
    if (a.splits == 1) {
      grads[1] = Tensor::empty(k.shape(), dt, device);
      grads[2] = Tensor::empty(v.shape(), dt, device);
      a.dk = static_cast<uint16_t*>(grads[1].data_ptr());
      a.dv = static_cast<uint16_t*>(grads[2].data_ptr());
    } else {
      dk_acc = Tensor::zeros(k.shape(), DType::f32, device);
      dv_acc = Tensor::zeros(v.shape(), DType::f32, device);
      a.dk_acc = static_cast<float*>(dk_acc.data_ptr());
      a.dv_acc = static_cast<float*>(dv_acc.data_ptr());
    }
    const dim3 grid(unsigned(key_tiles), unsigned(g.B * g.Hkv), unsigned(a.splits));
    flash_backward_kernel<Tag, D><<<grid, Tiles::kThreads, Tiles::kBytes, stream>>>(a);
    check_launch();
    if (a.splits > 1) {
      grads[1] = dk_acc.to(dt);
      grads[2] = dv_acc.to(dt);
    }
  });
  grads[0] = dq_acc.to(dt);
}

inline void launch_generic_backward(const Params& prm, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& dout, const Tensor& lse, const AttentionGeometry& g,
                                    cudaStream_t stream, std::vector<Tensor>& grads) {
  const Device device = q.device();
  const DType dt = q.dtype();
  grads[0] = Tensor::empty(q.shape(), dt, device);
  grads[1] = Tensor::empty(k.shape(), dt, device);
  grads[2] = Tensor::empty(v.shape(), dt, device);
  Tensor row_dot = Tensor::empty({g.B, g.Hq, g.Tq}, lse.dtype(), device);
  with_float_storage(dt, [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    const int64_t rows = g.B * g.Hq * g.Tq, keys = g.B * g.Hkv * g.Tk;
    const T* pq = static_cast<const T*>(q.data_ptr());
    const T* pk = static_cast<const T*>(k.data_ptr());
    const T* pv = static_cast<const T*>(v.data_ptr());
    const T* pdo = static_cast<const T*>(dout.data_ptr());
    const C* plse = static_cast<const C*>(lse.data_ptr());
    C* pdot = static_cast<C*>(row_dot.data_ptr());
    generic_backward_dq_kernel<T, C><<<unsigned((rows + kGenericWarps - 1) / kGenericWarps), kGenericWarps * 32, 0,
                                       stream>>>(prm, pq, pk, pv, pdo, plse, pdot, static_cast<T*>(grads[0].data_ptr()));
    check_launch();
    generic_backward_dkdv_kernel<T, C><<<unsigned((keys + kGenericWarps - 1) / kGenericWarps), kGenericWarps * 32, 0,
                                         stream>>>(prm, pq, pk, pv, pdo, plse, pdot, static_cast<T*>(grads[1].data_ptr()),
                                                   static_cast<T*>(grads[2].data_ptr()));
    check_launch();
  });
}

inline std::vector<Tensor> backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& out, const Tensor& lse, const AttentionOptions& opt,
                                    const AttentionGeometry& g) {
  const Device dev = q.device();
  DeviceGuard guard(dev.index);
  cudaStream_t stream = current_stream();
  const DType dt = q.dtype();
  const DType lse_dtype = lse_dtype_for(dt);
  TQ_CHECK(lse.dtype() == lse_dtype && lse.shape() == Shape({g.B, g.Hq, g.Tq}) && out.dtype() == dt &&
               out.shape() == Shape({g.B, g.Hq, g.Tq, g.Dv}),
           "scaled_dot_product_attention backward: saved forward ", describe(out), " and lse ", describe(lse),
           " do not fit ", describe(q));
  if (g.B * g.Hq * g.Tq == 0 || g.B * g.Hkv * g.Tk == 0)  // no (query, key) pair: every gradient is zero
    return {Tensor::zeros(q.shape(), dt, dev), Tensor::zeros(k.shape(), dt, dev), Tensor::zeros(v.shape(), dt, dev)};
  const DeviceMask mask = build_mask(opt, g, dev, stream);
  const Params prm = make_params(g, mask.params);
  // The gradient is taken in q's format (the CPU op widens it to the compute type instead).
  const Tensor doc = dense_aligned(dout.dtype() == dt ? dout : dout.detach().to(dt));
  const Tensor qc = dense_aligned(q), kc = dense_aligned(k), vc = dense_aligned(v);
  const Tensor lc = lse.detach().contiguous();  // out is not needed: both paths recompute Σ_j P_ij dP_ij
  std::vector<Tensor> grads(3);
  if (flash_eligible(g, dt, dev.index)) launch_flash_backward(prm, qc, kc, vc, doc, lc, g, dev.index, stream, grads);
  else launch_generic_backward(prm, qc, kc, vc, doc, lc, g, stream, grads);
  return grads;
}

}  // namespace attention

// Fills this family's CUDA kernel table; called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_attention_kernels() {
  ops::AttentionCudaKernels& t = ops::cuda_attention_kernels();
  t.forward = &attention::forward;
  t.backward = &attention::backward;
}

}  // namespace tq::cuda
