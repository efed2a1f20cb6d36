// AdamW with torch.optim.AdamW semantics (decoupled weight decay, bias correction in double),
// parameter groups (LoRA+ puts B matrices in a group with a larger lr), and state that can be
// saved and restored bit-exactly for checkpoint/resume.
//
// Per step t (1-based) for a parameter θ with gradient g, group lr η and weight decay λ:
//   θ ← θ·(1 − η·λ);  m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²
//   θ ← θ − (η / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
// m and v are fp32 like the fp32 parameters they belong to; parameters without a gradient are
// skipped (their step counter does not advance), as torch does.
//
// CUDA parameters are updated by the fused multi-tensor kernel (kernels/adamw.cuh): one step is a
// few launches for all of them (not one per parameter), with the same fp32 operation order as the
// CPU loop and no FMA contraction, so both give the same bits on the same inputs.
#pragma once

#include <cmath>
#include <map>
#include <string>

#include "tq/core/tensor.hpp"
#include "tq/ops/cpu_util.hpp"

namespace tq::optim {

struct ParamGroup {
  std::string name;
  std::vector<Tensor> params;
  double lr = 1e-3;
  double weight_decay = 1e-2;
  double initial_lr = 0;  // the lr the schedule scales; set from lr when 0
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

// The fp32 constants of one update (torch's scalars, computed in double and rounded once).
struct AdamWScalars {
  float decay;      // 1 − lr·λ
  float w1;         // 1 − β1 (lerp weight)
  float b2, w2;     // β2, 1 − β2
  float bc2_sqrt;   // √(1 − β2^t)
  float eps;
  float step_size;  // lr / (1 − β1^t)
};
inline AdamWScalars adamw_scalars(double lr, double wd, double beta1, double beta2, double eps, double step_size,
                                  double bc2_sqrt) {
  return {float(1.0 - lr * wd), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(bc2_sqrt), float(eps),
          float(step_size)};
}

// One parameter of a fused CUDA step: dense f32 tensors of one shape on one CUDA device.
struct AdamWTensorStep {
  Tensor param, grad, m, v;
  AdamWScalars scalars;
};

// Fused CUDA kernels, registered by <tq/cuda.hpp> (kernels/adamw.cuh).
struct AdamWCudaKernels {
  // Updates θ, m, v in place for one parameter.
  void (*step)(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr, double wd,
               double beta1, double beta2, double eps, double step_size, double bc2_sqrt) = nullptr;
  // Updates every listed parameter, many per launch.
  void (*multi_step)(const std::vector<AdamWTensorStep>& items) = nullptr;
  // clip_grad_norm over dense f32 CUDA gradients: fp32 per-tensor norms, their norm, grads scaled in place
  // by min(1, max_norm / (total + 1e-6)) on the device; returns the pre-clip total (one host read).
  double (*clip_grad_norm)(const std::vector<Tensor>& grads, double max_norm) = nullptr;
};
inline AdamWCudaKernels& cuda_adamw_kernels() {
  static AdamWCudaKernels k;
  return k;
}

namespace detail {
// One AdamW update on dense fp32 CPU memory. The CUDA kernel performs these same fp32 operations in
// this order.
inline void adamw_update_cpu(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  for (int64_t i = 0; i < n; ++i) {
    p[i] *= s.decay;
    m[i] += s.w1 * (g[i] - m[i]);
    v[i] = v[i] * s.b2 + s.w2 * (g[i] * g[i]);
    const float denom = std::sqrt(v[i]) / s.bc2_sqrt + s.eps;
    p[i] -= s.step_size * (m[i] / denom);
  }
}
inline void adamw_update_cpu(float* p, const float* g, float* m, float* v, int64_t n, double lr, double wd,
                             double beta1, double beta2, double eps, double step_size, double bc2_sqrt) {
  adamw_update_cpu(p, g, m, v, n, adamw_scalars(lr, wd, beta1, beta2, eps, step_size, bc2_sqrt));
}
}  // namespace detail

class AdamW {
 public:
  AdamW(std::vector<ParamGroup> groups, AdamWOptions opt = {}) : groups_(std::move(groups)), opt_(opt) {
    for (auto& g : groups_) {
      if (g.initial_lr == 0) g.initial_lr = g.lr;
      for (const Tensor& p : g.params) {
        TQ_CHECK(p.is_leaf() && p.requires_grad(), "AdamW: parameter of group '", g.name,
                 "' must be a leaf that requires grad: ", describe(p));
        TQ_CHECK(p.dtype() == DType::f32 && p.is_contiguous(), "AdamW: parameters must be dense f32, got ",
                 describe(p), " in group '", g.name, "'");
        State s;
        s.m = Tensor::zeros(p.shape(), DType::f32, p.device());
        s.v = Tensor::zeros(p.shape(), DType::f32, p.device());
        state_.push_back(std::move(s));
      }
    }
  }

