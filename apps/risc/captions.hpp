// Which caption a training sample uses. RISC rows carry up to five captions, some of which may be
// missing (null); missing ones are never chosen, and a row with none yields nullopt so that the
// caller can report and skip it. `random` is seeded per (seed, epoch, row), so the choice does not
// depend on thread timing or on the order rows are visited in.
#pragma once

#include <tq/core/error.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tq::risc {

enum class CaptionStrategy { Random, First, Longest, Concat };

inline CaptionStrategy parse_caption_strategy(const std::string& s) {
  if (s == "random") return CaptionStrategy::Random;
  if (s == "first") return CaptionStrategy::First;
  if (s == "longest") return CaptionStrategy::Longest;
  if (s == "concat") return CaptionStrategy::Concat;
  fail(str_cat("unknown caption strategy '", s, "' (random, first, longest, concat)"));
}

// splitmix64 finalizer: a well-mixed 64-bit hash of a 64-bit key.
inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// UTF-8 code points, so "longest" means the most characters, not the most bytes.
inline size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

inline std::optional<std::string> choose_caption(const std::vector<std::optional<std::string>>& caps,
                                                 CaptionStrategy strategy, uint64_t seed,
                                                 uint64_t epoch, int64_t row,
                                                 const std::string& concat_sep = " ") {
  std::vector<const std::string*> present;
  for (const auto& c : caps)
    if (c) present.push_back(&*c);
  if (present.empty()) return std::nullopt;
  switch (strategy) {
    case CaptionStrategy::First: return *present[0];
    case CaptionStrategy::Longest: {
      const std::string* best = present[0];
      for (const auto* c : present)
        if (utf8_length(*c) > utf8_length(*best)) best = c;
      return *best;
    }
    case CaptionStrategy::Concat: {
      std::string s = *present[0];
      for (size_t i = 1; i < present.size(); ++i) s += concat_sep + *present[i];
      return s;
    }
    case CaptionStrategy::Random: {
      uint64_t h = mix64(mix64(mix64(seed) ^ epoch) ^ static_cast<uint64_t>(row));
      // Multiply-shift maps the hash onto [0, n) without modulo bias worth noting for n <= 5.
      auto k = static_cast<size_t>((static_cast<unsigned __int128>(h) * present.size()) >> 64);
      return *present[k];
    }
  }
  return std::nullopt;
}

}  // namespace tq::risc
