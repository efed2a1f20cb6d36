// PEFT adapters on PaliGemma: the adapter's module paths may use any HF naming era
// (`language_model.model.layers.N…` before transformers 4.52, `model.language_model.layers.N…`
// after); they are matched to tq's modules through the same canonical form the checkpoint loader
// uses, so adapters from either era load.
#pragma once

#include <map>

#include <tq/tq.hpp>

#include "paligemma/paligemma.hpp"
#include "paligemma/weights.hpp"

namespace tq::paligemma {

inline nn::AdapterInfo load_peft_adapter(const std::string& dir, nn::Module& model, DType compute_dtype = DType::f32) {
  // canonical module path → tq module path, for every module of the model.
  std::map<std::string, std::string> by_canonical;
  for (auto& [name, m] : model.named_modules()) by_canonical[canonical_key(name)] = name;
  auto from_hf = [by_canonical](const std::string& hf) {
    auto it = by_canonical.find(canonical_key(hf));
    return it == by_canonical.end() ? hf : it->second;
  };
  return nn::load_adapter(dir, model, from_hf, compute_dtype);
}

}  // namespace tq::paligemma
