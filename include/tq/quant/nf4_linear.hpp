// NF4Linear: a frozen bitsandbytes Linear4bit (nf4, compute dtype bf16), bnb 0.49.2's MatMul4Bit path
// (spec A.10):
//   forward   W = dequantize(NF4) → a bf16 scratch buffer shared by every NF4Linear on the device (one
//             per device and thread, grown to the largest weight); y = bf16(x_bf16 · Wᵀ + bias_bf16) with fp32 accumulation, rounded once;
//             the result is cast back to x's dtype.
//   backward  dx = bf16(dy_bf16 · W_bf16) cast to x's dtype; no weight gradient (frozen), no bias gradient.
// An f64 input runs the same math in f64 on the dequantized weight (a reference mode for gradient tests).
// Invariant: the scratch never outlives a call's meaning — backward re-dequantizes instead of keeping W.
// Why shared: a layer's dequantized weight lives only from its dequantize to the GEMM that reads it,
// enqueued right after on the same stream (the next layer's dequantize is ordered after that GEMM),
// so one buffer serves the whole model. Kept per layer, the buffers added up to a bf16 copy of the
// model beside its NF4 codes (PaliGemma-3B: NF4 generate peaked above bf16 generate).
// CUDA (weight, bias and input on one device; NF4Linear::to moves a layer):
//   M ≤ kFusedMaxRows rows (decoding): the fused NF4 product on the packed codes (kernels/nf4.cuh), which
//             never materializes W: fp32 accumulation, bias in fp32, one bf16 rounding; it takes the NF4
//             codes as bf16 (as bnb's gemv_4bit does) and scales per 64-block partial sums, so it agrees
//             with the dequantize path to bf16 accuracy, not bit for bit.
//   larger M: dequantize into the shared bf16 scratch, then the GEMM (bf16 in, fp32 accumulate) with the
//             bf16 bias added in fp32 in its epilogue (ops::linear_fused_bias) and one bf16 rounding: the CPU
//             path's numerics, apart from the accumulation order. (Adding the bias to a bf16-rounded product
//             rounds twice; DoRA's reuse of y − bias as the base branch made that visible in the magnitude
//             gradient.)
//   backward: the same dequantize + ops::matmul as the CPU path, on the device.
#pragma once

#include <algorithm>
#include <map>
#include <string>

#include "tq/ops/elementwise.hpp"
#include "tq/ops/matmul.hpp"
#include "tq/nn/linear.hpp"
#include "tq/quant/nf4.hpp"

namespace tq {

namespace nf4_detail {

// The bf16 dequantization buffer of `d` for this thread, at least `numel` elements. Never destroyed
// (a CUDA buffer must not be freed after the runtime shut down at exit); growing it frees the old
// one in stream order, after the work already enqueued on it.
inline Tensor shared_scratch(Device d, int64_t numel) {
  static thread_local auto* buffers = new std::map<std::string, Tensor>();
  Tensor& b = (*buffers)[d.str()];
  if (!b.defined() || b.numel() < numel) {
    b = Tensor();
    b = Tensor::empty({std::max<int64_t>(numel, 1)}, DType::bf16, d);
  }
  return b;
}

// dequantize(q) as bf16 (out, in) in the shared buffer of q's device.
inline Tensor dequantize_to_scratch(const NF4Tensor& q) {
  Tensor w = shared_scratch(q.device(), q.numel()).narrow(0, 0, q.numel()).reshape(q.shape);
  nf4_dequantize_into(q, w);
  return w;
}

}  // namespace nf4_detail

class NF4Linear {
 public:
  NF4Linear() = default;
  explicit NF4Linear(NF4Tensor weight, Tensor bias = Tensor()) : weight_(std::move(weight)), bias_(std::move(bias)) {
    TQ_CHECK(weight_.shape.size() == 2, "NF4Linear: weight must be (out, in), got shape ", weight_.shape);
    TQ_CHECK(!bias_.defined() || (bias_.dim() == 1 && bias_.size(0) == out_features()), "NF4Linear: bias ",
             describe(bias_), " does not match ", out_features(), " outputs");
    if (bias_.defined()) bias_ = bias_.detach();
  }

  int64_t in_features() const { return weight_.shape[1]; }
  int64_t out_features() const { return weight_.shape[0]; }
  const NF4Tensor& weight() const { return weight_; }
  const Tensor& bias() const { return bias_; }

