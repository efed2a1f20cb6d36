// `paligemma data`: the manifest of an HF dataset directory against what pyarrow/hashlib/PIL saw
// (tools/fixtures/risc_parquet.py), split selection, and the bad-image paths.
#include "risc/split.hpp"
#include "risc_test_util.hpp"

#include <gtest/gtest.h>

#include <fstream>

namespace {

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST(RiscCliData, ManifestOfHfDirectoryMatchesPython) {
  auto exp = risc_test::load_json(risc_test::fixture("parquet/expected.json"))["tables"]["hf"];
  const std::string m = risc_test::temp_path("manifest.jsonl");
  auto r = risc_test::run_cli("data --data " + risc_test::fixture("parquet/hf_dataset") + " --manifest " + m +
                              " --skip-bad-images");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto lines = read_jsonl(m);
  size_t k = 0, bad = 0;
  for (size_t i = 0; i < exp.size(); ++i) {
    if (exp[i]["image_sha256"].is_null()) {
      ++bad;
      continue;
    }
    ASSERT_LT(k, lines.size());
    const auto& l = lines[k++];
    EXPECT_EQ(l["index"], i);
    EXPECT_EQ(l["image_sha256"], exp[i]["image_sha256"]);
    EXPECT_EQ(l["width"], exp[i]["width"]);
    EXPECT_EQ(l["height"], exp[i]["height"]);
    EXPECT_EQ(l["captions"], exp[i]["captions"]);
  }
  EXPECT_EQ(k, lines.size());
  EXPECT_GT(bad, 0u);
  EXPECT_NE(r.out.find("skipped bad images: " + std::to_string(bad)), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rows without any caption: 1"), std::string::npos) << r.out;
}

TEST(RiscCliData, SplitRowsComeInSplitOrder) {
  const std::string m = risc_test::temp_path("train.jsonl");
  auto r = risc_test::run_cli("data --data " + risc_test::fixture("parquet/matrix/dense_zstd_dict_v2_big.parquet") +
                              " --manifest " + m + " --split test --test-size 0.3 --seed 7");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto lines = read_jsonl(m);
  auto s = tq::risc::make_split(17, 7, 0.3, 0.05);
  ASSERT_EQ(lines.size(), s.test.size());
  for (size_t k = 0; k < lines.size(); ++k) EXPECT_EQ(lines[k]["index"], s.test[k]);
}

TEST(RiscCliData, CorruptImageIsOneLineErrorOrSkipped) {
  const std::string path = risc_test::fixture("parquet/extra/bad_image.parquet");
  const std::string m = risc_test::temp_path("bad.jsonl");
  auto r = risc_test::run_cli("data --data " + path + " --manifest " + m);
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("error: file '" + path + "', row group 1, row 3: corrupt image"), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  auto s = risc_test::run_cli("data --data " + path + " --manifest " + m + " --skip-bad-images");
  EXPECT_EQ(s.rc, 0) << s.out;
  EXPECT_NE(s.out.find("skipped bad images: 1"), std::string::npos) << s.out;
  EXPECT_EQ(read_jsonl(m).size(), 5u);
}

TEST(RiscCliData, BadParquetFilesExitNonZeroWithOneLine) {
  const std::string p = risc_test::temp_path("notparquet.parquet");
  std::ofstream(p) << "PAR1 this is not parquet at all";
  auto r = risc_test::run_cli("data --data " + p + " --manifest " + risc_test::temp_path("x.jsonl"));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("error: file '" + p + "'"), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
}
