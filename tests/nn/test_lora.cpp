#include "../test_util.hpp"
#include "tq/nn/lora.hpp"

using namespace tq;
using tq::test::random;

namespace {
// A two-level model with linear slots, named like a transformer block.
struct Block : nn::Module {
  std::unique_ptr<nn::LinearBase> q_proj, out_proj;
  explicit Block(int64_t d) {
    q_proj = std::make_unique<nn::Linear>(random({d, d}, DType::f32), random({d}, DType::f32));
    out_proj = std::make_unique<nn::Linear>(random({d, d}, DType::f32));
    register_linear("q_proj", &q_proj);
    register_linear("out_proj", &out_proj);
  }
};
struct Model : nn::Module {
  std::vector<std::unique_ptr<Block>> layers;
  Model(int n, int64_t d) {
    for (int i = 0; i < n; ++i) {
      layers.push_back(std::make_unique<Block>(d));
      register_module("layers." + std::to_string(i), layers.back().get());
    }
  }
};
}  // namespace

TEST(Lora, TargetMatchingFollowsPeft) {
  std::vector<std::string> t = {"q_proj", "v_proj"};
  EXPECT_TRUE(nn::lora_target_matches("q_proj", t));
  EXPECT_TRUE(nn::lora_target_matches("model.layers.0.self_attn.q_proj", t));
  EXPECT_FALSE(nn::lora_target_matches("model.layers.0.self_attn.xq_proj", t));
  EXPECT_FALSE(nn::lora_target_matches("model.layers.0.self_attn.out_proj", t));
  EXPECT_FALSE(nn::lora_target_matches("q_proj.sub", t));
}

TEST(Lora, ApplyWrapsMatchingSlotsAndFreezesBase) {
  Model m(2, 6);
  Generator gen(1);
  nn::LoraConfig cfg{.r = 2, .alpha = 4, .target_modules = {"q_proj"}};
  auto wrapped = nn::apply_lora(m, cfg, gen);
  EXPECT_EQ(wrapped, (std::vector<std::string>{"layers.0.q_proj", "layers.1.q_proj"}));
  std::vector<std::string> trainable;
  for (auto& [name, t] : m.named_parameters())
    if (t->requires_grad()) trainable.push_back(name);
  EXPECT_EQ(trainable, (std::vector<std::string>{"layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight",
                                                 "layers.1.q_proj.lora_A.weight", "layers.1.q_proj.lora_B.weight"}));
  EXPECT_EQ(m.count_parameters(true), 2 * (2 * 6 + 6 * 2));
  // A ~ U(−1/√in, 1/√in), B = 0: the wrapped layer starts as the base layer.
  auto* l = dynamic_cast<nn::LoRA<>*>(m.layers[0]->q_proj.get());
  ASSERT_NE(l, nullptr);
  for (double a : l->lora_A.to_vector()) EXPECT_LE(std::abs(a), 1 / std::sqrt(6.0));
  Tensor x = random({3, 6}, DType::f32);
  Tensor base_out = l->base->forward(x);
  EXPECT_EQ(l->forward(x).to_vector(), base_out.to_vector());
  nn::LoraConfig none{.r = 2, .target_modules = {"nothing"}};
  EXPECT_THROW(nn::apply_lora(m, none, gen), Error);
}

namespace {
// y = W x + b + s·B·A·x (LoRA) or DoRA's rescaled form, in float64 by hand.
std::vector<double> ref_forward(const std::vector<double>& W, const std::vector<double>& b,
                                const std::vector<double>& A, const std::vector<double>& B,
                                const std::vector<double>& mag, const std::vector<double>& x, int64_t rows,
                                int64_t in, int64_t out, int64_t r, double s, bool dora) {
  std::vector<double> BA(size_t(out * in), 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i)
      for (int64_t k = 0; k < r; ++k) BA[size_t(o * in + i)] += B[size_t(o * r + k)] * A[size_t(k * in + i)];
  std::vector<double> y(size_t(rows * out));
  for (int64_t o = 0; o < out; ++o) {
    double g = 1.0;
    if (dora) {
      double n = 0;
      for (int64_t i = 0; i < in; ++i) n += std::pow(W[size_t(o * in + i)] + s * BA[size_t(o * in + i)], 2);
      g = mag[size_t(o)] / std::sqrt(n);
    }
    for (int64_t p = 0; p < rows; ++p) {
      double wx = 0, bax = 0;
      for (int64_t i = 0; i < in; ++i) {
        wx += W[size_t(o * in + i)] * x[size_t(p * in + i)];
        bax += BA[size_t(o * in + i)] * x[size_t(p * in + i)];
      }
      y[size_t(p * out + o)] = b[size_t(o)] + g * (wx + s * bax);
    }
  }
  return y;
}
}  // namespace

