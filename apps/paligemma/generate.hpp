// Batched greedy decoding with a KV cache, as HF's generate runs it for PaliGemma (spec §8.2,
// transformers 5.x position rules):
//   prefill   the whole prompt with pixel_values under the prompt mask (§6.3); stored positions
//             p0 = cumsum(mask) − 1 with pads at 0; the model sees p0 + 1 (1-based)
//   step      the new token alone; position = last p0 + 1 (+1); attends to every cached valid key
//             (causal + key padding, query_offset = cached length); the mask gains a column of 1s
//   choose    argmax of the last position's fp32 logits (first maximal index on ties)
//   stop      a row is finished after it emits eos; finished rows get pad_token_id; the loop ends
//             when every row is finished or after max_new_tokens
// Returns the sequences as HF does: the prompt ids followed by the new ids.
#pragma once

#include <chrono>
#include <vector>

#include "paligemma/paligemma.hpp"

namespace tq::paligemma {

// Wall-clock split of one greedy_generate call (each step reads its argmax back, so the device is
// synchronized at every boundary and the times are real).
struct GenerateStats {
  double prefill_s = 0, decode_s = 0;
  int64_t rows = 0, steps = 0;  // tokens generated = rows × steps (finished rows get pad)
};

struct GenerateOptions {
  int64_t max_new_tokens = 20;
  int64_t eos_token_id = 1;
  int64_t pad_token_id = 0;
  GenerateStats* stats = nullptr;  // filled when set
};

namespace generate_detail {

// (B, V) f32 logits on any device → the first maximal index per row (read back: B integers).
inline std::vector<int64_t> argmax_rows(const Tensor& logits) {
  return ops::reduce(ops::ReduceKind::argmax, logits, {1}, false, "argmax").to_vector<int64_t>();
}

}  // namespace generate_detail

// HF generate's stored positions for a prompt: cumsum(mask) − 1, pads at 0. (B, T) i64.
inline std::vector<int64_t> generation_positions(const std::vector<int64_t>& mask, int64_t B, int64_t T) {
  std::vector<int64_t> p(mask.size());
  for (int64_t b = 0; b < B; ++b) {
    int64_t c = 0;
    for (int64_t t = 0; t < T; ++t) {
      c += mask[size_t(b * T + t)] != 0;
      p[size_t(b * T + t)] = mask[size_t(b * T + t)] ? c - 1 : 0;
    }
  }
  return p;
}

inline std::vector<std::vector<int64_t>> greedy_generate(PaliGemmaForConditionalGeneration& m, const Batch& batch,
                                                         const GenerateOptions& opt) {
  NoGradGuard ng;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const int64_t B = batch.input_ids.size(0), T = batch.input_ids.size(1);
  std::vector<int64_t> ids = batch.input_ids.to_vector<int64_t>();
  std::vector<int64_t> mask = batch.attention_mask.defined() ? batch.attention_mask.to_vector<int64_t>()
                                                             : std::vector<int64_t>(size_t(B * T), 1);
  std::vector<int64_t> pos = generation_positions(mask, B, T);
  std::vector<std::vector<int64_t>> seqs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) seqs[size_t(b)].assign(ids.begin() + b * T, ids.begin() + (b + 1) * T);

  Batch prompt = batch;
  prompt.attention_mask = Tensor::from_vector(mask, {B, T});
  AttentionOptions pmask = m.prompt_mask(prompt);
  KVCache cache;
  cache.k.resize(size_t(m.text().num_hidden_layers));
  cache.v.resize(size_t(m.text().num_hidden_layers));
  std::vector<int64_t> p1(pos);
  for (auto& x : p1) x += 1;
  Tensor h = m.hidden_states(batch.input_ids, batch.pixel_values, Tensor::from_vector(p1, {B, T}), pmask, &cache);
  Tensor last = h.select(1, T - 1);  // (B, D)

  std::vector<int64_t> last_pos(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) last_pos[size_t(b)] = pos[size_t(b * T + T - 1)];
  std::vector<bool> finished(static_cast<size_t>(B), false);
  int64_t Tk = T;
  auto t1 = t0;
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    std::vector<int64_t> next = generate_detail::argmax_rows(m.lm_head(last));
    if (step == 0) t1 = clock::now();  // the prompt pass and its first token
    if (opt.stats) opt.stats->steps = step + 1;
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (finished[size_t(b)]) next[size_t(b)] = opt.pad_token_id;
      else if (next[size_t(b)] == opt.eos_token_id) finished[size_t(b)] = true;
      seqs[size_t(b)].push_back(next[size_t(b)]);
      all_done = all_done && finished[size_t(b)];
    }
    if (all_done || step + 1 == opt.max_new_tokens) break;
    // One decode step for the new token.
    std::vector<int64_t> new_mask;
    for (int64_t b = 0; b < B; ++b) {
      new_mask.insert(new_mask.end(), mask.begin() + b * Tk, mask.begin() + (b + 1) * Tk);
      new_mask.push_back(1);
      last_pos[size_t(b)] += 1;
    }
    mask.swap(new_mask);
    ++Tk;
    std::vector<int64_t> step_pos(last_pos);
    for (auto& x : step_pos) x += 1;
    AttentionOptions smask;
    smask.mask = AttentionMask::causal;
    smask.key_padding = m.on_device(Tensor::from_vector(mask, {B, Tk}));
    Tensor hs = m.hidden_states(Tensor::from_vector(next, {B, 1}), Tensor(), Tensor::from_vector(step_pos, {B, 1}),
                                smask, &cache);
    last = hs.select(1, 0);
  }
  ops::check_device_index_errors(m.device());
  if (opt.stats) {
    opt.stats->rows = B;
    opt.stats->prefill_s = std::chrono::duration<double>(t1 - t0).count();
    opt.stats->decode_s = std::chrono::duration<double>(clock::now() - t1).count();
  }
  return seqs;
}

}  // namespace tq::paligemma
