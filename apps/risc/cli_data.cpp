// `paligemma data --data PATH --manifest OUT.jsonl [--split all|train|val|test]
// [--skip-bad-images]`: reads a dataset the way training does and writes one JSON line per row:
// {"index", "image_sha256" (of the stored bytes), "width", "height", "captions"}. Every image is
// fully decoded, so a corrupt one is found here and not in the middle of a training run.
// For a split, rows come in split order (row j of train is perm[j], as HF's select yields them).
#include "paligemma/cli_registry.hpp"
#include "risc/dataset.hpp"
#include "risc/image.hpp"
#include "risc/sha256.hpp"
#include "risc/split.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

namespace {

using tq::risc::Row;

struct DataArgs {
  std::string data, manifest, split = "all";
  uint64_t seed = 42;
  double test_size = 0.10, val_size = 0.05;
  bool skip_bad = false;
  int threads = 0;
};

struct Checked {
  Row row;
  std::string sha, error;
  int width = 0, height = 0;
};

void check_row(const tq::risc::Dataset& ds, int64_t i, Checked& c) {
  try {
    c.row = ds.row(i);
    if (!c.row.image) tq::fail(tq::str_cat(ds.where(i), ": missing image"));
    tq::risc::ImageU8 img = tq::risc::decode_image(*c.row.image, ds.where(i));
    c.width = img.width;
    c.height = img.height;
    c.sha = tq::risc::sha256_hex(*c.row.image);
  } catch (const tq::Error& e) {
    c.error = e.what();
  }
}

int run_data(const DataArgs& a) {
  auto ds = tq::risc::open_dataset(a.data);
  std::vector<int64_t> rows;
  if (a.split == "all") {
    for (int64_t i = 0; i < ds->size(); ++i) rows.push_back(i);
  } else {
    auto s = tq::risc::make_split(ds->size(), a.seed, a.test_size, a.val_size);
    rows = a.split == "train" ? s.train : a.split == "val" ? s.val : s.test;
  }
  std::ofstream out(a.manifest);
  TQ_CHECK(out.good(), "cannot write manifest '", a.manifest, "'");
  const int nt = a.threads > 0 ? a.threads : std::max(1u, std::thread::hardware_concurrency());
  int64_t bad = 0, no_caption = 0, written = 0;
  std::vector<int64_t> no_caption_rows;
  constexpr size_t kChunk = 256;
  std::vector<Checked> chunk;
  for (size_t start = 0; start < rows.size(); start += kChunk) {
    const size_t n = std::min(kChunk, rows.size() - start);
    chunk.assign(n, Checked{});
    std::vector<std::thread> pool;
    for (int t = 0; t < nt; ++t)
      pool.emplace_back([&, t] {
        for (size_t k = static_cast<size_t>(t); k < n; k += static_cast<size_t>(nt))
          check_row(*ds, rows[start + k], chunk[k]);
      });
    for (auto& th : pool) th.join();
    for (size_t k = 0; k < n; ++k) {
      Checked& c = chunk[k];
      if (!c.error.empty()) {
        if (!a.skip_bad) tq::fail(c.error + " (use --skip-bad-images to skip such rows)");
        ++bad;
        std::cerr << "skipped: " << c.error << "\n";
        continue;
      }
      nlohmann::json caps = nlohmann::json::array();
      bool any = false;
      for (auto& cap : c.row.captions) {
        caps.push_back(cap ? nlohmann::json(*cap) : nlohmann::json(nullptr));
        any = any || cap.has_value();
      }
      if (!any) {
        ++no_caption;
        if (no_caption_rows.size() < 10) no_caption_rows.push_back(rows[start + k]);
      }
      nlohmann::json j = {{"index", rows[start + k]}, {"image_sha256", c.sha},
                          {"width", c.width}, {"height", c.height}, {"captions", caps}};
      out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      ++written;
    }
  }
  out.close();
  TQ_CHECK(out.good(), "error writing manifest '", a.manifest, "'");
  std::cerr << "wrote " << written << " rows to " << a.manifest;
  if (a.skip_bad) std::cerr << "; skipped bad images: " << bad;
  std::cerr << "\n";
  if (no_caption)
    std::cerr << "rows without any caption: " << no_caption << " (first: "
              << tq::str_cat(no_caption_rows) << ")\n";
  return 0;
}

const tq::cli::Register reg_data(
    "data", "Read a RISC dataset (parquet, HF dir, image folder, Karpathy JSON) and write a manifest",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<DataArgs>();
      app.add_option("--data", a->data, "HF dataset dir, .parquet, image folder, .csv, .jsonl or .json")
          ->required();
      app.add_option("--manifest", a->manifest, "Output JSONL, one line per row")->required();
      app.add_option("--split", a->split, "Rows to write")
          ->capture_default_str()->check(CLI::IsMember({"all", "train", "val", "test"}));
      app.add_option("--seed", a->seed, "Split seed")->capture_default_str();
      app.add_option("--test-size", a->test_size, "Test fraction")->capture_default_str();
      app.add_option("--val-size", a->val_size, "Validation fraction")->capture_default_str();
      app.add_flag("--skip-bad-images", a->skip_bad, "Skip (and count) rows whose image is missing or corrupt");
      app.add_option("--threads", a->threads, "Decode threads (0: all cores)")->capture_default_str();
      return [a] { return run_data(*a); };
    });

}  // namespace
