// CIDEr-D as pycocoevalcap computes it (cider/cider_scorer.py, n = 4, sigma = 6):
// tf-idf n-gram vectors with df counted over the reference sets of the evaluated items (hypotheses
// never count), idf ln(N) - ln(max(1, df)), the hypothesis weight clipped by the reference weight,
// a Gaussian penalty on the bigram-count difference, mean over orders, / #refs, x 10.
// Sums run in Python dict order (first occurrence), so results match to the last bits.
#pragma once

#include "metrics/ngrams.hpp"

#include <cmath>
#include <numbers>
#include <unordered_map>
#include <vector>

namespace tq::metrics {

struct CiderItem {
  NgramCounts hyp;
  std::vector<NgramCounts> refs;
};

struct CiderVec {
  std::vector<double> w;  // weight per n-gram, aligned with NgramCounts::keys
  std::array<double, 4> norm{};
  long length = 0;  // number of bigrams (the reference code's "length")
};

// Returns per-item CIDEr-D scores.
inline std::vector<double> cider_scores(const std::vector<CiderItem>& items, double sigma = 6.0) {
  std::unordered_map<NgramKey, double, NgramKeyHash> df;
  for (const auto& it : items) {
    std::unordered_map<NgramKey, char, NgramKeyHash> seen;
    for (const auto& r : it.refs)
      for (const auto& k : r.keys)
        if (seen.try_emplace(k, 1).second) df[k] += 1.0;
  }
  const double ref_len = std::log(static_cast<double>(items.size()));
  auto vec = [&](const NgramCounts& c) {
    CiderVec v;
    v.w.resize(c.keys.size());
    for (size_t i = 0; i < c.keys.size(); ++i) {
      auto it = df.find(c.keys[i]);
      const double d = std::log(std::max(1.0, it == df.end() ? 0.0 : it->second));
      const int n = c.keys[i].n - 1;
      v.w[i] = static_cast<double>(c.counts[i]) * (ref_len - d);
      v.norm[n] += std::pow(v.w[i], 2);
      if (n == 1) v.length += c.counts[i];
    }
    for (auto& x : v.norm) x = std::sqrt(x);
    return v;
  };
  std::vector<double> scores;
  scores.reserve(items.size());
  for (const auto& it : items) {
    const CiderVec h = vec(it.hyp);
    std::array<double, 4> score{};
    for (const auto& rc : it.refs) {
      const CiderVec r = vec(rc);
      const double delta = static_cast<double>(h.length - r.length);
      std::array<double, 4> val{};
      for (size_t i = 0; i < it.hyp.keys.size(); ++i) {
        auto f = rc.index.find(it.hyp.keys[i]);
        const double wr = f == rc.index.end() ? 0.0 : r.w[f->second];
        val[it.hyp.keys[i].n - 1] += std::min(h.w[i], wr) * wr;
      }
      for (int n = 0; n < 4; ++n) {
        if (h.norm[n] != 0 && r.norm[n] != 0) val[n] /= (h.norm[n] * r.norm[n]);
        val[n] *= std::pow(std::numbers::e, -(delta * delta) / (2 * sigma * sigma));
        score[n] += val[n];
      }
    }
    double avg = numpy_pairwise_sum(score.data(), 4) / 4.0;
    avg /= static_cast<double>(it.refs.size());
    avg *= 10.0;
    scores.push_back(avg);
  }
  return scores;
}

}  // namespace tq::metrics
