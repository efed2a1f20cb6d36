// Test-local helpers for the NF4 fixtures: a minimal safetensors reader (until tq/io lands), the
// splitmix64 input generator shared with tools/fixtures/nf4_fixtures.py, and FNV-1a-64 checksums.
#pragma once

#include <nlohmann/json.hpp>
#include <tq/tq.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>

namespace tq::test {

struct SafetensorsFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

inline SafetensorsFile read_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TQ_CHECK(f.good(), "cannot open ", path);
  uint64_t hlen = 0;
  f.read(reinterpret_cast<char*>(&hlen), 8);
  std::string header(hlen, '\0');
  f.read(header.data(), std::streamsize(hlen));
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto j = nlohmann::json::parse(header);
  SafetensorsFile out;
  static const std::map<std::string, DType> dts = {
      {"F32", DType::f32}, {"F16", DType::f16}, {"BF16", DType::bf16}, {"U8", DType::u8}, {"I64", DType::i64}};
  for (auto& [k, v] : j.items()) {
    if (k == "__metadata__") {
      for (auto& [mk, mv] : v.items()) out.metadata[mk] = mv.get<std::string>();
      continue;
    }
    Shape shape = v["shape"].get<std::vector<int64_t>>();
    auto off = v["data_offsets"].get<std::vector<size_t>>();
    Tensor t = Tensor::empty(shape, dts.at(v["dtype"].get<std::string>()));
    TQ_CHECK(off[1] - off[0] == t.nbytes(), path, ": size mismatch for ", k);
    if (t.nbytes()) std::memcpy(t.data_ptr(), data.data() + off[0], t.nbytes());
    out.tensors[k] = t;
  }
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
