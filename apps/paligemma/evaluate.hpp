// Caption evaluation as the RISC notebook runs it: the seed-42 split's rows in split order, greedy
// captions (prompt "caption en", HF generate semantics, decoded after the prompt with special tokens
// skipped), then pycocoevalcap's metrics on the raw strings (spec/metrics.md §0). Outputs, all in
// one directory:
//   predictions.jsonl   {"index": dataset row, "refs": [...], "prediction": "..."} per line
//   results.json        {"baseline"|"finetuned": {"BLEU-1".."CIDEr"}} (the notebook's format); with
//                       a compare directory, that run's entries are merged in
//   results.csv         run,BLEU-1,..,CIDEr — one row per entry of results.json
//   qualitative.png     image | reference | each run's prediction (figures.hpp)
// Predictions are kept verbatim (empty strings and newlines included): the scorer treats them as
// pycocoevalcap does, and METEOR's input has newlines replaced as its Java protocol requires.
#pragma once

#include "metrics/meteor_data.hpp"
#include "metrics/scorer.hpp"
#include "paligemma/adapter.hpp"
#include "paligemma/figures.hpp"
#include "paligemma/generate.hpp"
#include "paligemma/processor.hpp"
#include "paligemma/weights.hpp"
#include "risc/dataset.hpp"
#include "risc/split.hpp"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tq::paligemma {

namespace fs = std::filesystem;

struct EvalOptions {
  std::string model, adapter, data, split = "test", prompt = "caption en", out, compare, meteor_data;
  int64_t limit = 500, batch_size = 8, max_new_tokens = 64, seed = 42, figure_rows = 8;
  double test_size = 0.10, val_size = 0.05;
  LoadOptions load;
  bool progress = true;
};

struct EvalPrediction {
  int64_t index = 0;  // dataset row
  std::vector<std::string> refs;
  std::string prediction;
};

// Dataset rows of `split` (train/val/test of the seed-`seed` split, or all), in split order.
inline std::vector<int64_t> split_indices(int64_t n, const std::string& split, uint64_t seed, double test_size,
                                          double val_size) {
  if (split == "all") {
    std::vector<int64_t> all(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) all[size_t(i)] = i;
    return all;
  }
  TQ_CHECK(split == "train" || split == "val" || split == "test", "--split '", split,
           "': expected train, val, test or all");
  risc::Split s = risc::make_split(n, seed, test_size, val_size);
  return split == "train" ? s.train : split == "val" ? s.val : s.test;
}

inline std::vector<std::string> present_captions(const risc::Row& r) {
  std::vector<std::string> out;
  for (const auto& c : r.captions)
    if (c) out.push_back(*c);
  return out;
}

// One line per update: a bar with \r on a terminal, plain lines (every ~10%) otherwise.
class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, bool enabled)
      : label_(std::move(label)), total_(total), enabled_(enabled), tty_(isatty(fileno(stderr)) != 0),
        start_(std::chrono::steady_clock::now()) {}

  void update(int64_t done) {
    if (!enabled_ || total_ <= 0) return;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = secs > 0 ? double(done) / secs : 0.0;
    const double eta = rate > 0 ? double(total_ - done) / rate : 0.0;
    if (tty_) {
      const int width = 30, fill = int(width * done / total_);
      std::fprintf(stderr, "\r%s [%s%s] %lld/%lld %.2f samples/s ETA %.0fs", label_.c_str(),
                   std::string(size_t(fill), '#').c_str(), std::string(size_t(width - fill), '.').c_str(),
                   (long long)done, (long long)total_, rate, eta);
      if (done == total_) std::fputc('\n', stderr);
    } else {
      const int64_t decile = done * 10 / total_;
      if (decile == last_decile_ && done != total_) return;
      last_decile_ = decile;
      std::fprintf(stderr, "%s %lld/%lld %.2f samples/s ETA %.0fs\n", label_.c_str(), (long long)done,
                   (long long)total_, rate, eta);
    }
    std::fflush(stderr);
  }

 private:
  std::string label_;
  int64_t total_;
  bool enabled_, tty_;
  int64_t last_decile_ = -1;
  std::chrono::steady_clock::time_point start_;
};

