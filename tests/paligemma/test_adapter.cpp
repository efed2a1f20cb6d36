// PEFT adapters on PaliGemma: an adapter saved under either HF module-naming era loads into a
// fresh model and reproduces the adapted model's logits.
#include <filesystem>

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

}  // namespace
}  // namespace tq::paligemma::test