TEST(Lora, ForwardMatchesFloat64AndGradcheckForAllVariants) {
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE(variant);
    const int64_t in = 7, out = 5, r = 3, rows = 4;
    nn::LoraConfig cfg{.r = r, .alpha = 6, .rslora = variant == 1, .dora = variant == 2};
    Generator gen(test::fresh_seed());
    auto base = std::make_unique<nn::Linear>(random({out, in}, DType::f64), random({out}, DType::f64));
    nn::LoRA<nn::Linear> l(std::move(base), cfg, gen);
    l.compute_dtype = DType::f64;
    // Make every adapter tensor non-trivial and f64 for the reference comparison.
    l.lora_A = random({r, in}, DType::f64).requires_grad_();
    l.lora_B = random({out, r}, DType::f64).requires_grad_();
    if (cfg.dora) l.lora_magnitude_vector = random({out}, DType::f64, 0.5, 2.0).requires_grad_();
    Tensor x = random({rows, in}, DType::f64);
    const double s = cfg.scaling();
    EXPECT_DOUBLE_EQ(s, variant == 1 ? 6 / std::sqrt(3.0) : 2.0);
    auto ref = ref_forward(l.base->weight.to_vector(), l.base->bias.to_vector(), l.lora_A.to_vector(),
                           l.lora_B.to_vector(), cfg.dora ? l.lora_magnitude_vector.to_vector() : std::vector<double>(),
                           x.to_vector(), rows, in, out, r, s, cfg.dora);
    EXPECT_TRUE(test::all_close(l.forward(x), ref, 1e-12, 1e-12));
    if (!cfg.dora) {
      // Full gradcheck through A, B and x.
      auto f = [&](const std::vector<Tensor>& inp) {
        l.lora_A = inp[1];
        l.lora_B = inp[2];
        return l.forward(inp[0]);
      };
      EXPECT_TRUE(test::grad_ok(gradcheck(f, {x, l.lora_A, l.lora_B})));
    } else {
      // DoRA's row norm is detached (peft): finite differences of the full function would not
      // match by design, so check A/B gradients against the formula with n held constant, and the
      // magnitude gradient (which is exact) by gradcheck.
      Tensor A0 = l.lora_A, B0 = l.lora_B;
      auto fm = [&](const std::vector<Tensor>& inp) {
        l.lora_magnitude_vector = inp[1];
        return l.forward(inp[0]);
      };
      EXPECT_TRUE(test::grad_ok(gradcheck(fm, {x, l.lora_magnitude_vector})));
      Tensor up = random({rows, out}, DType::f64);
      auto grads = grad_of([&](const std::vector<Tensor>& inp) {
        l.lora_A = inp[0];
        l.lora_B = inp[1];
        return l.forward(x);
      }, {A0, B0}, up);
      // With g = m/n fixed: y_lora = g ⊙ s·B·A·x → dA = s·Σ_p (Bᵀ (g⊙up_p)) x_pᵀ, dB = s·Σ_p (g⊙up_p)(A x_p)ᵀ.
      auto W = l.base->weight.to_vector(), Av = A0.to_vector(), Bv = B0.to_vector(), mv = l.lora_magnitude_vector.to_vector();
      auto xv = x.to_vector(), uv = up.to_vector();
      std::vector<double> g(static_cast<size_t>(out));
      for (int64_t o = 0; o < out; ++o) {
        double n = 0;
        for (int64_t i = 0; i < in; ++i) {
          double ba = 0;
          for (int64_t k = 0; k < r; ++k) ba += Bv[size_t(o * r + k)] * Av[size_t(k * in + i)];
          n += std::pow(W[size_t(o * in + i)] + s * ba, 2);
        }
        g[size_t(o)] = mv[size_t(o)] / std::sqrt(n);
      }
      std::vector<double> dA(size_t(r * in), 0.0), dB(size_t(out * r), 0.0);
      for (int64_t p = 0; p < rows; ++p) {
        std::vector<double> ax(size_t(r), 0.0);
        for (int64_t k = 0; k < r; ++k)
          for (int64_t i = 0; i < in; ++i) ax[size_t(k)] += Av[size_t(k * in + i)] * xv[size_t(p * in + i)];
        for (int64_t o = 0; o < out; ++o) {
          double gu = g[size_t(o)] * uv[size_t(p * out + o)] * s;
          for (int64_t k = 0; k < r; ++k) {
            dB[size_t(o * r + k)] += gu * ax[size_t(k)];
            for (int64_t i = 0; i < in; ++i) dA[size_t(k * in + i)] += gu * Bv[size_t(o * r + k)] * xv[size_t(p * in + i)];
          }
        }
      }
      EXPECT_TRUE(test::all_close(grads[0], dA, 1e-10, 1e-9));
      EXPECT_TRUE(test::all_close(grads[1], dB, 1e-10, 1e-9));
    }
  }
}

