// JPEG decoding against PIL (tools/fixtures/risc_jpeg.py): with libjpeg-turbo set up as Pillow sets
// it up, every JPEG PIL opens must decode to exactly PIL's .convert("RGB") pixels, and every JPEG
// PIL rejects (truncated, no EOI) must fail with the usual one-line "corrupt image" error.
#include "risc/image.hpp"
#include "risc_test_util.hpp"

#include <gtest/gtest.h>

using namespace tq::risc;

namespace {

nlohmann::json manifest() { return risc_test::load_json(risc_test::fixture("jpeg/manifest.json")); }

std::string jpeg_bytes(const std::string& name) { return read_whole_file(risc_test::fixture("jpeg/" + name + ".jpg")); }

}  // namespace

#ifdef TQ_HAVE_LIBJPEG

TEST(RiscImageJpeg, DecodesExactlyAsPil) {
  const auto man = manifest();
  int compared = 0;
  for (const auto& [name, c] : man["cases"].items()) {
    if (c["result"] != "ok") continue;
    const ImageU8 got = decode_image(jpeg_bytes(name), name);
    const ImageU8 want = decode_image(read_whole_file(risc_test::fixture("jpeg/pil_" + name + ".png")), name);
    ASSERT_EQ(got.width, c["size"][0].get<int>()) << name;
    ASSERT_EQ(got.height, c["size"][1].get<int>()) << name;
    ASSERT_EQ(got.rgb.size(), want.rgb.size()) << name;
    size_t diff = 0;
    int maxd = 0;
    for (size_t i = 0; i < got.rgb.size(); ++i) {
      diff += got.rgb[i] != want.rgb[i];
      maxd = std::max(maxd, std::abs(int(got.rgb[i]) - int(want.rgb[i])));
    }
    EXPECT_EQ(diff, 0u) << name << ": " << diff << " of " << got.rgb.size() << " values differ, max " << maxd;
    ++compared;
  }
  EXPECT_EQ(compared, 12);  // every kind in the generator, none silently dropped
}

TEST(RiscImageJpeg, RejectsWhatPilRejects) {
  const auto man = manifest();
  int rejected = 0;
  for (const auto& [name, c] : man["cases"].items()) {
    if (c["result"] != "error") continue;
    const std::string where = "file 'x.parquet', row group 0, row " + name;
    try {
      decode_image(jpeg_bytes(name), where);
      ADD_FAILURE() << name << " decoded, but PIL says: " << c["pil"].get<std::string>();
    } catch (const tq::Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(where + ": corrupt image (truncated JPEG"), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
    ++rejected;
  }
  EXPECT_EQ(rejected, 3);
}

// libjpeg's hard errors (not truncation) come back as the same one-line error, and the decoder
// stays usable afterwards (no state left behind by the longjmp).
TEST(RiscImageJpeg, LibjpegErrorsBecomeOneLine) {
  std::string bad = jpeg_bytes("rgb420_q90");
  const size_t sof = bad.find("\xff\xc0");
  ASSERT_NE(sof, std::string::npos);
  bad[sof + 4] = 12;  // 12-bit samples: libjpeg (8-bit build) errors out, as PIL refuses them too
  for (int round = 0; round < 2; ++round) {
    try {
      decode_image(bad, "row 3");
      FAIL();
    } catch (const tq::Error& e) {
      const std::string m = e.what();
      EXPECT_EQ(m.rfind("row 3: corrupt image (", 0), 0u) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
    EXPECT_EQ(decode_image(jpeg_bytes("rgb420_q90"), "ok").width, 37);
  }
}

#else

TEST(RiscImageJpeg, DecodesExactlyAsPil) { GTEST_SKIP() << "built without libjpeg (TQ_HAVE_LIBJPEG): stb_image decodes JPEG"; }

#endif

// Any decoder: JPEG and the PNG of the same pixels agree in size, and the pixels stay within what
// two IDCTs can differ by (stb_image's JPEG is a few levels off PIL's; libjpeg's is exact).
TEST(RiscImageJpeg, AnyDecoderIsCloseToPil) {
  const auto man = manifest();
  for (const char* name : {"rgb420_q90", "rgb444", "gray", "progressive"}) {
    const ImageU8 got = decode_image(jpeg_bytes(name), name);
    const ImageU8 want = decode_image(read_whole_file(risc_test::fixture(std::string("jpeg/pil_") + name + ".png")), name);
    ASSERT_EQ(got.rgb.size(), want.rgb.size()) << name;
    int maxd = 0;
    for (size_t i = 0; i < got.rgb.size(); ++i) maxd = std::max(maxd, std::abs(int(got.rgb[i]) - int(want.rgb[i])));
    EXPECT_LE(maxd, 4) << name;
  }
}
