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
//
// Devices: the adapter lives on its base layer's device (A is drawn there: the uniform Philox draw
// is bit-identical on every device) and so do the dropout masks (drawn on x's device directly).
//
// merge()/unmerge() (peft's merge_and_unload semantics, without ever re-quantizing): the merged
// weight W' = W + s·B·A (DoRA: row o scaled by m_o / ‖W_o + s·(B·A)_o‖) is computed in f32 (f64
// for an f64 weight) from the weight the base multiplies with and rounded once:
//   * a dense Linear base keeps its dtype; its weight tensor is swapped for W' and the original
//     tensor is kept, so unmerge() restores it bit for bit (peft subtracts, which is inexact);
//   * any other base (NF4): W = the bf16 dequantized weight NF4Linear computes with; the base is
//     replaced by a dense Linear holding bf16(W') with NF4Linear's compute semantics (bf16 operands,
//     fp32 accumulation, output in x's dtype); unmerge() puts the original base back.
// While merged, forward is the merged base alone (the adapter branch and its gradients are off).
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
    Tensor w0;
    {
      NoGradGuard ng;
      w0 = base->dense_weight(DType::f32);
    }
    const Device dev = w0.device();
    const double bound = 1.0 / std::sqrt(double(in));
    lora_A = rand({cfg.r, in}, init_gen, DType::f32, -bound, bound, dev).requires_grad_();
    lora_B = Tensor::zeros({out, cfg.r}, DType::f32, dev).requires_grad_();
    if (cfg.dora) {
      NoGradGuard ng;
      lora_magnitude_vector = row_norm(w0).detach().requires_grad_();
    }
    dropout_seed = init_gen.seed() ^ 0x9E3779B97F4A7C15ull;
    base->set_requires_grad(false);
    // A LoRA<LinearBase> registers its base as a slot so that merge() can swap the layer in it.
    if constexpr (std::is_same_v<Base, LinearBase>) register_linear("base_layer", &base);
    else register_module("base_layer", base.get());
    register_parameter("lora_A.weight", &lora_A);
    register_parameter("lora_B.weight", &lora_B);
    register_parameter("lora_magnitude_vector", &lora_magnitude_vector);
  }

  double scaling() const { return config.scaling(); }
  int64_t in_features() const override { return base->in_features(); }
  int64_t out_features() const override { return base->out_features(); }
  Tensor bias_tensor() const override { return base->bias_tensor(); }
  // W + s·B·A (what merging produces for plain LoRA; DoRA rescales rows by m / ‖·‖). While merged,
  // the merged base's weight.
  Tensor dense_weight(DType dtype) override {
    NoGradGuard ng;
    if (merged_) return base->dense_weight(dtype);
    Tensor w = base->dense_weight(DType::f32) + matmul(lora_B, lora_A) * scaling();
    if (config.dora) w = w * (lora_magnitude_vector / row_norm(w)).unsqueeze(1);
    return w.to(dtype);
  }

  bool merged() const { return merged_; }

  // Folds the adapter into the base weight (see the header comment). Throws when already merged.
  void merge() {
    TQ_CHECK(!merged_, "LoRA::merge: the adapter is already merged (unmerge() first)");
    NoGradGuard ng;
    if (auto* lin = dynamic_cast<Linear*>(base.get())) {
      const DType wdt = lin->weight.dtype();
      const DType ct = wdt == DType::f64 ? DType::f64 : DType::f32;
      Tensor merged = merged_weight(lin->weight.detach().to(ct)).to(wdt);
      merged.requires_grad_(lin->weight.requires_grad());
      saved_weight_ = lin->weight;
      lin->weight = merged;
    } else {
      if constexpr (std::is_same_v<Base, LinearBase>) {
        Tensor merged = merged_weight(base->dense_weight(DType::bf16).to(DType::f32)).to(DType::bf16);
        Tensor bias = base->bias_tensor();
        auto dense = std::make_unique<Linear>(merged, bias.defined() ? bias.detach() : Tensor());
        dense->autocast = true;  // bf16 operands, fp32 accumulation, output in x's dtype: NF4Linear's math
        dense->compute_dtype = DType::bf16;
        dense->set_requires_grad(false);
        dense->train(training());
        unmerged_base_ = std::move(base);
        base = std::move(dense);
      } else {
        fail("LoRA::merge: only a dense Linear base, or a LoRA<LinearBase> (whose slot can hold the merged "
             "dense layer), can be merged");
      }
    }
    merged_ = true;
  }

  // Restores the base exactly as it was before merge(). Throws when not merged.
  void unmerge() {
    TQ_CHECK(merged_, "LoRA::unmerge: the adapter is not merged");
    if (unmerged_base_) {
      if constexpr (std::is_same_v<Base, LinearBase>) base = std::move(unmerged_base_);
    } else {
      auto* lin = dynamic_cast<Linear*>(base.get());
      TQ_CHECK(lin != nullptr && saved_weight_.defined(), "LoRA::unmerge: the merged base is not the dense layer merge() made");
      lin->weight = saved_weight_;
      saved_weight_ = Tensor();
    }
    merged_ = false;
  }

  Tensor forward(const Tensor& x) override {
    if (merged_) return base->forward(x);
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

  // W + s·B·A, with DoRA's row rescaling, in w's dtype (the adapter tensors are converted to it).
  Tensor merged_weight(const Tensor& w) const {
    const DType ct = w.dtype();
    Tensor delta = ops::matmul(lora_B.detach().to(ct), lora_A.detach().to(ct));
    Tensor sum = ops::binary(BinaryOp::add, w, ops::binary(BinaryOp::mul, delta, ops::scalar_like(delta, scaling())));
    if (!config.dora) return sum;
    Tensor factor = ops::binary(BinaryOp::div, lora_magnitude_vector.detach().to(ct), row_norm(sum));
    return ops::binary(BinaryOp::mul, sum, factor.unsqueeze(1));
  }

  // The mask is drawn on x's device: the same (seed, offset) gives the same mask on every device.
  Tensor apply_dropout(const Tensor& x) {
    if (config.dropout <= 0 || !training()) return x;
    const double keep = 1.0 - config.dropout;
    Tensor mask =
        random_tensor(Distribution::bernoulli, x.shape(), dropout_seed, dropout_offset++, keep, 0, x.dtype(), x.device());
    return x * mask * (1.0 / keep);
  }

  Tensor adapter_product(const Tensor& xd) {
    const DType ct = compute_dtype;
    Tensor h = linear(xd.to(ct), lora_A.to(ct));  // (…, r)
    Tensor o = linear(h, lora_B.to(ct));          // (…, out)
    return o * scaling();
  }

  bool merged_ = false;
  Tensor saved_weight_;                   // a dense Linear base's own weight while merged
  std::unique_ptr<Base> unmerged_base_;   // the replaced (e.g. NF4) base while merged
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
