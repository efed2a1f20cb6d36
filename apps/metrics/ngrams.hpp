// N-gram counting shared by BLEU and CIDEr, plus numpy's float64 summation (np.mean) so means
// match pycocoevalcap to the last bit. Tokens are interned to ids per scoring call; an n-gram of
// order 1..4 is a fixed-size key, and counts keep first-occurrence order (orders 1..4, positions
// left to right), which is Python's dict order and therefore pycocoevalcap's summation order.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace tq::metrics {

class TokenVocab {
 public:
  uint32_t id(const std::string& token) {
    auto [it, inserted] = ids_.try_emplace(token, static_cast<uint32_t>(ids_.size()));
    return it->second;
  }
  std::vector<uint32_t> ids(const std::vector<std::string>& tokens) {
    std::vector<uint32_t> out;
    out.reserve(tokens.size());
    for (const auto& t : tokens) out.push_back(id(t));
    return out;
  }

 private:
  std::unordered_map<std::string, uint32_t> ids_;
};

struct NgramKey {
  std::array<uint32_t, 4> id{};
  uint32_t n = 0;  // order, 1..4
  bool operator==(const NgramKey&) const = default;
};

struct NgramKeyHash {
  size_t operator()(const NgramKey& k) const {
    uint64_t h = 0x9E3779B97F4A7C15ull * (k.n + 1);
    for (uint32_t i = 0; i < k.n; ++i) h = (h ^ k.id[i]) * 0x100000001B3ull + (h >> 29);
    return static_cast<size_t>(h);
  }
};

// Counts of all 1..max_n-grams of one sentence in first-occurrence order.
struct NgramCounts {
  std::vector<NgramKey> keys;
  std::vector<int> counts;
  std::unordered_map<NgramKey, uint32_t, NgramKeyHash> index;

  int count(const NgramKey& k) const {
    auto it = index.find(k);
    return it == index.end() ? 0 : counts[it->second];
  }
};

inline NgramCounts count_ngrams(const std::vector<uint32_t>& words, int max_n = 4) {
  NgramCounts c;
  c.index.reserve(words.size() * max_n);
  for (int k = 1; k <= max_n; ++k) {
    for (size_t i = 0; i + k <= words.size(); ++i) {
      NgramKey key;
      key.n = static_cast<uint32_t>(k);
      for (int j = 0; j < k; ++j) key.id[j] = words[i + j];
      auto [it, inserted] = c.index.try_emplace(key, static_cast<uint32_t>(c.keys.size()));
      if (inserted) {
        c.keys.push_back(key);
        c.counts.push_back(1);
      } else {
        ++c.counts[it->second];
      }
    }
  }
  return c;
}

// numpy's pairwise summation of a contiguous float64 array (numpy/core/src/umath/loops_utils.h):
// 8 interleaved accumulators for blocks up to 128, recursive halving (at multiples of 8) above.
inline double numpy_pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double res = 0.0;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return numpy_pairwise_sum(a, n2) + numpy_pairwise_sum(a + n2, n - n2);
}

// np.mean(np.array(v)) for float64.
inline double numpy_mean(const std::vector<double>& v) {
  return numpy_pairwise_sum(v.data(), v.size()) / static_cast<double>(v.size());
}

}  // namespace tq::metrics
