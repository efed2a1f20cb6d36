// Loading a Hugging Face PaliGemma model directory into PaliGemmaForConditionalGeneration.
//
// Key layouts (spec §2): every name HF has written maps onto one canonical form, so a checkpoint in
// any of them (or a mix, e.g. a sharded save) loads the same:
//   language_model.model.X          (Hub, transformers ≤ 4.51 and 5.x save_pretrained)
//   model.language_model.X          (≥ 4.52 module names)           → language_model.X
//   vision_tower.vision_model.X / vision_tower.X / model.vision_tower[.vision_model].X → vision_tower.X
//   [model.]multi_modal_projector.X                                 → multi_modal_projector.X
//   language_model.lm_head.weight / lm_head.weight                  → lm_head.weight (tied: ignored)
// Every model parameter must be present exactly once with its exact shape, and every tensor of the
// checkpoint must be used: otherwise one error naming the tensor (file, key, shapes).
// Weights are converted from f32/bf16/f16 to the load dtype. With quant = nf4, every Linear of the
// vision tower, projector and decoder is quantized on load (bitsandbytes NF4, double quant, from
// the weight in the load dtype); embeddings, norms, the patch conv and position embeddings stay dense.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>

#include "paligemma/config.hpp"
#include "paligemma/paligemma.hpp"

namespace tq::paligemma {

enum class Quant { none, nf4 };

inline Quant parse_quant(const std::string& s) {
  if (s == "none") return Quant::none;
  if (s == "nf4") return Quant::nf4;
  fail("unknown --quant '" + s + "' (expected none or nf4)");
}
inline DType parse_load_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return DType::f32;
  if (s == "bf16" || s == "bfloat16") return DType::bf16;
  fail("unknown --dtype '" + s + "' (expected f32 or bf16)");
}

// The canonical form of a checkpoint key or a module parameter name.
inline std::string canonical_key(std::string k) {
  auto starts = [&](const std::string& p) { return k.rfind(p, 0) == 0; };
  auto strip = [&](const std::string& from, const std::string& to) {
    if (starts(from)) k = to + k.substr(from.size());
  };
  for (const char* sub : {"model.language_model.", "model.vision_tower.", "model.multi_modal_projector."})
    if (starts(sub)) k = k.substr(6);
  strip("language_model.model.", "language_model.");
  strip("language_model.lm_head.", "lm_head.");
  strip("vision_tower.vision_model.", "vision_tower.");
  return k;
}

struct LoadOptions {
  DType dtype = DType::f32;
  Quant quant = Quant::none;
  Device device = Device::cpu();  // where the parameters live; NF4 quantizes there (bnb quantizes on the GPU)
};

inline Device parse_device(const std::string& s) {
  Device d = Device::parse(s);
  require_device_usable(d);
  return d;
}

namespace weights_detail {

// checkpoint canonical name → original key; two keys with the same canonical name are an error.
inline std::map<std::string, std::string> canonical_index(const SafetensorsDir& w, const std::string& dir) {
  std::map<std::string, std::string> idx;
  for (const std::string& key : w.keys()) {
    auto [it, added] = idx.emplace(canonical_key(key), key);
    TQ_CHECK(added, "checkpoint '", dir, "': tensors '", it->second, "' and '", key,
             "' are the same parameter under two key layouts");
  }
  return idx;
}

inline Tensor load_tensor(const SafetensorsDir& w, const std::string& dir, const std::string& key,
                          const std::string& param, const Shape& shape, DType dtype, Device device) {
  const auto& info = w.info(key);
  TQ_CHECK(info.shape == shape, "checkpoint '", dir, "': tensor '", key, "' (in ", w.file_of(key), ") has shape ",
           info.shape, " but the model's ", param, " needs ", shape);
  Tensor t = w.get(key);
  TQ_CHECK(is_floating(t.dtype()), "checkpoint '", dir, "': tensor '", key, "' has dtype ", dtype_name(t.dtype()),
           ", expected a float type");
  if (device.is_cuda()) return t.to(device).to(dtype).contiguous();  // convert on the device
  return t.to(dtype).contiguous().clone();  // clone: own the memory, never alias the file mapping
}

}  // namespace weights_detail

// Fills every parameter of `m` from the checkpoint `w` (see the file comment).
inline void load_weights(PaliGemmaForConditionalGeneration& m, const SafetensorsDir& w, const std::string& dir,
                         const LoadOptions& opt) {
  using namespace weights_detail;
  std::map<std::string, std::string> idx = canonical_index(w, dir);
  std::set<std::string> used;
  auto take = [&](const std::string& param, const Shape& shape) {
    const std::string c = canonical_key(param);
    auto it = idx.find(c);
    TQ_CHECK(it != idx.end(), "checkpoint '", dir, "': missing tensor for ", param, " (shape ", shape,
             "; looked for '", c, "' in any HF key layout)");
    used.insert(c);
    return load_tensor(w, dir, it->second, param, shape, opt.dtype, opt.device);
  };
  // Linear slots first: their weights may be quantized instead of stored densely.
  // Collect the slots before replacing any: a replaced layer frees the module it held.
  std::vector<std::pair<std::string, std::unique_ptr<nn::LinearBase>*>> slots;
  for (auto& [mname, mod] : m.named_modules())
    for (auto& [sname, slot] : mod->linear_slots()) slots.push_back({mname + "." + sname, slot});
  std::set<const Tensor*> done;
  {
    for (auto& [base, slot] : slots) {
      auto* lin = dynamic_cast<nn::Linear*>(slot->get());
      TQ_CHECK(lin != nullptr, "load_weights: ", base, " is not a dense Linear (load before applying adapters)");
      Tensor wt = take(base + ".weight", lin->weight.shape());
      Tensor bias = lin->bias.defined() ? take(base + ".bias", lin->bias.shape()) : Tensor();
      if (opt.quant == Quant::nf4) {
        *slot = std::make_unique<NF4LinearModule>(NF4Linear(nf4_quantize(wt), bias));
      } else {
        lin->weight = wt;
        lin->bias = bias;
        done.insert(&lin->weight);
        done.insert(&lin->bias);
      }
    }
  }
  for (auto& [name, t] : m.named_parameters()) {
    if (done.count(t)) continue;
    *t = take(name, t->shape());
  }
  for (const auto& [c, key] : idx) {
    if (used.count(c)) continue;
    if (c == "lm_head.weight" && m.config.tie_word_embeddings) continue;  // tied to embed_tokens
    fail(str_cat("checkpoint '", dir, "': unexpected tensor '", key, "' (in ", w.file_of(key),
                 ") matches no parameter of the model"));
  }
}

// config.json + weights of a HF model directory → a ready model (eval mode).
inline std::unique_ptr<PaliGemmaForConditionalGeneration> load_model(const std::string& dir,
                                                                     const LoadOptions& opt = {}) {
  PaliGemmaConfig cfg = load_config(dir);
  TQ_CHECK(cfg.tie_word_embeddings, "config.json in '", dir,
           "': tie_word_embeddings=false is not supported (PaliGemma ties lm_head to embed_tokens)");
  auto m = std::make_unique<PaliGemmaForConditionalGeneration>(cfg, opt.dtype);
  SafetensorsDir w = open_model_weights(dir);
  load_weights(*m, w, dir, opt);
  m->train(false);
  return m;
}

}  // namespace tq::paligemma