  // Decoding batches up to this many rows run the fused NF4 product on CUDA.
  static constexpr int64_t kFusedMaxRows = 16;

  Device device() const { return weight_.device(); }
  // This layer with its weight and bias on `d`.
  NF4Linear to(Device d) const { return NF4Linear(weight_.to(d), bias_.defined() ? bias_.to(d) : Tensor()); }

  // The dequantized weight in the compute dtype: bf16 (out, in), on the weight's device, in the shared
  // scratch buffer (valid until the next NF4Linear on this device and thread dequantizes).
  Tensor dequantized_weight() const { return nf4_detail::dequantize_to_scratch(weight_); }

  // y (..., out) = x (..., in) · W_deqᵀ + b, in x's dtype.
  Tensor forward(const Tensor& x) {
    TQ_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) == in_features(), "NF4Linear: input ", describe(x),
             " does not match ", in_features(), " input features");
    TQ_CHECK(is_floating(x.dtype()), "NF4Linear: input must be a float tensor, got ", describe(x));
    TQ_CHECK(x.device() == device() && (!bias_.defined() || bias_.device() == device()), "NF4Linear: input ",
             describe(x), " is not on the layer's device ", device().str(), " (weight ", describe(weight_.packed),
             ", bias ", describe(bias_), "; NF4Linear::to moves a layer)");
    const bool ref = x.dtype() == DType::f64;
    Tensor x2 = x.detach().reshape({-1, in_features()});
    Tensor y;
    if (x.device().is_cuda() && !ref && x2.size(0) <= kFusedMaxRows) {
      y = nf4::cuda_entry(cuda_nf4_kernels().linear_small_m, "NF4Linear")(x2.to(DType::bf16), weight_, bias_);
    } else if (x.device().is_cuda() && !ref) {
      const Tensor& w = dequantized_weight();
      y = bias_.defined() ? ops::linear_fused_bias(x2.to(DType::bf16), w, bias_.to(DType::bf16))
                          : ops::matmul(x2.to(DType::bf16), w, false, true);
    } else {
      const Tensor& w = dequantized_weight();
      // bf16 operands are exact in f32: one f32 GEMM + bias, then a single rounding, as cuBLAS' epilogue does.
      const DType acc = ref ? DType::f64 : DType::f32;
      Tensor xa = (ref ? x2 : x2.to(DType::bf16)).to(acc);
      y = ops::matmul(xa, w.to(acc), false, true);
      if (bias_.defined()) y = ops::binary(BinaryOp::add, y, (ref ? bias_ : bias_.to(DType::bf16)).to(acc));
      if (!ref) y = y.to(DType::bf16);
    }
    Shape os(x.shape().begin(), x.shape().end() - 1);
    os.push_back(out_features());
    Tensor out = y.to(x.dtype()).reshape(os);
    NF4Tensor wq = weight_;
    const DType xdt = x.dtype();
    const Shape xs = x.shape();
    return record("nf4_linear", out, {x}, [wq, xdt, xs](const Tensor& g) {
      const bool r = xdt == DType::f64;
      Tensor w_deq = nf4_detail::dequantize_to_scratch(wq);  // on the weight's device, in the shared buffer
      Tensor g2 = g.detach().reshape({-1, wq.shape[0]});
      Tensor dx = r ? ops::matmul(g2.to(DType::f64), w_deq.to(DType::f64))
                    : ops::matmul(g2.to(DType::bf16), w_deq);  // bf16 in, fp32 accumulate, bf16 out
      return std::vector<Tensor>{dx.to(xdt).reshape(xs)};
    });
  }
  Tensor operator()(const Tensor& x) { return forward(x); }

 private:
  NF4Tensor weight_;
  Tensor bias_;
};

// NF4Linear in an nn::Module linear slot, so apply_lora can wrap a quantized layer (QLoRA).
class NF4LinearModule : public nn::LinearBase {
 public:
  explicit NF4LinearModule(NF4Linear impl) : impl_(std::move(impl)) {}
  Tensor forward(const Tensor& x) override { return impl_.forward(x); }
  int64_t in_features() const override { return impl_.in_features(); }
  int64_t out_features() const override { return impl_.out_features(); }
  Tensor dense_weight(DType dtype) override { return nf4_dequantize(impl_.weight(), dtype); }
  Tensor bias_tensor() const override { return impl_.bias(); }
  const NF4Linear& impl() const { return impl_; }

 private:
  NF4Linear impl_;
};

}  // namespace tq