// Greedy captions for encoded images; `names` label the images in errors.
inline std::vector<std::string> caption_images(PaliGemmaForConditionalGeneration& m, const Processor& proc,
                                               const std::vector<std::string>& images,
                                               const std::vector<std::string>& names, const std::string& prompt,
                                               int64_t max_new_tokens) {
  std::vector<ProcessorSample> samples(images.size(), ProcessorSample{prompt, std::nullopt});
  PaliGemmaBatch pb = proc.make_batch(samples, images, names, PaddingSide::Left);
  Batch b;
  b.input_ids = pb.input_ids;
  b.attention_mask = pb.attention_mask;
  b.token_type_ids = pb.token_type_ids;
  b.pixel_values = pb.pixel_values;
  GenerateOptions o;
  o.max_new_tokens = max_new_tokens;
  o.eos_token_id = m.config.eos_token_id;
  o.pad_token_id = m.config.pad_token_id;
  const auto seqs = greedy_generate(m, b, o);
  const size_t prompt_len = static_cast<size_t>(b.input_ids.size(1));
  std::vector<std::string> out;
  for (const auto& s : seqs)
    out.push_back(proc.tokenizer().decode(std::vector<int64_t>(s.begin() + long(std::min(prompt_len, s.size())), s.end()), true));
  return out;
}

inline void check_model_dir(const std::string& dir) {
  TQ_CHECK(fs::is_directory(dir), "--model '", dir, "': no such directory");
  for (const char* f : {"config.json", "tokenizer.model", "preprocessor_config.json"})
    TQ_CHECK(fs::is_regular_file(fs::path(dir) / f), "--model '", dir, "': missing ", f);
}

inline std::unique_ptr<PaliGemmaForConditionalGeneration> load_eval_model(const std::string& dir,
                                                                          const std::string& adapter,
                                                                          const LoadOptions& load) {
  check_model_dir(dir);
  auto m = load_model(dir, load);
  if (!adapter.empty()) {
    TQ_CHECK(fs::is_regular_file(fs::path(adapter) / "adapter_config.json"), "--adapter '", adapter,
             "': missing adapter_config.json");
    load_peft_adapter(adapter, *m, load.dtype);
  }
  m->train(false);
  return m;
}

inline std::vector<EvalPrediction> predict_split(const EvalOptions& o, const risc::Dataset& ds,
                                                 const std::vector<int64_t>& rows) {
  auto m = load_eval_model(o.model, o.adapter, o.load);
  const Processor proc = Processor::load(o.model);
  std::vector<EvalPrediction> preds;
  ProgressBar bar(o.adapter.empty() ? "eval (zero-shot)" : "eval (fine-tuned)", int64_t(rows.size()), o.progress);
  bar.update(0);
  for (size_t start = 0; start < rows.size(); start += size_t(o.batch_size)) {
    const size_t end = std::min(rows.size(), start + size_t(o.batch_size));
    std::vector<std::string> images, names;
    for (size_t i = start; i < end; ++i) {
      risc::Row r = ds.row(rows[i]);
      TQ_CHECK(r.image.has_value(), ds.where(rows[i]), ": the image is missing");
      EvalPrediction p;
      p.index = rows[i];
      p.refs = present_captions(r);
      TQ_CHECK(!p.refs.empty(), ds.where(rows[i]), ": the row has no caption");
      preds.push_back(std::move(p));
      images.push_back(std::move(*r.image));
      names.push_back(ds.where(rows[i]));
    }
    const auto texts = caption_images(*m, proc, images, names, o.prompt, o.max_new_tokens);
    for (size_t i = start; i < end; ++i) preds[i].prediction = texts[i - start];
    bar.update(int64_t(end));
  }
  return preds;
}

inline void write_predictions(const fs::path& path, const std::vector<EvalPrediction>& preds) {
  std::ofstream out(path);
  TQ_CHECK(out.good(), "cannot write ", path.string());
  for (const auto& p : preds) {
    nlohmann::ordered_json j;
    j["index"] = p.index;
    j["refs"] = p.refs;
    j["prediction"] = p.prediction;
    out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  TQ_CHECK(out.good(), "cannot write ", path.string());
}

inline std::vector<EvalPrediction> read_predictions(const fs::path& path) {
  std::ifstream in(path);
  TQ_CHECK(in.good(), "cannot open ", path.string());
  std::vector<EvalPrediction> out;
  std::string line;
  for (size_t ln = 1; std::getline(in, line); ++ln) {
    if (line.empty()) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      out.push_back({j.at("index").get<int64_t>(), j.at("refs").get<std::vector<std::string>>(),
                     j.at("prediction").get<std::string>()});
    } catch (const nlohmann::json::exception& e) {
      fail(str_cat(path.string(), ":", ln, ": bad prediction line (", e.what(), ")"));
    }
  }
  return out;
}

