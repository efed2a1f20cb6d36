// Raster figures without a plotting library: an RGB canvas, images pasted in, UTF-8 text drawn with
// stb_truetype (DejaVu Sans from fonts-dejavu-core) and word-wrapped, saved with stb_image_write.
// Both stb headers are compiled with internal linkage (STBTT_STATIC / STB_IMAGE_WRITE_STATIC), so
// every translation unit that includes this gets a private copy and no duplicate symbols.
#pragma once

#ifndef STB_TRUETYPE_IMPLEMENTATION
#define STBTT_STATIC
#define STB_TRUETYPE_IMPLEMENTATION
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#endif
#include <stb/stb_truetype.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#undef STB_TRUETYPE_IMPLEMENTATION
#endif

#ifndef STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include <stb/stb_image_write.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#undef STB_IMAGE_WRITE_IMPLEMENTATION
#endif

#include <tq/core/error.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace tq::figures {

using Rgb = std::array<uint8_t, 3>;

struct Canvas {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // (H, W, 3) row-major

  Canvas(int w, int h, Rgb fill = {255, 255, 255}) : width(w), height(h), rgb(size_t(w) * size_t(h) * 3) {
    for (size_t i = 0; i < rgb.size(); i += 3) std::copy(fill.begin(), fill.end(), rgb.begin() + long(i));
  }

  void blend(int x, int y, Rgb c, int alpha) {  // alpha 0..255
    if (x < 0 || y < 0 || x >= width || y >= height) return;
    uint8_t* p = &rgb[(size_t(y) * size_t(width) + size_t(x)) * 3];
    for (int k = 0; k < 3; ++k) p[k] = uint8_t((p[k] * (255 - alpha) + c[size_t(k)] * alpha + 127) / 255);
  }

  void fill_rect(int x0, int y0, int w, int h, Rgb c) {
    for (int y = y0; y < y0 + h; ++y)
      for (int x = x0; x < x0 + w; ++x) blend(x, y, c, 255);
  }

  // Pastes an (ih, iw, 3) image scaled to (w, h) by nearest neighbour (thumbnails only).
  void paste(const uint8_t* img, int iw, int ih, int x0, int y0, int w, int h) {
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const int sx = std::min(iw - 1, x * iw / w), sy = std::min(ih - 1, y * ih / h);
        const uint8_t* s = img + (size_t(sy) * size_t(iw) + size_t(sx)) * 3;
        blend(x0 + x, y0 + y, {s[0], s[1], s[2]}, 255);
      }
  }

  void write_png(const std::filesystem::path& path) const {
    TQ_CHECK(stbi_write_png(path.string().c_str(), width, height, 3, rgb.data(), width * 3) != 0, "cannot write ",
             path.string());
  }
};

// Decodes one UTF-8 code point at s[i], advancing i; invalid bytes become U+FFFD.
inline uint32_t next_code_point(const std::string& s, size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + size_t(len) > s.size()) {
    ++i;
    return 0xFFFD;
  }
  uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + size_t(k)]) & 0x3Fu);
  i += size_t(len);
  return cp;
}

class Font {
 public:
  // The first of $TQ_FONT and the usual DejaVu Sans locations that exists.
  static std::filesystem::path default_path() {
    std::vector<std::filesystem::path> cands;
    if (const char* e = std::getenv("TQ_FONT"); e && *e) cands.emplace_back(e);
    for (const char* p : {"/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf",
                          "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/local/share/fonts/DejaVuSans.ttf"})
      cands.emplace_back(p);
    for (const auto& c : cands)
      if (std::filesystem::is_regular_file(c)) return c;
    return {};
  }

