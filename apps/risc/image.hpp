// Image decode, resize and normalize as PaliGemma's (slow, PIL) SiglipImageProcessor does it
// (spec/paligemma.md 3.1): RGB uint8 -> PIL Image.resize(BICUBIC) -> x/255 (float64, then
// float32) -> (x - 0.5) / 0.5 -> CHW float32.
//
// The resize reproduces Pillow's Resample.c for 8-bit images bit for bit: separable passes
// (each skipped when that side keeps its size; order per Pillow version, below), a = -0.5 cubic
// kernel widened by the downscale factor, coefficients normalized in double then rounded to
// 22-bit fixed point, rounding-and-clipping to uint8 between the passes. Same size = copy, as
// Image.resize returns self.copy().
//
// Decoding: JPEG through libjpeg-turbo set up as PIL sets it up (risc/jpeg_decode.hpp), so JPEG
// pixels equal PIL's; PNG/BMP and, where TQ_HAVE_LIBJPEG is not defined, JPEG through stb_image
// (PNG exact; stb's JPEG IDCT/upsampling differ from libjpeg's by up to ~3 levels).
#pragma once

#include "risc/jpeg_decode.hpp"
#include "risc/stb_image_impl.hpp"

#include <tq/core/error.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tq::risc {

struct ImageU8 {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // (H, W, 3) row-major
};

// Decodes JPEG/PNG/BMP bytes to RGB. `where` names the row for the error message.
inline ImageU8 decode_image(std::string_view bytes, const std::string& where) {
  TQ_CHECK(bytes.size() <= INT32_MAX, where, ": image of ", bytes.size(), " bytes is too large");
#ifdef TQ_HAVE_LIBJPEG
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  if (jpeg::looks_like_jpeg(data, bytes.size())) {
    ImageU8 img;
    const std::string why = jpeg::decode_rgb(data, bytes.size(), img.width, img.height, img.rgb);
    if (!why.empty()) fail(str_cat(where, ": corrupt image (", why, ", ", bytes.size(), " bytes)"));
    return img;
  }
#endif
  int w = 0, h = 0, comp = 0;
  stbi_uc* px = stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()),
                                      static_cast<int>(bytes.size()), &w, &h, &comp, 3);
  if (!px) fail(str_cat(where, ": corrupt image (", stbi_failure_reason(), ", ", bytes.size(), " bytes)"));
  ImageU8 img;
  img.width = w;
  img.height = h;
  img.rgb.assign(px, px + static_cast<size_t>(w) * h * 3);
  stbi_image_free(px);
  return img;
}

// Width and height from the header only (no decode).
inline bool image_size(std::string_view bytes, int& w, int& h) {
  int comp = 0;
  return stbi_info_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()),
                               static_cast<int>(bytes.size()), &w, &h, &comp) != 0;
}

