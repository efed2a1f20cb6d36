// tq::json against hand-written expectations: RFC 8259 acceptance/rejection with byte offsets,
// exact numbers, UTF-8 and surrogate handling, escaping, and random round trips.
#include <gtest/gtest.h>
#include <tq/io/json.hpp>

#include <random>

#include "../test_util.hpp"

namespace json = tq::json;

TEST(Json, ParsesEveryKindAndKeepsKeyOrder) {
  json::Value v = json::parse(R"( {"z": null, "a": [true, false, -0.5e1, "s"], "m": {"k": 12}} )");
  ASSERT_TRUE(v.is_object());
  const json::Object& o = v.as_object();
  ASSERT_EQ(o.size(), 3u);
  EXPECT_EQ(o[0].first, "z");
  EXPECT_EQ(o[1].first, "a");
  EXPECT_EQ(o[2].first, "m");
  EXPECT_TRUE(v.at("z").is_null());
  EXPECT_EQ(v.at("a").size(), 4u);
  EXPECT_TRUE(v.at("a")[0].as_bool());
  EXPECT_FALSE(v.at("a")[1].as_bool());
  EXPECT_EQ(v.at("a")[2].as_double(), -5.0);
  EXPECT_EQ(v.at("a")[2].number_text(), "-0.5e1");
  EXPECT_EQ(v.at("a")[3].as_string(), "s");
  EXPECT_EQ(v.at("m").at("k").as_int64(), 12);
  EXPECT_EQ(json::dump(v), R"({"z":null,"a":[true,false,-0.5e1,"s"],"m":{"k":12}})");
}

TEST(Json, IntegersAreExactBeyondDoublePrecision) {
  json::Value v = json::parse("[9223372036854775807, -9223372036854775808, 18446744073709551615, 9007199254740993]");
  EXPECT_EQ(v[0].as_int64(), INT64_MAX);
  EXPECT_EQ(v[1].as_int64(), INT64_MIN);
  EXPECT_EQ(v[2].as_uint64(), UINT64_MAX);
  EXPECT_EQ(v[3].as_int64(), 9007199254740993);  // 2^53 + 1: not representable as a double
  EXPECT_THROW(v[2].as_int64(), tq::Error);       // out of int64 range
  EXPECT_THROW(v[1].as_uint64(), tq::Error);      // negative
  EXPECT_THROW(json::parse("1.0").as_int64(), tq::Error);
  EXPECT_THROW(json::parse("1e2").as_int64(), tq::Error);
  EXPECT_TRUE(json::parse("-0").is_integer());
  EXPECT_EQ(json::dump(json::Value(int64_t(INT64_MIN))), "-9223372036854775808");
  EXPECT_EQ(json::dump(json::Value(uint64_t(UINT64_MAX))), "18446744073709551615");
}

TEST(Json, DoublesRoundTripBitExactly) {
  std::mt19937_64 rng(tq::test::fresh_seed());
  for (int i = 0; i < 2000; ++i) {
    uint64_t bits = rng();
    double d = std::bit_cast<double>(bits);
    if (!std::isfinite(d)) continue;
    std::string text = json::dump(json::Value(d));
    double back = json::parse(text).as_double();
    ASSERT_EQ(std::bit_cast<uint64_t>(back), bits) << text;
  }
  EXPECT_EQ(json::parse("1e-400").as_double(), 0.0);  // underflow rounds, as strtod does
  EXPECT_EQ(json::parse("4.9406564584124654e-324").as_double(), std::numeric_limits<double>::denorm_min());
  EXPECT_THROW(json::dump(json::Value(std::nan(""))), tq::Error);
  EXPECT_THROW(json::dump(json::Value(INFINITY)), tq::Error);
}

