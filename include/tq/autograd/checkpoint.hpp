// Activation checkpointing: run `fn` without recording, keep only its inputs, and recompute it
// with recording inside backward. Parameters that `fn` captures (weights not passed as inputs)
// still receive their gradients, because the recomputed graph reaches them.
#pragma once

#include "tq/autograd/engine.hpp"

namespace tq {

inline Tensor checkpoint(std::function<Tensor(const std::vector<Tensor>&)> fn, const std::vector<Tensor>& inputs) {
  Tensor out;
  {
    NoGradGuard ng;
    std::vector<Tensor> detached;
    for (const Tensor& t : inputs) detached.push_back(t.detach());
    out = fn(detached);
  }
  if (!grad_enabled()) return out;
  // Record against the inputs and against nothing else: captured parameters get their gradients
  // during recomputation. A dummy always-requires-grad input makes the node exist even when no
  // input requires grad but captured parameters do.
  static Tensor always = Tensor::zeros({}, DType::f32).requires_grad_(true);
  std::vector<Tensor> node_inputs = inputs;
  node_inputs.push_back(always);
  std::vector<Tensor> saved = inputs;
  return record("checkpoint", out.detach(), node_inputs, [fn, saved](const Tensor& g) {
    std::vector<Tensor> leaves;
    for (const Tensor& t : saved) {
      Tensor l = t.detach();
      if (t.requires_grad()) l.requires_grad_(true);
      leaves.push_back(l);
    }
    Tensor re;
    {
      EnableGradGuard on;
      re = fn(leaves);
    }
    if (re.requires_grad()) autograd::run_backward(re, g);
    std::vector<Tensor> grads;
    for (const Tensor& l : leaves) grads.push_back(l.defined() && l.requires_grad() ? l.grad() : Tensor());
    grads.push_back(Tensor());
    return grads;
  });
}

}  // namespace tq