inline metrics::CaptionScores score_predictions(const std::vector<EvalPrediction>& preds,
                                                const metrics::MeteorData* meteor) {
  std::vector<metrics::CaptionItem> items;
  for (const auto& p : preds) items.push_back({p.refs, p.prediction});
  return metrics::score_captions(items, metrics::Tokenization::raw, meteor);
}

inline nlohmann::ordered_json read_results(const fs::path& path) {
  std::ifstream in(path);
  TQ_CHECK(in.good(), "--compare: cannot open ", path.string());
  try {
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(in);
    TQ_CHECK(j.is_object(), path.string(), ": expected a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail(str_cat(path.string(), ": not valid JSON (", e.what(), ")"));
  }
}

// results.json: the compared run's entries first (baseline before finetuned), then this run's.
inline nlohmann::ordered_json merge_results(const std::string& label, const nlohmann::ordered_json& scores,
                                            const std::optional<nlohmann::ordered_json>& earlier) {
  nlohmann::ordered_json all = nlohmann::ordered_json::object();
  for (const char* k : {"baseline", "finetuned"}) {
    if (k == label) all[k] = scores;
    else if (earlier && earlier->contains(k)) all[k] = (*earlier)[k];
  }
  if (earlier)
    for (auto it = earlier->begin(); it != earlier->end(); ++it)
      if (!all.contains(it.key())) all[it.key()] = it.value();
  return all;
}

inline void write_results_csv(const fs::path& path, const nlohmann::ordered_json& results) {
  std::ofstream out(path);
  TQ_CHECK(out.good(), "cannot write ", path.string());
  const char* cols[] = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"};
  out << "run";
  for (const char* c : cols) out << "," << c;
  out << "\n";
  for (auto it = results.begin(); it != results.end(); ++it) {
    out << it.key();
    for (const char* c : cols) {
      out << ",";
      if (it.value().contains(c) && it.value()[c].is_number()) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.17g", it.value()[c].get<double>());
        out << buf;
      }
    }
    out << "\n";
  }
  TQ_CHECK(out.good(), "cannot write ", path.string());
}

// The reference figure: one row per sample, the image, then its first reference and each run's
// prediction (zero-shot beside fine-tuned when a compare run is given).
struct FigureRun {
  std::string title;
  std::map<int64_t, std::string> predictions;  // by dataset row
};

inline bool write_qualitative_figure(const fs::path& path, const risc::Dataset& ds,
                                     const std::vector<EvalPrediction>& rows, const std::vector<FigureRun>& runs,
                                     int64_t max_rows) {
  const fs::path font_path = figures::Font::default_path();
  if (font_path.empty()) {
    std::fprintf(stderr, "note: no DejaVuSans.ttf (fonts-dejavu-core; or set TQ_FONT): skipping %s\n",
                 path.string().c_str());
    return false;
  }
  const figures::Font body = figures::Font::load(font_path, 15.0f), head = figures::Font::load(font_path, 17.0f);
  const int thumb = 128, pad = 10, col_w = 260;
  const int n = int(std::min<int64_t>(max_rows, int64_t(rows.size())));
  const int ncols = 1 + int(runs.size());
  const int width = pad + thumb + pad + ncols * (col_w + pad);
  std::vector<int> heights;
  for (int i = 0; i < n; ++i) {
    int h = int(body.wrap(rows[size_t(i)].refs[0], col_w).size());
    for (const auto& r : runs) {
      auto it = r.predictions.find(rows[size_t(i)].index);
      h = std::max(h, int(body.wrap(it == r.predictions.end() ? "" : it->second, col_w).size()));
    }
    heights.push_back(std::max(thumb, h * body.line_height()) + pad);
  }
  int height = pad + head.line_height() + pad;
  for (int h : heights) height += h;
  figures::Canvas c(width, height);
  int x = pad + thumb + pad;
  head.draw(c, "Reference", x, pad, {0, 0, 0});
  for (const auto& r : runs) head.draw(c, r.title, x += col_w + pad, pad, {0, 0, 0});
  int y = pad + head.line_height() + pad;
  const figures::Rgb run_colors[] = {{170, 30, 30}, {20, 110, 40}, {30, 60, 160}};
  for (int i = 0; i < n; ++i) {
    const auto& p = rows[size_t(i)];
    risc::Row r = ds.row(p.index);
    if (r.image) {
      risc::ImageU8 img = risc::decode_image(*r.image, ds.where(p.index));
      c.paste(img.rgb.data(), img.width, img.height, pad, y, thumb, thumb);
    }
    x = pad + thumb + pad;
    body.draw_wrapped(c, p.refs[0], x, y, col_w, {0, 0, 0});
    for (size_t k = 0; k < runs.size(); ++k) {
      auto it = runs[k].predictions.find(p.index);
      std::string text = it == runs[k].predictions.end() ? "(no prediction)" : it->second;
      if (text.find_first_not_of(" \t\r\n") == std::string::npos) text = "(empty)";
      body.draw_wrapped(c, text, x += col_w + pad, y, col_w, run_colors[std::min<size_t>(k, 2)]);
    }
    y += heights[size_t(i)];
    c.fill_rect(pad, y - pad / 2, width - 2 * pad, 1, {210, 210, 210});
  }
  c.write_png(path);
  return true;
}

