// Module: a node of a model tree with named parameters, as torch.nn.Module names them
// ("layers.0.self_attn.q_proj.weight"), so checkpoints and adapters map by name.
//
// Parameters and children are registered by address: a module is neither copyable nor movable
// (hold it in a std::unique_ptr), and the registry always sees the member's current tensor, also
// after a load replaced it.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tq/core/tensor.hpp"

namespace tq::nn {

class LinearBase;

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter of this module and its descendants, depth-first in registration order.
  std::vector<std::pair<std::string, Tensor*>> named_parameters(const std::string& prefix = "") {
    std::vector<std::pair<std::string, Tensor*>> out;
    for (auto& [name, t] : params_)
      if (t->defined()) out.push_back({prefix + name, t});
    for (auto& [name, get] : children_) {
      auto sub = get()->named_parameters(prefix + name + ".");
      out.insert(out.end(), sub.begin(), sub.end());
    }
    return out;
  }
  // Every module (this one first) with its dotted name ("" for this one).
  std::vector<std::pair<std::string, Module*>> named_modules(const std::string& prefix = "") {
    std::vector<std::pair<std::string, Module*>> out{{prefix, this}};
    for (auto& [name, get] : children_) {
      auto sub = get()->named_modules(prefix.empty() ? name : prefix + "." + name);
      out.insert(out.end(), sub.begin(), sub.end());
    }
    return out;
  }
  std::vector<Tensor> trainable_parameters() {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_parameters())
      if (t->requires_grad()) out.push_back(*t);
    return out;
  }
  int64_t count_parameters(bool trainable_only = false) {
    int64_t n = 0;
    for (auto& [name, t] : named_parameters())
      if (!trainable_only || t->requires_grad()) n += t->numel();
    return n;
  }
  void zero_grad() {
    for (auto& [n, t] : named_parameters()) t->zero_grad();
  }
  void set_requires_grad(bool on) {
    for (auto& [n, t] : named_parameters())
      if (is_floating(t->dtype())) t->requires_grad_(on);
  }
  bool training() const { return training_; }
  void train(bool on = true) {
    training_ = on;
    for (auto& [n, get] : children_) get()->train(on);
  }

  // Slots holding replaceable linear layers (an adapter wraps the layer in its slot).
  std::vector<std::pair<std::string, std::unique_ptr<LinearBase>*>>& linear_slots() { return linear_slots_; }

 protected:
  void register_parameter(std::string name, Tensor* t) { params_.push_back({std::move(name), t}); }
  void register_module(std::string name, Module* m) {
    children_.push_back({std::move(name), [m] { return m; }});
  }
  // A child held in a slot that LoRA may replace; traversals always see the slot's current layer.
  void register_linear(std::string name, std::unique_ptr<LinearBase>* slot);

 private:
  std::vector<std::pair<std::string, Tensor*>> params_;
  std::vector<std::pair<std::string, std::function<Module*()>>> children_;
  std::vector<std::pair<std::string, std::unique_ptr<LinearBase>*>> linear_slots_;
  bool training_ = true;
};

}  // namespace tq::nn
