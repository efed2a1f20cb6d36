// PaliGemmaForConditionalGeneration: SigLIP → projector → merge into the token embeddings →
// Gemma / Gemma 2 → tied lm_head (spec §4–§7, §12).
//
//   F  = (Z·Wpᵀ + bp) / √D_text          fp32 division by the Python-float √D (§5.1, P6)
//   X  = Emb[ids];  X[ids == <image>] = F in order (image-major, N rows per image)   (§5.2)
//   positions: 1-based, padding ignored, for a plain forward (§5.5); generation passes its own
//   mask: prefix-LM from token_type_ids (type 0 = prefix, bidirectional within its run); without
//         token_type_ids every token is prefix (bidirectional prompt, §6.3) — except under
//         hf_compat, where transformers 5.x's eager forward builds a plain causal mask
//   logits = norm(H)·Embᵀ, then the final softcap (Gemma 2) as the model was trained — HF ≥ 4.52
//         (hf_compat) does not apply it (§5.6)
//   loss: labels shifted by one (position t predicts labels[t+1]); logits are computed only at
//         supervised rows, a chunk at a time, fused with the fp32 cross-entropy (§7)
// Parameter names are transformers ≥ 4.52's module names (model.vision_tower.vision_model...,
// model.multi_modal_projector.linear, model.language_model.layers.{i}...), so peft adapter keys map.
#pragma once

#include <cmath>
#include <vector>

#include "paligemma/config.hpp"
#include "paligemma/gemma.hpp"
#include "paligemma/siglip.hpp"

namespace tq::paligemma {

// One batch with HF's tensor names; everything but input_ids is optional.
struct Batch {
  Tensor input_ids;       // (B, T) i64
  Tensor attention_mask;  // (B, T) 0/1
  Tensor token_type_ids;  // (B, T) 0 prefix / 1 suffix
  Tensor labels;          // (B, T) i64, −100 = ignored
  Tensor pixel_values;    // (B_img, C, H, W) f32
};

struct ForwardOptions {
  bool hf_compat = false;  // reproduce transformers 5.x (no final softcap; causal without token types)
};

class PaliGemmaMultiModalProjector : public nn::Module {
 public:
  std::unique_ptr<nn::LinearBase> linear;
  PaliGemmaMultiModalProjector(const PaliGemmaConfig& c, DType dt) {
    linear = make_linear(c.vision_config.hidden_size, c.projection_dim, true, dt);
    register_linear("linear", &linear);
  }
  Tensor forward(const Tensor& x) { return linear->forward(x); }
};

class PaliGemmaModel : public nn::Module {
 public:
  SiglipVisionModel vision_tower;
  PaliGemmaMultiModalProjector multi_modal_projector;
  GemmaModel language_model;
  PaliGemmaModel(const PaliGemmaConfig& c, DType dt)
      : vision_tower(c.vision_config, dt), multi_modal_projector(c, dt), language_model(c.text_config, dt) {
    register_module("vision_tower", &vision_tower);
    register_module("multi_modal_projector", &multi_modal_projector);
    register_module("language_model", &language_model);
  }
};

class PaliGemmaForConditionalGeneration : public nn::Module {
 public:
  PaliGemmaConfig config;
  DType dtype;
  std::unique_ptr<PaliGemmaModel> model;  // built after `config` so its members can refer to it
  ForwardOptions options;

  PaliGemmaForConditionalGeneration(PaliGemmaConfig c, DType dt) : config(std::move(c)), dtype(dt) {
    model = std::make_unique<PaliGemmaModel>(config, dt);
    register_module("model", model.get());
  }
  const TextConfig& text() const { return config.text_config; }
  // Where the parameters live; inputs given on another device (the CLI's CPU batches, index
  // lists built on the host) are moved here at the model's entry points.
  Device device() const { return model->language_model.embed_tokens.device(); }
  Tensor on_device(const Tensor& t) const { return t.defined() ? t.to(device()) : t; }

  // pixel_values (B_img, C, H, W) → scaled image features (B_img, N, D_text) in the model dtype.
  Tensor image_features(const Tensor& pixel_values) {
    Tensor z = model->vision_tower.forward(on_device(pixel_values));
    Tensor f = model->multi_modal_projector.forward(z);
    // HF divides by a Python float: fp32 math, one rounding to the activation dtype.
    return (f.to(DType::f32) / std::sqrt(double(text().hidden_size))).to(f.dtype());
  }

  // input_ids (B, T) [+ pixel_values] → merged input embeddings (B, T, D).
  Tensor embed(const Tensor& input_ids, const Tensor& pixel_values) {
    int64_t n_tokens = 0;
    Tensor is_image = image_token_mask(input_ids, n_tokens);
    Tensor lookup = input_ids;
    if (config.image_token_index >= text().vocab_size && n_tokens > 0) {  // HF: an OOV image token looks up row 0
      std::vector<int64_t> v = input_ids.to_vector<int64_t>();
      for (auto& id : v)
        if (id == config.image_token_index) id = 0;
      lookup = Tensor::from_vector(v, input_ids.shape());
    }
    Tensor x = embedding(on_device(lookup), model->language_model.embed_tokens);
    if (!pixel_values.defined()) {
      TQ_CHECK(n_tokens == 0, "PaliGemma: input_ids hold ", n_tokens, " image tokens but no pixel_values were given");
      return x;
    }
    Tensor f = image_features(pixel_values);  // (B_img, N, D)
    TQ_CHECK(n_tokens == f.size(0) * f.size(1), "PaliGemma: image features and image tokens do not match: ",
             n_tokens, " image tokens (id ", config.image_token_index, ") in input_ids, ", f.size(0), " images × ",
             f.size(1), " features");
    return masked_scatter(x, on_device(is_image).unsqueeze(-1).expand(x.shape()), f.to(x.dtype()));
  }

