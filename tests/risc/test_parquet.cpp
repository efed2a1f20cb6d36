// The parquet reader against files written by pyarrow (tools/fixtures/risc_parquet.py): every
// codec x dictionary x page version x layout, required fields, dictionary fallback to PLAIN and an
// HF dataset directory must decode to the values pyarrow was given. Then damaged copies of those
// files must fail with one error that names the file (and row group/rows where there are any).
#include "risc/dataset.hpp"
#include "risc/sha256.hpp"
#include "risc_test_util.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

using namespace tq::risc;

namespace {

const nlohmann::json& expected() {
  static const nlohmann::json j = risc_test::load_json(risc_test::fixture("parquet/expected.json"));
  return j;
}

void check_row(const Dataset& ds, const nlohmann::json& table, const std::string& name, int64_t i) {
  {
    const auto& want = table[static_cast<size_t>(i)];
    Row r = ds.row(i);
    SCOPED_TRACE(name + " row " + std::to_string(i));
    if (want["image_sha256"].is_null()) {
      EXPECT_FALSE(r.image.has_value());
    } else {
      ASSERT_TRUE(r.image.has_value());
      EXPECT_EQ(r.image->size(), want["image_len"].get<size_t>());
      EXPECT_EQ(sha256_hex(*r.image), want["image_sha256"].get<std::string>());
    }
    EXPECT_EQ(risc_test::opt_json(r.image_path), want["path"]);
    ASSERT_EQ(r.captions.size(), 5u);
    for (size_t k = 0; k < 5; ++k) EXPECT_EQ(risc_test::opt_json(r.captions[k]), want["captions"][k]);
  }
}

// Compares every row of `ds` with the expected table; returns the number of rows checked.
size_t check_rows(const Dataset& ds, const nlohmann::json& table, const std::string& name) {
  EXPECT_EQ(ds.size(), static_cast<int64_t>(table.size())) << name;
  if (ds.size() != static_cast<int64_t>(table.size())) return 0;
  for (int64_t i = 0; i < ds.size(); ++i) check_row(ds, table, name, i);
  return static_cast<size_t>(ds.size());
}

std::string copy_with(const std::string& src, const std::string& name,
                      const std::function<void(std::string&)>& edit) {
  std::string bytes = read_whole_file(src);
  edit(bytes);
  std::string p = risc_test::temp_path(name);
  std::ofstream(p, std::ios::binary) << bytes;
  return p;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const tq::Error& e) {
    return e.what();
  }
  return "<no error>";
}

void read_all(const std::string& path) {
  ParquetDataset ds({path});
  for (int64_t i = 0; i < ds.size(); ++i) ds.row(i);
}

const std::string kGood = "parquet/matrix/nulls_snappy_dict_v1_small.parquet";

}  // namespace

TEST(RiscParquet, EveryPyarrowFixtureDecodesExactly) {
  size_t files = 0, rows = 0;
  for (auto& [rel, table] : expected()["files"].items()) {
    if (rel == "hf_dataset") continue;
    auto ds = open_dataset(risc_test::fixture("parquet/" + rel));
    rows += check_rows(*ds, expected()["tables"][table.get<std::string>()], rel);
    ++files;
  }
  EXPECT_EQ(files, 67u);  // 2 tables x 4 codecs x 2 dictionary x 2 page versions x 2 layouts + 3
  EXPECT_GT(rows, 1000u);
}

TEST(RiscParquet, MatrixCoversManyRowGroupsAndPages) {
  ParquetFile f(risc_test::fixture("parquet/matrix/nulls_zstd_plain_v2_small.parquet"));
  EXPECT_EQ(f.num_row_groups(), 5u);  // 23 rows in groups of 5
  EXPECT_EQ(f.num_rows(), 23);
  EXPECT_EQ(f.leaves().size(), 7u);
  EXPECT_EQ(f.leaves()[0].max_def, 2);
  EXPECT_EQ(f.leaves()[2].max_def, 1);
  ParquetFile r(risc_test::fixture("parquet/extra/required.parquet"));
  EXPECT_EQ(r.leaves()[0].max_def, 0);
}

TEST(RiscParquet, HfDatasetDirectoryConcatenatesShardsInNameOrder) {
  auto ds = open_dataset(risc_test::fixture("parquet/hf_dataset"));
  EXPECT_EQ(check_rows(*ds, expected()["tables"]["hf"], "hf_dataset"), 19u);
  EXPECT_NE(ds->where(8).find("train-00001-of-00003.parquet', row group 0, row 1"), std::string::npos)
      << ds->where(8);
}

TEST(RiscParquet, CacheEvictionKeepsResultsRight) {
  // A 1-byte budget evicts on every row group change; results must not depend on the cache.
  ParquetDataset ds({risc_test::fixture("parquet/matrix/nulls_gzip_dict_v2_small.parquet")}, 1);
  for (int64_t i : {22, 0, 13, 4, 21, 5}) {
    Row a = ds.row(i);
    EXPECT_EQ(risc_test::opt_json(a.captions[2]), expected()["tables"]["nulls"][i]["captions"][2]);
  }
}

