// The caption scorer: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D over a list of items
// {refs, pred}, with pycocoevalcap's numbers. Tokenization::raw is the RISC notebook's call
// pattern (raw strings, each scorer splits its own way); Tokenization::ptb is the COCO protocol
// (PTBTokenizer on refs and preds first). METEOR is absent (nullopt) when no data was given: it is
// reported as unavailable, never replaced by a different number.
#pragma once

#include "metrics/bleu.hpp"
#include "metrics/cider.hpp"
#include "metrics/meteor.hpp"
#include "metrics/ngrams.hpp"
#include "metrics/ptb_tokenizer.hpp"
#include "metrics/rouge.hpp"
#include "metrics/text.hpp"

#include <tq/core/error.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace tq::metrics {

struct CaptionItem {
  std::vector<std::string> refs;
  std::string pred;
};

enum class Tokenization { raw, ptb };

struct ItemScores {
  std::array<double, 4> bleu{};
  std::optional<double> meteor;
  double rouge_l = 0;
  double cider = 0;
};

struct CaptionScores {
  std::array<double, 4> bleu{};
  std::optional<double> meteor;
  double rouge_l = 0;
  double cider = 0;
  std::vector<ItemScores> per_item;
};

// Checks what every scorer asserts in pycocoevalcap, plus valid UTF-8 (Python would reject it).
inline void validate_items(const std::vector<CaptionItem>& items, const std::string& where = "input") {
  TQ_CHECK(!items.empty(), where, ": the item list is empty");
  for (size_t i = 0; i < items.size(); ++i) {
    TQ_CHECK(!items[i].refs.empty(), where, ": item ", i, ": \"refs\" is empty");
    for (size_t r = 0; r < items[i].refs.size(); ++r) {
      const size_t bad = find_invalid_utf8(items[i].refs[r]);
      TQ_CHECK(bad == std::string::npos, where, ": item ", i, ": refs[", r, "] is not valid UTF-8 (byte ", bad, ")");
    }
    const size_t bad = find_invalid_utf8(items[i].pred);
    TQ_CHECK(bad == std::string::npos, where, ": item ", i, ": \"pred\" is not valid UTF-8 (byte ", bad, ")");
  }
}

inline std::vector<CaptionItem> ptb_tokenize_items(const std::vector<CaptionItem>& items) {
  std::vector<CaptionItem> out(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    for (const auto& r : items[i].refs) out[i].refs.push_back(ptb_tokenize(r));
    out[i].pred = ptb_tokenize(items[i].pred);
  }
  return out;
}

// Scores `items`; `meteor` may be null (METEOR unavailable).
inline CaptionScores score_captions(const std::vector<CaptionItem>& input, Tokenization tok,
                                    const MeteorData* meteor = nullptr) {
  validate_items(input);
  const std::vector<CaptionItem> items = tok == Tokenization::ptb ? ptb_tokenize_items(input) : input;
  const size_t n = items.size();
  CaptionScores out;
  out.per_item.resize(n);

  TokenVocab vocab;  // split() tokens (BLEU, CIDEr) and split(" ") tokens (ROUGE-L) share ids
  std::vector<BleuCounts> bleu(n);
  std::vector<CiderItem> cider(n);
  std::vector<double> rouge(n), cider_scores_v;
  for (size_t i = 0; i < n; ++i) {
    const auto hyp = vocab.ids(python_split(items[i].pred));
    std::vector<std::vector<uint32_t>> refs;
    for (const auto& r : items[i].refs) refs.push_back(vocab.ids(python_split(r)));
    bleu[i] = bleu_counts(hyp, refs);
    cider[i].hyp = count_ngrams(hyp);
    for (const auto& r : refs) cider[i].refs.push_back(count_ngrams(r));
    std::vector<std::vector<uint32_t>> rrefs;
    for (const auto& r : items[i].refs) rrefs.push_back(vocab.ids(split_single_space(r)));
    rouge[i] = rouge_l_item(vocab.ids(split_single_space(items[i].pred)), rrefs);
  }
  const BleuResult b = bleu_score(bleu);
  cider_scores_v = cider_scores(cider);
  out.bleu = b.corpus;
  out.rouge_l = numpy_mean(rouge);
  out.cider = numpy_mean(cider_scores_v);
  for (size_t i = 0; i < n; ++i) {
    out.per_item[i].bleu = b.per_item[i];
    out.per_item[i].rouge_l = rouge[i];
    out.per_item[i].cider = cider_scores_v[i];
  }
  if (meteor) {
    MeteorScorer ms(*meteor);
    std::vector<MeteorStats> stats;
    stats.reserve(n);
    for (const auto& it : items) stats.push_back(ms.item_stats(it.refs, it.pred));
    const MeteorResult m = meteor_corpus(stats);
    out.meteor = m.corpus;
    for (size_t i = 0; i < n; ++i) out.per_item[i].meteor = m.per_item[i];
  }
  return out;
}

