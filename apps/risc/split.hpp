// The image-level split of the reference run, reproduced bit for bit: `Dataset.shuffle(seed)` is
// numpy's `default_rng(seed).permutation(n)` = SeedSequence -> PCG64 -> Fisher-Yates with masked
// rejection (spec/qlora.md section E). Only integer arithmetic (32-bit words, 128-bit state), so
// the result is the same on every machine. Train takes the head of the permutation, then val, then
// test, with test = int(n * test_size) and val = int(n * val_size) as the notebook computes them.
#pragma once

#include <tq/core/error.hpp>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace tq::risc {

using u128 = unsigned __int128;

// numpy's coercion of an int or a list of ints to entropy words: each integer split into 32-bit
// words, least significant first (0 -> [0]), concatenated.
inline std::vector<uint32_t> entropy_words(std::initializer_list<uint64_t> values) {
  std::vector<uint32_t> words;
  for (uint64_t v : values) {
    do {
      words.push_back(static_cast<uint32_t>(v));
      v >>= 32;
    } while (v != 0);
  }
  return words;
}

// numpy.random.SeedSequence for a non-negative integer entropy, no spawn key, pool size 4.
class SeedSequence {
 public:
  explicit SeedSequence(uint64_t entropy) : SeedSequence(entropy_words({entropy})) {}

  // Entropy already as numpy's uint32 words (see entropy_words).
  explicit SeedSequence(const std::vector<uint32_t>& words) {
    uint32_t h = kInitA;
    auto hashmix = [&h](uint32_t v) {
      v ^= h;
      h *= kMultA;
      v *= h;
      v ^= v >> 16;
      return v;
    };
    auto mix = [](uint32_t x, uint32_t y) {
      uint32_t r = kMixMultL * x - kMixMultR * y;
      return r ^ (r >> 16);
    };
    for (size_t i = 0; i < 4; ++i) pool_[i] = hashmix(i < words.size() ? words[i] : 0u);
    for (size_t src = 0; src < 4; ++src)
      for (size_t dst = 0; dst < 4; ++dst)
        if (src != dst) pool_[dst] = mix(pool_[dst], hashmix(pool_[src]));
    for (size_t i = 4; i < words.size(); ++i)
      for (size_t dst = 0; dst < 4; ++dst) pool_[dst] = mix(pool_[dst], hashmix(words[i]));
  }

  const std::array<uint32_t, 4>& pool() const { return pool_; }

  std::vector<uint32_t> generate_state_u32(size_t n) const {
    std::vector<uint32_t> out(n);
    uint32_t h = kInitB;
    for (size_t k = 0; k < n; ++k) {
      uint32_t d = pool_[k % 4];
      d ^= h;
      h *= kMultB;
      d *= h;
      d ^= d >> 16;
      out[k] = d;
    }
    return out;
  }

  // uint64 words pair two uint32 words little-endian, as numpy's view does.
  std::vector<uint64_t> generate_state_u64(size_t n) const {
    std::vector<uint32_t> w = generate_state_u32(2 * n);
    std::vector<uint64_t> out(n);
    for (size_t j = 0; j < n; ++j) out[j] = uint64_t{w[2 * j]} | (uint64_t{w[2 * j + 1]} << 32);
    return out;
  }

 private:
  static constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875;
  static constexpr uint32_t kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
  static constexpr uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
  std::array<uint32_t, 4> pool_{};
};

// numpy's PCG64 (XSL-RR 128/64) with its buffered 32-bit output.
class Pcg64 {
 public:
  explicit Pcg64(const SeedSequence& seq) {
    std::vector<uint64_t> u = seq.generate_state_u64(4);
    u128 initstate = (u128{u[0]} << 64) | u[1];
    u128 initseq = (u128{u[2]} << 64) | u[3];
    inc_ = (initseq << 1) | 1;
    state_ = 0;
    step();
    state_ += initstate;
    step();
  }
  explicit Pcg64(uint64_t seed) : Pcg64(SeedSequence(seed)) {}

  u128 state() const { return state_; }
  u128 inc() const { return inc_; }

  uint64_t next64() {
    step();
    uint64_t x = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
  }

  uint32_t next32() {
    if (has_half_) {
      has_half_ = false;
      return half_;
    }
    uint64_t r = next64();
    half_ = static_cast<uint32_t>(r >> 32);
    has_half_ = true;
    return static_cast<uint32_t>(r);
  }

  // Generator.random(): 53 random bits scaled to [0, 1).
  double next_double() { return static_cast<double>(next64() >> 11) * (1.0 / 9007199254740992.0); }

  // numpy's random_interval: masked rejection sampling of [0, max].
  uint64_t random_interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    for (unsigned s : {1u, 2u, 4u, 8u, 16u, 32u}) mask |= mask >> s;
    uint64_t v;
    if (max <= 0xFFFFFFFFull) {
      while ((v = (next32() & mask)) > max) {
      }
    } else {
      while ((v = (next64() & mask)) > max) {
      }
    }
    return v;
  }

 private:
  void step() {
    constexpr u128 kMult = (u128{0x2360ED051FC65DA4ull} << 64) | 0x4385DF649FCCF645ull;
    state_ = state_ * kMult + inc_;
  }
  u128 state_ = 0, inc_ = 0;
  bool has_half_ = false;
  uint32_t half_ = 0;
};

// numpy: default_rng(seed).permutation(n).
inline std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  TQ_CHECK(n >= 0, "permutation: n must be >= 0, got ", n);
  std::vector<int64_t> arr(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) arr[static_cast<size_t>(i)] = i;
  Pcg64 rng(seed);
  for (int64_t i = n - 1; i >= 1; --i) {
    uint64_t j = rng.random_interval(static_cast<uint64_t>(i));
    std::swap(arr[static_cast<size_t>(i)], arr[j]);
  }
  return arr;
}

struct Split {
  std::vector<int64_t> train, val, test;
};

// Sizes as the notebook computes them: int() truncation of n * ratio, train gets the rest.
inline Split make_split(int64_t n, uint64_t seed, double test_size = 0.10, double val_size = 0.05) {
  TQ_CHECK(test_size >= 0 && val_size >= 0 && test_size + val_size <= 1.0,
           "split: need 0 <= test-size, val-size and test-size + val-size <= 1 (got ", test_size, ", ",
           val_size, ")");
  const auto n_test = static_cast<int64_t>(static_cast<double>(n) * test_size);
  const auto n_val = static_cast<int64_t>(static_cast<double>(n) * val_size);
  const int64_t n_train = n - n_test - n_val;
  TQ_CHECK(n_train >= 0, "split: test + val (", n_test, " + ", n_val, ") exceed n = ", n);
  std::vector<int64_t> perm = permutation(n, seed);
  Split s;
  s.train.assign(perm.begin(), perm.begin() + n_train);
  s.val.assign(perm.begin() + n_train, perm.begin() + n_train + n_val);
  s.test.assign(perm.begin() + n_train + n_val, perm.end());
  return s;
}

}  // namespace tq::risc
