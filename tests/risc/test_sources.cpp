// Non-parquet layouts (tools/fixtures/risc_sources.py): image folder + captions.csv / .jsonl,
// Karpathy JSON (RSICD) and the class-keyed NWPU JSON.
#include "risc/dataset.hpp"
#include "risc/sha256.hpp"
#include "risc_test_util.hpp"

#include <gtest/gtest.h>

using namespace tq::risc;

TEST(RiscSources, EveryLayoutDecodesToWhatPythonWrote) {
  auto exp = risc_test::load_json(risc_test::fixture("sources/expected.json"));
  const std::vector<std::pair<std::string, std::string>> layouts = {
      {"folder_csv", "sources/folder_csv"},
      {"folder_jsonl", "sources/folder_jsonl"},
      {"karpathy", "sources/karpathy/dataset_rsicd.json"},
      {"nwpu", "sources/nwpu/dataset_nwpu.json"}};
  for (const auto& [key, rel] : layouts) {
    auto ds = open_dataset(risc_test::fixture(rel));
    const auto& want = exp[key];
    ASSERT_EQ(ds->size(), static_cast<int64_t>(want.size())) << key;
    for (int64_t i = 0; i < ds->size(); ++i) {
      Row r = ds->row(i);
      ASSERT_TRUE(r.image.has_value()) << key << " " << i << " " << ds->where(i);
      EXPECT_EQ(sha256_hex(*r.image), want[i]["image_sha256"].get<std::string>()) << key << i;
      nlohmann::json caps = nlohmann::json::array();
      for (auto& c : r.captions) caps.push_back(risc_test::opt_json(c));
      EXPECT_EQ(caps, want[i]["captions"]) << key << " row " << i;
    }
  }
}

TEST(RiscSources, MissingImageIsReportedWithItsRow) {
  std::vector<FileEntry> e(1);
  e[0].image = "/nonexistent/x.jpg";
  e[0].origin = "captions.csv row 1";
  FileListDataset ds(e);
  EXPECT_FALSE(ds.row(0).image.has_value());
  EXPECT_NE(ds.where(0).find("/nonexistent/x.jpg"), std::string::npos);
}

TEST(RiscSources, UnknownPathsFailClearly) {
  EXPECT_THROW(open_dataset("/nonexistent/dir"), tq::Error);
  EXPECT_THROW(open_dataset(risc_test::fixture("image/manifest.json.nope")), tq::Error);
}
