// gradcheck: compares the analytic gradients of fn with central finite differences in float64.
//
// All float inputs are converted to f64; integer inputs (ids, masks) pass through unchanged.
// The output is projected on fixed random weights w, L = Σ w·fn(x), so every output element's
// gradient is exercised; analytic = backward with grad w, numeric = (L(x+ε) − L(x−ε)) / 2ε.
#pragma once

#include "tq/autograd/engine.hpp"
#include "tq/core/rng.hpp"
#include "tq/ops/reduce.hpp"

namespace tq {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-4;
  uint64_t seed = 1234;
};

struct GradcheckResult {
  bool ok = true;
  double max_abs_error = 0;
  std::string first_failure;  // "input 1 element 7: analytic 0.3 numeric 0.31"
  explicit operator bool() const { return ok; }
};

inline GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
                                 const std::vector<Tensor>& inputs, GradcheckOptions opt = {}) {
  std::vector<Tensor> x;
  for (const Tensor& t : inputs) x.push_back(is_floating(t.dtype()) ? t.detach().to(DType::f64).contiguous() : t.detach());
  Tensor out0;
  {
    NoGradGuard ng;
    out0 = fn(x);
  }
  TQ_CHECK(out0.dtype() == DType::f64, "gradcheck: fn must return f64 for f64 inputs, got ", describe(out0));
  Tensor w = random_tensor(Distribution::normal, out0.shape(), opt.seed, 0, 0.0, 1.0, DType::f64);
  auto loss = [&](const std::vector<Tensor>& in) {
    NoGradGuard ng;
    Tensor o = fn(in);
    return ops::reduce(ops::ReduceKind::sum, ops::binary(BinaryOp::mul, o, w), {}, false, "gradcheck").item<double>();
  };
  std::vector<Tensor> analytic = grad_of(fn, x, w);
  GradcheckResult res;
  for (size_t k = 0; k < x.size(); ++k) {
    if (x[k].dtype() != DType::f64) continue;
    std::vector<double> an = analytic[k].defined() ? analytic[k].to_vector<double>() : std::vector<double>(size_t(x[k].numel()), 0.0);
    double* p = x[k].data<double>();
    for (int64_t i = 0; i < x[k].numel(); ++i) {
      const double orig = p[i];
      p[i] = orig + opt.eps;
      const double lp = loss(x);
      p[i] = orig - opt.eps;
      const double lm = loss(x);
      p[i] = orig;
      const double num = (lp - lm) / (2 * opt.eps);
      const double err = std::abs(num - an[size_t(i)]);
      res.max_abs_error = std::max(res.max_abs_error, err);
      if (!(err <= opt.atol + opt.rtol * std::abs(num)) && res.ok) {
        res.ok = false;
        res.first_failure = str_cat("input ", k, " element ", i, ": analytic ", an[size_t(i)], " numeric ", num);
      }
    }
  }
  return res;
}

}  // namespace tq
