// `paligemma merge --model DIR --adapter DIR --out DIR [--dtype bf16|f32]`: peft's
// merge_and_unload() + save_pretrained(): every adapted Linear's weight becomes W + s·B·A (DoRA: rows
// rescaled to m / ‖W + s·B·A‖), and the result is written as an ordinary Hugging Face model
// directory (config.json, model.safetensors, the tokenizer and preprocessor files copied), which
// loads in transformers, in tq, and can be quantized again by either.
//
// The base is loaded dense (never NF4): merging into a dequantized NF4 weight and writing it back
// dense is what peft does for 4-bit bases; here it is also exact for dense bases. The merge runs in
// fp32 and rounds once to --dtype. Keys follow transformers ≥ 4.52's module names
// (model.language_model.…, model.vision_tower.vision_model.…, model.multi_modal_projector.…).
#include <filesystem>
#include <map>

#include "paligemma/adapter.hpp"
#include "paligemma/cli_registry.hpp"
#include "paligemma/weights.hpp"

namespace {

namespace fs = std::filesystem;

struct MergeArgs {
  std::string model, adapter, out, dtype = "bf16";
};

int run_merge(const MergeArgs& a) {
  using namespace tq;
  using namespace tq::paligemma;
  TQ_CHECK(fs::is_regular_file(fs::path(a.adapter) / "adapter_config.json"), "--adapter ", a.adapter,
           ": missing adapter_config.json");
  TQ_CHECK(fs::absolute(a.out) != fs::absolute(a.model), "--out must differ from --model (", a.out, ")");
  const DType out_dt = parse_load_dtype(a.dtype);
  LoadOptions lo;
  lo.dtype = DType::f32;
  auto m = load_model(a.model, lo);
  load_peft_adapter(a.adapter, *m, DType::f32);
  std::map<std::string, Tensor> merged;  // LoRA layer path → its merged (out, in) weight
  for (auto& [name, l] : nn::peft_detail::lora_layers(*m)) merged[name] = l->dense_weight(DType::f32);
  std::vector<std::pair<std::string, Tensor>> tensors;
  int64_t n_merged = 0;
  for (auto& [name, t] : m->named_parameters()) {
    if (!t->defined() || name.find("lora_") != std::string::npos) continue;
    std::string key = name;
    const std::string base = ".base_layer.weight";
    if (key.size() > base.size() && key.compare(key.size() - base.size(), base.size(), base) == 0) {
      const std::string layer = key.substr(0, key.size() - base.size());
      TQ_CHECK(merged.count(layer), "merge: no LoRA layer at ", layer);
      tensors.push_back({layer + ".weight", merged[layer].to(out_dt)});
      ++n_merged;
      continue;
    }
    const std::string bias = ".base_layer.bias";
    if (key.size() > bias.size() && key.compare(key.size() - bias.size(), bias.size(), bias) == 0)
      key = key.substr(0, key.size() - bias.size()) + ".bias";
    tensors.push_back({key, t->detach().to(out_dt)});
  }
  fs::create_directories(a.out);
  save_safetensors((fs::path(a.out) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  for (const auto& e : fs::directory_iterator(a.model)) {  // config, tokenizer, preprocessor
    const std::string f = e.path().filename().string();
    if (e.is_regular_file() && f.find("safetensors") == std::string::npos && f.find(".bin") == std::string::npos)
      fs::copy_file(e.path(), fs::path(a.out) / f, fs::copy_options::overwrite_existing);
  }
  std::fprintf(stderr, "merge: %lld adapted layers merged; wrote %s (%s)\n", (long long)n_merged, a.out.c_str(),
               dtype_name(out_dt));
  return 0;
}

const tq::cli::Register reg_merge(
    "merge", "Merge a PEFT LoRA/DoRA adapter into the base weights and write a Hugging Face model directory",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<MergeArgs>();
      app.add_option("--model", a->model, "Base model directory (Hugging Face format)")->required();
      app.add_option("--adapter", a->adapter, "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
          ->required();
      app.add_option("--out", a->out, "Output model directory")->required();
      app.add_option("--dtype", a->dtype, "dtype of the written weights: bf16 or f32")->capture_default_str()
          ->check(CLI::IsMember({"f32", "bf16"}));
      return [a] { return run_merge(*a); };
    });

}  // namespace