  std::vector<ParamGroup>& groups() { return groups_; }
  const AdamWOptions& options() const { return opt_; }

  // CPU parameters update one by one; all CUDA parameters together in one fused multi-tensor call.
  void step() {
    std::vector<AdamWTensorStep> cuda_items;
    size_t k = 0;
    for (auto& g : groups_) {
      for (Tensor& p : g.params) {
        State& s = state_[k++];
        Tensor grad = p.grad();
        if (!grad.defined()) continue;
        TQ_CHECK(grad.shape() == p.shape() && grad.device() == p.device(), "AdamW: gradient ", describe(grad),
                 " for parameter ", describe(p));
        s.t += 1;
        const double bc1 = 1.0 - std::pow(opt_.beta1, double(s.t));
        const double bc2 = 1.0 - std::pow(opt_.beta2, double(s.t));
        const double step_size = g.lr / bc1;
        const double bc2_sqrt = std::sqrt(bc2);
        const AdamWScalars sc =
            adamw_scalars(g.lr, g.weight_decay, opt_.beta1, opt_.beta2, opt_.eps, step_size, bc2_sqrt);
        Tensor gf = grad.dtype() == DType::f32 ? grad.contiguous() : grad.to(DType::f32).contiguous();
        if (p.device().is_cuda()) {
          cuda_items.push_back({p, gf, s.m, s.v, sc});
        } else {
          detail::adamw_update_cpu(p.data<float>(), gf.data<float>(), s.m.data<float>(), s.v.data<float>(), p.numel(),
                                   sc);
        }
      }
    }
    if (cuda_items.empty()) return;
    TQ_CHECK(cuda_adamw_kernels().multi_step != nullptr,
             "AdamW: no CUDA kernel is available for CUDA parameters (include <tq/cuda.hpp> in one CUDA translation unit)");
    cuda_adamw_kernels().multi_step(cuda_items);
  }

  void zero_grad() {
    for (auto& g : groups_)
      for (Tensor& p : g.params) p.zero_grad();
  }

  // State as named tensors ("<group>.<index>.exp_avg", ".exp_avg_sq", ".step") for checkpoints.
  std::vector<std::pair<std::string, Tensor>> state_dict() const {
    std::vector<std::pair<std::string, Tensor>> out;
    size_t k = 0;
    for (const auto& g : groups_) {
      for (size_t i = 0; i < g.params.size(); ++i, ++k) {
        std::string base = str_cat(g.name, ".", i, ".");
        out.push_back({base + "exp_avg", state_[k].m});
        out.push_back({base + "exp_avg_sq", state_[k].v});
        out.push_back({base + "step", Tensor::full({}, double(state_[k].t), DType::i64)});
      }
    }
    return out;
  }
  void load_state_dict(const std::map<std::string, Tensor>& sd) {
    size_t k = 0;
    for (const auto& g : groups_) {
      for (size_t i = 0; i < g.params.size(); ++i, ++k) {
        std::string base = str_cat(g.name, ".", i, ".");
        for (const char* key : {"exp_avg", "exp_avg_sq", "step"})
          TQ_CHECK(sd.count(base + key), "AdamW state: missing '", base + key, "'");
        const Tensor& m = sd.at(base + "exp_avg");
        const Tensor& v = sd.at(base + "exp_avg_sq");
        TQ_CHECK(m.shape() == state_[k].m.shape() && v.shape() == state_[k].v.shape(), "AdamW state: '", base,
                 "' has shape ", m.shape(), ", the parameter has ", state_[k].m.shape());
        state_[k].m.copy_(m);
        state_[k].v.copy_(v);
        state_[k].t = sd.at(base + "step").item<int64_t>();
      }
    }
  }

 private:
  struct State {
    Tensor m, v;
    int64_t t = 0;
  };
  std::vector<ParamGroup> groups_;
  AdamWOptions opt_;
  std::vector<State> state_;
};

}  // namespace tq::optim
