// `paligemma init --arch pg1|pg2 --out DIR [--tokenizer DIR] [--layers N] [--seed S]`: writes a
// Hugging Face PaliGemma model directory with random weights — the full-size PaliGemma-3B (pg1) or
// PaliGemma 2 3B (pg2) at 224 px by default — so the GPU benchmarks and the full-recipe runs work
// without downloading the real checkpoint. The configuration is the Hub's (spec/paligemma.md §1);
// only the tokenizer differs: its files are copied from --tokenizer (default: the bundled sample's
// small SentencePiece model), and image_token_index is set to that tokenizer's <image> id. The
// embedding keeps the real 257,216 rows, so every matrix has the real model's shape and cost.
//
// Weights (bf16, one model.safetensors, HF ≥ 4.52 key names): N(0, 0.02) for every matrix, the
// embeddings and the patch convolution, as HF's initializer_range; LayerNorm weights 1 + N(0, 0.02),
// RMSNorm weights (stored as the offset around 1) N(0, 0.02), biases N(0, 0.02). Draws are Philox
// (seed, tensor index), computed in parallel, so the same seed always writes the same file.
#include <filesystem>
#include <fstream>

#include "paligemma/cli_registry.hpp"
#include "paligemma/paligemma.hpp"
#include "paligemma/tokenizer.hpp"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct InitArgs {
  std::string arch = "pg1", out, tokenizer;
  int64_t layers = 0, vision_layers = 0;
  uint64_t seed = 0;
};

json vision_config() {
  return {{"model_type", "siglip_vision_model"}, {"hidden_size", 1152}, {"intermediate_size", 4304},
          {"num_hidden_layers", 27}, {"num_attention_heads", 16}, {"num_channels", 3}, {"image_size", 224},
          {"patch_size", 14}, {"layer_norm_eps", 1e-6}, {"hidden_act", "gelu_pytorch_tanh"},
          {"attention_dropout", 0.0}, {"vision_use_head", false}};
}

// The Hub configs of google/paligemma-3b-pt-224 and google/paligemma2-3b-pt-224 (spec §1.1).
json hub_config(const std::string& arch, int64_t image_token) {
  const bool v2 = arch == "pg2";
  const int64_t D = v2 ? 2304 : 2048;
  json text = {{"model_type", v2 ? "gemma2" : "gemma"}, {"vocab_size", 257216}, {"hidden_size", D},
               {"intermediate_size", v2 ? 9216 : 16384}, {"num_hidden_layers", v2 ? 26 : 18},
               {"num_attention_heads", 8}, {"num_key_value_heads", v2 ? 4 : 1}, {"head_dim", 256},
               {"hidden_act", "gelu_pytorch_tanh"}, {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0},
               {"max_position_embeddings", 8192}, {"attention_bias", false}, {"num_image_tokens", 256},
               {"bos_token_id", 2}, {"eos_token_id", 1}, {"pad_token_id", 0}};
  if (v2) {
    text["query_pre_attn_scalar"] = 256;
    text["attn_logit_softcapping"] = 50.0;
    text["final_logit_softcapping"] = 30.0;
    text["sliding_window"] = 4096;
    text["cache_implementation"] = "hybrid";
  }
  return {{"architectures", {"PaliGemmaForConditionalGeneration"}}, {"model_type", "paligemma"},
          {"image_token_index", image_token}, {"vocab_size", 257216}, {"projection_dim", D},
          {"hidden_size", 2048}, {"bos_token_id", 2}, {"eos_token_id", 1}, {"pad_token_id", 0},
          {"torch_dtype", "bfloat16"}, {"text_config", text}, {"vision_config", vision_config()},
          {"tq_note", "random-init weights written by `paligemma init` (not the released checkpoint)"}};
}

// (numel) bf16 values mean + std·z, z ~ N(0, 1) from Philox (seed, index), filled in parallel.
tq::Tensor random_bf16(const tq::Shape& shape, uint64_t seed, uint64_t index, double mean, double std) {
  using namespace tq;
  Tensor t = Tensor::empty(shape, DType::bf16);
  bf16* p = t.data<bf16>();
  parallel_for(t.numel(), 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) p[i] = bf16(float(mean + std * double(Philox::normal(seed, index, uint64_t(i)))));
  });
  return t;
}