inline std::unique_ptr<metrics::MeteorData> load_meteor_for_eval(const std::string& explicit_dir) {
  const fs::path dir = explicit_dir.empty() ? metrics::default_meteor_data_dir() : fs::path(explicit_dir);
  if (const std::string missing = metrics::missing_meteor_file(dir); !missing.empty()) {
    TQ_CHECK(explicit_dir.empty(), "--meteor-data: missing ", missing);
    std::fprintf(stderr, "note: METEOR unavailable (no data at %s; run tools/setup_meteor.sh); reported as null\n",
                 dir.string().c_str());
    return nullptr;
  }
  return std::make_unique<metrics::MeteorData>(metrics::load_meteor_data(dir));
}

struct EvalResult {
  std::string label;
  metrics::CaptionScores scores;
  nlohmann::ordered_json results;  // what results.json holds
};

inline EvalResult run_eval(const EvalOptions& o) {
  TQ_CHECK(o.batch_size > 0 && o.max_new_tokens > 0, "--batch-size and --max-new-tokens must be positive");
  TQ_CHECK(fs::exists(o.data), "--data '", o.data, "': no such file or directory");
  check_model_dir(o.model);
  std::optional<nlohmann::ordered_json> earlier;
  std::vector<EvalPrediction> earlier_preds;
  if (!o.compare.empty()) {
    earlier = read_results(fs::path(o.compare) / "results.json");
    earlier_preds = read_predictions(fs::path(o.compare) / "predictions.jsonl");
  }
  const auto meteor = load_meteor_for_eval(o.meteor_data);  // fail early, before the slow part
  auto ds = risc::open_dataset(o.data);
  std::vector<int64_t> rows = split_indices(ds->size(), o.split, uint64_t(o.seed), o.test_size, o.val_size);
  TQ_CHECK(!rows.empty(), "--split ", o.split, " of '", o.data, "' (", ds->size(), " rows) is empty");
  if (o.limit > 0 && int64_t(rows.size()) > o.limit) rows.resize(size_t(o.limit));
  fs::create_directories(o.out);

  const std::vector<EvalPrediction> preds = predict_split(o, *ds, rows);
  write_predictions(fs::path(o.out) / "predictions.jsonl", preds);
  EvalResult r;
  r.label = o.adapter.empty() ? "baseline" : "finetuned";
  r.scores = score_predictions(preds, meteor.get());
  r.results = merge_results(r.label, metrics::scores_json(r.scores, false), earlier);
  {
    std::ofstream out(fs::path(o.out) / "results.json");
    out << r.results.dump(2) << "\n";
    TQ_CHECK(out.good(), "cannot write ", (fs::path(o.out) / "results.json").string());
  }
  write_results_csv(fs::path(o.out) / "results.csv", r.results);

  std::vector<FigureRun> runs;
  if (!o.compare.empty()) {
    FigureRun e{"Zero-shot", {}};
    if (earlier && earlier->contains("finetuned") && !earlier->contains("baseline")) e.title = "Fine-tuned (earlier)";
    for (const auto& p : earlier_preds) e.predictions[p.index] = p.prediction;
    runs.push_back(std::move(e));
  }
  FigureRun mine{o.adapter.empty() ? "Zero-shot" : "Fine-tuned", {}};
  for (const auto& p : preds) mine.predictions[p.index] = p.prediction;
  runs.push_back(std::move(mine));
  write_qualitative_figure(fs::path(o.out) / "qualitative.png", *ds, preds, runs, o.figure_rows);
  return r;
}

}  // namespace tq::paligemma
