// Building blocks shared by the SigLIP tower and the Gemma decoders: linear slots (dense or NF4),
// LayerNorm and Gemma's (1 + w) RMSNorm as named nn::Modules.
//
// Parameters are allocated uninitialized (Tensor::empty) at their final shape and dtype: the
// checkpoint loader replaces each one, so nothing is ever filled twice, and a shape mismatch is
// caught against these shapes before anything is quantized.
#pragma once

#include <memory>

#include <tq/tq.hpp>

namespace tq::paligemma {

inline std::unique_ptr<nn::LinearBase> make_linear(int64_t in, int64_t out, bool bias, DType dtype) {
  return std::make_unique<nn::Linear>(Tensor::empty({out, in}, dtype), bias ? Tensor::empty({out}, dtype) : Tensor());
}

class LayerNorm : public nn::Module {
 public:
  Tensor weight, bias;  // (D)
  double eps;
  LayerNorm(int64_t d, double eps_, DType dtype) : eps(eps_) {
    weight = Tensor::empty({d}, dtype);
    bias = Tensor::empty({d}, dtype);
    register_parameter("weight", &weight);
    register_parameter("bias", &bias);
  }
  Tensor forward(const Tensor& x) const { return layer_norm(x, weight, bias, eps); }
};

// y = x·rsqrt(mean(x²) + eps)·(1 + w), fp32 inside, one rounding at the end (spec §5.3, P1).
class GemmaRMSNorm : public nn::Module {
 public:
  Tensor weight;  // (D), stored as the offset around 1
  double eps;
  GemmaRMSNorm(int64_t d, double eps_, DType dtype) : eps(eps_) {
    weight = Tensor::empty({d}, dtype);
    register_parameter("weight", &weight);
  }
  Tensor forward(const Tensor& x) const { return rms_norm(x, weight, eps, 1.0); }
};

// (B, T, H·D) → (B, H, T, D), contiguous for the attention and RoPE kernels.
inline Tensor split_heads(const Tensor& x, int64_t heads) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2) / heads;
  return x.view({B, T, heads, D}).permute({0, 2, 1, 3}).contiguous();
}
// (B, H, T, D) → (B, T, H·D).
inline Tensor merge_heads(const Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  return x.permute({0, 2, 1, 3}).contiguous().view({B, T, H * D});
}

inline Tensor activation(const Tensor& x, const std::string& name) {
  return gelu(x, /*tanh_approx=*/name != "gelu");
}

}  // namespace tq::paligemma
