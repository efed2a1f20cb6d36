// LoRA<Base>: a trainable low-rank adapter around a frozen linear layer, matching peft 0.21.
//
//   y = base(x) + s · B·A·dropout(x)              s = α/r, or α/√r with rsLoRA
// DoRA (use_dora): with W the dense base weight and m the magnitude vector,
//   n = ‖W + s·B·A‖ per output row, DETACHED (no gradient flows through the norm, as in peft);
//   g = m / n;   y = base(x) + (g − 1)·(x'·Wᵀ) + g·s·B·A·x'
// where x' = dropout(x); without dropout x'·Wᵀ is base(x) − bias (peft reuses the base output).
// Parameters: lora_A (r, in), lora_B (out, r), lora_magnitude_vector (out), all f32. Init:
// A ~ U(−1/√in, 1/√in) (kaiming_uniform with a = √5), B = 0, m = ‖W‖ per row.
// `compute_dtype` bf16 reproduces training under torch.autocast(bf16): the adapter GEMMs run in
// bf16 with fp32 accumulation; f32 reproduces peft's plain fp32 forward.
#pragma once

#include <cmath>

#include "tq/core/rng.hpp"
#include "tq/nn/linear.hpp"
#include "tq/ops/reduce.hpp"

namespace tq::nn {

struct LoraConfig {
  int64_t r = 8;
  double alpha = 8;
  double dropout = 0.0;
  bool rslora = false;
  bool dora = false;
  std::vector<std::string> target_modules;
  double scaling() const { return rslora ? alpha / std::sqrt(double(r)) : alpha / double(r); }
};

// peft's target_modules match: the dotted name equals an entry or ends with "." + entry.
inline bool lora_target_matches(const std::string& name, const std::vector<std::string>& targets) {
  for (const std::string& t : targets) {
    if (name == t) return true;
    if (name.size() > t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0 &&
        name[name.size() - t.size() - 1] == '.')
      return true;
  }
  return false;
}

template <class Base = LinearBase>
class LoRA : public LinearBase {
 public:
  std::unique_ptr<Base> base;
  Tensor lora_A;                 // (r, in) f32
  Tensor lora_B;                 // (out, r) f32
  Tensor lora_magnitude_vector;  // (out) f32, DoRA only
  LoraConfig config;
  DType compute_dtype = DType::f32;
  // Dropout draws: (seed, offset) advance once per forward, so recomputation under checkpointing
  // must restore `dropout_offset` (the checkpoint wrapper saves and restores it).
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;

  LoRA(std::unique_ptr<Base> b, const LoraConfig& cfg, Generator& init_gen) : base(std::move(b)), config(cfg) {
    TQ_CHECK(cfg.r > 0, "LoRA: r must be positive, got ", cfg.r);
    const int64_t in = base->in_features(), out = base->out_features();
    const Device dev = base->dense_weight(DType::f32).device();
    const double bound = 1.0 / std::sqrt(double(in));
    lora_A = rand({cfg.r, in}, init_gen, DType::f32, -bound, bound).to(dev).requires_grad_();
    lora_B = Tensor::zeros({out, cfg.r}, DType::f32, dev).requires_grad_();
    if (cfg.dora) lora_magnitude_vector = row_norm(base->dense_weight(DType::f32)).requires_grad_();
    dropout_seed = init_gen.seed() ^ 0x9E3779B97F4A7C15ull;
    base->set_requires_grad(false);
    register_module("base_layer", base.get());
    register_parameter("lora_A.weight", &lora_A);
    register_parameter("lora_B.weight", &lora_B);
    register_parameter("lora_magnitude_vector", &lora_magnitude_vector);
  }

  double scaling() const { return config.scaling(); }
  int64_t in_features() const override { return base->in_features(); }
  int64_t out_features() const override { return base->out_features(); }
  Tensor bias_tensor() const override { return base->bias_tensor(); }
  // W + s·B·A (what merging produces for plain LoRA; DoRA rescales rows by m / ‖·‖).
  Tensor dense_weight(DType dtype) override {
    NoGradGuard ng;
    Tensor w = base->dense_weight(DType::f32) + matmul(lora_B, lora_A) * scaling();
    if (config.dora) w = w * (lora_magnitude_vector / row_norm(w)).unsqueeze(1);
    return w.to(dtype);
  }

  Tensor forward(const Tensor& x) override {
    Tensor y = base->forward(x);
    Tensor xd = apply_dropout(x);
    Tensor lora = adapter_product(xd);  // s·B·A·x' in the adapter compute dtype
    if (!config.dora) return y + lora.to(y.dtype());
    // DoRA: the per-row norm of the combined weight is a constant for autograd.
    Tensor w = base->dense_weight(x.dtype());
    Tensor n;
    {
      NoGradGuard ng;
      Tensor ba = matmul(lora_B.detach(), lora_A.detach()).to(x.dtype());
      n = row_norm(w + ba * scaling());
    }
    Tensor g = lora_magnitude_vector / n.to(lora_magnitude_vector.dtype());  // (out)
    Tensor base_part;
    if (config.dropout > 0 && training()) {
      base_part = linear(xd, w);
    } else {
      Tensor bias = base->bias_tensor();
      base_part = bias.defined() ? y - bias.to(y.dtype()) : y;
    }
    Tensor gy = g.to(y.dtype());
    return y + (gy - 1.0) * base_part + gy * lora.to(y.dtype());
  }

 private:
  static Tensor row_norm(const Tensor& w) { return sqrt(sum(square(w), {1})); }

  Tensor apply_dropout(const Tensor& x) {
    if (config.dropout <= 0 || !training()) return x;
    const double keep = 1.0 - config.dropout;
    Tensor mask = random_tensor(Distribution::bernoulli, x.shape(), dropout_seed, dropout_offset++, keep, 0, x.dtype());
    return x * mask.to(x.device()) * (1.0 / keep);
  }

  Tensor adapter_product(const Tensor& xd) {
    const DType ct = compute_dtype;
    Tensor h = linear(xd.to(ct), lora_A.to(ct));  // (…, r)
    Tensor o = linear(h, lora_B.to(ct));          // (…, out)
    return o * scaling();
  }
};

// Wraps every linear slot whose dotted name matches cfg.target_modules in a LoRA adapter.
// Returns the names wrapped, in traversal order. A drawn from `gen` in that order.
inline std::vector<std::string> apply_lora(Module& root, const LoraConfig& cfg, Generator& gen,
                                           DType compute_dtype = DType::f32) {
  std::vector<std::string> wrapped;
  for (auto& [mname, m] : root.named_modules()) {
    for (auto& [sname, slot] : m->linear_slots()) {
      const std::string full = mname.empty() ? sname : mname + "." + sname;
      if (!lora_target_matches(full, cfg.target_modules)) continue;
      auto lora = std::make_unique<LoRA<LinearBase>>(std::move(*slot), cfg, gen);
      lora->compute_dtype = compute_dtype;
      *slot = std::move(lora);
      wrapped.push_back(full);
    }
  }
  TQ_CHECK(!wrapped.empty(), "apply_lora: no module matches target_modules ", cfg.target_modules);
  return wrapped;
}

}  // namespace tq::nn
