// Gemma (PaliGemma) and Gemma 2 (PaliGemma 2) decoders, one config-driven implementation
// (spec §5.2–5.6), HF eager numerics:
//   H0 = X · dtype(√D)                       normalizer rounded to the activation dtype (P2)
//   Gemma   : x += o(attn(norm_in(x)));  x += mlp(norm_post_attn(x))          (P7: pre-MLP norm)
//   Gemma 2 : x += norm_post_attn(o(attn(norm_in(x))));  x += norm_post_ffw(mlp(norm_pre_ffw(x)))
//   attn    : RoPE on q, k at explicit positions; scale head_dim^-½ (Gemma) or
//             query_pre_attn_scalar^-½ (Gemma 2); softcap before the mask; sliding window on the
//             layers config.layer_types marks; GQA as HF's repeat_kv.
//   mlp     : down(gelu_tanh(gate(x)) ⊙ up(x))   (one fused GeGLU node)
// The KV cache holds the rotated k and v of every layer; a decode step attends with query_offset
// = cached length. Names follow HF's GemmaModel (embed_tokens, layers.{i}.self_attn.q_proj, norm).
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "paligemma/config.hpp"
#include "paligemma/layers.hpp"

namespace tq::paligemma {

// Per-layer cached keys and values, (B, Hkv, Tk, hd) each.
struct KVCache {
  std::vector<Tensor> k, v;
  int64_t length() const { return k.empty() || !k[0].defined() ? 0 : k[0].size(2); }
};

class GemmaAttention : public nn::Module {
 public:
  std::unique_ptr<nn::LinearBase> q_proj, k_proj, v_proj, o_proj;
  const TextConfig& cfg;
  int64_t layer_idx;

  GemmaAttention(const TextConfig& c, int64_t idx, DType dt) : cfg(c), layer_idx(idx) {
    const int64_t D = c.hidden_size, hd = c.head_dim;
    q_proj = make_linear(D, c.num_attention_heads * hd, c.attention_bias, dt);
    k_proj = make_linear(D, c.num_key_value_heads * hd, c.attention_bias, dt);
    v_proj = make_linear(D, c.num_key_value_heads * hd, c.attention_bias, dt);
    o_proj = make_linear(c.num_attention_heads * hd, D, c.attention_bias, dt);
    register_linear("q_proj", &q_proj);
    register_linear("k_proj", &k_proj);
    register_linear("v_proj", &v_proj);
    register_linear("o_proj", &o_proj);
  }

  // x (B, T, D), positions (B, T) → (B, T, D). `mask` carries the mask kind, token types and key
  // padding for the whole key range (cache + new tokens).
  Tensor forward(const Tensor& x, const Tensor& positions, const AttentionOptions& mask, KVCache* cache) {
    Tensor q = rope(split_heads(q_proj->forward(x), cfg.num_attention_heads), positions, cfg.rope_theta);
    Tensor k = rope(split_heads(k_proj->forward(x), cfg.num_key_value_heads), positions, cfg.rope_theta);
    Tensor v = split_heads(v_proj->forward(x), cfg.num_key_value_heads);  // (B, Hkv, T, hd)
    AttentionOptions opt = mask;
    if (cache) {
      auto& ck = cache->k[size_t(layer_idx)];
      auto& cv = cache->v[size_t(layer_idx)];
      opt.query_offset = ck.defined() ? ck.size(2) : 0;
      if (ck.defined()) {
        k = concat({ck, k}, 2);
        v = concat({cv, v}, 2);
      }
      ck = k.detach();
      cv = v.detach();
    }
    opt.scale = cfg.attention_scale();
    opt.softcap = cfg.attn_logit_softcapping;
    opt.sliding_window = cfg.layer_is_sliding(layer_idx) ? cfg.sliding_window : 0;
    return o_proj->forward(merge_heads(scaled_dot_product_attention(q, k, v, opt)));
  }
};

class GemmaMLP : public nn::Module {
 public:
  std::unique_ptr<nn::LinearBase> gate_proj, up_proj, down_proj;
  std::string act;
  GemmaMLP(const TextConfig& c, DType dt) : act(c.hidden_activation) {
    gate_proj = make_linear(c.hidden_size, c.intermediate_size, false, dt);
    up_proj = make_linear(c.hidden_size, c.intermediate_size, false, dt);
    down_proj = make_linear(c.intermediate_size, c.hidden_size, false, dt);
    register_linear("gate_proj", &gate_proj);
    register_linear("up_proj", &up_proj);
    register_linear("down_proj", &down_proj);
  }
  Tensor forward(const Tensor& x) {
    Tensor gate = gate_proj->forward(x), up = up_proj->forward(x);
    // Gemma's tanh-GELU gate runs as one fused GeGLU node (one kernel, one rounding); exact GELU
    // (not used by any released PaliGemma) keeps the two-op form.
    if (act != "gelu") return down_proj->forward(geglu(gate, up));
    return down_proj->forward(activation(gate, act) * up);
  }
};

class GemmaDecoderLayer : public nn::Module {
 public:
  const TextConfig& cfg;
  GemmaRMSNorm input_layernorm;
  GemmaAttention self_attn;
  GemmaRMSNorm post_attention_layernorm;  // Gemma: the pre-MLP norm; Gemma 2: on the attention output
  std::unique_ptr<GemmaRMSNorm> pre_feedforward_layernorm, post_feedforward_layernorm;  // Gemma 2
  GemmaMLP mlp;

