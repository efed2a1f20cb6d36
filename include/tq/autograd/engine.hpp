// The backward engine: walks the graph from a scalar (or a tensor with a given gradient) in
// reverse topological order, calling each node's backward once with the summed gradient of its
// output, and accumulating (+=) into the .grad of every leaf that requires grad.
#pragma once

#include <unordered_map>
#include <unordered_set>

#include "tq/autograd/node.hpp"
#include "tq/ops/elementwise.hpp"

namespace tq {

namespace autograd {

inline void accumulate(Tensor& slot, const Tensor& g) {
  if (!slot.defined()) slot = g;
  else slot = ops::binary(BinaryOp::add, slot, g).to(slot.dtype());
}

// Nodes reachable from `root` in an order where every node precedes the nodes it feeds from.
inline std::vector<Node*> topo_order(Node* root) {
  std::vector<Node*> order;
  std::unordered_set<Node*> seen;
  std::vector<std::pair<Node*, size_t>> stack{{root, 0}};
  seen.insert(root);
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      const Tensor& in = node->inputs[next++];
      if (in.defined() && in.grad_fn() && !seen.count(in.grad_fn().get())) {
        seen.insert(in.grad_fn().get());
        stack.push_back({in.grad_fn().get(), 0});
      }
      continue;
    }
    order.push_back(node);
    stack.pop_back();
  }
  std::reverse(order.begin(), order.end());  // root first
  return order;
}

inline void run_backward(const Tensor& root, const Tensor& root_grad) {
  TQ_CHECK(root.requires_grad(), "backward: the tensor does not require grad (no input requires grad, or it was "
                                 "computed under no_grad)");
  Tensor g0 = root_grad;
  if (!g0.defined()) {
    TQ_CHECK(root.numel() == 1, "backward: implicit gradient only for one-element tensors, got ", describe(root));
    g0 = Tensor::ones(root.shape(), root.dtype(), root.device());
  }
  TQ_CHECK(g0.shape() == root.shape(), "backward: gradient ", describe(g0), " does not match ", describe(root));
  NoGradGuard no_grad;  // gradients are plain tensors (no higher-order graphs)
  if (!root.grad_fn()) {  // a leaf
    Tensor acc = root.grad();
    accumulate(acc, g0.to(root.dtype()));
    Tensor(root.impl_ptr()).set_grad(acc);
    return;
  }
  std::unordered_map<Node*, Tensor> grads;
  grads[root.grad_fn().get()] = g0;
  for (Node* node : topo_order(root.grad_fn().get())) {
    auto it = grads.find(node);
    if (it == grads.end()) continue;  // no gradient reached this node
    Tensor g = std::move(it->second);
    grads.erase(it);
    std::vector<Tensor> in_grads = node->backward(g);
    TQ_CHECK(in_grads.size() == node->inputs.size(), "backward of ", node->name, " returned ", in_grads.size(),
             " gradients for ", node->inputs.size(), " inputs");
    for (size_t i = 0; i < in_grads.size(); ++i) {
      const Tensor& in = node->inputs[i];
      Tensor gi = in_grads[i];
      if (!in.defined() || !in.requires_grad() || !gi.defined()) continue;
      TQ_CHECK(gi.shape() == in.shape(), "backward of ", node->name, ": gradient ", describe(gi), " for input ", i,
               " of shape ", in.shape());
      if (in.grad_fn()) {
        accumulate(grads[in.grad_fn().get()], gi);
      } else {
        Tensor acc = in.grad();
        accumulate(acc, gi.to(in.dtype()).contiguous());
        Tensor(in.impl_ptr()).set_grad(acc);
      }
    }
  }
}

}  // namespace autograd

inline void Tensor::backward(const Tensor& grad) const { autograd::run_backward(*this, grad); }

// Gradients of `output` with respect to `inputs`, without touching any .grad: runs backward on
// detached copies of the inputs. Used by gradcheck and available to users.
inline std::vector<Tensor> grad_of(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                                   const std::vector<Tensor>& inputs, const Tensor& grad_out = Tensor()) {
  std::vector<Tensor> leaves;
  for (const Tensor& t : inputs) {
    Tensor l = t.detach();
    if (is_floating(l.dtype())) l.requires_grad_(true);
    leaves.push_back(l);
  }
  Tensor out;
  {
    EnableGradGuard on;
    out = fn(leaves);
  }
  if (out.requires_grad()) out.backward(grad_out);
  std::vector<Tensor> grads;
  for (const Tensor& l : leaves) grads.push_back(l.grad());
  return grads;
}

}  // namespace tq