  static Font load(const std::filesystem::path& path, float pixel_height) {
    Font f;
    std::ifstream in(path, std::ios::binary);
    TQ_CHECK(in.good(), "cannot open font '", path.string(), "'");
    std::ostringstream ss;
    ss << in.rdbuf();
    f.data_ = std::make_shared<std::string>(ss.str());
    const auto* bytes = reinterpret_cast<const unsigned char*>(f.data_->data());
    TQ_CHECK(stbtt_InitFont(&f.info_, bytes, stbtt_GetFontOffsetForIndex(bytes, 0)) != 0, "font '", path.string(),
             "' is not a TrueType font");
    f.scale_ = stbtt_ScaleForPixelHeight(&f.info_, pixel_height);
    int asc = 0, desc = 0, gap = 0;
    stbtt_GetFontVMetrics(&f.info_, &asc, &desc, &gap);
    f.ascent_ = int(float(asc) * f.scale_ + 0.5f);
    f.line_height_ = int(float(asc - desc + gap) * f.scale_ + 0.5f);
    return f;
  }

  int line_height() const { return line_height_; }

  int text_width(const std::string& s) const {
    float x = 0;
    for (size_t i = 0; i < s.size();) {
      int adv = 0, lsb = 0;
      stbtt_GetCodepointHMetrics(&info_, int(next_code_point(s, i)), &adv, &lsb);
      x += float(adv) * scale_;
    }
    return int(x + 0.5f);
  }

  // Draws one line with its top at y; returns the x after it.
  int draw(Canvas& c, const std::string& s, int x0, int y, Rgb color) const {
    float x = float(x0);
    for (size_t i = 0; i < s.size();) {
      const int cp = int(next_code_point(s, i));
      int adv = 0, lsb = 0, x1 = 0, y1 = 0, x2 = 0, y2 = 0;
      stbtt_GetCodepointHMetrics(&info_, cp, &adv, &lsb);
      stbtt_GetCodepointBitmapBox(&info_, cp, scale_, scale_, &x1, &y1, &x2, &y2);
      const int w = x2 - x1, h = y2 - y1;
      if (w > 0 && h > 0) {
        std::vector<unsigned char> bmp(size_t(w) * size_t(h));
        stbtt_MakeCodepointBitmap(&info_, bmp.data(), w, h, w, scale_, scale_, cp);
        const int bx = int(x + 0.5f) + x1, by = y + ascent_ + y1;
        for (int yy = 0; yy < h; ++yy)
          for (int xx = 0; xx < w; ++xx) c.blend(bx + xx, by + yy, color, bmp[size_t(yy) * size_t(w) + size_t(xx)]);
      }
      x += float(adv) * scale_;
    }
    return int(x + 0.5f);
  }

  // Greedy word wrap to `width` pixels; a word wider than the line is cut by characters.
  std::vector<std::string> wrap(const std::string& text, int width) const {
    std::vector<std::string> lines;
    std::string line;
    std::istringstream words(text);
    std::string w;
    while (words >> w) {
      const std::string cand = line.empty() ? w : line + " " + w;
      if (text_width(cand) <= width || line.empty()) {
        line = cand;
      } else {
        lines.push_back(line);
        line = w;
      }
      while (text_width(line) > width && line.size() > 1) {  // overlong word: cut it
        size_t cut = line.size() - 1;
        while (cut > 1 && text_width(line.substr(0, cut)) > width) --cut;
        while (cut > 1 && (static_cast<unsigned char>(line[cut]) & 0xC0) == 0x80) --cut;
        lines.push_back(line.substr(0, cut));
        line = line.substr(cut);
      }
    }
    if (!line.empty() || lines.empty()) lines.push_back(line);
    return lines;
  }

  // Draws wrapped text from (x, y); returns the y below it.
  int draw_wrapped(Canvas& c, const std::string& text, int x, int y, int width, Rgb color) const {
    for (const auto& l : wrap(text, width)) {
      draw(c, l, x, y, color);
      y += line_height_;
    }
    return y;
  }

 private:
  std::shared_ptr<std::string> data_;  // stbtt_fontinfo points into it
  stbtt_fontinfo info_{};
  float scale_ = 1;
  int ascent_ = 0, line_height_ = 0;
};

}  // namespace tq::figures
