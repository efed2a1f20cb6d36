// The split against numpy: spec/qlora.md E.4 test vectors and full permutations written by numpy
// (tools/fixtures/risc_split.py).
#include "risc/split.hpp"
#include "risc_test_util.hpp"

#include <gtest/gtest.h>

using namespace tq::risc;

TEST(RiscSplit, SeedSequenceAndPcg64MatchNumpyVectors) {
  SeedSequence ss(42);
  EXPECT_EQ(ss.pool(), (std::array<uint32_t, 4>{0x631d3606, 0x07ae90ae, 0x6fc4be28, 0x2ced5c75}));
  EXPECT_EQ(ss.generate_state_u32(8), (std::vector<uint32_t>{0xcd540ab7, 0x9f1e2e6d, 0x79fb94b6, 0xd57873dc,
                                                             0x64d420b7, 0x7d282a1b, 0x4692d5ff, 0x33657971}));
  Pcg64 g(42);
  EXPECT_EQ(static_cast<uint64_t>(g.state() >> 64), 0xcea44f6798798f2aull);
  EXPECT_EQ(static_cast<uint64_t>(g.state()), 0xacbc7c9d68860ac8ull);
  EXPECT_EQ(static_cast<uint64_t>(g.inc() >> 64), 0xfa505436c9a8416eull);
  EXPECT_EQ(g.next64(), 0xc621fbcd16d92688ull);
  EXPECT_EQ(g.next64(), 0x705a5661a791ffc1ull);
  Pcg64 h(42);
  EXPECT_EQ(h.next32(), 0x16d92688u);
  EXPECT_EQ(h.next32(), 0xc621fbcdu);
  Pcg64 r(42);
  EXPECT_DOUBLE_EQ(r.next_double(), 0.7739560485559633);
  EXPECT_DOUBLE_EQ(r.next_double(), 0.4388784397520523);
}

TEST(RiscSplit, PermutationsEqualNumpy) {
  for (int64_t n : {7, 1000, 44521})
    for (uint64_t seed : {42u, 7u}) {
      std::string bytes = read_whole_file(risc_test::fixture(
          "split/perm_n" + std::to_string(n) + "_seed" + std::to_string(seed) + ".u16"));
      ASSERT_EQ(bytes.size(), static_cast<size_t>(2 * n));
      std::vector<int64_t> want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i)
        want[i] = static_cast<uint8_t>(bytes[2 * i]) | (static_cast<uint8_t>(bytes[2 * i + 1]) << 8);
      EXPECT_EQ(permutation(n, seed), want) << "n=" << n << " seed=" << seed;
    }
  auto p = permutation(44521, 42);
  EXPECT_EQ(std::vector<int64_t>(p.begin(), p.begin() + 10),
            (std::vector<int64_t>{6501, 23784, 34364, 29869, 17244, 2004, 20214, 36194, 43637, 42509}));
}

TEST(RiscSplit, SizesAndContentsEqualNumpy) {
  auto cases = risc_test::load_json(risc_test::fixture("split/splits.json"))["cases"];
  ASSERT_GE(cases.size(), 18u);
  for (const auto& c : cases) {
    const int64_t n = c["n"];
    const uint64_t seed = c["seed"];
    Split s = make_split(n, seed, c["test_size"], c["val_size"]);
    EXPECT_EQ(static_cast<int64_t>(s.train.size()), c["train"].get<int64_t>()) << c.dump();
    EXPECT_EQ(static_cast<int64_t>(s.val.size()), c["val"].get<int64_t>()) << c.dump();
    EXPECT_EQ(static_cast<int64_t>(s.test.size()), c["test"].get<int64_t>()) << c.dump();
    auto perm = permutation(n, seed);
    std::vector<int64_t> joined = s.train;
    joined.insert(joined.end(), s.val.begin(), s.val.end());
    joined.insert(joined.end(), s.test.begin(), s.test.end());
    EXPECT_EQ(joined, perm);
  }
  Split risc = make_split(44521, 42);
  EXPECT_EQ(risc.train.size(), 37843u);
  EXPECT_EQ(risc.val.size(), 2226u);
  EXPECT_EQ(risc.test.size(), 4452u);
}

TEST(RiscSplit, CliPrintsTheSplit) {
  auto r = risc_test::run_cli("split --n 7 --seed 7 --test-size 0.3 --val-size 0.15");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  Split s = make_split(7, 7, 0.3, 0.15);
  EXPECT_EQ(j["train"].get<std::vector<int64_t>>(), s.train);
  EXPECT_EQ(j["val"].get<std::vector<int64_t>>(), s.val);
  EXPECT_EQ(j["test"].get<std::vector<int64_t>>(), s.test);
  auto big = risc_test::run_cli("split --n 44521");
  ASSERT_EQ(big.rc, 0);
  auto jb = nlohmann::json::parse(big.out);
  EXPECT_EQ(jb["train"].size(), 37843u);
  EXPECT_EQ(jb["val"].size(), 2226u);
  EXPECT_EQ(jb["test"].size(), 4452u);
  EXPECT_EQ(jb["train"][0], 6501);
  EXPECT_NE(risc_test::run_cli("split --n 10 --test-size 0.8 --val-size 0.5").rc, 0);
}
