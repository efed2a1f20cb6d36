// Uses the installed tq the way an outside project would: tensors, ops, autograd, errors.
#include <tq/tq.hpp>

#include <cmath>
#include <cstdio>

int main() {
  using namespace tq;
  Generator gen(7);
  Tensor x = randn({4, 3}, gen, DType::f32);
  Tensor w = randn({2, 3}, gen, DType::f32).requires_grad_();
  Tensor loss = sum(square(linear(x, w)));
  loss.backward();
  // dL/dW = 2 · (x Wᵀ)ᵀ x: check one element against a hand computation.
  auto xv = x.to_vector<double>(), wv = w.to_vector<double>(), gv = w.grad().to_vector<double>();
  double g00 = 0;
  for (int i = 0; i < 4; ++i) {
    double y0 = 0;
    for (int k = 0; k < 3; ++k) y0 += xv[size_t(i * 3 + k)] * wv[size_t(k)];
    g00 += 2 * y0 * xv[size_t(i * 3)];
  }
  if (std::abs(g00 - gv[0]) > 1e-4) {
    std::printf("gradient mismatch: %f vs %f\n", g00, gv[0]);
    return 1;
  }
  try {
    matmul(x, x);
    return 1;
  } catch (const Error& e) {
    std::printf("caught: %s\n", e.what());
  }
  std::printf("tq consumer ok\n");
  return 0;
}
