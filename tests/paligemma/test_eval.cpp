// `paligemma eval` and `caption` end to end on the demo sample (data/sample: a tiny random-init
// PaliGemma with a real tokenizer, and a RISC-format parquet directory): the output files and their
// structure, results.json equal to an independent scoring of predictions.jsonl, --compare merging a
// zero-shot run with a fine-tuned (random adapter) run, and one clear error line for bad input.
#include <unistd.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "metrics/meteor_data.hpp"
#include "metrics/scorer.hpp"
#include "paligemma/adapter.hpp"
#include "paligemma/evaluate.hpp"
#include "paligemma/weights.hpp"
#include "risc/dataset.hpp"
#include "risc/split.hpp"

namespace tq::paligemma::test {
namespace {

namespace fs = std::filesystem;

const std::string kSample = std::string(TQ_FIXTURES) + "/../../data/sample";
const std::string kModel = kSample + "/model";
const std::string kData = kSample + "/risc";

struct RunResult {
  int rc;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ctest runs tests as parallel processes: every scratch path is per process.
fs::path scratch() {
  const fs::path d = fs::path(::testing::TempDir()) / ("tq_eval_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

RunResult run_cli(const std::string& args) {
  const fs::path dir = scratch() / "cli";
  fs::create_directories(dir);
  const std::string cmd = "'" + std::string(TQ_BIN_DIR) + "/paligemma' " + args + " >'" + (dir / "o").string() +
                          "' 2>'" + (dir / "e").string() + "'";
  const int status = std::system(cmd.c_str());
  return {WEXITSTATUS(status), slurp(dir / "o"), slurp(dir / "e")};
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = scratch() / name;
  fs::remove_all(d);
  return d;
}

std::vector<EvalPrediction> read_preds(const fs::path& p) { return read_predictions(p); }

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(slurp(p)); }

const char* const kMetricKeys[] = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"};

// The scorer run independently of the CLI on the CLI's own predictions.
void expect_scores_match(const nlohmann::json& entry, const std::vector<EvalPrediction>& preds) {
  std::vector<metrics::CaptionItem> items;
  for (const auto& p : preds) items.push_back({p.refs, p.prediction});
  const fs::path md = metrics::default_meteor_data_dir();
  std::unique_ptr<metrics::MeteorData> meteor;
  if (metrics::missing_meteor_file(md).empty()) meteor = std::make_unique<metrics::MeteorData>(metrics::load_meteor_data(md));
  const auto s = metrics::score_captions(items, metrics::Tokenization::raw, meteor.get());
  for (int k = 0; k < 4; ++k) EXPECT_DOUBLE_EQ(entry[kMetricKeys[k]].get<double>(), s.bleu[size_t(k)]) << kMetricKeys[k];
  EXPECT_DOUBLE_EQ(entry["ROUGE-L"].get<double>(), s.rouge_l);
  EXPECT_DOUBLE_EQ(entry["CIDEr"].get<double>(), s.cider);
  if (s.meteor) EXPECT_DOUBLE_EQ(entry["METEOR"].get<double>(), *s.meteor);
  else EXPECT_TRUE(entry["METEOR"].is_null());
}

void expect_png(const fs::path& p) {
  const std::string b = slurp(p);
  ASSERT_GT(b.size(), 8u) << p;
  EXPECT_EQ(b.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
}

// A PEFT adapter for the sample model with random lora_B, so its captions differ from zero-shot.
std::string make_random_adapter() {
  const std::string out = (scratch() / "adapter").string();
  auto m = load_model(kModel, {});
  Generator gen(5);
  nn::LoraConfig cfg{.r = 2, .alpha = 4, .rslora = true, .target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}};
  nn::apply_lora(*m, cfg, gen);
  for (auto& [name, t] : m->named_parameters())
    if (name.find("lora_B") != std::string::npos) t->copy_(tq::rand(t->shape(), gen, DType::f32, -30.0, 30.0));
  nn::save_adapter(out, *m, {.config = cfg});
  return out;
}

TEST(PaliGemmaEval, WritesPredictionsResultsCsvFigureAndConfig) {
  const fs::path out = fresh_dir("tq_eval_zs");
  const RunResult r = run_cli("eval --model '" + kModel + "' --data '" + kData + "' --out '" + out.string() +
                              "' --limit 6 --batch-size 4 --max-new-tokens 5 --no-progress");
  ASSERT_EQ(r.rc, 0) << r.err;
  // Rows: the first 6 of the seed-42 test split, in split order, with the row's captions as refs.
  auto ds = risc::open_dataset(kData);
  const auto split = risc::make_split(ds->size(), 42);
  const auto preds = read_preds(out / "predictions.jsonl");
  ASSERT_EQ(preds.size(), 6u);
  for (size_t i = 0; i < preds.size(); ++i) {
    EXPECT_EQ(preds[i].index, split.test[i]);
    EXPECT_EQ(preds[i].refs, present_captions(ds->row(split.test[i])));
    EXPECT_EQ(preds[i].refs.size(), 5u);
  }
  const auto res = read_json(out / "results.json");
  ASSERT_TRUE(res.is_object());
  ASSERT_EQ(res.size(), 1u);
  ASSERT_TRUE(res.contains("baseline"));
  for (const char* k : kMetricKeys) EXPECT_TRUE(res["baseline"].contains(k)) << k;
  expect_scores_match(res["baseline"], preds);
  EXPECT_EQ(nlohmann::json::parse(r.out), res);  // stdout prints the same table
  const std::string csv = slurp(out / "results.csv");
  EXPECT_EQ(csv.substr(0, csv.find('\n')), "run,BLEU-1,BLEU-2,BLEU-3,BLEU-4,METEOR,ROUGE-L,CIDEr");
  EXPECT_NE(csv.find("\nbaseline,"), std::string::npos);
  expect_png(out / "qualitative.png");
  const auto cfg = read_json(out / "eval_config.json");
  EXPECT_EQ(cfg["split"], "test");
  EXPECT_EQ(cfg["limit"], "6");
  EXPECT_EQ(cfg["prompt"], "caption en");
}

TEST(PaliGemmaEval, CompareMergesZeroShotAndFineTuned) {
  const fs::path zs = fresh_dir("tq_eval_cmp_zs"), ft = fresh_dir("tq_eval_cmp_ft");
  const std::string common = " --model '" + kModel + "' --data '" + kData + "' --limit 5 --batch-size 3 "
                             "--max-new-tokens 6 --no-progress";
  ASSERT_EQ(run_cli("eval" + common + " --out '" + zs.string() + "'").rc, 0);
  const std::string adapter = make_random_adapter();
  const RunResult r = run_cli("eval" + common + " --adapter '" + adapter + "' --compare '" + zs.string() +
                              "' --out '" + ft.string() + "'");
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto res = read_json(ft / "results.json");
  ASSERT_EQ(res.size(), 2u);
  EXPECT_EQ(res["baseline"], read_json(zs / "results.json")["baseline"]);
  const auto ft_preds = read_preds(ft / "predictions.jsonl");
  expect_scores_match(res["finetuned"], ft_preds);
  const auto zs_preds = read_preds(zs / "predictions.jsonl");
  ASSERT_EQ(zs_preds.size(), ft_preds.size());
  bool differs = false;
  for (size_t i = 0; i < zs_preds.size(); ++i) {
    EXPECT_EQ(zs_preds[i].index, ft_preds[i].index);
    differs |= zs_preds[i].prediction != ft_preds[i].prediction;
  }
  EXPECT_TRUE(differs) << "the adapter did not change any caption";
  const std::string csv = slurp(ft / "results.csv");
  EXPECT_LT(csv.find("\nbaseline,"), csv.find("\nfinetuned,"));
  expect_png(ft / "qualitative.png");
}

TEST(PaliGemmaEval, MergeResultsKeepsBothLabelsInOrder) {
  nlohmann::ordered_json earlier = {{"baseline", {{"CIDEr", 0.25}}}};
  const auto all = merge_results("finetuned", {{"CIDEr", 2.2}}, earlier);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all.begin().key(), "baseline");
  EXPECT_EQ(all["finetuned"]["CIDEr"], 2.2);
  // Re-running the same label replaces the earlier entry.
  EXPECT_EQ(merge_results("baseline", {{"CIDEr", 1.0}}, earlier)["baseline"]["CIDEr"], 1.0);
}

TEST(PaliGemmaEval, OddPredictionsScoreLikePycocoevalcap) {
  // Empty and newline-only predictions are scored, never dropped or rejected.
  std::vector<EvalPrediction> preds = {{0, {"a red building ."}, ""}, {1, {"the sea ."}, "\n\n"},
                                       {2, {"the sea ."}, "the sea ."}};
  const auto s = score_predictions(preds, nullptr);
  EXPECT_EQ(s.per_item[0].cider, 0.0);
  EXPECT_EQ(s.per_item[1].cider, 0.0);
  EXPECT_GT(s.per_item[2].bleu[0], 0.99);
}

TEST(PaliGemmaEval, CaptionPrintsOneLinePerImage) {
  // Two of the sample's images written out as JPEG files.
  auto ds = risc::open_dataset(kData);
  std::string args = "caption --model '" + kModel + "' --max-new-tokens 4";
  for (int i = 0; i < 3; ++i) {
    const fs::path p = scratch() / ("caption_" + std::to_string(i) + ".jpg");
    std::ofstream(p, std::ios::binary) << *ds->row(i).image;
    args += " '" + p.string() + "'";
  }
  const RunResult r = run_cli(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 3);
}

void expect_one_line_error(const RunResult& r, const std::string& needle) {
  EXPECT_NE(r.rc, 0);
  EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
}

TEST(PaliGemmaEval, ErrorsAreOneClearLine) {
  const std::string out = fresh_dir("tq_eval_err").string();
  expect_one_line_error(run_cli("eval --model '" + kModel + "' --data /nonexistent/risc --out '" + out + "'"),
                        "/nonexistent/risc");
  // A model directory without weights / without a tokenizer.
  expect_one_line_error(run_cli("eval --model '" + std::string(TQ_FIXTURES) + "/paligemma/pg1/native' --data '" +
                                kData + "' --out '" + out + "'"),
                        "tokenizer.model");
  const std::string no_weights = std::string(TQ_FIXTURES) + "/paligemma_proc/model";
  expect_one_line_error(run_cli("eval --model '" + no_weights + "' --data '" + kData + "' --out '" + out + "'"),
                        no_weights);
  expect_one_line_error(run_cli("eval --model /nonexistent/model --data '" + kData + "' --out '" + out + "'"),
                        "/nonexistent/model");
  expect_one_line_error(
      run_cli("eval --model '" + kModel + "' --data '" + kData + "' --split bogus --out '" + out + "'"), "bogus");
  expect_one_line_error(run_cli("eval --model '" + kModel + "' --data '" + kData + "' --compare /nonexistent/cmp --out '" +
                                out + "'"),
                        "/nonexistent/cmp");
  expect_one_line_error(run_cli("eval --model '" + kModel + "' --data '" + kData + "' --device cuda --out '" + out + "'"),
                        "cuda");
  expect_one_line_error(run_cli("caption --model '" + kModel + "' /nonexistent/img.jpg"), "/nonexistent/img.jpg");
}

}  // namespace
}  // namespace tq::paligemma::test
