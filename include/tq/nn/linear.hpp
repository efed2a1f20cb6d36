// nn::Linear: y = x·Wᵀ + b with W (out, in), as torch.nn.Linear stores it.
//
// `compute_dtype` (default: the weight's) is the dtype of the matmul: with bf16 it behaves like a
// Linear under torch.autocast(bf16): input and weight cast to bf16, fp32 accumulation, bf16 out.
#pragma once

#include "tq/nn/module.hpp"
#include "tq/ops/matmul.hpp"

namespace tq::nn {

// What LoRA<Base> needs from a frozen base layer.
class LinearBase : public Module {
 public:
  virtual Tensor forward(const Tensor& x) = 0;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  // The base weight as a dense (out, in) tensor of `dtype` (dequantized for NF4).
  virtual Tensor dense_weight(DType dtype) = 0;
  virtual Tensor bias_tensor() const = 0;
};

inline void Module::register_linear(std::string name, std::unique_ptr<LinearBase>* slot) {
  children_.push_back({name, [slot]() -> Module* { return slot->get(); }});
  linear_slots_.push_back({std::move(name), slot});
}

class Linear : public LinearBase {
 public:
  Tensor weight;  // (out, in)
  Tensor bias;    // (out) or undefined

  Linear(int64_t in, int64_t out, bool with_bias = true, DType dtype = DType::f32, Device device = Device::cpu()) {
    weight = Tensor::zeros({out, in}, dtype, device);
    if (with_bias) bias = Tensor::zeros({out}, dtype, device);
    register_parameter("weight", &weight);
    register_parameter("bias", &bias);
  }
  Linear(Tensor w, Tensor b = Tensor()) : weight(std::move(w)), bias(std::move(b)) {
    TQ_CHECK(weight.dim() == 2, "Linear: weight must be (out, in), got ", describe(weight));
    register_parameter("weight", &weight);
    register_parameter("bias", &bias);
  }

  DType compute_dtype = DType::f32;  // f32 = exact; bf16 = autocast-style
  bool autocast = false;

  Tensor forward(const Tensor& x) override {
    if (!autocast) return linear(x, weight, bias);
    const DType in_dt = x.dtype();
    Tensor y = linear(x.to(compute_dtype), weight.to(compute_dtype), bias.defined() ? bias.to(compute_dtype) : Tensor());
    return y.to(in_dt);
  }
  int64_t in_features() const override { return weight.size(1); }
  int64_t out_features() const override { return weight.size(0); }
  Tensor dense_weight(DType dtype) override { return weight.detach().to(dtype); }
  Tensor bias_tensor() const override { return bias; }
};

}  // namespace tq::nn