TEST(Lora, DropoutMaskIsReproducibleAndOnlyInTraining) {
  Generator gen(5);
  nn::LoraConfig cfg{.r = 2, .alpha = 2, .dropout = 0.5};
  nn::LoRA<nn::Linear> l(std::make_unique<nn::Linear>(random({4, 8}, DType::f32)), cfg, gen);
  l.lora_B = random({4, 2}, DType::f32).requires_grad_();
  Tensor x = random({3, 8}, DType::f32);
  l.train(true);
  uint64_t off = l.dropout_offset;
  auto a = l.forward(x).to_vector();
  l.dropout_offset = off;  // replaying the same draw (as checkpoint recomputation does)
  EXPECT_EQ(l.forward(x).to_vector(), a);
  EXPECT_NE(l.forward(x).to_vector(), a);  // the next draw differs
  l.train(false);
  auto e1 = l.forward(x).to_vector();
  EXPECT_EQ(l.forward(x).to_vector(), e1);
}

namespace {
// Non-trivial adapter tensors (B = 0 after init would make merging a no-op).
template <class L>
void randomize_adapter(L& l, DType dt) {
  const int64_t r = l.config.r, in = l.in_features(), out = l.out_features();
  l.lora_A = random({r, in}, dt).requires_grad_();
  l.lora_B = random({out, r}, dt).requires_grad_();
  if (l.config.dora) l.lora_magnitude_vector = random({out}, dt, 0.5, 2.0).requires_grad_();
}
}  // namespace

TEST(Lora, MergeIntoADenseBaseMatchesFloat64AndUnmergeRestoresTheBits) {
  for (int variant = 0; variant < 3; ++variant) {
    for (DType dt : {DType::f64, DType::f32}) {
      SCOPED_TRACE(str_cat("variant ", variant, " ", dtype_name(dt)));
      const int64_t in = 9, out = 6, r = 3;
      nn::LoraConfig cfg{.r = r, .alpha = 6, .dropout = 0.25, .rslora = variant == 1, .dora = variant == 2};
      Generator gen(test::fresh_seed());
      nn::LoRA<nn::Linear> l(std::make_unique<nn::Linear>(random({out, in}, dt), random({out}, dt)), cfg, gen);
      l.compute_dtype = dt;
      randomize_adapter(l, dt);
      l.train(false);
      Tensor x = random({4, in}, dt);
      const std::vector<double> before = l.forward(x).to_vector();
      const Tensor w0 = l.base->weight;
      const auto ref = test::lora_merge_f64(w0.to_vector(), l.lora_A.to_vector(), l.lora_B.to_vector(),
                                            cfg.dora ? l.lora_magnitude_vector.to_vector() : std::vector<double>(), in,
                                            out, r, cfg.scaling(), cfg.dora).merged;
      l.merge();
      ASSERT_TRUE(l.merged());
      EXPECT_EQ(l.base->weight.dtype(), dt);
      EXPECT_FALSE(l.base->weight.requires_grad());
      const double tol = dt == DType::f64 ? 1e-13 : 1e-6;
      EXPECT_TRUE(test::all_close(l.base->weight, ref, tol, tol));
      EXPECT_TRUE(test::all_close(l.forward(x), before, 10 * tol, 10 * tol));  // merged forward = adapter forward
      l.train(true);  // while merged, training mode runs the merged base alone (no dropout draws)
      const uint64_t off = l.dropout_offset;
      EXPECT_TRUE(test::all_close(l.forward(x), before, 10 * tol, 10 * tol));
      EXPECT_EQ(l.dropout_offset, off);
      EXPECT_THROW(l.merge(), Error);
      l.unmerge();
      EXPECT_FALSE(l.merged());
      EXPECT_TRUE(l.base->weight.same(w0));  // the original tensor, not W' − ΔW
      l.train(false);
      EXPECT_EQ(l.forward(x).to_vector(), before);
      EXPECT_THROW(l.unmerge(), Error);
    }
  }
}

