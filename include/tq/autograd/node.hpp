// Autograd graph nodes and grad mode.
//
// Every differentiable op produces a fresh output tensor and, when grad mode is on and some input
// requires grad, attaches a Node: the op's inputs (kept alive by the node) and a backward
// function mapping the output's gradient to one gradient per input (undefined = none). Saved
// tensors are captured detached, so a node never owns its own output (no reference cycles).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tq/core/tensor.hpp"

namespace tq {

using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_out)>;

struct Node {
  std::string name;
  std::vector<Tensor> inputs;
  BackwardFn backward;
  Shape out_shape;
  DType out_dtype = DType::f32;
  Device out_device;
};

inline bool& grad_mode_slot() {
  thread_local bool enabled = true;
  return enabled;
}
inline bool grad_enabled() { return grad_mode_slot(); }

// Disables graph recording on this thread for the guard's lifetime.
class NoGradGuard {
 public:
  NoGradGuard() : prev_(grad_mode_slot()) { grad_mode_slot() = false; }
  ~NoGradGuard() { grad_mode_slot() = prev_; }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// Re-enables recording inside a no_grad region (used by checkpoint's recomputation).
class EnableGradGuard {
 public:
  EnableGradGuard() : prev_(grad_mode_slot()) { grad_mode_slot() = true; }
  ~EnableGradGuard() { grad_mode_slot() = prev_; }
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool prev_;
};

inline bool any_requires_grad(const std::vector<Tensor>& ts) {
  for (const Tensor& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// Attaches a backward node to `out` when needed and returns it.
inline Tensor record(std::string name, Tensor out, std::vector<Tensor> inputs, BackwardFn backward) {
  if (!grad_enabled() || !any_requires_grad(inputs)) return out;
  for (const Tensor& in : inputs)
    if (in.defined() && out.same(in)) {
      out = out.detach();  // the op returned an input unchanged: give the output its own identity
      break;
    }
  auto node = std::make_shared<Node>();
  node->name = std::move(name);
  node->inputs = std::move(inputs);
  node->backward = std::move(backward);
  node->out_shape = out.shape();
  node->out_dtype = out.dtype();
  node->out_device = out.device();
  out.impl().grad_fn = std::move(node);
  out.impl().requires_grad = true;
  return out;
}

}  // namespace tq
