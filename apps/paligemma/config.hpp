// PaliGemma / PaliGemma 2 configuration: structs mirroring config.json (top level, vision_config,
// text_config) with the defaults HF's config classes fill in (spec/paligemma.md §1.2):
//   - PaliGemmaConfig: image_token_index 256000, vocab_size 257152, projection_dim 2048,
//     hidden_size 2048 (stale for PG2, never used: P6), ignore_index -100; a missing vision_config
//     is the So400m/14 tower, a missing text_config the Gemma 2B decoder.
//   - text_config.model_type "gemma" (default when absent) or "gemma2", each with its own class
//     defaults; num_image_tokens is forced to (image_size / patch_size)², vision projection_dim to
//     the top-level one.
// Anything else in model_type is an error naming the field.
#pragma once

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <tq/tq.hpp>

namespace tq::paligemma {

struct VisionConfig {  // SiglipVisionConfig
  std::string model_type = "siglip_vision_model";
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t num_channels = 3;
  int64_t image_size = 224;
  int64_t patch_size = 16;
  std::string hidden_act = "gelu_pytorch_tanh";
  double layer_norm_eps = 1e-6;
  double attention_dropout = 0.0;
  int64_t projection_dim = 2048;
  bool vision_use_head = false;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

struct TextConfig {  // GemmaConfig / Gemma2Config
  std::string model_type = "gemma";
  int64_t vocab_size = 256000;
  int64_t hidden_size = 3072;
  int64_t intermediate_size = 24576;
  int64_t num_hidden_layers = 28;
  int64_t num_attention_heads = 16;
  int64_t num_key_value_heads = 16;
  int64_t head_dim = 256;
  std::string hidden_activation = "gelu_pytorch_tanh";  // hidden_activation, else hidden_act
  int64_t max_position_embeddings = 8192;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool attention_bias = false;
  // Gemma 2 only (0 = off).
  double query_pre_attn_scalar = 0;
  int64_t sliding_window = 0;
  double final_logit_softcapping = 0;
  double attn_logit_softcapping = 0;
  std::vector<std::string> layer_types;  // "sliding_attention" / "full_attention" per layer
  int64_t num_image_tokens = 256;
  int64_t pad_token_id = 0, eos_token_id = 1, bos_token_id = 2;

