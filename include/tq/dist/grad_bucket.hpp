// GradBucket: the gradients of a list of f32 parameters in one flat buffer, reduced by one
// all_reduce_mean per optimizer step.
//
// Each parameter owns a slot of the flat buffer (in the order given, each slot starting at a
// multiple of kAlignElems elements; the padding between slots stays zero). flatten_grads() makes
// every parameter's .grad a view of its slot, so the optimizer, clipping and checkpoints read the
// reduced values in place.
//
// Invariants:
//  * every rank builds its bucket from the same parameters in the same order (same slots);
//  * autograd replaces a leaf's .grad with a new tensor when it accumulates (grad + g), so after a
//    backward the gradients are generally not views: flatten_grads() copies each gradient that
//    is not already its slot into it (one device copy per parameter, no host sync), writes zeros
//    for a parameter without gradient, and points .grad at the slot;
//  * all_reduce_mean(comm) = flatten_grads() + comm.all_reduce_mean(flat): enqueued behind the
//    end of the backward on the current stream, on the communicator's own stream, without
//    blocking the host; call comm.wait() before the host reads anything derived from the grads
//    if a failed peer must surface as an exception at that point;
//  * a parameter without a gradient on every rank gets a zero gradient (not "no gradient"), so
//    AdamW updates it; LoRA training gives every adapter a gradient, so this does not arise there.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tq/dist/communicator.hpp"
#include "tq/ops/elementwise.hpp"
#include "tq/ops/reduce.hpp"

namespace tq::dist {

class GradBucket {
 public:
  static constexpr int64_t kAlignElems = 64;  // slots start 256 bytes apart: aligned vector access

  // `names` (optional, same length) name the parameters in error messages.
  explicit GradBucket(std::vector<Tensor> params, std::vector<std::string> names = {})
      : params_(std::move(params)), names_(std::move(names)) {
    TQ_CHECK(!params_.empty(), "GradBucket: no parameters");
    TQ_CHECK(names_.empty() || names_.size() == params_.size(), "GradBucket: ", names_.size(), " names for ",
             params_.size(), " parameters");
    const Device dev = params_[0].device();
    int64_t at = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      TQ_CHECK(p.defined(), "GradBucket: parameter ", name(i), " is undefined");
      TQ_CHECK(p.dtype() == DType::f32, "GradBucket: parameter ", name(i), " is ", describe(p),
               "; the bucket holds f32 gradients");
      TQ_CHECK(p.device() == dev, "GradBucket: parameter ", name(i), " is on ", p.device().str(), ", parameter ",
               name(0), " on ", dev.str());
      TQ_CHECK(p.is_leaf() && p.requires_grad(), "GradBucket: parameter ", name(i), " must be a leaf that requires grad");
      offsets_.push_back(at);
      at += (p.numel() + kAlignElems - 1) / kAlignElems * kAlignElems;
    }
    flat_ = Tensor::zeros({at}, DType::f32, dev);
  }

  // The trainable parameters of a module tree (named_parameters order, which every rank shares).
  static GradBucket of(const std::vector<std::pair<std::string, Tensor*>>& named_parameters) {
    std::vector<Tensor> ps;
    std::vector<std::string> ns;
    for (const auto& [n, t] : named_parameters)
      if (t->defined() && t->requires_grad()) ps.push_back(*t), ns.push_back(n);
    return GradBucket(std::move(ps), std::move(ns));
  }

  size_t size() const { return params_.size(); }
  int64_t numel() const { return flat_.numel(); }  // padding included
  Device device() const { return flat_.device(); }
  const Tensor& flat() const { return flat_; }  // (numel) f32
  const std::vector<Tensor>& params() const { return params_; }
  int64_t offset(size_t i) const { return offsets_.at(i); }

  // Parameter i's slot, shaped like the parameter (a view: no copy).
  Tensor grad_view(size_t i) const {
    const Tensor& p = params_.at(i);
    return make_view(flat_, p.shape(), contiguous_strides(p.shape()), flat_.offset() + offsets_[i]);
  }

  // Whether `g` is exactly parameter i's slot (same storage, offset and dense layout).
  bool is_slot(size_t i, const Tensor& g) const {
    return g.defined() && g.storage() == flat_.storage() && g.offset() == flat_.offset() + offsets_.at(i) &&
           g.dtype() == DType::f32 && g.shape() == params_[i].shape() && g.is_contiguous();
  }

  // Zeroes the buffer and points every gradient at its slot.
  void zero_() {
    flat_.zero_();
    for (size_t i = 0; i < params_.size(); ++i) params_[i].set_grad(grad_view(i));
  }

  // Copies every gradient that is not already its slot into it (zeros where a parameter has no
  // gradient) and points the gradient at the slot. Device work on the current stream only.
  void flatten_grads() {
    NoGradGuard no_grad;
    for (size_t i = 0; i < params_.size(); ++i) {
      Tensor g = params_[i].grad();
      if (is_slot(i, g)) continue;
      Tensor slot = grad_view(i);
      if (g.defined()) {
        TQ_CHECK(g.shape() == params_[i].shape(), "GradBucket: gradient ", describe(g), " of parameter ", name(i),
                 " does not match its shape ", params_[i].shape());
        slot.copy_(g);
      } else {
        slot.zero_();
      }
      params_[i].set_grad(slot);
    }
  }

  // flatten_grads(), then every rank's gradients become their mean over the ranks.
  void all_reduce_mean(Communicator& comm) {
    TQ_CHECK(comm.device() == device(), "GradBucket: the bucket lives on ", device().str(), ", the communicator on ",
             comm.device().str());
    flatten_grads();
    comm.all_reduce_mean(flat_);
  }

  // ‖all gradients‖₂ in f64 (one reduction over the buffer and one host read); the padding is zero.
  double grad_norm() const {
    check_flattened("grad_norm");
    NoGradGuard no_grad;
    Tensor sq = ops::reduce(ops::ReduceKind::sum, ops::unary(UnaryOp::square, flat_.to(DType::f64)), {}, false,
                            "GradBucket::grad_norm");
    return std::sqrt(sq.item<double>());
  }

  // optim::clip_grad_norm over the bucket's parameters (same norm up to summation order, same
  // f32 scale factor min(1, max_norm / (norm + 1e-6)), the same single f32 multiply per element),
  // with one reduction and one multiply over the whole buffer. Returns the pre-clip norm.
  double clip_grad_norm(double max_norm) {
    const double total = grad_norm();
    const float coef = float(std::min(1.0, max_norm / (total + 1e-6)));
    NoGradGuard no_grad;
    Tensor scaled = ops::binary(BinaryOp::mul, flat_, Tensor::full({}, double(coef), DType::f32, device()));
    flat_.copy_(scaled);
    return total;
  }

 private:
  std::string name(size_t i) const {
    return names_.empty() ? str_cat("#", i) : str_cat("#", i, " '", names_[i], "'");
  }

  void check_flattened(const char* op) const {
    for (size_t i = 0; i < params_.size(); ++i)
      TQ_CHECK(is_slot(i, params_[i].grad()), "GradBucket::", op, ": the gradient of parameter ", name(i),
               " is not its slot of the bucket (call flatten_grads() or all_reduce_mean() after the backward)");
  }

  std::vector<Tensor> params_;
  std::vector<std::string> names_;
  std::vector<int64_t> offsets_;  // element offset of each slot in flat_
  Tensor flat_;                   // (Σ padded numel) f32
};

}  // namespace tq::dist