TEST(Json, StringsEscapesUtf8AndSurrogatePairs) {
  json::Value v = json::parse(R"(["a\"b\\c\/d\b\f\n\r\t", "\u00e9\u4e2d\ud83d\ude00", "é中😀", "\u0000x"])");
  EXPECT_EQ(v[0].as_string(), "a\"b\\c/d\b\f\n\r\t");
  EXPECT_EQ(v[1].as_string(), "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80");
  EXPECT_EQ(v[2].as_string(), v[1].as_string());
  EXPECT_EQ(v[3].as_string(), std::string("\0x", 2));
  // Writer: serde_json's escaping (short forms, \u00xx for other controls, UTF-8 verbatim).
  EXPECT_EQ(json::dump(json::Value(std::string("q\"\\/\x01\x1f\x7f\n\t") + "é😀")),
            "\"q\\\"\\\\/\\u0001\\u001f\x7f\\n\\t\xc3\xa9\xf0\x9f\x98\x80\"");
  EXPECT_THROW(json::dump(json::Value(std::string("\xff"))), tq::Error);
  EXPECT_THROW(json::dump(json::Value(std::string("\xed\xa0\x80"))), tq::Error);  // surrogate as UTF-8
}

struct BadJson {
  std::string text;
  size_t offset;
  std::string expected;  // a piece of the message
};