  bool is_gemma2() const { return model_type == "gemma2"; }
  bool layer_is_sliding(int64_t i) const {
    return sliding_window > 0 && i < int64_t(layer_types.size()) && layer_types[size_t(i)] == "sliding_attention";
  }
  // The attention scale: Gemma 2 uses query_pre_attn_scalar^-½, Gemma head_dim^-½.
  double attention_scale() const {
    return 1.0 / std::sqrt(is_gemma2() ? query_pre_attn_scalar : double(head_dim));
  }
};

struct PaliGemmaConfig {
  std::string model_type = "paligemma";
  int64_t image_token_index = 256000;
  int64_t vocab_size = 257152;
  int64_t projection_dim = 2048;
  int64_t hidden_size = 2048;  // stale in PG2 (P6): the image-feature scale uses text_config.hidden_size
  int64_t ignore_index = -100;
  int64_t pad_token_id = 0, bos_token_id = 2, eos_token_id = 1;
  bool tie_word_embeddings = true;
  VisionConfig vision_config;
  TextConfig text_config;
};

namespace config_detail {

inline int64_t get_int(const json::Value& o, const char* key, int64_t def) {
  const json::Value* v = o.find(key);
  if (!v || v->is_null()) return def;
  TQ_CHECK(v->is_number(), "config.json: \"", key, "\" must be a number");
  return int64_t(v->as_double());
}
inline double get_double(const json::Value& o, const char* key, double def) {
  const json::Value* v = o.find(key);
  if (!v || v->is_null()) return def;
  TQ_CHECK(v->is_number(), "config.json: \"", key, "\" must be a number");
  return v->as_double();
}
inline std::string get_string(const json::Value& o, const char* key, const std::string& def) {
  const json::Value* v = o.find(key);
  if (!v || v->is_null()) return def;
  TQ_CHECK(v->is_string(), "config.json: \"", key, "\" must be a string");
  return v->as_string();
}
inline bool get_bool(const json::Value& o, const char* key, bool def) {
  const json::Value* v = o.find(key);
  if (!v || v->is_null()) return def;
  TQ_CHECK(v->is_bool(), "config.json: \"", key, "\" must be true or false");
  return v->as_bool();
}
// eos_token_id may be a list (PG2 text_config: [1, 107]); generation stops on the first (spec §8.1).
inline int64_t get_token_id(const json::Value& o, const char* key, int64_t def) {
  const json::Value* v = o.find(key);
  if (v && v->is_array()) return v->as_array().empty() ? def : int64_t(v->as_array()[0].as_double());
  return get_int(o, key, def);
}

inline VisionConfig parse_vision(const json::Value* j) {
  VisionConfig c;
  if (!j) {  // PaliGemmaConfig's default tower
    c.intermediate_size = 4096, c.hidden_size = 1152, c.patch_size = 14, c.image_size = 224;
    c.num_hidden_layers = 27, c.num_attention_heads = 16;
    return c;
  }
  TQ_CHECK(j->is_object(), "config.json: \"vision_config\" must be an object");
  c.model_type = get_string(*j, "model_type", c.model_type);
  TQ_CHECK(c.model_type == "siglip_vision_model", "config.json: vision_config.model_type \"", c.model_type,
           "\" is not supported (expected \"siglip_vision_model\")");
  c.hidden_size = get_int(*j, "hidden_size", c.hidden_size);
  c.intermediate_size = get_int(*j, "intermediate_size", c.intermediate_size);
  c.num_hidden_layers = get_int(*j, "num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = get_int(*j, "num_attention_heads", c.num_attention_heads);
  c.num_channels = get_int(*j, "num_channels", c.num_channels);
  c.image_size = get_int(*j, "image_size", c.image_size);
  c.patch_size = get_int(*j, "patch_size", c.patch_size);
  c.hidden_act = get_string(*j, "hidden_act", c.hidden_act);
  c.layer_norm_eps = get_double(*j, "layer_norm_eps", c.layer_norm_eps);
  c.attention_dropout = get_double(*j, "attention_dropout", c.attention_dropout);
  c.vision_use_head = get_bool(*j, "vision_use_head", c.vision_use_head);
  return c;
}

inline void gemma2_defaults(TextConfig& c) {
  c.hidden_size = 2304, c.intermediate_size = 9216, c.num_hidden_layers = 26, c.num_attention_heads = 8;
  c.num_key_value_heads = 4, c.query_pre_attn_scalar = 256, c.sliding_window = 4096;
  c.final_logit_softcapping = 30.0, c.attn_logit_softcapping = 50.0;
}

inline TextConfig parse_text(const json::Value* j, int64_t top_vocab) {
  TextConfig c;
  if (!j) {  // PaliGemmaConfig's default decoder: Gemma 2B
    c.hidden_size = 2048, c.num_hidden_layers = 18, c.intermediate_size = 16384, c.num_attention_heads = 8;
    c.num_key_value_heads = 1, c.vocab_size = top_vocab;
    return c;
  }
  TQ_CHECK(j->is_object(), "config.json: \"text_config\" must be an object");
  c.model_type = get_string(*j, "model_type", "gemma");
  TQ_CHECK(c.model_type == "gemma" || c.model_type == "gemma2", "config.json: text_config.model_type \"",
           c.model_type, "\" is not supported (expected \"gemma\" or \"gemma2\")");
  if (c.is_gemma2()) gemma2_defaults(c);
  c.vocab_size = get_int(*j, "vocab_size", c.vocab_size);
  c.hidden_size = get_int(*j, "hidden_size", c.hidden_size);
  c.intermediate_size = get_int(*j, "intermediate_size", c.intermediate_size);
  c.num_hidden_layers = get_int(*j, "num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = get_int(*j, "num_attention_heads", c.num_attention_heads);
  c.num_key_value_heads = get_int(*j, "num_key_value_heads", c.num_key_value_heads);
  c.head_dim = get_int(*j, "head_dim", c.head_dim);
  // Old Gemma used hidden_activation (None → tanh GELU); later ones hidden_act. Either way tanh GELU.
  c.hidden_activation = get_string(*j, "hidden_activation", get_string(*j, "hidden_act", c.hidden_activation));
  c.max_position_embeddings = get_int(*j, "max_position_embeddings", c.max_position_embeddings);
  c.rms_norm_eps = get_double(*j, "rms_norm_eps", c.rms_norm_eps);
  c.rope_theta = get_double(*j, "rope_theta", c.rope_theta);
  if (const json::Value* rp = j->find("rope_parameters"); rp && rp->is_object())  // transformers 5.x
    c.rope_theta = get_double(*rp, "rope_theta", c.rope_theta);
  c.attention_bias = get_bool(*j, "attention_bias", c.attention_bias);
  c.pad_token_id = get_token_id(*j, "pad_token_id", c.pad_token_id);
  c.eos_token_id = get_token_id(*j, "eos_token_id", c.eos_token_id);
  c.bos_token_id = get_token_id(*j, "bos_token_id", c.bos_token_id);
  if (c.is_gemma2()) {
    c.query_pre_attn_scalar = get_double(*j, "query_pre_attn_scalar", c.query_pre_attn_scalar);
    c.sliding_window = get_int(*j, "sliding_window", c.sliding_window);
    c.final_logit_softcapping = get_double(*j, "final_logit_softcapping", c.final_logit_softcapping);
    c.attn_logit_softcapping = get_double(*j, "attn_logit_softcapping", c.attn_logit_softcapping);
    if (const json::Value* lt = j->find("layer_types"); lt && lt->is_array()) {
      for (const json::Value& v : lt->as_array()) c.layer_types.push_back(v.as_string());
      TQ_CHECK(int64_t(c.layer_types.size()) == c.num_hidden_layers, "config.json: text_config.layer_types has ",
               c.layer_types.size(), " entries for ", c.num_hidden_layers, " layers");
    }
  }
  if (c.layer_types.empty()) {  // Gemma 2: sliding on even layer indices; Gemma: global everywhere
    for (int64_t i = 0; i < c.num_hidden_layers; ++i)
      c.layer_types.push_back(c.is_gemma2() && i % 2 == 0 ? "sliding_attention" : "full_attention");
  }
  return c;
}

}  // namespace config_detail

inline void validate(const PaliGemmaConfig& c) {
  const auto& v = c.vision_config;
  const auto& t = c.text_config;
  TQ_CHECK(v.hidden_size % v.num_attention_heads == 0, "config.json: vision hidden_size ", v.hidden_size,
           " is not a multiple of num_attention_heads ", v.num_attention_heads);
  TQ_CHECK(v.image_size % v.patch_size == 0, "config.json: vision image_size ", v.image_size,
           " is not a multiple of patch_size ", v.patch_size);
  TQ_CHECK(t.num_attention_heads % t.num_key_value_heads == 0, "config.json: text num_attention_heads ",
           t.num_attention_heads, " is not a multiple of num_key_value_heads ", t.num_key_value_heads);
  TQ_CHECK(t.head_dim % 2 == 0, "config.json: text head_dim must be even for RoPE, got ", t.head_dim);
  for (const std::string* act : {&v.hidden_act, &t.hidden_activation})
    TQ_CHECK(*act == "gelu_pytorch_tanh" || *act == "gelu_tanh" || *act == "gelu", "config.json: activation \"",
             *act, "\" is not supported (expected gelu_pytorch_tanh or gelu)");
  TQ_CHECK(c.image_token_index >= 0, "config.json: image_token_index must be >= 0, got ", c.image_token_index);
  TQ_CHECK(!v.vision_use_head, "config.json: vision_use_head=true is not supported (PaliGemma never pools)");
}

inline PaliGemmaConfig parse_config(const json::Value& j) {
  using namespace config_detail;
  TQ_CHECK(j.is_object(), "config.json: expected a JSON object");
  PaliGemmaConfig c;
  const json::Value* mt = j.find("model_type");
  TQ_CHECK(mt && mt->is_string(), "config.json: missing \"model_type\" (expected \"paligemma\")");
  c.model_type = mt->as_string();
  TQ_CHECK(c.model_type == "paligemma", "config.json: model_type \"", c.model_type,
           "\" is not supported (expected \"paligemma\")");
  c.image_token_index = get_int(j, "image_token_index", get_int(j, "image_token_id", c.image_token_index));
  c.vocab_size = get_int(j, "vocab_size", c.vocab_size);
  c.projection_dim = get_int(j, "projection_dim", c.projection_dim);
  c.hidden_size = get_int(j, "hidden_size", c.hidden_size);
  c.ignore_index = get_int(j, "ignore_index", c.ignore_index);
  c.pad_token_id = get_token_id(j, "pad_token_id", c.pad_token_id);
  c.bos_token_id = get_token_id(j, "bos_token_id", c.bos_token_id);
  c.eos_token_id = get_token_id(j, "eos_token_id", c.eos_token_id);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", c.tie_word_embeddings);
  c.vision_config = parse_vision(j.find("vision_config"));
  c.text_config = parse_text(j.find("text_config"), c.vocab_size);
  c.text_config.num_image_tokens = c.vision_config.num_patches();
  c.vision_config.projection_dim = c.projection_dim;
  validate(c);
  return c;
}

inline PaliGemmaConfig load_config(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path p = fs::path(model_dir) / "config.json";
  TQ_CHECK(fs::is_regular_file(p), "model directory '", model_dir, "' has no config.json (expected ", p.string(),
           ", as written by save_pretrained)");
  try {
    return parse_config(json::parse_file(p.string()));
  } catch (const Error& e) {
    std::string msg = e.what();
    if (msg.rfind("config.json", 0) == 0) msg = p.string() + msg.substr(11);
    throw Error(msg);
  }
}

}  // namespace tq::paligemma
