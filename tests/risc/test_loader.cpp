// The prefetching loader: order = numpy default_rng([seed, epoch]).permutation over the given rows,
// pixels = the processor path, deterministic across worker counts, bad rows reported or skipped.
#include "risc/loader.hpp"
#include "risc_test_util.hpp"

#include <gtest/gtest.h>

#include <set>

using namespace tq::risc;

namespace {

std::vector<int64_t> iota(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

struct Epoch {
  std::vector<int64_t> rows;
  std::vector<std::string> captions;
  std::vector<float> pixels;
};

Epoch run_epoch(Loader& l, uint64_t epoch, int w, int h) {
  l.begin_epoch(epoch);
  Epoch e;
  while (auto b = l.next()) {
    e.rows.insert(e.rows.end(), b->rows.begin(), b->rows.end());
    e.captions.insert(e.captions.end(), b->captions.begin(), b->captions.end());
    e.pixels.insert(e.pixels.end(), b->pixels->data(), b->pixels->data() + b->rows.size() * 3 * w * h);
  }
  return e;
}

}  // namespace

TEST(RiscLoader, EpochOrderIsNumpyPermutationOfSeedAndEpoch) {
  // 10 rows of the dense table; python3 -c "import numpy as np;
  //   print(np.random.default_rng([42,1]).permutation(10))"  -> [0 8 7 4 3 1 2 9 6 5]
  auto ds = open_dataset(risc_test::fixture("parquet/matrix/dense_snappy_dict_v1_small.parquet"));
  LoaderOptions o;
  o.batch_size = 3;
  o.image_width = o.image_height = 16;
  o.captions = CaptionStrategy::First;
  Loader l(*ds, iota(10), o);
  EXPECT_EQ(run_epoch(l, 0, 16, 16).rows, (std::vector<int64_t>{5, 6, 0, 7, 3, 2, 4, 9, 1, 8}));
  EXPECT_EQ(run_epoch(l, 1, 16, 16).rows, (std::vector<int64_t>{0, 8, 7, 4, 3, 1, 2, 9, 6, 5}));
  // Subset indices are permuted as a list: position k of the epoch is indices[perm[k]].
  Loader sub(*ds, {10, 11, 12, 13, 14, 15, 16}, o);
  // python3 -c "import numpy as np; print(np.random.default_rng(42).permutation(7))" -> [3 2 6 4 1 5 0]
  EXPECT_EQ(run_epoch(sub, 0, 16, 16).rows, (std::vector<int64_t>{13, 12, 16, 14, 11, 15, 10}));
}

TEST(RiscLoader, PixelsAndCaptionsMatchTheProcessorPath) {
  auto ds = open_dataset(risc_test::fixture("parquet/matrix/dense_none_plain_v2_big.parquet"));
  LoaderOptions o;
  o.batch_size = 4;
  o.image_width = 20;
  o.image_height = 12;
  o.captions = CaptionStrategy::Longest;
  Loader l(*ds, iota(ds->size()), o);
  Epoch e = run_epoch(l, 3, 20, 12);
  ASSERT_EQ(e.rows.size(), static_cast<size_t>(ds->size()));
  std::vector<float> one(3 * 20 * 12);
  for (size_t k = 0; k < e.rows.size(); ++k) {
    Row r = ds->row(e.rows[k]);
    preprocess_image(*r.image, 20, 12, one.data(), "test");
    ASSERT_TRUE(std::equal(one.begin(), one.end(), e.pixels.begin() + k * one.size())) << k;
    EXPECT_EQ(e.captions[k], *choose_caption(r.captions, CaptionStrategy::Longest, 42, 3, e.rows[k]));
  }
}

TEST(RiscLoader, DeterministicAcrossWorkerCounts) {
  auto ds = open_dataset(risc_test::fixture("parquet/hf_dataset"));
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < ds->size(); ++i)
    if (ds->row(i).image) rows.push_back(i);
  LoaderOptions o;
  o.batch_size = 2;
  o.image_width = o.image_height = 8;
  o.prefetch = 2;
  o.workers = 1;
  Loader a(*ds, rows, o);
  o.workers = 4;
  Loader b(*ds, rows, o);
  Epoch ea = run_epoch(a, 2, 8, 8), eb = run_epoch(b, 2, 8, 8);
  EXPECT_EQ(ea.rows, eb.rows);
  EXPECT_EQ(ea.captions, eb.captions);
  EXPECT_EQ(ea.pixels, eb.pixels);
  EXPECT_NE(run_epoch(a, 3, 8, 8).rows, ea.rows);  // epochs reshuffle
  // Row 4 of the hf table has no caption at all: it is skipped and counted.
  EXPECT_GT(a.stats().rows_without_caption.load(), 0);
}