  // The attention mask of a full (prompt) pass, spec §6.3.
  AttentionOptions prompt_mask(const Batch& b) const {
    AttentionOptions m;
    if (b.attention_mask.defined()) m.key_padding = on_device(b.attention_mask);
    if (b.token_type_ids.defined()) {
      m.mask = AttentionMask::prefix_lm;
      m.token_type_ids = on_device(b.token_type_ids);
    } else if (options.hf_compat) {
      m.mask = AttentionMask::causal;
    } else {
      m.mask = AttentionMask::prefix_lm;
      m.token_type_ids = Tensor::zeros(b.input_ids.shape(), DType::i64, device());
    }
    return m;
  }

  // HF's plain-forward positions: 1, 2, …, T for every row (padding ignored), offset by the cache.
  static Tensor forward_positions(int64_t B, int64_t T, int64_t past = 0) {
    std::vector<int64_t> p(size_t(B * T));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) p[size_t(b * T + t)] = past + t + 1;
    return Tensor::from_vector(p, {B, T});
  }

  // Final-normed hidden states (B, T, D).
  Tensor hidden_states(const Tensor& input_ids, const Tensor& pixel_values, const Tensor& positions,
                       const AttentionOptions& mask, KVCache* cache = nullptr) {
    Tensor x = embed(input_ids, pixel_values);
    return model->language_model.forward(x, on_device(positions), mask, cache);
  }

  // h (..., D) → logits (..., V) in fp32: tied lm_head, then the final softcap unless hf_compat.
  Tensor lm_head(const Tensor& h) {
    Tensor logits = linear(h, model->language_model.embed_tokens);
    const double cap = text().final_logit_softcapping;
    if (cap > 0 && !options.hf_compat) logits = tanh(logits / cap) * cap;  // in the model dtype, as old HF
    return logits.to(DType::f32);
  }

  // Σ CE(lm_head(h_r), t_r) / normalizer over rows h (n, D) (normalizer 0: the mean over the
  // supervised rows): the tied lm_head, the final softcap unless hf_compat, and the loss as one fused
  // node that never holds all rows' logits (ops/linear_cross_entropy.hpp: the same numerics as
  // lm_head followed by cross_entropy).
  Tensor lm_loss(const Tensor& h, const Tensor& targets, double normalizer) {
    LinearCrossEntropyOptions o;
    o.ignore_index = config.ignore_index;
    o.normalizer = normalizer;
    o.softcap = options.hf_compat ? 0.0 : text().final_logit_softcapping;
    return linear_cross_entropy(h, model->language_model.embed_tokens, targets, o);
  }

  // Logits at every position (B, T, V), fp32.
  Tensor logits(const Batch& b) {
    const int64_t B = b.input_ids.size(0), T = b.input_ids.size(1);
    return lm_head(hidden_states(b.input_ids, b.pixel_values, forward_positions(B, T), prompt_mask(b)));
  }

  // Mean token cross-entropy over supervised positions, from hidden states (B, T, D) and labels.
  Tensor loss_from_hidden(const Tensor& h, const Tensor& labels) {
    const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
    TQ_CHECK(labels.shape() == (Shape{B, T}), "PaliGemma: labels ", describe(labels), " must be (", B, ", ", T, ")");
    std::vector<int64_t> lab = labels.to_vector<int64_t>(), rows, targets;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t + 1 < T; ++t) {
        const int64_t y = lab[size_t(b * T + t + 1)];
        if (y == config.ignore_index) continue;
        rows.push_back(b * T + t);
        targets.push_back(y);
      }
    if (rows.empty()) return Tensor::zeros({}, DType::f32, device());  // HF: mean over nothing is NaN; 0 here
    const int64_t n = int64_t(rows.size());
    Tensor sel = index_select(h.reshape({B * T, D}), 0, on_device(Tensor::from_vector(rows, {n})));  // (n, D)
    return lm_loss(sel, on_device(Tensor::from_vector(targets, {n})), 0.0);
  }

  Tensor loss(const Batch& b) {
    const int64_t B = b.input_ids.size(0), T = b.input_ids.size(1);
    Tensor h = hidden_states(b.input_ids, b.pixel_values, forward_positions(B, T), prompt_mask(b));
    return loss_from_hidden(h, b.labels);
  }

  void set_gradient_checkpointing(bool on) { model->language_model.gradient_checkpointing = on; }

 private:
  Tensor image_token_mask(const Tensor& ids, int64_t& count) const {
    std::vector<int64_t> v = ids.to_vector<int64_t>();
    std::vector<uint8_t> m(v.size());
    for (size_t i = 0; i < v.size(); ++i) count += m[i] = v[i] == config.image_token_index;
    return Tensor::from_vector(m, ids.shape()).to(DType::boolean);
  }
};

}  // namespace tq::paligemma
