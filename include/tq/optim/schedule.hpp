// Learning-rate schedules and gradient clipping as the HF Trainer applies them.
//
// LinearWarmupDecay is transformers' get_linear_schedule_with_warmup: factor k/W during warmup,
// then (N − k)/(N − W) down to 0, for 0-based optimizer step k; step 0 therefore uses lr 0.
#pragma once

#include <cmath>

#include "tq/optim/adamw.hpp"
#include "tq/ops/reduce.hpp"

namespace tq::optim {

// ceil(N · ratio) computed on the IEEE double product, as Python does.
inline int64_t warmup_steps_from_ratio(int64_t total_steps, double ratio) {
  return int64_t(std::ceil(double(total_steps) * ratio));
}

struct LinearWarmupDecay {
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  double factor(int64_t k) const {
    if (k < warmup_steps) return double(k) / double(std::max<int64_t>(1, warmup_steps));
    return std::max(0.0, double(total_steps - k) / double(std::max<int64_t>(1, total_steps - warmup_steps)));
  }
  // Sets every group's lr for optimizer step k.
  void apply(AdamW& opt, int64_t k) const {
    for (auto& g : opt.groups()) g.lr = g.initial_lr * factor(k);
  }
};

// torch.nn.utils.clip_grad_norm_: total = ‖(‖g_p‖₂)_p‖₂ over parameters with a gradient; every
// gradient is multiplied by min(1, max_norm / (total + 1e-6)). Returns the pre-clip total.
// CPU gradients: norms in f64. CUDA gradients (dense f32, as LoRA's are): one fused pass over all of
// them (kernels/adamw.cuh: fp32 per-tensor norms like torch's _foreach_norm, the norm of the norms
// and the clip coefficient on the device, one multi-tensor scale) and a single host read of the total.
inline double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  std::vector<Tensor> grads;
  for (const Tensor& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  bool fused = !grads.empty();
  for (const Tensor& g : grads)
    fused = fused && g.device().is_cuda() && g.dtype() == DType::f32 && g.is_contiguous() && g.device() == grads[0].device();
  if (fused) {
    TQ_CHECK(cuda_adamw_kernels().clip_grad_norm != nullptr,
             "clip_grad_norm: no CUDA kernel is available for CUDA gradients (include <tq/cuda.hpp> in one CUDA "
             "translation unit)");
    return cuda_adamw_kernels().clip_grad_norm(grads, max_norm);
  }
  std::vector<double> norms;
  for (const Tensor& g : grads) {
    Tensor sq = ops::reduce(ops::ReduceKind::sum, ops::unary(UnaryOp::square, g.to(DType::f64)), {}, false, "clip");
    norms.push_back(std::sqrt(sq.item<double>()));
  }
  double total = 0;
  for (double n : norms) total += n * n;
  total = std::sqrt(total);
  const float coef = float(std::min(1.0, max_norm / (total + 1e-6)));
  for (Tensor g : grads) {
    Tensor scaled = ops::binary(BinaryOp::mul, g, Tensor::full({}, double(coef), DType::f32, g.device())).to(g.dtype());
    g.copy_(scaled);
  }
  return total;
}

}  // namespace tq::optim
