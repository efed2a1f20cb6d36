// METEOR building blocks against the jar itself: the Snowball English stems of meteor-1.5.jar's
// `Stemmer` (tools/fixtures/metrics_stemmer.py), and Java String.hashCode values.
#include "metrics/snowball_english.hpp"
#include "metrics/text.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <string>

namespace {

using namespace tq::metrics;

TEST(MeteorParts, SnowballStemsMatchJar) {
  std::ifstream in(std::string(TQ_FIXTURES) + "/metrics/meteor_stems.tsv");
  ASSERT_TRUE(in);
  EnglishStemmer stemmer;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t tab = line.find('\t');
    ASSERT_NE(tab, std::string::npos) << line;
    const std::string word = line.substr(0, tab), want = line.substr(tab + 1);
    EXPECT_EQ(u32_to_utf8(stemmer.stem(utf8_to_u32(word))), want) << word;
    ++n;
  }
  EXPECT_GT(n, 4000);
}

TEST(MeteorParts, JavaStringHashCode) {
  // Values of "...".hashCode() in Java.
  EXPECT_EQ(java_hash(U""), 0);
  EXPECT_EQ(java_hash(U"a"), 97);
  EXPECT_EQ(java_hash(U"hello"), 99162322);
  EXPECT_EQ(java_hash(U"parking lot"), -1722267927);
  EXPECT_EQ(java_hash(U"caf\u00e9"), 3045921);
  EXPECT_EQ(java_hash(U"\U0001F600x"), 54959989);  // a surrogate pair in Java
}

}  // namespace
