// SigLIP vision tower as PaliGemma uses it (spec §4): patch embedding + learned position
// embedding, pre-LN encoder layers (bidirectional attention, tanh-GELU MLP), post-layernorm.
// No pooling head: PaliGemma uses every patch token of last_hidden_state.
// Parameter names follow HF's SiglipVisionModel: vision_model.embeddings.patch_embedding.weight,
// vision_model.encoder.layers.{i}.self_attn.q_proj, ..., vision_model.post_layernorm.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "paligemma/config.hpp"
#include "paligemma/layers.hpp"

namespace tq::paligemma {

class SiglipAttention : public nn::Module {
 public:
  std::unique_ptr<nn::LinearBase> q_proj, k_proj, v_proj, out_proj;
  int64_t heads;

  SiglipAttention(const VisionConfig& c, DType dt) : heads(c.num_attention_heads) {
    const int64_t D = c.hidden_size;
    q_proj = make_linear(D, D, true, dt);
    k_proj = make_linear(D, D, true, dt);
    v_proj = make_linear(D, D, true, dt);
    out_proj = make_linear(D, D, true, dt);
    // HF's SiglipAttention order (k, v, q, out): traversal order decides LoRA's init draws.
    register_linear("k_proj", &k_proj);
    register_linear("v_proj", &v_proj);
    register_linear("q_proj", &q_proj);
    register_linear("out_proj", &out_proj);
  }
  // x (B, N, D) → (B, N, D); no mask, scale head_dim^-½.
  Tensor forward(const Tensor& x) {
    Tensor q = split_heads(q_proj->forward(x), heads);  // (B, H, N, hd)
    Tensor k = split_heads(k_proj->forward(x), heads);
    Tensor v = split_heads(v_proj->forward(x), heads);
    AttentionOptions opt;
    opt.scale = 1.0 / std::sqrt(double(q.size(3)));
    return out_proj->forward(merge_heads(scaled_dot_product_attention(q, k, v, opt)));
  }
};

class SiglipMLP : public nn::Module {
 public:
  std::unique_ptr<nn::LinearBase> fc1, fc2;
  std::string act;
  SiglipMLP(const VisionConfig& c, DType dt) : act(c.hidden_act) {
    fc1 = make_linear(c.hidden_size, c.intermediate_size, true, dt);
    fc2 = make_linear(c.intermediate_size, c.hidden_size, true, dt);
    register_linear("fc1", &fc1);
    register_linear("fc2", &fc2);
  }
  Tensor forward(const Tensor& x) { return fc2->forward(activation(fc1->forward(x), act)); }
};

class SiglipEncoderLayer : public nn::Module {
 public:
  LayerNorm layer_norm1;
  SiglipAttention self_attn;
  LayerNorm layer_norm2;
  SiglipMLP mlp;
  SiglipEncoderLayer(const VisionConfig& c, DType dt)
      : layer_norm1(c.hidden_size, c.layer_norm_eps, dt), self_attn(c, dt),
        layer_norm2(c.hidden_size, c.layer_norm_eps, dt), mlp(c, dt) {
    register_module("layer_norm1", &layer_norm1);
    register_module("self_attn", &self_attn);
    register_module("layer_norm2", &layer_norm2);
    register_module("mlp", &mlp);
  }
  Tensor forward(const Tensor& x) {
    Tensor h = x + self_attn.forward(layer_norm1.forward(x));
    return h + mlp.forward(layer_norm2.forward(h));
  }
};

class SiglipVisionEmbeddings : public nn::Module {
 public:
  Tensor patch_weight;     // (D, C, P, P)
  Tensor patch_bias;       // (D)
  Tensor position_weight;  // (N, D)
  SiglipVisionEmbeddings(const VisionConfig& c, DType dt) {
    patch_weight = Tensor::empty({c.hidden_size, c.num_channels, c.patch_size, c.patch_size}, dt);
    patch_bias = Tensor::empty({c.hidden_size}, dt);
    position_weight = Tensor::empty({c.num_patches(), c.hidden_size}, dt);
    register_parameter("patch_embedding.weight", &patch_weight);
    register_parameter("patch_embedding.bias", &patch_bias);
    register_parameter("position_embedding.weight", &position_weight);
  }
  // pixels (B, C, H, W) → (B, N, D); pixels are cast to the conv weight's dtype as HF does.
  Tensor forward(const Tensor& pixels) const {
    Tensor x = patch_embed(pixels.to(patch_weight.dtype()), patch_weight, patch_bias);  // (B, N, D)
    return x + position_weight.unsqueeze(0);
  }
};

class SiglipVisionTransformer : public nn::Module {
 public:
  SiglipVisionEmbeddings embeddings;
  std::vector<std::unique_ptr<SiglipEncoderLayer>> layers;
  LayerNorm post_layernorm;
  SiglipVisionTransformer(const VisionConfig& c, DType dt)
      : embeddings(c, dt), post_layernorm(c.hidden_size, c.layer_norm_eps, dt) {
    register_module("embeddings", &embeddings);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      layers.push_back(std::make_unique<SiglipEncoderLayer>(c, dt));
      register_module("encoder.layers." + std::to_string(i), layers.back().get());
    }
    register_module("post_layernorm", &post_layernorm);
  }
  // pixels (B, C, H, W) → last_hidden_state (B, N, D)
  Tensor forward(const Tensor& pixels) {
    Tensor x = embeddings.forward(pixels);
    for (auto& l : layers) x = l->forward(x);
    return post_layernorm.forward(x);
  }
};

class SiglipVisionModel : public nn::Module {
 public:
  SiglipVisionTransformer vision_model;
  SiglipVisionModel(const VisionConfig& c, DType dt) : vision_model(c, dt) {
    register_module("vision_model", &vision_model);
  }
  Tensor forward(const Tensor& pixels) { return vision_model.forward(pixels); }
};

}  // namespace tq::paligemma