  GemmaDecoderLayer(const TextConfig& c, int64_t idx, DType dt)
      : cfg(c), input_layernorm(c.hidden_size, c.rms_norm_eps, dt), self_attn(c, idx, dt),
        post_attention_layernorm(c.hidden_size, c.rms_norm_eps, dt), mlp(c, dt) {
    register_module("input_layernorm", &input_layernorm);
    register_module("self_attn", &self_attn);
    register_module("post_attention_layernorm", &post_attention_layernorm);
    if (c.is_gemma2()) {
      pre_feedforward_layernorm = std::make_unique<GemmaRMSNorm>(c.hidden_size, c.rms_norm_eps, dt);
      post_feedforward_layernorm = std::make_unique<GemmaRMSNorm>(c.hidden_size, c.rms_norm_eps, dt);
      register_module("pre_feedforward_layernorm", pre_feedforward_layernorm.get());
      register_module("post_feedforward_layernorm", post_feedforward_layernorm.get());
    }
    register_module("mlp", &mlp);
  }

  Tensor forward(const Tensor& x, const Tensor& positions, const AttentionOptions& mask, KVCache* cache) {
    Tensor a = self_attn.forward(input_layernorm.forward(x), positions, mask, cache);
    if (!cfg.is_gemma2()) {
      Tensor h = x + a;
      return h + mlp.forward(post_attention_layernorm.forward(h));
    }
    Tensor h = x + post_attention_layernorm.forward(a);
    return h + post_feedforward_layernorm->forward(mlp.forward(pre_feedforward_layernorm->forward(h)));
  }
};

class GemmaModel : public nn::Module {
 public:
  const TextConfig& cfg;
  Tensor embed_tokens;  // (V, D), also the tied lm_head
  std::vector<std::unique_ptr<GemmaDecoderLayer>> layers;
  GemmaRMSNorm norm;
  bool gradient_checkpointing = false;

  GemmaModel(const TextConfig& c, DType dt) : cfg(c), norm(c.hidden_size, c.rms_norm_eps, dt) {
    embed_tokens = Tensor::empty({c.vocab_size, c.hidden_size}, dt);
    register_parameter("embed_tokens.weight", &embed_tokens);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      layers.push_back(std::make_unique<GemmaDecoderLayer>(c, i, dt));
      register_module("layers." + std::to_string(i), layers.back().get());
    }
    register_module("norm", &norm);
  }

  // inputs_embeds (B, T, D) → final-normed hidden states (B, T, D).
  Tensor forward(const Tensor& inputs_embeds, const Tensor& positions, const AttentionOptions& mask, KVCache* cache) {
    // The normalizer is a tensor of the activation dtype: √2048 → 45.25 in bf16 (P2).
    Tensor x = inputs_embeds * std::sqrt(double(cfg.hidden_size));
    for (auto& layer : layers) {
      if (gradient_checkpointing && !cache && grad_enabled()) {
        GemmaDecoderLayer* l = layer.get();
        Tensor pos = positions;
        AttentionOptions m = mask;
        // Recomputation must draw the same LoRA dropout masks: rewind each adapter's offset first.
        std::vector<std::pair<nn::LoRA<nn::LinearBase>*, uint64_t>> rng;
        for (auto& [name, mod] : l->named_modules())
          if (auto* lo = dynamic_cast<nn::LoRA<nn::LinearBase>*>(mod)) rng.push_back({lo, lo->dropout_offset});
        x = checkpoint(
            [l, pos, m, rng](const std::vector<Tensor>& in) {
              for (auto& [lo, off] : rng) lo->dropout_offset = off;
              return l->forward(in[0], pos, m, nullptr);
            },
            {x});
      } else {
        x = layer->forward(x, positions, mask, cache);
      }
    }
    return norm.forward(x);
  }
};

}  // namespace tq::paligemma