TEST(RiscLoader, BadImageErrorsOrIsSkipped) {
  const std::string path = risc_test::fixture("parquet/extra/bad_image.parquet");
  auto ds = open_dataset(path);
  LoaderOptions o;
  o.batch_size = 2;
  o.image_width = o.image_height = 8;
  o.shuffle = false;
  {
    Loader l(*ds, iota(ds->size()), o);
    l.begin_epoch(0);
    try {
      while (l.next()) {
      }
      FAIL() << "no error for the corrupt image";
    } catch (const tq::Error& e) {
      EXPECT_NE(std::string(e.what()).find("file '" + path + "', row group 1, row 3: corrupt image"),
                std::string::npos) << e.what();
    }
  }
  o.skip_bad_images = true;
  Loader l(*ds, iota(ds->size()), o);
  Epoch e = run_epoch(l, 0, 8, 8);
  EXPECT_EQ(e.rows, (std::vector<int64_t>{0, 1, 2, 4, 5}));
  EXPECT_EQ(l.stats().bad_images.load(), 1);
}

TEST(RiscLoader, TokenizeHookSeesEveryCaption) {
  auto ds = open_dataset(risc_test::fixture("parquet/matrix/dense_gzip_dict_v1_big.parquet"));
  LoaderOptions o;
  o.batch_size = 5;
  o.image_width = o.image_height = 8;
  o.tokenize = [](const std::string& c) {
    TokenizedText t;
    t.input_ids.assign(c.begin(), c.end());
    return t;
  };
  Loader l(*ds, iota(ds->size()), o);
  l.begin_epoch(0);
  while (auto b = l.next()) {
    ASSERT_EQ(b->tokens.size(), b->captions.size());
    for (size_t k = 0; k < b->tokens.size(); ++k)
      EXPECT_EQ(std::string(b->tokens[k].input_ids.begin(), b->tokens[k].input_ids.end()), b->captions[k]);
  }
}

TEST(RiscCaptions, StrategiesSkipMissingCaptions) {
  std::vector<std::optional<std::string>> c = {std::nullopt, "ab", std::nullopt, "héllo", "xyz"};
  EXPECT_EQ(*choose_caption(c, CaptionStrategy::First, 1, 0, 0), "ab");
  EXPECT_EQ(*choose_caption(c, CaptionStrategy::Longest, 1, 0, 0), "héllo");
  EXPECT_EQ(*choose_caption(c, CaptionStrategy::Concat, 1, 0, 0), "ab héllo xyz");
  std::set<std::string> seen;
  for (int64_t row = 0; row < 200; ++row) seen.insert(*choose_caption(c, CaptionStrategy::Random, 7, 0, row));
  EXPECT_EQ(seen, (std::set<std::string>{"ab", "héllo", "xyz"}));
  EXPECT_EQ(choose_caption(c, CaptionStrategy::Random, 7, 1, 5), choose_caption(c, CaptionStrategy::Random, 7, 1, 5));
  EXPECT_FALSE(choose_caption({std::nullopt, std::nullopt}, CaptionStrategy::First, 1, 0, 0).has_value());
  EXPECT_THROW(parse_caption_strategy("best"), tq::Error);
}
