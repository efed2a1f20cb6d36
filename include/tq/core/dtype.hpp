// Element types. bf16 and f16 are stored as their IEEE bit patterns; conversions from float round
// to nearest, ties to even (as torch and the GPU intrinsics do), and keep NaN a NaN.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "tq/core/error.hpp"

// Marks functions shared by host code and CUDA kernels (the CUDA backend calls the same formulas
// the CPU reference uses).
#ifndef TQ_HOST_DEVICE
#if defined(__CUDACC__)
#define TQ_HOST_DEVICE __host__ __device__
#else
#define TQ_HOST_DEVICE
#endif
#endif

namespace tq {

enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64, u8, boolean };

struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  static constexpr bf16 from_bits(uint16_t b) {
    bf16 v;
    v.bits = b;
    return v;
  }
  explicit bf16(float f) : bits(round(f)) {}
  explicit operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }
  static uint16_t round(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

struct f16 {
  uint16_t bits = 0;
  f16() = default;
  static constexpr f16 from_bits(uint16_t b) {
    f16 v;
    v.bits = b;
    return v;
  }
  explicit f16(float f) : bits(round(f)) {}
  explicit operator float() const { return to_float(bits); }

  static uint16_t round(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (incl. rounding) → inf
    if (a < 0x38800000u) {
      // Subnormal half (or zero): value = a_float / 2^-24, rounded to nearest even.
      float af = std::bit_cast<float>(a);
      float scaled = af * 16777216.0f;  // exact: multiplying by a power of two
      uint32_t q = uint32_t(std::nearbyint(scaled));
      return uint16_t(sign | q);
    }
    // Normal: rebias exponent 127 → 15 and round the 13 dropped mantissa bits to nearest even.
    uint32_t r = a - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return uint16_t(sign | (r >> 13));
  }
  static float to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
      float v = std::ldexp(float(man), -24);
      return sign ? -v : v;
    }
    if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
  }
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
    case DType::boolean: return 1;
  }
  fail("dtype_size: unknown dtype");
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::boolean: return "bool";
  }
  return "?";
}

inline std::ostream& operator<<(std::ostream& os, DType t) { return os << dtype_name(t); }

inline bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16;
}

// Result type of a binary arithmetic op: the wider float wins; bf16 with f16 meets at f32;
// any float beats any integer; among integers the wider one.
inline DType promote(DType a, DType b) {
  if (a == b) return a;
  auto rank = [](DType t) {
    switch (t) {
      case DType::boolean: return 0;
      case DType::u8: return 1;
      case DType::i32: return 2;
      case DType::i64: return 3;
      case DType::bf16: return 4;
      case DType::f16: return 4;
      case DType::f32: return 5;
      case DType::f64: return 6;
    }
    return 0;
  };
  if ((a == DType::bf16 && b == DType::f16) || (a == DType::f16 && b == DType::bf16)) return DType::f32;
  return rank(a) >= rank(b) ? a : b;
}

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };
template <> struct dtype_of<bool> { static constexpr DType value = DType::boolean; };
template <class T> inline constexpr DType dtype_v = dtype_of<T>::value;

// Converts any element type to and from double for generic host code.
template <class T> inline double to_double(T v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return double(float(v));
  else return double(v);
}
template <class T> inline T from_double(double v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return T(float(v));
  else if constexpr (std::is_same_v<T, bool>) return v != 0.0;
  else return T(v);
}

}  // namespace tq

// TQ_DISPATCH(dtype, T, ...): runs the body with `T` bound to the C++ type of `dtype`.
#define TQ_DISPATCH_CASE(DT, CT, T, ...) \
  case ::tq::DType::DT: {                \
    using T = CT;                        \
    __VA_ARGS__;                         \
    break;                               \
  }
#define TQ_DISPATCH(dtype, T, ...)                                   \
  switch (dtype) {                                                   \
    TQ_DISPATCH_CASE(f32, float, T, __VA_ARGS__)                     \
    TQ_DISPATCH_CASE(f64, double, T, __VA_ARGS__)                    \
    TQ_DISPATCH_CASE(bf16, ::tq::bf16, T, __VA_ARGS__)               \
    TQ_DISPATCH_CASE(f16, ::tq::f16, T, __VA_ARGS__)                 \
    TQ_DISPATCH_CASE(i32, int32_t, T, __VA_ARGS__)                   \
    TQ_DISPATCH_CASE(i64, int64_t, T, __VA_ARGS__)                   \
    TQ_DISPATCH_CASE(u8, uint8_t, T, __VA_ARGS__)                    \
    TQ_DISPATCH_CASE(boolean, bool, T, __VA_ARGS__)                  \
  }

// TQ_DISPATCH_FLOAT: f32 and f64 only (CPU compute types); TQ_DISPATCH_COMPUTE adds i64.
#define TQ_DISPATCH_FLOAT(dtype, T, ...)                                                   \
  switch (dtype) {                                                                         \
    TQ_DISPATCH_CASE(f32, float, T, __VA_ARGS__)                                           \
    TQ_DISPATCH_CASE(f64, double, T, __VA_ARGS__)                                          \
    default: ::tq::fail(::tq::str_cat("expected an f32 or f64 compute type, got ", dtype)); \
  }
#define TQ_DISPATCH_COMPUTE(dtype, T, ...)                                                        \
  switch (dtype) {                                                                                \
    TQ_DISPATCH_CASE(f32, float, T, __VA_ARGS__)                                                  \
    TQ_DISPATCH_CASE(f64, double, T, __VA_ARGS__)                                                 \
    TQ_DISPATCH_CASE(i64, int64_t, T, __VA_ARGS__)                                                \
    default: ::tq::fail(::tq::str_cat("expected an f32, f64 or i64 compute type, got ", dtype)); \
  }