TEST(Json, RejectsInvalidInputWithOffsetAndExpectation) {
  const std::vector<BadJson> cases = {
      {"", 0, "expected a value"},
      {"[1,]", 3, "expected a value"},
      {"{\"a\":1,}", 7, "expected '\"' starting an object key"},
      {"{\"a\" 1}", 5, "expected ':'"},
      {"{\"a\":1 \"b\":2}", 7, "expected ',' or '}'"},
      {"[1 2]", 3, "expected ',' or ']'"},
      {"01", 1, "leading zeros"},
      {"-", 1, "expected a digit"},
      {"1.", 2, "after the decimal point"},
      {"1e", 2, "in the exponent"},
      {"1e400", 0, "range of a double"},
      {"NaN", 0, "expected a value"},
      {"tru", 0, "expected 'true'"},
      {"\"abc", 4, "closing the string"},
      {"\"a\nb\"", 2, "control characters"},
      {"\"\\x\"", 2, "escape character"},
      {"\"\\u12g4\"", 5, "4 hex digits"},
      {"\"\\ud83d\"", 7, "low surrogate after a high surrogate"},
      {"\"\\ud83d\\u0041\"", 7, "expected a low surrogate"},
      {"\"\\ude00\"", 1, "high surrogate before a low surrogate"},
      {"\"\xff\"", 1, "valid UTF-8"},
      {"\"\xc0\xaf\"", 1, "valid UTF-8"},      // overlong '/'
      {"\"\xed\xa0\x80\"", 1, "valid UTF-8"},  // UTF-16 surrogate encoded in UTF-8
      {"\"\xf4\x90\x80\x80\"", 1, "valid UTF-8"},  // above U+10FFFF
      {"\"\xe4\xb8\"", 1, "valid UTF-8"},      // truncated sequence
      {"{\"k\":1,\"k\":2}", 7, "\"k\" appears twice"},
      {"{} x", 3, "end of input"},
      {"\xef\xbb\xbf{}", 0, "expected a value"},  // BOM
      {"// c\n{}", 0, "expected a value"},
      {"[1,2", 4, "expected ',' or ']'"},
  };
  for (const auto& c : cases) {
    try {
      json::parse(c.text, "cfg.json");
      ADD_FAILURE() << "accepted: " << c.text;
    } catch (const json::ParseError& e) {
      std::string msg = e.what();
      EXPECT_EQ(e.offset(), c.offset) << c.text << " -> " << msg;
      EXPECT_NE(msg.find(c.expected), std::string::npos) << c.text << " -> " << msg;
      EXPECT_NE(msg.find(tq::str_cat("cfg.json: invalid JSON at byte ", c.offset)), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
}

TEST(Json, ReportsLineAndColumn) {
  try {
    json::parse("{\n  \"a\": 1,\n  \"b\": ]\n}", "config.json");
    FAIL();
  } catch (const json::ParseError& e) {
    EXPECT_EQ(std::string(e.what()),
              "config.json: invalid JSON at byte 19 (line 3, column 8): expected a value (object, array, string, number, "
              "true, false or null), got ']'");
  }
}

TEST(Json, NestingLimitProtectsTheStack) {
  std::string ok(200, '['), bad(300, '[');
  ok += std::string(200, ']');
  bad += std::string(300, ']');
  EXPECT_NO_THROW(json::parse(ok));
  EXPECT_THROW(json::parse(bad), json::ParseError);
}

TEST(Json, AccessorsNameTheProblem) {
  json::Value v = json::parse(R"({"r": 16, "s": "x"})");
  try {
    v.at("alpha");
    FAIL();
  } catch (const tq::Error& e) {
    EXPECT_STREQ(e.what(), "JSON object has no key \"alpha\"");
  }
  try {
    v.at("s").as_int64();
    FAIL();
  } catch (const tq::Error& e) {
    EXPECT_STREQ(e.what(), "JSON value is a string, expected a number");
  }
  EXPECT_EQ(v.find("nope"), nullptr);
  v.set("r", 32);
  v.set("new", json::Array{1, "two"});
  EXPECT_EQ(json::dump(v), R"({"r":32,"s":"x","new":[1,"two"]})");
  EXPECT_EQ(json::dump(v, 2), "{\n  \"r\": 32,\n  \"s\": \"x\",\n  \"new\": [\n    1,\n    \"two\"\n  ]\n}");
  EXPECT_EQ(json::dump(json::parse("{ }"), 2), "{}");
  EXPECT_EQ(json::dump(json::parse("[ ]"), 2), "[]");
}

// Random documents survive dump → parse unchanged, compact and pretty.
static json::Value random_value(std::mt19937_64& rng, int depth) {
  int kind = int(rng() % (depth > 3 ? 4 : 6));
  switch (kind) {
    case 0: return rng() % 2 ? json::Value(nullptr) : json::Value(bool(rng() % 2));
    case 1: return rng() % 2 ? json::Value(int64_t(rng())) : json::Value(std::ldexp(double(int64_t(rng())), -int(rng() % 80)));
    case 2:
    case 3: {
      std::string s;
      size_t n = rng() % 12;
      for (size_t i = 0; i < n; ++i) {
        uint32_t cp = uint32_t(rng() % 0x11000);
        if (cp >= 0xd800 && cp <= 0xdfff) cp = 'x';
        json::append_utf8(s, rng() % 3 ? cp % 0x80 : cp);
      }
      return json::Value(s);
    }
    case 4: {
      json::Array a;
      for (size_t i = rng() % 5; i > 0; --i) a.push_back(random_value(rng, depth + 1));
      return json::Value(std::move(a));
    }
    default: {
      json::Object o;
      for (size_t i = rng() % 5; i > 0; --i) o.emplace_back("k" + std::to_string(o.size()) + "\x01é", random_value(rng, depth + 1));
      return json::Value(std::move(o));
    }
  }
}

TEST(Json, RandomDocumentsRoundTrip) {
  uint64_t seed = tq::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 300; ++i) {
    json::Value v = random_value(rng, 0);
    std::string compact = json::dump(v);
    ASSERT_EQ(json::parse(compact), v) << compact;
    ASSERT_EQ(json::parse(json::dump(v, 1)), v);
    ASSERT_EQ(json::dump(json::parse(compact)), compact);
  }
}

TEST(Json, ReadsFilesWrittenByPython) {
  json::Value v = json::parse_file(TQ_FIXTURES "/io/sharded/model.safetensors.index.json");
  EXPECT_EQ(v.at("metadata").at("total_size").as_int64(), 112);
  EXPECT_EQ(v.at("weight_map").size(), 4u);
  EXPECT_EQ(v.at("weight_map").at("model.norm.weight").as_string(), "model-00002-of-00002.safetensors");
  try {
    json::parse_file("/nonexistent/config.json");
    FAIL();
  } catch (const tq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'/nonexistent/config.json'"), std::string::npos) << e.what();
  }
}
