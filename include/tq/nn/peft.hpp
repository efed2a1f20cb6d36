// PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, as peft 0.21 writes and
// reads them, so adapters move both ways between tq and peft.
//
// Keys: "base_model.model." + the module path as the *Python* model names it + ".lora_A.weight" /
// ".lora_B.weight" / ".lora_magnitude_vector". tq's module paths can differ from a given
// transformers version's (PaliGemma's were renamed in transformers 4.52), so callers pass a
// name map: tq path → HF path when saving, and HF path → tq path when loading (identity default).
// Config: JSON with sorted keys and 2-space indent (peft's `to_json_string`); peft fills any
// missing field from LoraConfig's defaults, and tq reads only the fields that change the math.
#pragma once

#include <filesystem>
#include <functional>

#include "tq/io/json.hpp"
#include "tq/io/safetensors.hpp"
#include "tq/nn/lora.hpp"

namespace tq::nn {

using NameMap = std::function<std::string(const std::string&)>;
inline std::string identity_name(const std::string& s) { return s; }

inline constexpr const char* kPeftPrefix = "base_model.model.";

struct AdapterInfo {
  LoraConfig config;
  std::string base_model_name_or_path;
  std::string task_type = "CAUSAL_LM";
};

namespace peft_detail {

// Every LoRA layer under `root` with its tq module path.
inline std::vector<std::pair<std::string, LoRA<LinearBase>*>> lora_layers(Module& root) {
  std::vector<std::pair<std::string, LoRA<LinearBase>*>> out;
  for (auto& [name, m] : root.named_modules())
    if (auto* l = dynamic_cast<LoRA<LinearBase>*>(m)) out.push_back({name, l});
  return out;
}

inline json::Value config_json(const AdapterInfo& info) {
  const LoraConfig& c = info.config;
  json::Array targets;
  std::vector<std::string> sorted = c.target_modules;
  std::sort(sorted.begin(), sorted.end());
  for (const auto& t : sorted) targets.push_back(json::Value(t));
  auto base = info.base_model_name_or_path.empty() ? json::Value(nullptr) : json::Value(info.base_model_name_or_path);
  // Keys in sorted order, as peft writes them (sort_keys=True).
  json::Object o = {
      {"alpha_pattern", json::Value(json::Object{})},
      {"base_model_name_or_path", base},
      {"bias", json::Value("none")},
      {"fan_in_fan_out", json::Value(false)},
      {"inference_mode", json::Value(true)},
      {"init_lora_weights", json::Value(true)},
      {"lora_alpha", c.alpha == std::floor(c.alpha) ? json::Value(int64_t(c.alpha)) : json::Value(c.alpha)},
      {"lora_dropout", json::Value(c.dropout)},
      {"modules_to_save", json::Value(nullptr)},
      {"peft_type", json::Value("LORA")},
      {"peft_version", json::Value("0.21.0")},
      {"r", json::Value(c.r)},
      {"rank_pattern", json::Value(json::Object{})},
      {"target_modules", json::Value(targets)},
      {"task_type", info.task_type.empty() ? json::Value(nullptr) : json::Value(info.task_type)},
      {"use_dora", json::Value(c.dora)},
      {"use_rslora", json::Value(c.rslora)},
  };
  return json::Value(o);
}

}  // namespace peft_detail

// Writes every LoRA adapter under `root` into `dir` (created if needed).
inline void save_adapter(const std::string& dir, Module& root, const AdapterInfo& info,
                         const NameMap& to_hf = identity_name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  TQ_CHECK(!ec, "save_adapter: cannot create ", dir, ": ", ec.message());
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (auto& [path, l] : peft_detail::lora_layers(root)) {
    const std::string key = kPeftPrefix + to_hf(path);
    tensors.push_back({key + ".lora_A.weight", l->lora_A.detach()});
    tensors.push_back({key + ".lora_B.weight", l->lora_B.detach()});
    if (l->config.dora) tensors.push_back({key + ".lora_magnitude_vector", l->lora_magnitude_vector.detach()});
  }
  TQ_CHECK(!tensors.empty(), "save_adapter: the model has no LoRA layers");
  save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string tmp = cfg_path + ".tmp";
  {
    std::ofstream out(tmp);
    out << json::dump(peft_detail::config_json(info), 2) << "\n";
    TQ_CHECK(out.good(), "save_adapter: cannot write ", tmp);
  }
  fs::rename(tmp, cfg_path, ec);
  TQ_CHECK(!ec, "save_adapter: cannot rename ", tmp, " to ", cfg_path, ": ", ec.message());
}

// Reads adapter_config.json; errors name the file and the field.
inline AdapterInfo read_adapter_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "adapter_config.json").string();
  TQ_CHECK(std::filesystem::exists(path), "adapter ", dir, ": missing adapter_config.json");
  json::Value j = json::parse_file(path);
  TQ_CHECK(j.is_object(), path, ": expected a JSON object");
  auto field = [&](const char* k) -> const json::Value* { return j.find(k); };
  if (auto* t = field("peft_type")) TQ_CHECK(t->is_string() && t->as_string() == "LORA", path, ": peft_type must be \"LORA\"");
  AdapterInfo info;
  LoraConfig& c = info.config;
  try {
    c.r = field("r") ? field("r")->as_int64() : 8;
    c.alpha = field("lora_alpha") ? field("lora_alpha")->as_double() : 8.0;
    if (auto* d = field("lora_dropout"); d && !d->is_null()) c.dropout = d->as_double();
    if (auto* v = field("use_rslora"); v && !v->is_null()) c.rslora = v->as_bool();
    if (auto* v = field("use_dora"); v && !v->is_null()) c.dora = v->as_bool();
    if (auto* v = field("base_model_name_or_path"); v && v->is_string()) info.base_model_name_or_path = v->as_string();
    if (auto* v = field("task_type"); v && v->is_string()) info.task_type = v->as_string();
    if (auto* t = field("target_modules")) {
      if (t->is_string()) fail(str_cat(path, ": target_modules as a regular expression is not supported"));
      for (const auto& e : t->as_array()) c.target_modules.push_back(e.as_string());
    }
    if (auto* b = field("bias"); b && b->is_string())
      TQ_CHECK(b->as_string() == "none", path, ": bias \"", b->as_string(), "\" is not supported (only \"none\")");
    if (auto* f = field("fan_in_fan_out"); f && f->is_bool()) TQ_CHECK(!f->as_bool(), path, ": fan_in_fan_out is not supported");
  } catch (const Error& e) {
    fail(str_cat(path, ": ", e.what()));
  }
  TQ_CHECK(c.r > 0, path, ": r must be positive");
  TQ_CHECK(!c.target_modules.empty(), path, ": target_modules is empty");
  return info;
}

