// Caption metrics against values produced by the real pycocoevalcap 1.2 (tools/fixtures/
// metrics_generate.py): 520 RISC-style items, raw (RISC notebook) and PTB (COCO) modes.
// BLEU, ROUGE-L and CIDEr must agree to 1e-9, METEOR to 1e-6, corpus and per item.
#include "metrics/meteor_data.hpp"

#include <cstdlib>
#include "metrics/scorer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <memory>
#include <sstream>

namespace {

using namespace tq::metrics;

const nlohmann::json& fixture() {
  static const nlohmann::json j = [] {
    std::ifstream in(std::string(TQ_FIXTURES) + "/metrics/pycocoevalcap_520.json");
    EXPECT_TRUE(in) << "missing fixture";
    return nlohmann::json::parse(in);
  }();
  return j;
}

std::vector<CaptionItem> fixture_items() {
  std::vector<CaptionItem> items;
  for (const auto& it : fixture()["items"]) items.push_back({it["refs"].get<std::vector<std::string>>(), it["pred"]});
  return items;
}

// METEOR data loads once per test binary (the paraphrase table takes seconds); null when absent.
const MeteorData* meteor_data() {
  static const std::unique_ptr<MeteorData> d = []() -> std::unique_ptr<MeteorData> {
    const auto dir = default_meteor_data_dir();
    if (!missing_meteor_file(dir).empty()) return nullptr;
    return std::make_unique<MeteorData>(load_meteor_data(dir));
  }();
  return d.get();
}

// Without the data METEOR tests skip, except where TQ_REQUIRE_METEOR is set (CI sets it, so a
// failed data download fails the run instead of silently skipping the comparison).
bool meteor_required() { return std::getenv("TQ_REQUIRE_METEOR") != nullptr; }

void expect_scores(const nlohmann::json& ref, const std::array<double, 4>& bleu, double rouge, double cider,
                   const std::string& what) {
  for (int k = 0; k < 4; ++k)
    EXPECT_NEAR(bleu[k], ref["BLEU-" + std::to_string(k + 1)].get<double>(), 1e-9) << what << " BLEU-" << k + 1;
  EXPECT_NEAR(rouge, ref["ROUGE-L"].get<double>(), 1e-9) << what << " ROUGE-L";
  EXPECT_NEAR(cider, ref["CIDEr"].get<double>(), 1e-9) << what << " CIDEr";
}

void check_mode(const std::string& mode, Tokenization tok, bool with_meteor) {
  const auto items = fixture_items();
  ASSERT_GE(items.size(), 500u);
  const auto& ref = fixture()[mode];
  const MeteorData* data = with_meteor ? meteor_data() : nullptr;
  if (with_meteor && !data) {
    if (meteor_required()) FAIL() << "METEOR data absent and TQ_REQUIRE_METEOR is set";
    GTEST_SKIP() << "METEOR data absent; run tools/setup_meteor.sh";
  }
  const CaptionScores s = score_captions(items, tok, data);
  expect_scores(ref["corpus"], s.bleu, s.rouge_l, s.cider, mode + " corpus");
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& r = ref["per_item"][i];
    expect_scores(r, s.per_item[i].bleu, s.per_item[i].rouge_l, s.per_item[i].cider, mode + " item " + std::to_string(i));
    if (data) {
      EXPECT_NEAR(*s.per_item[i].meteor, r["METEOR"].get<double>(), 1e-6) << mode << " item " << i << " METEOR";
    }
  }
  if (data) {
    EXPECT_NEAR(*s.meteor, ref["corpus"]["METEOR"].get<double>(), 1e-6) << mode << " corpus METEOR";
  }
  if (!data) {
    EXPECT_FALSE(s.meteor.has_value());
  }
}

TEST(MetricsFixture, RawBleuRougeCider) { check_mode("raw", Tokenization::raw, false); }
TEST(MetricsFixture, PtbBleuRougeCider) { check_mode("ptb", Tokenization::ptb, false); }
TEST(MetricsFixture, RawMeteor) { check_mode("raw", Tokenization::raw, true); }
TEST(MetricsFixture, PtbMeteor) { check_mode("ptb", Tokenization::ptb, true); }

TEST(MetricsFixture, PtbTokenizerMatchesStanford) {
  const auto items = fixture_items();
  const auto& ptb = fixture()["ptb"];
  int bad = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    for (size_t r = 0; r < items[i].refs.size(); ++r) {
      const std::string want = ptb["tokenized_refs"][i][r];
      EXPECT_EQ(ptb_tokenize(items[i].refs[r]), want) << "item " << i << " ref " << r << ": " << items[i].refs[r];
      bad += ptb_tokenize(items[i].refs[r]) != want;
    }
    const std::string want = ptb["tokenized_pred"][i];
    EXPECT_EQ(ptb_tokenize(items[i].pred), want) << "item " << i << " pred: " << items[i].pred;
  }
}

// The statistics lines the jar returned (tstLen refLen ... chunks tstWM refWM) pin down where a
// METEOR difference comes from: normalization, a matcher, or the alignment search.
TEST(MetricsFixture, MeteorStatisticsMatchJar) {
  const MeteorData* data = meteor_data();
  if (!data) {
    if (meteor_required()) FAIL() << "METEOR data absent and TQ_REQUIRE_METEOR is set";
    GTEST_SKIP() << "METEOR data absent; run tools/setup_meteor.sh";
  }
  const auto items = fixture_items();
  MeteorScorer ms(*data);
  for (size_t i = 0; i < items.size(); ++i) {
    const MeteorStats s = ms.item_stats(items[i].refs, items[i].pred);
    std::istringstream want(fixture()["raw"]["meteor_stats"][i].get<std::string>());
    std::vector<double> w(23);
    for (auto& x : w) want >> x;
    const std::vector<double> got = {s.test_len, s.ref_len, s.test_func, s.ref_func,
                                     s.test_content[0], s.ref_content[0], s.test_function[0], s.ref_function[0],
                                     s.test_content[1], s.ref_content[1], s.test_function[1], s.ref_function[1],
                                     s.test_content[2], s.ref_content[2], s.test_function[2], s.ref_function[2],
                                     s.test_content[3], s.ref_content[3], s.test_function[3], s.ref_function[3],
                                     s.chunks, s.test_word_matches, s.ref_word_matches};
    EXPECT_EQ(got, w) << "item " << i << ": pred '" << items[i].pred << "' ref0 '" << items[i].refs[0] << "'";
  }
}

}  // namespace
