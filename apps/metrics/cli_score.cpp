// `paligemma score`: caption metrics for {"items":[{"refs":[...],"pred":"..."}]} as JSON on stdout.
#include "metrics/meteor_data.hpp"
#include "metrics/scorer.hpp"
#include "paligemma/cli_registry.hpp"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

namespace {

void write_csv(const std::string& path, const tq::metrics::CaptionScores& s) {
  std::ofstream out(path);
  TQ_CHECK(out, "cannot write ", path);
  auto row = [&](const std::string& name, const std::array<double, 4>& b, const std::optional<double>& m, double r,
                 double c) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "%s,%.17g,%.17g,%.17g,%.17g,", name.c_str(), b[0], b[1], b[2], b[3]);
    out << buf;
    if (m) {
      std::snprintf(buf, sizeof buf, "%.17g", *m);
      out << buf;
    }
    std::snprintf(buf, sizeof buf, ",%.17g,%.17g\n", r, c);
    out << buf;
  };
  out << "item,BLEU-1,BLEU-2,BLEU-3,BLEU-4,METEOR,ROUGE-L,CIDEr\n";
  for (size_t i = 0; i < s.per_item.size(); ++i) {
    const auto& it = s.per_item[i];
    row(std::to_string(i), it.bleu, it.meteor, it.rouge_l, it.cider);
  }
  row("corpus", s.bleu, s.meteor, s.rouge_l, s.cider);
  TQ_CHECK(out, "cannot write ", path);
}

const tq::cli::Register kScore{
    "score", "Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) exactly as pycocoevalcap computes them",
    [](CLI::App& app) -> std::function<int()> {
      struct Opts {
        std::string input, tokenize = "raw", csv, meteor_data;
        bool per_item = false;
      };
      auto o = std::make_shared<Opts>();
      app.add_option("--input", o->input, "JSON file {\"items\":[{\"refs\":[...],\"pred\":\"...\"}]}")->required();
      app.add_option("--tokenize", o->tokenize, "raw: strings as given (RISC notebook); ptb: PTBTokenizer first (COCO)")
          ->check(CLI::IsMember({"raw", "ptb"}))
          ->capture_default_str();
      app.add_flag("--per-item", o->per_item, "Also print per-item scores (input order)");
      app.add_option("--csv", o->csv, "Write per-item and corpus scores as CSV");
      app.add_option("--meteor-data", o->meteor_data,
                     "METEOR data folder (default: $XDG_DATA_HOME/tq/meteor or ~/.local/share/tq/meteor)");
      return [o]() -> int {
        using namespace tq::metrics;
        const auto items = read_score_input(o->input);
        const std::filesystem::path dir =
            o->meteor_data.empty() ? default_meteor_data_dir() : std::filesystem::path(o->meteor_data);
        std::unique_ptr<MeteorData> data;
        if (const std::string missing = missing_meteor_file(dir); missing.empty()) {
          data = std::make_unique<MeteorData>(load_meteor_data(dir));
        } else {
          TQ_CHECK(o->meteor_data.empty(), "--meteor-data: missing ", missing);
          std::cerr << "note: METEOR unavailable (no data at " << dir.string()
                    << "; run tools/setup_meteor.sh); reported as null\n";
        }
        const auto tok = o->tokenize == "ptb" ? Tokenization::ptb : Tokenization::raw;
        const CaptionScores s = score_captions(items, tok, data.get());
        if (!o->csv.empty()) write_csv(o->csv, s);
        std::cout << scores_json(s, o->per_item).dump(2) << "\n";
        return 0;
      };
    }};

}  // namespace
