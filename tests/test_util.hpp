// Shared helpers for tq's tests: fresh random inputs (never zeros) and float64 comparisons.
#pragma once

#include <gtest/gtest.h>
#include <tq/tq.hpp>

#include <functional>
#include <random>
#include <string>
#include <vector>

namespace tq::test {

// A fresh seed per call (printed by the caller on failure through SCOPED_TRACE).
inline uint64_t fresh_seed() {
  static std::random_device rd;
  return (uint64_t(rd()) << 32) | rd();
}

// A per-binary engine seeded fresh each run (for ids, shapes and other integer choices).
inline std::mt19937_64& rng() {
  static std::mt19937_64 r(fresh_seed());
  return r;
}

// Random tensor in [lo, hi) of the given dtype; a new draw every call.
inline Tensor random(const Shape& shape, DType dtype = DType::f64, double lo = -1.0, double hi = 1.0) {
  static Generator gen(fresh_seed());
  return rand(shape, gen, dtype, lo, hi);
}

// Random shape of `ndim` dims with sizes in [1, max] (size-1 dims are common on purpose).
inline Shape random_shape(int ndim, int64_t max = 5) {
  static std::mt19937_64 rng(fresh_seed());
  Shape s;
  for (int i = 0; i < ndim; ++i) s.push_back(1 + int64_t(rng() % uint64_t(max)));
  return s;
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    double d = std::abs(a[i] - b[i]);
    if (d != d) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

// Every element of `t` equals `ref` within atol + rtol·|ref|.
inline ::testing::AssertionResult all_close(const Tensor& t, const std::vector<double>& ref, double atol = 1e-10,
                                            double rtol = 1e-10) {
  std::vector<double> v = t.to_vector<double>();
  if (v.size() != ref.size()) return ::testing::AssertionFailure() << "size " << v.size() << " vs " << ref.size();
  for (size_t i = 0; i < v.size(); ++i) {
    double err = std::abs(v[i] - ref[i]);
    if (!(err <= atol + rtol * std::abs(ref[i])))
      return ::testing::AssertionFailure() << "element " << i << ": got " << v[i] << ", expected " << ref[i];
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult grad_ok(const GradcheckResult& r) {
  if (r.ok) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "gradcheck failed: " << r.first_failure << " (max abs error " << r.max_abs_error
                                       << ")";
}

// f() throws a tq::Error whose message contains every one of `parts`.
inline ::testing::AssertionResult throws_with(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const tq::Error& e) {
    const std::string m = e.what();
    for (const std::string& p : parts)
      if (m.find(p) == std::string::npos) return ::testing::AssertionFailure() << "message lacks '" << p << "': " << m;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no tq::Error thrown";
}

// A LoRA merge in float64 from host vectors (W: out×in, A: r×in, B: out×r, mag: out or empty):
// merged = W + s·B·A, DoRA: row o times m_o / ‖W_o + s·(B·A)_o‖; and per element the magnitude of
// the terms a float merge rounds, (|W| + s·Σ_k |B·A|) times DoRA's row factor (where W and s·B·A
// nearly cancel, the rounding error is a few ulps of this, not of the result).
struct LoraMergeRef {
  std::vector<double> merged, terms;
};
inline LoraMergeRef lora_merge_f64(const std::vector<double>& W, const std::vector<double>& A,
                                   const std::vector<double>& B, const std::vector<double>& mag, int64_t in,
                                   int64_t out, int64_t r, double s, bool dora) {
  LoraMergeRef ref{W, std::vector<double>(W.size())};
  for (int64_t o = 0; o < out; ++o) {
    double norm = 0;
    for (int64_t i = 0; i < in; ++i) {
      const size_t e = size_t(o * in + i);
      double ba = 0, t = 0;
      for (int64_t k = 0; k < r; ++k) {
        ba += B[size_t(o * r + k)] * A[size_t(k * in + i)];
        t += std::abs(B[size_t(o * r + k)] * A[size_t(k * in + i)]);
      }
      ref.merged[e] += s * ba;
      ref.terms[e] = std::abs(W[e]) + s * t;
      norm += ref.merged[e] * ref.merged[e];
    }
    if (!dora) continue;
    const double f = mag[size_t(o)] / std::sqrt(norm);
    for (int64_t i = 0; i < in; ++i) {
      ref.merged[size_t(o * in + i)] *= f;
      ref.terms[size_t(o * in + i)] *= std::abs(f);
    }
  }
  return ref;
}

}  // namespace tq::test