// Loads an adapter into `root`: wraps the target modules with LoRA when they are not wrapped yet
// (A, B then come from the file), and copies every tensor. Missing or extra keys and shape
// mismatches are errors naming the key.
inline AdapterInfo load_adapter(const std::string& dir, Module& root, const NameMap& from_hf = identity_name,
                                DType compute_dtype = DType::f32) {
  AdapterInfo info = read_adapter_config(dir);
  if (peft_detail::lora_layers(root).empty()) {
    // target_modules are module-name suffixes ("q_proj"), which tq and HF paths share. A is
    // drawn and then overwritten from the file.
    Generator unused(0);
    apply_lora(root, info.config, unused, compute_dtype);
  }
  auto file = SafetensorsFile::open((std::filesystem::path(dir) / "adapter_model.safetensors").string());
  std::map<std::string, bool> used;
  for (const auto& k : file.keys()) used[k] = false;
  auto copy_in = [&](const std::string& key, Tensor& dst) {
    TQ_CHECK(file.contains(key), "adapter ", dir, ": missing tensor '", key, "'");
    Tensor src = file.get(key);
    TQ_CHECK(src.shape() == dst.shape(), "adapter ", dir, ": tensor '", key, "' has shape ", src.shape(),
             ", the model expects ", dst.shape());
    NoGradGuard ng;
    dst.copy_(src);
    used[key] = true;
  };
  for (auto& [path, l] : peft_detail::lora_layers(root)) {
    l->config.alpha = info.config.alpha;
    l->config.rslora = info.config.rslora;
    l->config.dropout = info.config.dropout;
    TQ_CHECK(l->config.r == info.config.r && l->config.dora == info.config.dora, "adapter ", dir,
             ": r/use_dora differ from the LoRA layers already on the model at ", path);
  }
  std::map<std::string, std::string> tq_of_key;  // tq path → HF key stem
  for (const auto& k : file.keys()) {
    TQ_CHECK(k.rfind(kPeftPrefix, 0) == 0, "adapter ", dir, ": key '", k, "' lacks the '", kPeftPrefix,
             "' prefix (peft would load it as zeros)");
    std::string stem = k.substr(std::strlen(kPeftPrefix));
    for (const char* suffix : {".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"}) {
      std::string s(suffix);
      if (stem.size() > s.size() && stem.compare(stem.size() - s.size(), s.size(), s) == 0) {
        tq_of_key[from_hf(stem.substr(0, stem.size() - s.size()))] = k.substr(0, k.size() - s.size());
        break;
      }
    }
  }
  for (auto& [path, l] : peft_detail::lora_layers(root)) {
    auto it = tq_of_key.find(path);
    TQ_CHECK(it != tq_of_key.end(), "adapter ", dir, ": no tensors for module '", path, "'");
    copy_in(it->second + ".lora_A.weight", l->lora_A);
    copy_in(it->second + ".lora_B.weight", l->lora_B);
    if (l->config.dora) copy_in(it->second + ".lora_magnitude_vector", l->lora_magnitude_vector);
  }
  for (const auto& [k, u] : used) TQ_CHECK(u, "adapter ", dir, ": tensor '", k, "' matches no LoRA layer of the model");
  return info;
}

}  // namespace tq::nn
