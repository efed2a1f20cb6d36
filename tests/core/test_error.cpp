#include <gtest/gtest.h>
#include <tq/tq.hpp>

TEST(Error, CheckCarriesContext) {
  std::vector<int64_t> shape{2, 3};
  try {
    TQ_CHECK(false, "matmul: shape ", shape, " vs ", 4);
    FAIL() << "TQ_CHECK did not throw";
  } catch (const tq::Error& e) {
    EXPECT_STREQ(e.what(), "matmul: shape [2, 3] vs 4");
  }
}
