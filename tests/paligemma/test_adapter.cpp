// PEFT adapters on PaliGemma: an adapter saved under either HF module-naming era loads into a
// fresh model and reproduces the adapted model's logits.
#include <cstdlib>
#include <filesystem>
#include <unistd.h>

#include "paligemma/adapter.hpp"
#include "test_model_util.hpp"

namespace tq::paligemma::test {
namespace {

// Old-era (transformers < 4.52) module path for a new-era one.
std::string to_old_era(const std::string& p) {
  auto starts = [&](const std::string& s) { return p.rfind(s, 0) == 0; };
  if (starts("model.language_model.")) return "language_model.model." + p.substr(21);
  if (starts("model.vision_tower.")) return p.substr(6);  // vision_tower.vision_model.…
  if (starts("model.multi_modal_projector.")) return p.substr(6);
  return p;
}

TEST(PaliGemmaAdapter, LoadsFromBothNamingErasAndReproducesLogits) {
  const std::string dir = fixture("pg1/native");
  Batch b = load_batch(fixture("pg1/batch_right.safetensors"));
  auto adapted = load_model(dir, {});
  Generator gen(11);
  nn::LoraConfig cfg{.r = 2, .alpha = 4, .rslora = true,
                     .target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}};
  auto wrapped = nn::apply_lora(*adapted, cfg, gen);
  // SigLIP's q/k/v are adapted too (peft's suffix match), its out_proj is not.
  bool vision_q = false, out_proj = false;
  for (const auto& w : wrapped) {
    vision_q |= w.find("vision_tower") != std::string::npos && w.find("q_proj") != std::string::npos;
    out_proj |= w.find("out_proj") != std::string::npos;
  }
  EXPECT_TRUE(vision_q);
  EXPECT_FALSE(out_proj);
  for (auto& [name, t] : adapted->named_parameters())
    if (name.find("lora_B") != std::string::npos) t->copy_(tq::rand(t->shape(), gen, DType::f32, -0.5, 0.5));
  adapted->train(false);
  Tensor ref;
  {
    NoGradGuard ng;
    ref = adapted->logits(b);
  }
  for (bool old_era : {false, true}) {
    SCOPED_TRACE(old_era ? "old naming" : "new naming");
    const std::string out = ::testing::TempDir() + (old_era ? "/pg_adapter_old" : "/pg_adapter_new");
    nn::save_adapter(out, *adapted, {.config = cfg}, old_era ? to_old_era : nn::identity_name);
    auto st = SafetensorsFile::open(out + "/adapter_model.safetensors");
    const std::string probe = old_era ? "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"
                                      : "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight";
    EXPECT_TRUE(st.contains(probe)) << probe;
    auto fresh = load_model(dir, {});
    load_peft_adapter(out, *fresh);
    fresh->train(false);
    NoGradGuard ng;
    EXPECT_EQ(fresh->logits(b).to_vector<float>(), ref.to_vector<float>());
  }
}

// `paligemma merge` (peft's merge_and_unload + save_pretrained): the written model directory, loaded
// as a plain model, reproduces the adapted model's logits — LoRA and DoRA, both with non-zero B.
TEST(PaliGemmaMerge, MergedDirectoryReproducesTheAdaptedModel) {
  const std::string dir = fixture("pg2/native");
  Batch b = load_batch(fixture("pg2/batch_right.safetensors"));
  for (bool dora : {false, true}) {
    SCOPED_TRACE(dora ? "DoRA" : "LoRA");
    auto adapted = load_model(dir, {});
    Generator gen(dora ? 5 : 3);
    nn::LoraConfig cfg{.r = 4, .alpha = 8, .rslora = true, .dora = dora,
                       .target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}};
    nn::apply_lora(*adapted, cfg, gen);
    for (auto& [name, t] : adapted->named_parameters()) {
      if (name.find("lora_B") != std::string::npos) t->copy_(tq::rand(t->shape(), gen, DType::f32, -0.5, 0.5));
      if (name.find("lora_magnitude") != std::string::npos) t->copy_(*t * tq::rand(t->shape(), gen, DType::f32, 0.5, 1.5));
    }
    adapted->train(false);
    Tensor ref;
    {
      NoGradGuard ng;
      ref = adapted->logits(b);
    }
    const std::string tmp = ::testing::TempDir() + "/pg_merge_" + std::to_string(::getpid()) + (dora ? "_dora" : "");
    nn::save_adapter(tmp + "/adapter", *adapted, {.config = cfg});
    const std::string cmd = std::string(TQ_BIN_DIR) + "/paligemma merge --model " + dir + " --adapter " + tmp +
                            "/adapter --out " + tmp + "/merged --dtype f32 2>/dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    auto merged = load_model(tmp + "/merged", {});  // a plain model: every key matched, none extra
    NoGradGuard ng;
    std::vector<float> got = merged->logits(b).to_vector<float>(), want = ref.to_vector<float>();
    ASSERT_EQ(got.size(), want.size());
    double worst = 0, scale = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      worst = std::max(worst, double(std::abs(got[i] - want[i])));
      scale = std::max(scale, double(std::abs(want[i])));
    }
    EXPECT_LT(worst, 1e-5 * scale) << "worst |Δlogit| " << worst << " of max " << scale;
    EXPECT_GT(scale, 0);
    std::filesystem::remove_all(tmp);
  }
}

}  // namespace
}  // namespace tq::paligemma::test
