// PaliGemma model properties and error paths:
//   - KV-cache generation equals step-by-step full recomputation token for token (acceptance 3)
//   - changing a suffix token never changes logits at earlier positions (acceptance 3)
//   - every load error names the tensor / file (acceptance 5); config defaults (spec §1.2)
//   - NF4 on load and bf16 stay close to the fp32 dense model (loose, stated tolerances)
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "test_model_util.hpp"

namespace tq::paligemma::test {
namespace {

namespace fs = std::filesystem;

double max_abs_diff(const Tensor& a, const Tensor& b) {
  std::vector<float> av = a.to_vector<float>(), bv = b.to_vector<float>();
  double e = 0;
  for (size_t i = 0; i < av.size(); ++i) e = std::max(e, std::abs(double(av[i]) - bv[i]));
  return e;
}
double max_abs(const Tensor& a) {
  double e = 0;
  for (float v : a.to_vector<float>()) e = std::max(e, std::abs(double(v)));
  return e;
}

// Greedy decoding without a cache: the whole sequence is recomputed every step, with the generated
// tokens as suffix (token type 1) and HF generate's positions.
std::vector<std::vector<int64_t>> greedy_recompute(PaliGemmaForConditionalGeneration& m, const Batch& b,
                                                   const GenerateOptions& o) {
  NoGradGuard ng;
  const int64_t B = b.input_ids.size(0), T0 = b.input_ids.size(1);
  std::vector<int64_t> ids = b.input_ids.to_vector<int64_t>(), mask = b.attention_mask.to_vector<int64_t>();
  std::vector<int64_t> pos = generation_positions(mask, B, T0), tt(size_t(B * T0), 0);
  std::vector<std::vector<int64_t>> seq(static_cast<size_t>(B)), msk(static_cast<size_t>(B)),
      ps(static_cast<size_t>(B)), tts(static_cast<size_t>(B));
  for (int64_t r = 0; r < B; ++r) {
    seq[size_t(r)].assign(ids.begin() + r * T0, ids.begin() + (r + 1) * T0);
    msk[size_t(r)].assign(mask.begin() + r * T0, mask.begin() + (r + 1) * T0);
    ps[size_t(r)].assign(pos.begin() + r * T0, pos.begin() + (r + 1) * T0);
    tts[size_t(r)].assign(size_t(T0), 0);
  }
  std::vector<bool> done(static_cast<size_t>(B), false);
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    const int64_t T = int64_t(seq[0].size());
    std::vector<int64_t> fi, fm, fp, ft;
    for (int64_t r = 0; r < B; ++r) {
      fi.insert(fi.end(), seq[size_t(r)].begin(), seq[size_t(r)].end());
      fm.insert(fm.end(), msk[size_t(r)].begin(), msk[size_t(r)].end());
      for (int64_t p : ps[size_t(r)]) fp.push_back(p + 1);
      ft.insert(ft.end(), tts[size_t(r)].begin(), tts[size_t(r)].end());
    }
    AttentionOptions am;
    am.mask = AttentionMask::prefix_lm;
    am.token_type_ids = Tensor::from_vector(ft, {B, T});
    am.key_padding = Tensor::from_vector(fm, {B, T});
    Tensor h = m.hidden_states(Tensor::from_vector(fi, {B, T}), b.pixel_values, Tensor::from_vector(fp, {B, T}), am);
    std::vector<float> lg = m.lm_head(h.select(1, T - 1)).to_vector<float>();
    const int64_t V = int64_t(lg.size()) / B;
    bool all = true;
    for (int64_t r = 0; r < B; ++r) {
      int64_t best = 0;
      for (int64_t j = 1; j < V; ++j)
        if (lg[size_t(r * V + j)] > lg[size_t(r * V + best)]) best = j;
      if (done[size_t(r)]) best = o.pad_token_id;
      else if (best == o.eos_token_id) done[size_t(r)] = true;
      seq[size_t(r)].push_back(best);
      msk[size_t(r)].push_back(1);
      ps[size_t(r)].push_back(ps[size_t(r)].back() + 1);
      tts[size_t(r)].push_back(1);
      all = all && done[size_t(r)];
    }
    if (all) break;
  }
  return seq;
}

TEST(PaliGemmaGenerate, KvCacheEqualsFullRecomputation) {
  for (const std::string model : {"pg1", "pg2"}) {
    auto m = load_model(fixture(model + "/native"));
    for (const std::string g : {"gen_left", "gen_right", "batch_left"}) {
      SCOPED_TRACE(model + " " + g);
      Batch b = load_batch(fixture(model + "/" + g + ".safetensors"));
      b.token_type_ids = Tensor();  // a prompt: every token prefix
      GenerateOptions o{10, -1, 0};  // no eos: run every step
      auto cached = greedy_generate(*m, b, o);
      EXPECT_EQ(cached, greedy_recompute(*m, b, o));
      EXPECT_EQ(int64_t(cached[0].size()), b.input_ids.size(1) + 10);
    }
  }
}

TEST(PaliGemmaMask, SuffixChangeNeverChangesEarlierLogits) {
  for (const std::string model : {"pg1", "pg2"}) {
    SCOPED_TRACE(model);
    auto m = load_model(fixture(model + "/native"));
    NoGradGuard ng;
    Batch b = load_batch(fixture(model + "/batch_right.safetensors"));
    const int64_t T = b.input_ids.size(1);
    std::vector<int64_t> ids = b.input_ids.to_vector<int64_t>(), tt = b.token_type_ids.to_vector<int64_t>();
    int64_t first_suffix = 0;  // row 0
    while (tt[size_t(first_suffix)] == 0) ++first_suffix;
    const int64_t k = first_suffix + 1;  // a suffix token in the middle of row 0's suffix
    Tensor before = m->logits(b);
    ids[size_t(k)] = ids[size_t(k)] == 20 ? 21 : 20;
    b.input_ids = Tensor::from_vector(ids, b.input_ids.shape());
    Tensor after = m->logits(b);
    EXPECT_EQ(max_abs_diff(before.narrow(1, 0, k), after.narrow(1, 0, k)), 0.0);
    EXPECT_GT(max_abs_diff(before.narrow(1, k, T - k).select(0, 0), after.narrow(1, k, T - k).select(0, 0)), 1e-3);
    EXPECT_EQ(max_abs_diff(before.narrow(0, 1, 2), after.narrow(0, 1, 2)), 0.0);  // other rows untouched
  }
}

TEST(PaliGemmaLoad, Nf4OnLoadCloseToDense) {
  for (const std::string model : {"pg1", "pg2"}) {
    SCOPED_TRACE(model);
    auto dense = load_model(fixture(model + "/native"));
    LoadOptions o;
    o.quant = Quant::nf4;
    auto q = load_model(fixture(model + "/native"), o);
    int64_t n_nf4 = 0, n_slots = 0;
    for (auto& [name, mod] : q->named_modules())
      for (auto& [s, slot] : mod->linear_slots()) {
        ++n_slots;
        n_nf4 += dynamic_cast<NF4LinearModule*>(slot->get()) != nullptr;
      }
    EXPECT_EQ(n_nf4, n_slots);
    EXPECT_GT(n_slots, 0);
    // Dense parts stay dense: embeddings, norms, patch conv, position embeddings.
    for (auto& [name, t] : q->named_parameters()) EXPECT_EQ(t->dtype(), DType::f32) << name;
    NoGradGuard ng;
    Batch b = load_batch(fixture(model + "/batch_left.safetensors"));
    Tensor ld = dense->logits(b), lq = q->logits(b);
    // The reference: the dense fp32 model with every Linear weight replaced by its NF4 round trip,
    // so only NF4Linear's bf16 compute differs. These tiny random models amplify rounding ~15×
    // (bf16 end to end moves logits by 6.7%, see Bf16CloseToF32), hence the loose 10% bound;
    // NF4 vs the original dense weights moves them by far more (measured 0.79 / 0.87).
    for (auto& [name, mod] : dense->named_modules())
      for (auto& [s, slot] : mod->linear_slots()) {
        auto* lin = dynamic_cast<nn::Linear*>(slot->get());
        lin->weight = nf4_dequantize(nf4_quantize(lin->weight), DType::f32);
      }
    Tensor lr = dense->logits(b);
    const double rel = max_abs_diff(lr, lq) / max_abs(lr);
    EXPECT_LT(rel, 0.10);
    EXPECT_GT(max_abs_diff(ld, lq) / max_abs(ld), 3 * rel);  // quantization really happened
    std::printf("[ info ] %s NF4 vs dense: max |Δlogit| / max |logit| = %.4f\n", model.c_str(), rel);
  }
}

TEST(PaliGemmaLoad, Bf16CloseToF32) {
  auto f = load_model(fixture("pg2/native"));
  LoadOptions o;
  o.dtype = DType::bf16;
  auto h = load_model(fixture("pg2/native"), o);
  NoGradGuard ng;
  Batch b = load_batch(fixture("pg2/batch_left.safetensors"));
  const double rel = max_abs_diff(f->logits(b), h->logits(b)) / max_abs(f->logits(b));
  EXPECT_LT(rel, 0.15);  // bf16 end to end; these tiny random models amplify rounding (measured 0.067)
  EXPECT_GT(rel, 0.0);
}

// ---- error paths -------------------------------------------------------------------------------

struct TempModel {
  fs::path dir;
  explicit TempModel(const std::string& name) {
    dir = fs::temp_directory_path() / ("tq_pg_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    fs::copy_file(fixture("pg1/native/config.json"), dir / "config.json");
  }
  ~TempModel() { fs::remove_all(dir); }
  // Writes the pg1 weights after `edit` changed the list.
  template <class F>
  void write_weights(F edit) {
    SafetensorsFile f = SafetensorsFile::open(fixture("pg1/native/model.safetensors"));
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const auto& k : f.keys()) ts.push_back({k, f.get(k).clone()});
    edit(ts);
    save_safetensors((dir / "model.safetensors").string(), ts);
  }
  void write_config(const std::string& text) { std::ofstream(dir / "config.json") << text; }
};

std::string load_error(const fs::path& dir, Quant q = Quant::none) {
  LoadOptions o;
  o.quant = q;
  try {
    load_model(dir.string(), o);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

const std::string kQ = "language_model.model.layers.1.self_attn.q_proj.weight";

TEST(PaliGemmaLoadErrors, MissingTensorIsNamed) {
  TempModel t("missing");
  t.write_weights([](auto& ts) { std::erase_if(ts, [](auto& p) { return p.first == kQ; }); });
  const std::string e = load_error(t.dir);
  EXPECT_NE(e.find("missing tensor for model.language_model.layers.1.self_attn.q_proj.weight"), std::string::npos) << e;
}

TEST(PaliGemmaLoadErrors, ExtraTensorIsNamed) {
  TempModel t("extra");
  t.write_weights([](auto& ts) { ts.push_back({"language_model.model.layers.9.mlp.up_proj.weight", Tensor::ones({2, 2})}); });
  const std::string e = load_error(t.dir);
  EXPECT_NE(e.find("unexpected tensor 'language_model.model.layers.9.mlp.up_proj.weight'"), std::string::npos) << e;
}

TEST(PaliGemmaLoadErrors, MisShapedTensorIsNamedDenseAndNf4) {
  TempModel t("shape");
  t.write_weights([](auto& ts) {
    for (auto& [k, v] : ts)
      if (k == kQ) v = Tensor::ones({v.size(0) + 1, v.size(1)});
  });
  for (Quant q : {Quant::none, Quant::nf4}) {
    const std::string e = load_error(t.dir, q);
    EXPECT_NE(e.find("tensor '" + kQ + "'"), std::string::npos) << e;
    EXPECT_NE(e.find("has shape [33, 48]"), std::string::npos) << e;
  }
}

TEST(PaliGemmaLoadErrors, SameParameterUnderTwoLayouts) {
  TempModel t("dup");
  t.write_weights([](auto& ts) {
    Tensor v;
    for (auto& [k, x] : ts)
      if (k == kQ) v = x;
    ts.push_back({"model.language_model.layers.1.self_attn.q_proj.weight", v});
  });
  EXPECT_NE(load_error(t.dir).find("same parameter under two key layouts"), std::string::npos);
}

TEST(PaliGemmaLoadErrors, ConfigErrors) {
  TempModel t("cfg");
  t.write_weights([](auto&) {});
  t.write_config(R"({"model_type": "llava"})");
  EXPECT_NE(load_error(t.dir).find("model_type \"llava\" is not supported"), std::string::npos) << load_error(t.dir);
  t.write_config(R"({"model_type": "paligemma", "text_config": {"model_type": "llama"}})");
  EXPECT_NE(load_error(t.dir).find("text_config.model_type \"llama\" is not supported"), std::string::npos);
  t.write_config(R"({"text_config": {}})");
  EXPECT_NE(load_error(t.dir).find("missing \"model_type\""), std::string::npos);
  fs::remove(t.dir / "config.json");
  EXPECT_NE(load_error(t.dir).find("has no config.json"), std::string::npos) << load_error(t.dir);
}

TEST(PaliGemmaLoadErrors, MissingWeightsFile) {
  TempModel t("noweights");
  EXPECT_NE(load_error(t.dir).find("has neither model.safetensors.index.json nor model.safetensors"),
            std::string::npos);
}

TEST(PaliGemmaForward, ImageTokenCountMismatch) {
  auto m = load_model(fixture("pg1/native"));
  Batch b = load_batch(fixture("pg1/batch_left.safetensors"));
  b.pixel_values = b.pixel_values.narrow(0, 0, 2).contiguous();
  try {
    m->logits(b);
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("image features and image tokens do not match"), std::string::npos);
  }
}

TEST(PaliGemmaConfig, HfDefaultsFilledIn) {
  PaliGemmaConfig c = parse_config(json::parse(R"({"model_type": "paligemma", "text_config": {"model_type": "gemma2"}})"));
  EXPECT_EQ(c.vision_config.hidden_size, 1152);
  EXPECT_EQ(c.vision_config.num_hidden_layers, 27);
  EXPECT_EQ(c.vision_config.patch_size, 14);
  EXPECT_EQ(c.text_config.num_image_tokens, 256);
  EXPECT_EQ(c.text_config.hidden_size, 2304);
  EXPECT_EQ(c.text_config.num_key_value_heads, 4);
  EXPECT_DOUBLE_EQ(c.text_config.final_logit_softcapping, 30.0);
  EXPECT_DOUBLE_EQ(c.text_config.attn_logit_softcapping, 50.0);
  EXPECT_DOUBLE_EQ(c.text_config.attention_scale(), 1.0 / 16);
  EXPECT_TRUE(c.text_config.layer_is_sliding(0));
  EXPECT_FALSE(c.text_config.layer_is_sliding(1));
  EXPECT_EQ(c.vision_config.projection_dim, 2048);
  // The PG1 Hub text_config: Gemma defaults, no softcaps or window.
  PaliGemmaConfig g = parse_config(json::parse(
      R"({"model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
          "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                            "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
          "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                          "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
                          "vocab_size": 257216}})"));
  EXPECT_EQ(g.text_config.head_dim, 256);
  EXPECT_DOUBLE_EQ(g.text_config.final_logit_softcapping, 0);
  EXPECT_FALSE(g.text_config.layer_is_sliding(0));
  EXPECT_EQ(g.text_config.hidden_activation, "gelu_pytorch_tanh");
  EXPECT_EQ(canonical_key("model.vision_tower.vision_model.post_layernorm.weight"), "vision_tower.post_layernorm.weight");
  EXPECT_EQ(canonical_key("language_model.model.norm.weight"), "language_model.norm.weight");
}

// ---- CLI ----------------------------------------------------------------------------------------

int run(const std::string& cmd) { return std::system((cmd + " > /dev/null 2>&1").c_str()); }

TEST(PaliGemmaCli, LogitsMatchesHfAndCudaIsAClearError) {
  const std::string bin = std::string(TQ_BIN_DIR) + "/paligemma";
  const fs::path out = fs::temp_directory_path() / ("tq_pg_logits_" + std::to_string(::getpid()) + ".safetensors");
  ASSERT_EQ(run(bin + " logits --model " + fixture("pg2/new") + " --batch " + fixture("pg2/batch_left.safetensors") +
                " --out " + out.string() + " --hf-compat"),
            0);
  SafetensorsFile f = SafetensorsFile::open(out.string());
  SafetensorsFile ref = SafetensorsFile::open(fixture("pg2/ref.safetensors"));
  EXPECT_NEAR(f.get("loss").item<double>(), ref.get("batch_left.loss").item<double>(), 1e-5);
  EXPECT_EQ(f.get("logits").shape(), ref.get("batch_left.logits").shape());
  fs::remove(out);
  EXPECT_NE(run(bin + " logits --model " + fixture("pg2/new") + " --batch " + fixture("pg2/batch_left.safetensors") +
                " --out " + out.string() + " --device cuda"),
            0);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(run(bin + " generate --model " + fixture("pg1/sharded") + " --batch " +
                fixture("pg1/gen_left.safetensors") + " --max-new-tokens 3"),
            0);
}

}  // namespace
}  // namespace tq::paligemma::test
