// ROUGE-L as pycocoevalcap computes it (rouge/rouge.py): tokens from Python's str.split(" ")
// (single spaces; empty tokens kept), plain LCS, precision and recall maximized independently over
// the references, F with beta = 1.2; the corpus value is np.mean of the item scores.
#pragma once

#include "metrics/ngrams.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tq::metrics {

inline int lcs_length(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  std::vector<int> prev(b.size() + 1, 0), cur(b.size() + 1, 0);
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = a[i - 1] == b[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// `cand` and `refs` are ids of str.split(" ") tokens (never empty lists).
inline double rouge_l_item(const std::vector<uint32_t>& cand, const std::vector<std::vector<uint32_t>>& refs) {
  const double beta2 = std::pow(1.2, 2.0);
  double prec_max = 0, rec_max = 0;
  for (const auto& r : refs) {
    const int lcs = lcs_length(r, cand);
    prec_max = std::max(prec_max, lcs / static_cast<double>(cand.size()));
    rec_max = std::max(rec_max, lcs / static_cast<double>(r.size()));
  }
  if (prec_max != 0 && rec_max != 0) return ((1 + beta2) * prec_max * rec_max) / (rec_max + beta2 * prec_max);
  return 0.0;
}

}  // namespace tq::metrics
