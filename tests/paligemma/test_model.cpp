// PaliGemma / PaliGemma 2 parity with HF transformers 5.17 (tests/fixtures/paligemma, made by
// tools/fixtures/paligemma_fixtures.py): fp32 logits within 1e-4 of HF relative to the largest
// logit (at non-pad positions: HF's fully masked pad rows are defined garbage), loss within 1e-5,
// greedy ids identical — for every key layout, the sharded copy, left/right padding, with and
// without token_type_ids, default and --hf-compat semantics.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "test_model_util.hpp"

namespace tq::paligemma::test {
namespace {

struct Ref {
  SafetensorsFile f;
  explicit Ref(const std::string& model) : f(SafetensorsFile::open(fixture(model + "/ref.safetensors"))) {}
  Tensor get(const std::string& k) const { return f.get(k).clone(); }
};

// max |a − b| over valid (mask == 1) positions / max |b|.
double rel_logit_error(const Tensor& a, const Tensor& b, const Tensor& mask) {
  EXPECT_EQ(a.shape(), b.shape());
  const int64_t B = a.size(0), T = a.size(1), V = a.size(2);
  std::vector<float> av = a.to_vector<float>(), bv = b.to_vector<float>();
  std::vector<int64_t> m = mask.to_vector<int64_t>();
  double err = 0, big = 0;
  for (int64_t r = 0; r < B * T; ++r) {
    if (!m[size_t(r)]) continue;
    for (int64_t j = 0; j < V; ++j) {
      err = std::max(err, std::abs(double(av[size_t(r * V + j)]) - bv[size_t(r * V + j)]));
      big = std::max(big, std::abs(double(bv[size_t(r * V + j)])));
    }
  }
  return err / big;
}

Tensor softcap(const Tensor& x, double c) { return c > 0 ? tanh(x / c) * c : x; }

std::vector<std::vector<int64_t>> rows_of(const Tensor& t) {
  std::vector<int64_t> v = t.to_vector<int64_t>();
  std::vector<std::vector<int64_t>> out;
  for (int64_t b = 0; b < t.size(0); ++b) out.emplace_back(v.begin() + b * t.size(1), v.begin() + (b + 1) * t.size(1));
  return out;
}

class ModelParity : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(ModelParity, LogitsLossAndGreedyMatchHF) {
  const auto& [model_name, layout] = GetParam();
  auto m = load_model(fixture(model_name + "/" + layout));
  Ref ref(model_name);
  const double cap = m->text().final_logit_softcapping;
  NoGradGuard ng;
  double worst_logit = 0, worst_loss = 0;
  auto track = [&](double e, double l) {
    worst_logit = std::max(worst_logit, e);
    worst_loss = std::max(worst_loss, l);
  };
  for (const std::string bname : {"batch_left", "batch_right"}) {
    SCOPED_TRACE(model_name + "/" + layout + " " + bname);
    Batch b = load_batch(fixture(model_name + "/" + bname + ".safetensors"));
    Batch nott = b;
    nott.token_type_ids = Tensor();
    // hf_compat: transformers 5.x exactly.
    m->options.hf_compat = true;
    double e = rel_logit_error(m->logits(b), ref.get(bname + ".logits"), b.attention_mask);
    EXPECT_LT(e, 1e-4);
    EXPECT_NEAR(m->loss(b).item<double>(), ref.get(bname + ".loss").item<double>(), 1e-5);
    e = rel_logit_error(m->logits(nott), ref.get(bname + ".logits_nott"), b.attention_mask);
    EXPECT_LT(e, 1e-4) << "without token_type_ids";
    EXPECT_NEAR(m->loss(nott).item<double>(), ref.get(bname + ".loss_nott").item<double>(), 1e-5);
    // Default: the final softcap as trained (HF's logits capped by hand).
    m->options.hf_compat = false;
    e = rel_logit_error(m->logits(b), softcap(ref.get(bname + ".logits"), cap), b.attention_mask);
    EXPECT_LT(e, 1e-4) << "softcapped";
    EXPECT_NEAR(m->loss(b).item<double>(), ref.get(bname + ".loss_softcap").item<double>(), 1e-5);
    track(e, std::abs(m->loss(b).item<double>() - ref.get(bname + ".loss_softcap").item<double>()));
    m->options.hf_compat = true;
    track(0, std::abs(m->loss(b).item<double>() - ref.get(bname + ".loss").item<double>()));
    track(rel_logit_error(m->logits(nott), ref.get(bname + ".logits_nott"), b.attention_mask), 0);
    track(rel_logit_error(m->logits(b), ref.get(bname + ".logits"), b.attention_mask), 0);
  }
  std::printf("[ info ] %s/%s worst relative logit error %.2e, worst loss error %.2e\n", model_name.c_str(),
              layout.c_str(), worst_logit, worst_loss);
  const int64_t eos = ref.get("gen_eos").item<int64_t>();
  for (const std::string gname : {"gen_left", "gen_right"}) {
    SCOPED_TRACE(model_name + "/" + layout + " " + gname);
    Batch g = load_batch(fixture(model_name + "/" + gname + ".safetensors"));
    Batch nott = g;
    nott.token_type_ids = Tensor();
    GenerateOptions go{8, eos, 0};
    m->options.hf_compat = true;
    EXPECT_EQ(greedy_generate(*m, g, go), rows_of(ref.get(gname + ".sequences")));
    EXPECT_EQ(greedy_generate(*m, nott, go), rows_of(ref.get(gname + ".sequences_nott"))) << "without token types";
    // Default: no token types means an all-prefix prompt, the same as HF with all-zero token types.
    m->options.hf_compat = false;
    EXPECT_EQ(greedy_generate(*m, nott, go), rows_of(ref.get(gname + ".sequences")));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelParity,
                         ::testing::Combine(::testing::Values("pg1", "pg2"),
                                            ::testing::Values("native", "novm", "new", "sharded")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

}  // namespace
}  // namespace tq::paligemma::test
