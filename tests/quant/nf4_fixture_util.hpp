// Test-local helpers for the NF4 fixtures: fixture files as maps (read with tq/io), the
// splitmix64 input generator shared with tools/fixtures/nf4_fixtures.py, and FNV-1a-64 checksums.
#pragma once

#include <tq/tq.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>

namespace tq::test {

// A fixture file's tensors (read by tq's own reader) and metadata, as plain maps.
struct FixtureFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

inline FixtureFile read_safetensors(const std::string& path) {
  auto f = tq::SafetensorsFile::open(path);
  FixtureFile out;
  for (const auto& k : f.keys()) out.tensors[k] = f.get(k).clone();
  out.metadata = f.metadata();
  return out;
}

inline std::string fixture_path(const std::string& name) { return std::string(TQ_FIXTURES) + "/nf4/" + name; }

// Counter-based splitmix64 and the fixture's value generator (see nf4_fixtures.py gen_values).
inline uint64_t splitmix64(uint64_t seed, uint64_t idx) {
  uint64_t z = seed + (idx + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline std::vector<float> gen_values(uint64_t seed, int64_t n, double scale) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double u[4];
    for (int k = 0; k < 4; ++k) u[k] = double(splitmix64(seed, 4 * uint64_t(i) + uint64_t(k)) >> 11) * 0x1p-53;
    double x = (((u[0] + u[1]) + u[2]) + u[3] - 2.0) * scale;
    if (i % 61 == 0) x *= 5.0;
    v[size_t(i)] = float(x);
  }
  return v;
}

inline std::string fnv1a64(const void* p, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001B3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}
inline std::string fnv1a64(const Tensor& t) {
  Tensor c = t.contiguous();
  return fnv1a64(c.data_ptr(), c.nbytes());
}

// Byte-level equality of two tensors (dtype, shape and bits).
inline ::testing::AssertionResult same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape())
    return ::testing::AssertionFailure() << describe(a) << " vs " << describe(b);
  Tensor ca = a.contiguous(), cb = b.contiguous();
  const auto* pa = static_cast<const uint8_t*>(ca.data_ptr());
  const auto* pb = static_cast<const uint8_t*>(cb.data_ptr());
  const size_t es = dtype_size(a.dtype());
  for (size_t i = 0; i < ca.nbytes(); ++i)
    if (pa[i] != pb[i]) return ::testing::AssertionFailure() << "element " << i / es << " differs (" << describe(a) << ")";
  return ::testing::AssertionSuccess();
}

}  // namespace tq::test