// Parses {"items":[{"refs":[...], "pred":"..."}, ...]} (other keys are ignored). Errors name the
// file, the item index and the field.
inline std::vector<CaptionItem> parse_score_input(const std::string& text, const std::string& where) {
  const size_t bad = find_invalid_utf8(text);
  TQ_CHECK(bad == std::string::npos, where, ": not valid UTF-8 (byte ", bad, ")");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(str_cat(where, ": malformed JSON: ", e.what()));
  }
  TQ_CHECK(j.is_object() && j.contains("items"), where, ": expected an object with an \"items\" list");
  const auto& arr = j["items"];
  TQ_CHECK(arr.is_array(), where, ": \"items\" must be a list");
  std::vector<CaptionItem> items;
  items.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const auto& it = arr[i];
    TQ_CHECK(it.is_object(), where, ": item ", i, ": expected an object");
    TQ_CHECK(it.contains("refs"), where, ": item ", i, ": missing \"refs\"");
    TQ_CHECK(it["refs"].is_array(), where, ": item ", i, ": \"refs\" must be a list of strings");
    TQ_CHECK(it.contains("pred") && it["pred"].is_string(), where, ": item ", i, ": missing or non-string \"pred\"");
    CaptionItem c;
    for (size_t r = 0; r < it["refs"].size(); ++r) {
      TQ_CHECK(it["refs"][r].is_string(), where, ": item ", i, ": refs[", r, "] is not a string");
      c.refs.push_back(it["refs"][r].get<std::string>());
    }
    c.pred = it["pred"].get<std::string>();
    items.push_back(std::move(c));
  }
  validate_items(items, where);
  return items;
}

inline std::vector<CaptionItem> read_score_input(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  TQ_CHECK(in, "cannot open ", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_score_input(ss.str(), path.string());
}

inline nlohmann::ordered_json scores_json(const std::array<double, 4>& bleu, const std::optional<double>& meteor,
                                          double rouge, double cider) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  out["BLEU-1"] = bleu[0];
  out["BLEU-2"] = bleu[1];
  out["BLEU-3"] = bleu[2];
  out["BLEU-4"] = bleu[3];
  out["METEOR"] = meteor ? nlohmann::ordered_json(*meteor) : nlohmann::ordered_json(nullptr);
  out["ROUGE-L"] = rouge;
  out["CIDEr"] = cider;
  return out;
}

// {"BLEU-1":..,...,"CIDEr":..} plus "per_item" (input order) when asked.
inline nlohmann::ordered_json scores_json(const CaptionScores& s, bool per_item) {
  nlohmann::ordered_json out = scores_json(s.bleu, s.meteor, s.rouge_l, s.cider);
  if (per_item) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const auto& it : s.per_item) list.push_back(scores_json(it.bleu, it.meteor, it.rouge_l, it.cider));
    out["per_item"] = std::move(list);
  }
  return out;
}

}  // namespace tq::metrics