void write_json(const fs::path& p, const json& j) {
  std::ofstream f(p);
  f << j.dump(2) << "\n";
  TQ_CHECK(f.good(), "init: cannot write ", p.string());
}

int run_init(InitArgs& a) {
  using namespace tq;
  using namespace tq::paligemma;
  if (a.tokenizer.empty()) a.tokenizer = (fs::path(TQ_SOURCE_DIR) / "data" / "sample" / "model").string();
  TQ_CHECK(fs::is_regular_file(fs::path(a.tokenizer) / "tokenizer.model"), "--tokenizer ", a.tokenizer,
           ": no tokenizer.model there (a PaliGemma/Gemma model directory is needed)");
  const Tokenizer tok = Tokenizer::load(a.tokenizer);
  fs::create_directories(a.out);
  json cfg = hub_config(a.arch, tok.image_id());
  if (a.layers > 0) cfg["text_config"]["num_hidden_layers"] = a.layers;
  if (a.vision_layers > 0) cfg["vision_config"]["num_hidden_layers"] = a.vision_layers;
  const fs::path out(a.out);
  write_json(out / "config.json", cfg);
  write_json(out / "preprocessor_config.json",
             {{"do_convert_rgb", true}, {"do_normalize", true}, {"do_rescale", true}, {"do_resize", true},
              {"image_mean", {0.5, 0.5, 0.5}}, {"image_std", {0.5, 0.5, 0.5}}, {"resample", 3},
              {"rescale_factor", 1.0 / 255.0}, {"size", {{"height", 224}, {"width", 224}}},
              {"image_seq_length", 256}, {"image_processor_type", "SiglipImageProcessor"},
              {"processor_class", "PaliGemmaProcessor"}});
  for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json"}) {
    const fs::path src = fs::path(a.tokenizer) / f;
    if (fs::exists(src)) fs::copy_file(src, out / f, fs::copy_options::overwrite_existing);
  }

  PaliGemmaConfig pc = load_config(a.out);  // our own parser: the file we wrote must load
  PaliGemmaForConditionalGeneration m(pc, DType::bf16);  // parameters unallocated until touched
  std::vector<std::pair<std::string, Tensor>> tensors;
  int64_t count = 0;
  uint64_t index = 0;
  for (auto& [name, t] : m.named_parameters()) {
    if (!t->defined()) continue;
    const bool layer_norm = name.find("layer_norm") != std::string::npos || name.find("post_layernorm") != std::string::npos;
    const bool is_weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
    const double mean = layer_norm && is_weight ? 1.0 : 0.0;
    tensors.push_back({name, random_bf16(t->shape(), a.seed, index++, mean, 0.02)});
    count += t->numel();
    *t = Tensor();  // the model's placeholder is not needed
  }
  save_safetensors((out / "model.safetensors").string(), tensors, {{"format", "pt"}});
  std::fprintf(stderr, "init: wrote %s (%s, %lld parameters, bf16, seed %llu)\n", a.out.c_str(), a.arch.c_str(),
               (long long)count, (unsigned long long)a.seed);
  return 0;
}

const tq::cli::Register reg_init(
    "init", "Write a random-init PaliGemma (pg1) or PaliGemma 2 (pg2) 3B model directory (HF format)",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<InitArgs>();
      app.add_option("--arch", a->arch, "pg1 (PaliGemma-3B-224) or pg2 (PaliGemma 2 3B-224)")
          ->capture_default_str()->check(CLI::IsMember({"pg1", "pg2"}));
      app.add_option("--out", a->out, "Output model directory")->required();
      app.add_option("--tokenizer", a->tokenizer, "Model directory whose tokenizer files are copied "
                                                  "(default: the bundled sample model)");
      app.add_option("--layers", a->layers, "Override the decoder's layer count (0: the real one)")
          ->capture_default_str()->check(CLI::NonNegativeNumber);
      app.add_option("--vision-layers", a->vision_layers, "Override SigLIP's layer count (0: the real one)")
          ->capture_default_str()->check(CLI::NonNegativeNumber);
      app.add_option("--seed", a->seed, "Philox seed of the weights")->capture_default_str();
      return [a] { return run_init(*a); };
    });

}  // namespace