TEST(RiscParquetErrors, TruncatedFile) {
  auto p = copy_with(risc_test::fixture(kGood), "trunc.parquet", [](std::string& b) { b.resize(b.size() / 2); });
  auto msg = error_of([&] { read_all(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST(RiscParquetErrors, BadMagic) {
  auto p = copy_with(risc_test::fixture(kGood), "magic.parquet", [](std::string& b) { b[1] = 'X'; });
  auto msg = error_of([&] { read_all(p); });
  EXPECT_NE(msg.find(p), std::string::npos);
  EXPECT_NE(msg.find("bad magic"), std::string::npos) << msg;
}

TEST(RiscParquetErrors, CorruptThriftFooter) {
  auto p = copy_with(risc_test::fixture(kGood), "thrift.parquet", [](std::string& b) {
    uint32_t len;
    std::memcpy(&len, b.data() + b.size() - 8, 4);
    size_t start = b.size() - 8 - len;
    for (size_t i = start + 2; i < start + 40; ++i) b[i] = static_cast<char>(0xFF);
  });
  auto msg = error_of([&] { read_all(p); });
  EXPECT_NE(msg.find(p), std::string::npos);
  EXPECT_NE(msg.find("corrupt Thrift"), std::string::npos) << msg;
}

TEST(RiscParquetErrors, CorruptPageNamesRowGroupAndRows) {
  // Damage the first page header of the third row group's caption_3 chunk.
  ParquetFile f(risc_test::fixture(kGood));
  const auto& m = *f.meta().row_groups[2].columns[4].meta;
  const int64_t off = m.dictionary_page_offset ? *m.dictionary_page_offset : m.data_page_offset;
  auto p = copy_with(risc_test::fixture(kGood), "page.parquet", [&](std::string& b) {
    for (int64_t i = off; i < off + 12; ++i) b[static_cast<size_t>(i)] = static_cast<char>(0xEE);
  });
  auto msg = error_of([&] { read_all(p); });
  EXPECT_NE(msg.find(p + "', row group 2, rows 10..14, column caption_3"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

TEST(RiscParquetErrors, CorruptCompressedDataNamesRowGroup) {
  ParquetFile f(risc_test::fixture(kGood));
  const auto& m = *f.meta().row_groups[1].columns[0].meta;
  const int64_t off = m.dictionary_page_offset ? *m.dictionary_page_offset : m.data_page_offset;
  auto p = copy_with(risc_test::fixture(kGood), "snappy.parquet", [&](std::string& b) {
    // Past the ~30-byte page header: scribble over the snappy stream.
    for (int64_t i = off + 40; i < off + m.total_compressed_size - 4; i += 3) b[static_cast<size_t>(i)] ^= 0x5A;
  });
  auto msg = error_of([&] { read_all(p); });
  EXPECT_NE(msg.find("row group 1, rows 5..9, column image.bytes"), std::string::npos) << msg;
}

TEST(RiscParquetErrors, MissingColumns) {
  auto msg = error_of([] {
    ParquetFile f(risc_test::fixture(kGood));
    f.leaf_index({"image", "pixels"});
  });
  EXPECT_NE(msg.find("missing column 'image.pixels'"), std::string::npos) << msg;
}

TEST(RiscParquetErrors, EmptyAndTinyFiles) {
  for (size_t n : {0, 3, 11, 12}) {
    auto p = copy_with(risc_test::fixture(kGood), "tiny" + std::to_string(n) + ".parquet",
                       [n](std::string& b) { b = std::string("PAR1PAR1PAR1").substr(0, n); });
    EXPECT_NE(error_of([&] { read_all(p); }), "<no error>") << n;
  }
}

// Inputs kept from fuzzing (tools/fuzz_parquet.sh): each must decode or throw tq::Error, never
// crash. A crash the fuzzer finds is added to tests/fixtures/risc/fuzz/ and so runs here.
TEST(RiscFuzzRegressions, KeptInputsDecodeOrThrow) {
  const std::string dir = risc_test::fixture("fuzz");
  if (!std::filesystem::is_directory(dir)) GTEST_SKIP() << "no kept fuzz inputs";
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string bytes = read_whole_file(e.path());
    try {
      ParquetFile f(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), e.path().string());
      for (size_t g = 0; g < f.num_row_groups(); ++g)
        for (size_t c = 0; c < f.leaves().size(); ++c) {
          try {
            f.read_column(g, c);
          } catch (const tq::Error&) {
          }
        }
    } catch (const tq::Error&) {
    }
    ++n;
  }
  EXPECT_GT(n, 0);
}