namespace detail {

constexpr int kPrecisionBits = 32 - 8 - 2;

inline double bicubic(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Per output pixel: first input index, tap count, and ksize fixed-point weights.
struct Coeffs {
  int ksize = 0;
  std::vector<int> xmin, count;
  std::vector<int32_t> k;
};

inline Coeffs precompute_coeffs(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.xmin.resize(out_size);
  c.count.resize(out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[x] / ww : w[x];
      c.k[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    c.xmin[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

}  // namespace detail

// Which pass Pillow runs first. The two orders round differently (uint8 between the passes), so
// for bit-exactness the version matters when one side grows and the other shrinks:
//  * Pillow <= 12.1 always runs horizontal first (what a 2025 Colab, i.e. the reference run, had);
//  * Pillow 12.2 runs vertical first for very tall images (height > 100 x width, height shrinks);
//  * Pillow 13 runs vertical first whenever the width does not shrink and the height does.
enum class PilResizeOrder { Pillow12_1, Pillow12_2, Pillow13 };

inline bool pil_vertical_first(int in_w, int in_h, int out_w, int out_h, PilResizeOrder order) {
  switch (order) {
    case PilResizeOrder::Pillow12_1: return false;
    case PilResizeOrder::Pillow12_2: return in_h > in_w * 100 && out_h < in_h;
    case PilResizeOrder::Pillow13: return out_w >= in_w && out_h < in_h;
  }
  return false;
}

namespace detail {

inline ImageU8 resample_horizontal(const ImageU8& in, int out_w) {
  const auto c = precompute_coeffs(in.width, out_w);
  ImageU8 out{out_w, in.height, std::vector<uint8_t>(static_cast<size_t>(out_w) * in.height * 3)};
  for (int y = 0; y < in.height; ++y) {
    const uint8_t* src = &in.rgb[static_cast<size_t>(y) * in.width * 3];
    uint8_t* dst = &out.rgb[static_cast<size_t>(y) * out_w * 3];
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &c.k[static_cast<size_t>(xx) * c.ksize];
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      const uint8_t* p = src + c.xmin[xx] * 3;
      for (int x = 0; x < c.count[xx]; ++x, p += 3) s0 += p[0] * k[x], s1 += p[1] * k[x], s2 += p[2] * k[x];
      dst[xx * 3] = clip8(s0), dst[xx * 3 + 1] = clip8(s1), dst[xx * 3 + 2] = clip8(s2);
    }
  }
  return out;
}

inline ImageU8 resample_vertical(const ImageU8& in, int out_h) {
  const auto c = precompute_coeffs(in.height, out_h);
  const size_t row = static_cast<size_t>(in.width) * 3;
  ImageU8 out{in.width, out_h, std::vector<uint8_t>(row * out_h)};
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &c.k[static_cast<size_t>(yy) * c.ksize];
    uint8_t* dst = &out.rgb[static_cast<size_t>(yy) * row];
    for (size_t i = 0; i < row; ++i) {
      int32_t s = 1 << (kPrecisionBits - 1);
      const uint8_t* p = &in.rgb[static_cast<size_t>(c.xmin[yy]) * row + i];
      for (int y = 0; y < c.count[yy]; ++y, p += row) s += *p * k[y];
      dst[i] = clip8(s);
    }
  }
  return out;
}

}  // namespace detail

// PIL Image.resize((out_w, out_h), Image.BICUBIC) on an RGB uint8 image; a pass is skipped when
// its side keeps its size, and equal sizes return a copy, as Pillow does.
inline ImageU8 resize_bicubic(const ImageU8& in, int out_w, int out_h,
                              PilResizeOrder order = PilResizeOrder::Pillow12_1) {
  TQ_CHECK(out_w > 0 && out_h > 0 && in.width > 0 && in.height > 0, "resize: bad sizes ", in.width,
           "x", in.height, " -> ", out_w, "x", out_h);
  const bool need_h = out_w != in.width, need_v = out_h != in.height;
  if (!need_h && !need_v) return in;
  if (!need_h) return detail::resample_vertical(in, out_h);
  if (!need_v) return detail::resample_horizontal(in, out_w);
  if (pil_vertical_first(in.width, in.height, out_w, out_h, order))
    return detail::resample_horizontal(detail::resample_vertical(in, out_h), out_w);
  return detail::resample_vertical(detail::resample_horizontal(in, out_w), out_h);
}

// u8 -> ((float32)(u8 * (1/255 in float64)) - 0.5f) / 0.5f, the processor's rescale + normalize.
inline const std::array<float, 256>& normalize_table() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> a{};
    for (int i = 0; i < 256; ++i) {
      float x = static_cast<float>(i * (1.0 / 255.0));
      a[i] = (x - 0.5f) / 0.5f;
    }
    return a;
  }();
  return t;
}

// RGB (H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1].
inline void normalize_to_chw(const ImageU8& img, float* out) {
  const auto& t = normalize_table();
  const size_t hw = static_cast<size_t>(img.width) * img.height;
  const uint8_t* p = img.rgb.data();
  for (size_t i = 0; i < hw; ++i, p += 3) {
    out[i] = t[p[0]];
    out[hw + i] = t[p[1]];
    out[2 * hw + i] = t[p[2]];
  }
}

// The whole processor path for one encoded image into a (3, size_h, size_w) float buffer.
inline void preprocess_image(std::string_view bytes, int out_w, int out_h, float* out,
                             const std::string& where,
                             PilResizeOrder order = PilResizeOrder::Pillow12_1) {
  ImageU8 img = decode_image(bytes, where);
  if (img.width != out_w || img.height != out_h) img = resize_bicubic(img, out_w, out_h, order);
  normalize_to_chw(img, out);
}

}  // namespace tq::risc
