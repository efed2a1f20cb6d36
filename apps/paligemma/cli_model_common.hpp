// Flags and helpers shared by the model CLIs (logits, generate): --model/--batch/--device/--dtype/
// --quant/--hf-compat, loading the model and an HF-named batch file.
#pragma once

#include <memory>
#include <string>

#include "paligemma/cli_registry.hpp"
#include "paligemma/weights.hpp"

namespace tq::paligemma::cli {

struct ModelArgs {
  std::string model, batch, device = "cpu", dtype = "f32", quant = "none";
  bool hf_compat = false;
};

inline void add_model_flags(CLI::App& app, ModelArgs& a) {
  app.add_option("--model", a.model, "Hugging Face model directory (config.json + safetensors)")->required();
  app.add_option("--batch", a.batch, "safetensors batch: input_ids, attention_mask, [token_type_ids], [labels], "
                                     "pixel_values")->required();
  app.add_option("--device", a.device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", a.dtype, "Load/compute dtype: f32 or bf16")->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--quant", a.quant, "none, or nf4: quantize every Linear on load")->capture_default_str()
      ->check(CLI::IsMember({"none", "nf4"}));
  app.add_flag("--hf-compat", a.hf_compat,
               "Reproduce transformers 5.x exactly: no final logit softcap; causal mask without token_type_ids");
}

inline std::unique_ptr<PaliGemmaForConditionalGeneration> load_cli_model(const ModelArgs& a) {
  LoadOptions o;
  o.dtype = parse_load_dtype(a.dtype);
  o.quant = parse_quant(a.quant);
  o.device = parse_device(a.device);
  auto m = load_model(a.model, o);
  m->options.hf_compat = a.hf_compat;
  return m;
}

// "peak 12.3 GiB on cuda:0" — the high-water mark of tq's allocations on the model's device.
inline std::string peak_memory_line(Device d) {
  const MemoryStats s = memory_stats(d);
  char b[96];
  std::snprintf(b, sizeof b, "peak memory %.2f GiB on %s", double(s.peak) / double(1ull << 30), d.str().c_str());
  return b;
}

inline Batch load_batch_file(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  auto get = [&](const char* k, bool required) {
    TQ_CHECK(!required || f.contains(k), "batch '", path, "' has no tensor '", k, "'");
    return f.contains(k) ? f.get(k).clone() : Tensor();
  };
  Batch b;
  b.input_ids = get("input_ids", true).to(DType::i64);
  TQ_CHECK(b.input_ids.dim() == 2, "batch '", path, "': input_ids must be (B, T), got ", describe(b.input_ids));
  b.attention_mask = get("attention_mask", false);
  if (b.attention_mask.defined()) b.attention_mask = b.attention_mask.to(DType::i64);
  b.token_type_ids = get("token_type_ids", false);
  if (b.token_type_ids.defined()) b.token_type_ids = b.token_type_ids.to(DType::i64);
  b.labels = get("labels", false);
  if (b.labels.defined()) b.labels = b.labels.to(DType::i64);
  b.pixel_values = get("pixel_values", false);
  if (b.pixel_values.defined()) b.pixel_values = b.pixel_values.to(DType::f32);
  for (const Tensor* t : {&b.attention_mask, &b.token_type_ids, &b.labels})
    TQ_CHECK(!t->defined() || t->shape() == b.input_ids.shape(), "batch '", path, "': ", describe(*t),
             " does not match input_ids ", describe(b.input_ids));
  return b;
}

}  // namespace tq::paligemma::cli