TEST(Lora, MergeIntoAnNf4BaseMakesADenseBf16LinearWithoutRequantizing) {
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE(str_cat("variant ", variant));
    const int64_t in = 200, out = 24, r = 4;  // blocks straddle rows
    nn::LoraConfig cfg{.r = r, .alpha = 8, .rslora = variant == 1, .dora = variant == 2};
    Generator gen(test::fresh_seed());
    NF4Tensor q = nf4_quantize(random({out, in}, DType::f32, -0.1, 0.1));
    Tensor bias = random({out}, DType::f32);
    nn::LoRA<nn::LinearBase> l(std::make_unique<NF4LinearModule>(NF4Linear(q, bias)), cfg, gen);
    randomize_adapter(l, DType::f32);
    l.lora_B = (l.lora_B * 0.05).detach().requires_grad_();  // a LoRA-sized update of the weight
    l.train(false);
    nn::LinearBase* original = l.base.get();
    Tensor x = random({5, in}, DType::f32);
    const std::vector<double> before = l.forward(x).to_vector();
    // Reference: the bf16 weight NF4Linear multiplies with, plus the f64 update, rounded once to bf16.
    const std::vector<double> Wv = nf4_dequantize(q, DType::bf16).to_vector<double>(), Av = l.lora_A.to_vector(),
                              Bv = l.lora_B.to_vector(),
                              mag = cfg.dora ? l.lora_magnitude_vector.to_vector() : std::vector<double>();
    const test::LoraMergeRef f64 = test::lora_merge_f64(Wv, Av, Bv, mag, in, out, r, cfg.scaling(), cfg.dora);
    const std::vector<double>& ref = f64.merged;
    l.merge();
    auto* dense = dynamic_cast<nn::Linear*>(l.base.get());
    ASSERT_NE(dense, nullptr) << "the merged base is a dense Linear";
    EXPECT_EQ(dense->weight.dtype(), DType::bf16);
    EXPECT_TRUE(dense->bias.same(bias) || dense->bias.to_vector() == bias.to_vector());
    // Every weight is bf16(ref) up to a tie-break of the f32 intermediate: within one bf16 ulp plus
    // the f32 rounding of W + ΔW (a few u·(|W| + |ΔW|) times DoRA's row scale, which dominates where
    // the two nearly cancel), and almost all exactly.
    const std::vector<double> got = dense->weight.to_vector();
    int exact = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double r1 = double(float(bf16(float(ref[i]))));
      EXPECT_LE(std::abs(got[i] - ref[i]), std::abs(ref[i]) / 128 + 4 * std::ldexp(f64.terms[i], -24)) << i;
      exact += got[i] == r1;
    }
    EXPECT_GE(exact, int(got.size()) * 99 / 100);
    // The merged layer computes as NF4Linear does: bf16 operands, fp32 accumulation, bf16 results
    // (the product and the bias add each round to bf16 here), output in x's dtype.
    std::vector<double> xb = x.to(DType::bf16).to_vector(), bb = bias.to(DType::bf16).to_vector();
    const std::vector<double> yv = [&] {
      const Tensor y = l.forward(x);
      EXPECT_EQ(y.dtype(), DType::f32);
      return y.to_vector();
    }();
    for (int64_t p = 0; p < 5; ++p)
      for (int64_t o = 0; o < out; ++o) {
        double prod = 0;
        for (int64_t i = 0; i < in; ++i) prod += xb[size_t(p * in + i)] * got[size_t(o * in + i)];
        const double want = prod + bb[size_t(o)], have = yv[size_t(p * out + o)];
        EXPECT_LE(std::abs(have - want), (std::abs(prod) + std::abs(want)) / 128 + 1e-6) << p << ", " << o;
      }
    EXPECT_TRUE(test::all_close(l.forward(x), before, 0.05, 0.02));  // the same function as the unmerged layer
    bool listed = false;
    for (auto& [name, t] : l.named_parameters())
      if (name == "base_layer.weight") listed = t->dtype() == DType::bf16 && !t->requires_grad();
    EXPECT_TRUE(listed) << "the merged weight is the base layer's parameter";
    l.unmerge();
    EXPECT_EQ(l.base.get(), original);
    EXPECT_EQ(l.forward(x).to_vector(), before);
  }
}
