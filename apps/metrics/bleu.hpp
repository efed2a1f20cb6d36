// BLEU-1..4 as pycocoevalcap computes it (bleu/bleu_scorer.py, option "closest"):
// - per item: clipped n-gram matches against the max count over references, guesses
//   max(0, len-k+1), a running product of (correct+1e-15)/(guess+1e-9), k-th root, and the brevity
//   penalty exp(1-1/ratio) against the closest reference length (ties go to the shorter);
// - corpus: the same formula on counts summed over items (not a mean of item scores).
// Tokens come from Python's str.split(); case and punctuation are kept as written.
#pragma once

#include "metrics/ngrams.hpp"

#include <array>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace tq::metrics {

struct BleuCounts {
  int testlen = 0;
  int reflen = 0;  // closest reference length
  std::array<long, 4> guess{};
  std::array<long, 4> correct{};
};

struct BleuResult {
  std::array<double, 4> corpus{};
  std::vector<std::array<double, 4>> per_item;
};

// `hyp` and `refs` are token ids of one item.
inline BleuCounts bleu_counts(const std::vector<uint32_t>& hyp, const std::vector<std::vector<uint32_t>>& refs) {
  BleuCounts c;
  c.testlen = static_cast<int>(hyp.size());
  // Closest reference length: minimum of (|L - testlen|, L) pairs.
  int best_diff = -1;
  for (const auto& r : refs) {
    const int L = static_cast<int>(r.size());
    const int d = std::abs(L - c.testlen);
    if (best_diff < 0 || d < best_diff || (d == best_diff && L < c.reflen)) {
      best_diff = d;
      c.reflen = L;
    }
  }
  std::unordered_map<NgramKey, int, NgramKeyHash> maxref;
  for (const auto& r : refs) {
    const NgramCounts rc = count_ngrams(r);
    for (size_t i = 0; i < rc.keys.size(); ++i) {
      int& m = maxref[rc.keys[i]];
      if (rc.counts[i] > m) m = rc.counts[i];
    }
  }
  const NgramCounts hc = count_ngrams(hyp);
  for (size_t i = 0; i < hc.keys.size(); ++i) {
    auto it = maxref.find(hc.keys[i]);
    const int m = it == maxref.end() ? 0 : it->second;
    c.correct[hc.keys[i].n - 1] += std::min(m, hc.counts[i]);
  }
  for (int k = 0; k < 4; ++k) c.guess[k] = std::max(0, c.testlen - k);
  return c;
}

inline std::array<double, 4> bleu_from_counts(double testlen, double reflen, const std::array<long, 4>& correct,
                                              const std::array<long, 4>& guess) {
  constexpr double tiny = 1e-15, small = 1e-9;
  std::array<double, 4> out{};
  double prod = 1.0;
  for (int k = 0; k < 4; ++k) {
    prod *= (static_cast<double>(correct[k]) + tiny) / (static_cast<double>(guess[k]) + small);
    out[k] = std::pow(prod, 1.0 / (k + 1));
  }
  const double ratio = (testlen + tiny) / (reflen + small);
  if (ratio < 1) {
    for (int k = 0; k < 4; ++k) out[k] *= std::exp(1 - 1 / ratio);
  }
  return out;
}

inline BleuResult bleu_score(const std::vector<BleuCounts>& items) {
  BleuResult res;
  res.per_item.reserve(items.size());
  long testlen = 0, reflen = 0;
  std::array<long, 4> correct{}, guess{};
  for (const auto& c : items) {
    testlen += c.testlen;
    reflen += c.reflen;
    for (int k = 0; k < 4; ++k) {
      correct[k] += c.correct[k];
      guess[k] += c.guess[k];
    }
    res.per_item.push_back(bleu_from_counts(c.testlen, c.reflen, c.correct, c.guess));
  }
  res.corpus = bleu_from_counts(static_cast<double>(testlen), static_cast<double>(reflen), correct, guess);
  return res;
}

}  // namespace tq::metrics
