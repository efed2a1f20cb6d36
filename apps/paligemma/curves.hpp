// The training curves figure (`curves.png` beside train's logs): the training loss (and the
// validation loss when --eval-every is on) and the learning rate against the optimizer step, as two
// stacked panels with labelled axes. Drawn on figures::Canvas; the text needs the DejaVu font that
// the qualitative figure uses, and the panels are drawn without labels when it is absent.
#pragma once

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "paligemma/figures.hpp"

namespace tq::figures {

struct Series {
  std::string name;
  std::vector<double> x, y;
  Rgb color;
  bool markers = false;  // dots instead of a line (sparse points such as validation losses)
};

namespace curves_detail {

// A "nice" tick step (1, 2 or 5 × 10^k) giving about `n` ticks over `span`.
inline double tick_step(double span, int n) {
  if (!(span > 0)) return 1;
  const double raw = span / n, p = std::pow(10.0, std::floor(std::log10(raw)));
  const double m = raw / p;
  return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
}

inline std::string tick_label(double v, double step) {
  char b[32];
  if (std::abs(v) < 1e-9 * step) v = 0;  // no "-0.000" from accumulated tick arithmetic
  if (std::abs(v) > 0 && (std::abs(v) < 1e-3 || std::abs(v) >= 1e5)) std::snprintf(b, sizeof b, "%.1e", v);
  else std::snprintf(b, sizeof b, "%.*f", step >= 1 ? 0 : int(std::ceil(-std::log10(step))), v);
  return b;
}

// A line from (x0, y0) to (x1, y1), `width` pixels thick.
inline void line(Canvas& c, double x0, double y0, double x1, double y1, Rgb color, int width = 2) {
  const double len = std::max(std::abs(x1 - x0), std::abs(y1 - y0));
  const int n = std::max(1, int(std::ceil(len)));
  for (int i = 0; i <= n; ++i) {
    const double t = double(i) / n;
    const int x = int(std::lround(x0 + t * (x1 - x0))), y = int(std::lround(y0 + t * (y1 - y0)));
    c.fill_rect(x - width / 2, y - width / 2, width, width, color);
  }
}

}  // namespace curves_detail

// One panel: axes, grid, ticks and the series, inside the rectangle (x, y, w, h).
inline void draw_panel(Canvas& c, const Font* font, int x, int y, int w, int h, const std::string& title,
                       const std::string& xlabel, const std::vector<Series>& series) {
  using namespace curves_detail;
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  for (const Series& s : series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      xmin = std::min(xmin, s.x[i]), xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, s.y[i]), ymax = std::max(ymax, s.y[i]);
    }
  if (!std::isfinite(xmin)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
  if (xmax <= xmin) xmax = xmin + 1;
  if (ymax <= ymin) ymax = ymin + (ymin == 0 ? 1 : std::abs(ymin) * 0.1);
  const double ypad = 0.05 * (ymax - ymin);
  ymin -= ypad, ymax += ypad;
  const int left = 70, right = 16, top = font ? font->line_height() + 8 : 8, bottom = font ? 2 * font->line_height() + 8 : 8;
  const int px = x + left, py = y + top, pw = w - left - right, ph = h - top - bottom;
  auto sx = [&](double v) { return px + (v - xmin) / (xmax - xmin) * pw; };
  auto sy = [&](double v) { return py + ph - (v - ymin) / (ymax - ymin) * ph; };
  const Rgb grid{225, 225, 225}, axis{60, 60, 60};
  const double xs = tick_step(xmax - xmin, 6), ys = tick_step(ymax - ymin, 5);
  for (double v = std::ceil(xmin / xs) * xs; v <= xmax + 1e-9 * xs; v += xs) {
    line(c, sx(v), py, sx(v), py + ph, grid, 1);
    if (font) {
      const std::string l = tick_label(v, xs);
      font->draw(c, l, int(sx(v)) - font->text_width(l) / 2, py + ph + 4, axis);
    }
  }
  for (double v = std::ceil(ymin / ys) * ys; v <= ymax + 1e-9 * ys; v += ys) {
    line(c, px, sy(v), px + pw, sy(v), grid, 1);
    if (font) {
      const std::string l = tick_label(v, ys);
      font->draw(c, l, px - 6 - font->text_width(l), int(sy(v)) - font->line_height() / 2, axis);
    }
  }
  line(c, px, py + ph, px + pw, py + ph, axis, 1);
  line(c, px, py, px, py + ph, axis, 1);
  for (const Series& s : series) {
    std::optional<std::pair<double, double>> prev;
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.y[i])) {
        prev.reset();
        continue;
      }
      const double X = sx(s.x[i]), Y = sy(s.y[i]);
      if (s.markers) c.fill_rect(int(X) - 3, int(Y) - 3, 7, 7, s.color);
      else if (prev) line(c, prev->first, prev->second, X, Y, s.color, 2);
      else c.fill_rect(int(X) - 1, int(Y) - 1, 3, 3, s.color);
      prev = {X, Y};
    }
  }
  if (!font) return;
  int tx = px;
  font->draw(c, title, tx, y + 2, axis);
  tx += font->text_width(title) + 24;
  for (const Series& s : series) {  // legend after the title
    c.fill_rect(tx, y + 2 + font->line_height() / 2 - 2, 18, 4, s.color);
    tx = font->draw(c, s.name, tx + 24, y + 2, axis) + 18;
  }
  font->draw(c, xlabel, px + pw / 2 - font->text_width(xlabel) / 2, py + ph + 4 + font->line_height(), axis);
}

// Loss (training + optional validation) above, learning rate below; returns the PNG's path.
inline void write_training_curves(const std::filesystem::path& path, const std::vector<double>& step,
                                  const std::vector<double>& loss, const std::vector<double>& eval_step,
                                  const std::vector<double>& eval_loss, const std::vector<double>& lr) {
  Canvas c(960, 720);
  std::optional<Font> font;
  if (const auto fp = Font::default_path(); !fp.empty()) font = Font::load(fp, 15.0f);
  const Font* f = font ? &*font : nullptr;
  std::vector<Series> top = {{"train loss", step, loss, {31, 119, 180}}};
  if (!eval_step.empty()) top.push_back({"validation loss", eval_step, eval_loss, {214, 39, 40}, true});
  draw_panel(c, f, 0, 0, c.width, 400, "Loss", "optimizer step", top);
  draw_panel(c, f, 0, 410, c.width, 310, "Learning rate (lora_A; lora_B is x the LoRA+ ratio)", "optimizer step",
             {{"learning rate", step, lr, {44, 160, 44}}});
  c.write_png(path);
}

}  // namespace tq::figures
