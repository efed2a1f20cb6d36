// safetensors against the real Python library: its files read back bit for bit, our writer's
// bytes equal its bytes, random round trips, and every malformed file rejected with one line
// that names the file and the problem.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <tq/io/safetensors.hpp>

#include "../test_util.hpp"

namespace fs = std::filesystem;
using tq::SafetensorsDir;
using tq::SafetensorsFile;
using tq::Tensor;
namespace json = tq::json;

namespace {

const std::string kIo = TQ_FIXTURES "/io";

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int k = 0; k < 8; ++k) s[size_t(k)] = char(n >> (8 * k));
  return s;
}

// A file with this header text and `data_bytes` bytes of data (values irrelevant to validation).
std::string file_bytes(const std::string& header, size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\x5a');
}

std::string hex_of(const void* p, size_t n) {
  static const char* h = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    uint8_t c = static_cast<const uint8_t*>(p)[i];
    out += h[c >> 4];
    out += h[c & 15];
  }
  return out;
}

const json::Value& expected_files() {
  static const json::Value v = json::parse_file(kIo + "/expected.json").at("files");
  return v;
}

std::string st_name(const std::string& numpy_name) {
  static const std::map<std::string, std::string> m = {
      {"float64", "F64"}, {"float32", "F32"}, {"float16", "F16"}, {"bfloat16", "BF16"}, {"int64", "I64"},
      {"int32", "I32"},   {"uint8", "U8"},    {"bool", "BOOL"},   {"int8", "I8"}};
  return m.at(numpy_name);
}

// The tensor matches the Python dump: dtype, shape, raw bytes and (independently) the values.
void expect_matches(const Tensor& t, const std::string& name, const json::Value& e) {
  SCOPED_TRACE(name);
  EXPECT_EQ(tq::safetensors_dtype_of(t.dtype()).name, st_name(e.at("dtype").as_string()));
  tq::Shape shape;
  for (const auto& d : e.at("shape").as_array()) shape.push_back(d.as_int64());
  EXPECT_EQ(t.shape(), shape);
  ASSERT_TRUE(t.is_contiguous());
  EXPECT_EQ(hex_of(t.data_ptr(), t.nbytes()), e.at("hex").as_string());
  const json::Array& vals = e.at("values").as_array();
  ASSERT_EQ(size_t(t.numel()), vals.size());
  if (t.dtype() == tq::DType::i64) {  // beyond 2^53: compare as integers
    for (size_t i = 0; i < vals.size(); ++i) EXPECT_EQ(t.data<int64_t>()[i], vals[i].as_int64());
  } else {
    std::vector<double> got = t.to_vector<double>();
    for (size_t i = 0; i < vals.size(); ++i) EXPECT_EQ(got[i], vals[i].as_double()) << "element " << i;
  }
}

class TempDir : public ::testing::Test {
 protected:
  fs::path dir;
  void SetUp() override {
    static int counter = 0;
    dir = fs::temp_directory_path() / ("tq_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  std::string path(const std::string& name) const { return (dir / name).string(); }
};

}  // namespace

// ---- reading the Python library's files -------------------------------------------------------------

TEST(Safetensors, ReadsPythonWrittenFileBitExactly) {
  const json::Value& exp = expected_files().at("all_dtypes.safetensors");
  SafetensorsFile f = SafetensorsFile::open(kIo + "/all_dtypes.safetensors");
  std::vector<std::string> names;
  for (const auto& [name, e] : exp.at("tensors").as_object()) {
    names.push_back(name);
    ASSERT_TRUE(f.contains(name));
    expect_matches(f.get(name), name, e);
    EXPECT_EQ(f.info(name).dtype_name, st_name(e.at("dtype").as_string()));
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(f.keys(), names);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{
                              {"generator", exp.at("metadata").at("generator").as_string()}}));
  EXPECT_EQ(f.get("scalar_f32").dim(), 0);
  EXPECT_EQ(f.get("empty_f32").numel(), 0);
}

TEST(Safetensors, ReadsMetadataWithEscapesAndUnicode) {
  const json::Value& exp = expected_files().at("metadata.safetensors");
  SafetensorsFile f = SafetensorsFile::open(kIo + "/metadata.safetensors");
  std::map<std::string, std::string> want;
  for (const auto& [k, v] : exp.at("metadata").as_object()) want[k] = v.as_string();
  EXPECT_EQ(f.metadata(), want);
  EXPECT_EQ(f.metadata().at("quote\"back\\slash"), "line\nbreak\ttab");
  expect_matches(f.get("x"), "x", exp.at("tensors").at("x"));
}

TEST(Safetensors, GetIsAZeroCopyViewThatOutlivesTheFileAndNeverWritesIt) {
  const std::string src = kIo + "/all_dtypes.safetensors";
  const std::string before = read_bytes(src);
  Tensor t;
  {
    SafetensorsFile f = SafetensorsFile::open(src);
    t = f.get("f32");
    EXPECT_EQ(f.get("f32").data_ptr(), t.data_ptr());  // same mapped bytes, no copy
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4, 0u);
  }
  // The mapping lives on through the tensor; writing into it is private (copy-on-write).
  const json::Value& e = expected_files().at("all_dtypes.safetensors").at("tensors").at("f32");
  EXPECT_EQ(t.to_vector<double>()[0], e.at("values")[0].as_double());
  t.fill_(42.0);
  EXPECT_EQ(t.to_vector<double>()[5], 42.0);
  EXPECT_EQ(read_bytes(src), before);
  EXPECT_NE(SafetensorsFile::open(src).get("f32").to_vector<double>()[5], 42.0);
}

TEST(Safetensors, UnsupportedDtypeIsNamedOnGetAndOtherTensorsStillLoad) {
  const std::string p = kIo + "/unsupported_i8.safetensors";
  SafetensorsFile f = SafetensorsFile::open(p);
  EXPECT_EQ(f.info("q").dtype_name, "I8");
  EXPECT_FALSE(f.info("q").supported);
  EXPECT_EQ(f.info("q").shape, (tq::Shape{4}));
  try {
    f.get("q");
    FAIL();
  } catch (const tq::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("'" + p + "'"), std::string::npos) << m;
    EXPECT_NE(m.find("tensor 'q': unsupported dtype I8"), std::string::npos) << m;
  }
  expect_matches(f.get("scale"), "scale", expected_files().at("unsupported_i8.safetensors").at("tensors").at("scale"));
}

TEST(Safetensors, ShardedDirectoryGivesOneLookup) {
  const json::Value& exp = expected_files().at("sharded");
  SafetensorsDir d = tq::open_model_weights(kIo + "/sharded");
  EXPECT_EQ(d.size(), 4u);
  EXPECT_EQ(d.shards().size(), 2u);
  for (const auto& [name, e] : exp.at("tensors").as_object()) {
    ASSERT_TRUE(d.contains(name));
    expect_matches(d.get(name), name, e);
    EXPECT_EQ(fs::path(d.file_of(name)).filename().string(), exp.at("weight_map").at(name).as_string());
  }
  EXPECT_THROW(d.get("model.missing"), tq::Error);
  // A single file, given directly or as a directory's model.safetensors.
  SafetensorsDir single = tq::open_model_weights(kIo + "/all_dtypes.safetensors");
  EXPECT_EQ(single.size(), expected_files().at("all_dtypes.safetensors").at("tensors").size());
}

// ---- writing ---------------------------------------------------------------------------------------

using SafetensorsWrite = TempDir;

// Our writer's bytes equal the Python library's for the same tensors and (one) metadata entry,
// whatever order the tensors are given in; hence the library reads what we write.
TEST_F(SafetensorsWrite, BytesIdenticalToThePythonLibrary) {
  const std::string ref = kIo + "/all_dtypes.safetensors";
  SafetensorsFile f = SafetensorsFile::open(ref);
  std::vector<std::pair<std::string, Tensor>> items;
  for (const auto& k : f.keys()) items.emplace_back(k, f.get(k));
  std::mt19937_64 rng(tq::test::fresh_seed());
  std::shuffle(items.begin(), items.end(), rng);
  const std::string out = path("ours.safetensors");
  tq::save_safetensors(out, items, f.metadata());
  EXPECT_EQ(read_bytes(out), read_bytes(ref));
  EXPECT_FALSE(fs::exists(out + ".tmp"));
  // Set TQ_IO_EXPORT_DIR to keep the file for tools/fixtures/safetensors_fixtures.py --verify-tq-written.
  if (const char* exp = std::getenv("TQ_IO_EXPORT_DIR"))
    fs::copy_file(out, fs::path(exp) / "tq_written.safetensors", fs::copy_options::overwrite_existing);
}

TEST_F(SafetensorsWrite, RandomRoundTripOfEveryDtypeAndLayout) {
  using tq::DType;
  const std::vector<DType> dtypes = {DType::f64, DType::f32, DType::f16, DType::bf16,
                                     DType::i64, DType::i32, DType::u8,  DType::boolean};
  std::mt19937_64 rng(tq::test::fresh_seed());
  std::vector<std::pair<std::string, Tensor>> items;
  for (size_t i = 0; i < 24; ++i) {
    DType dt = dtypes[i % dtypes.size()];
    int nd = int(rng() % 4);
    tq::Shape shape = tq::test::random_shape(nd, 5);
    if (i % 7 == 3 && nd > 0) shape[0] = 0;  // zero-sized
    Tensor t = tq::test::random(shape, DType::f64, -100, 100).to(dt);
    if (nd >= 2 && i % 2) t = t.transpose(0, 1);  // non-contiguous input
    items.emplace_back(tq::str_cat("t", i, i % 3 ? ".weight" : ""), t);
  }
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "tab\there \"q\" ✓"}, {"", ""}};
  const std::string p = path("rt.safetensors");
  tq::save_safetensors(p, items, meta);
  SafetensorsFile f = SafetensorsFile::open(p);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.size(), items.size());
  for (const auto& [name, t] : items) {
    SCOPED_TRACE(name);
    Tensor got = f.get(name);
    EXPECT_EQ(got.dtype(), t.dtype());
    EXPECT_EQ(got.shape(), t.shape());
    Tensor want = t.contiguous();
    EXPECT_EQ(hex_of(got.data_ptr(), got.nbytes()), hex_of(want.data_ptr(), want.nbytes()));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data_ptr()) % tq::dtype_size(got.dtype()), 0u);
  }
  // Rewriting replaces the file atomically.
  tq::save_safetensors(p, {{"only", Tensor::ones({2})}});
  EXPECT_EQ(SafetensorsFile::open(p).keys(), std::vector<std::string>{"only"});
}

TEST_F(SafetensorsWrite, EmptyFileMatchesTheLibraryLayout) {
  const std::string p = path("empty.safetensors");
  tq::save_safetensors(p, {});
  // The crate's own test vector: {} padded with spaces to 8 bytes.
  EXPECT_EQ(read_bytes(p), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  EXPECT_EQ(SafetensorsFile::open(p).size(), 0u);
}

TEST_F(SafetensorsWrite, RejectsBadInputsNamingTheFile) {
  const std::string p = path("bad.safetensors");
  auto expect_error = [&](const std::vector<std::pair<std::string, Tensor>>& items, const std::string& piece) {
    try {
      tq::save_safetensors(p, items);
      ADD_FAILURE() << "accepted";
    } catch (const tq::Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("'" + p + "'"), std::string::npos) << m;
      EXPECT_NE(m.find(piece), std::string::npos) << m;
    }
    EXPECT_FALSE(fs::exists(p));
    EXPECT_FALSE(fs::exists(p + ".tmp"));
  };
  expect_error({{"a", Tensor::ones({1})}, {"a", Tensor::ones({2})}}, "duplicate tensor name 'a'");
  expect_error({{"__metadata__", Tensor::ones({1})}}, "reserved");
  expect_error({{"u", Tensor()}}, "tensor 'u' is undefined");
  try {
    tq::save_safetensors(path("no/such/dir/x.safetensors"), {{"a", Tensor::ones({1})}});
    FAIL();
  } catch (const tq::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("no/such/dir/x.safetensors'"), std::string::npos) << m;
    EXPECT_NE(m.find("cannot create"), std::string::npos) << m;
    EXPECT_NE(m.find(std::strerror(ENOENT)), std::string::npos) << m;
  }
}

// A write that fails half way (here: the file size limit, as a full disk would) is reported with
// the file name and the system's reason, and leaves neither a partial file nor a changed target.
TEST_F(SafetensorsWrite, FailedWriteIsReportedAndLeavesTheOldFile) {
  const std::string p = path("model.safetensors");
  tq::save_safetensors(p, {{"old", Tensor::ones({4})}});
  const std::string old = read_bytes(p);
  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  try {
    tq::save_safetensors(p, {{"big", tq::test::random({4096}, tq::DType::f32)}});
  } catch (const tq::Error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(message.find("'" + p + "'"), std::string::npos) << message;
  EXPECT_NE(message.find("write failed"), std::string::npos) << message;
  EXPECT_NE(message.find(std::strerror(EFBIG)), std::string::npos) << message;
  EXPECT_EQ(read_bytes(p), old);
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

// ---- malformed files ---------------------------------------------------------------------------------

using SafetensorsReject = TempDir;

struct BadFile {
  std::string label;
  std::string bytes;
  std::string problem;  // expected piece of the message, after "safetensors file '<path>': "
};

static std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

static std::vector<BadFile> bad_files() {
  const std::string good = "{" + entry("a", "F32", "[2]", "[0,8]") + "}";
  std::string truncated = file_bytes(good, 8);
  truncated.resize(truncated.size() - 3);
  std::string cut_header = file_bytes(good, 8).substr(0, 20);
  return {
      {"empty file", "", "file has 0 bytes, fewer than the 8-byte header length"},
      {"5 bytes", std::string(5, '\0'), "file has 5 bytes, fewer than the 8-byte header length"},
      {"header length > file", le64(1000) + "{}", "header length 1000 is larger than the 2 bytes that follow it"},
      {"header length > limit", le64(200'000'000) + "{}", "header length 200000000 exceeds the limit of 100000000 bytes"},
      {"cut inside the header", cut_header, "header length 54 is larger than the 12 bytes that follow it"},
      {"truncated data", truncated, "tensor 'a': data_offsets [0, 8] extend past the end of the data section (5 bytes)"},
      {"mis-sized", file_bytes("{" + entry("x", "F32", "[2,3]", "[0,20]") + "}", 20),
       "tensor 'x': shape [2, 3] of F32 needs 24 bytes, data_offsets give 20"},
      {"mis-sized bf16", file_bytes("{" + entry("w", "BF16", "[3]", "[0,4]") + "}", 4),
       "tensor 'w': shape [3] of BF16 needs 6 bytes, data_offsets give 4"},
      {"overlap", file_bytes("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[1]", "[4,8]") + "}", 8),
       "tensors 'a' (data_offsets [0, 8]) and 'b' (data_offsets [4, 8]) overlap"},
      {"identical offsets", file_bytes("{" + entry("a", "U8", "[4]", "[0,4]") + "," + entry("b", "U8", "[4]", "[0,4]") + "}", 4),
       "tensors 'a' (data_offsets [0, 4]) and 'b' (data_offsets [0, 4]) overlap"},
      {"empty inside another", file_bytes("{" + entry("a", "U8", "[4]", "[0,4]") + "," + entry("e", "U8", "[0]", "[2,2]") + "}", 4),
       "tensors 'a' (data_offsets [0, 4]) and 'e' (data_offsets [2, 2]) overlap"},
      {"hole", file_bytes("{" + entry("a", "F32", "[1]", "[0,4]") + "," + entry("b", "F32", "[1]", "[8,12]") + "}", 12),
       "data section bytes [4, 8) are not covered by any tensor (a hole before tensor 'b')"},
      {"trailing bytes", file_bytes(good, 12), "data section has 12 bytes but the tensors cover only the first 8"},
      {"malformed JSON", file_bytes("{\"a\":{\"dtype\":\"F32\",}}", 0),
       "header is not valid JSON at header byte 20 (file byte 28): expected '\"' starting an object key, got '}'"},
      {"truncated JSON", file_bytes("{\"a\":{\"dtype\"", 0), "header is not valid JSON at header byte 13 (file byte 21)"},
      {"trailing NUL after JSON", file_bytes(good + std::string(1, '\0'), 8), "header is not valid JSON at header byte 54 (file byte 62): expected end of input after the top-level value, got byte 0x00"},
      {"bad UTF-8", file_bytes("{\"a\xff\":{}}", 0), "header is not valid UTF-8 at header byte 3 (file byte 11)"},
      {"not an object", file_bytes("[1,2]", 0), "header is an array, expected a JSON object"},
      {"unknown dtype", file_bytes("{" + entry("a", "Q7", "[2]", "[0,8]") + "}", 8), "tensor 'a': unknown dtype 'Q7'"},
      {"dtype not a string", file_bytes("{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
       "tensor 'a': dtype is a number, expected a string"},
      {"missing dtype", file_bytes("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "tensor 'a': missing \"dtype\""},
      {"missing shape", file_bytes("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8), "tensor 'a': missing \"shape\""},
      {"missing data_offsets", file_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8),
       "tensor 'a': missing \"data_offsets\""},
      {"entry not an object", file_bytes("{\"a\":[1]}", 0), "tensor 'a': entry is an array, expected an object"},
      {"negative dim", file_bytes("{" + entry("a", "F32", "[2,-3]", "[0,8]") + "}", 8),
       "tensor 'a': shape dimension 1 is -3, expected a non-negative integer"},
      {"fractional dim", file_bytes("{" + entry("a", "F32", "[2.0]", "[0,8]") + "}", 8),
       "tensor 'a': shape dimension 0 is 2.0, expected a non-negative integer"},
      {"string dim", file_bytes("{" + entry("a", "F32", "[\"2\"]", "[0,8]") + "}", 8),
       "tensor 'a': shape dimension 0 is \"2\", expected a non-negative integer"},
      {"shape not an array", file_bytes("{" + entry("a", "F32", "2", "[0,8]") + "}", 8),
       "tensor 'a': shape is a number, expected an array"},
      {"end before begin", file_bytes("{" + entry("a", "F32", "[0]", "[8,4]") + "}", 8),
       "tensor 'a': data_offsets [8, 4] end before they begin"},
      {"three offsets", file_bytes("{" + entry("a", "F32", "[2]", "[0,8,9]") + "}", 8),
       "tensor 'a': data_offsets is [0,8,9], expected [begin, end] of two non-negative integers"},
      {"negative offset", file_bytes("{" + entry("a", "F32", "[2]", "[-8,0]") + "}", 8),
       "tensor 'a': data_offsets is [-8,0], expected [begin, end]"},
      {"numel overflow", file_bytes("{" + entry("a", "F32", "[4611686018427387904,4611686018427387904]", "[0,8]") + "}", 8),
       "tensor 'a': shape [4611686018427387904, 4611686018427387904] of F32 does not fill a whole number of bytes or overflows"},
      {"duplicate tensor", file_bytes("{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("a", "F32", "[2]", "[0,8]") + "}", 8),
       "header is not valid JSON at header byte 54 (file byte 62): expected a unique key, but \"a\" appears twice"},
      {"metadata not strings", file_bytes("{\"__metadata__\":{\"k\":1}}", 0), "__metadata__ 'k' is a number, expected a string"},
      {"metadata not an object", file_bytes("{\"__metadata__\":\"x\"}", 0), "__metadata__ is a string, expected an object"},
      {"name with a newline", file_bytes("{" + entry("a\\nb", "Q7", "[2]", "[0,8]") + "}", 8),
       "tensor 'a\\x0ab': unknown dtype 'Q7'"},
  };
}

TEST_F(SafetensorsReject, EveryMalformedFileGivesOneLineNamingFileAndProblem) {
  for (const auto& c : bad_files()) {
    SCOPED_TRACE(c.label);
    const std::string p = path("bad.safetensors");
    write_bytes(p, c.bytes);
    try {
      SafetensorsFile::open(p);
      ADD_FAILURE() << "accepted: " << c.label;
    } catch (const tq::Error& e) {
      const std::string m = e.what();
      const std::string prefix = "safetensors file '" + p + "': ";
      EXPECT_EQ(m.rfind(prefix, 0), 0u) << m;
      EXPECT_NE(m.find(c.problem), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
  }
}

// What the reference accepts, we accept: whitespace around the JSON, unknown fields in an entry,
// an empty header, zero-sized tensors at any boundary, entries in any order.
TEST_F(SafetensorsReject, AcceptsWhatTheReferenceAccepts) {
  const std::string p = path("ok.safetensors");
  std::string header = "  {" + entry("b", "F32", "[1]", "[4,8]") + ",\"a\":{\"data_offsets\":[0,4],\"extra\":[1],\"shape\":[4],"
                       "\"dtype\":\"U8\"}," + entry("z", "I64", "[0,5]", "[8,8]") + "}  \n ";
  while (header.size() % 4 != 1) header += ' ';  // puts 'b' at a file offset that is not a multiple of 4
  std::string bytes = le64(header.size()) + header;
  float one = 1.5f;
  bytes += std::string("\x01\x02\x03\x04", 4) + std::string(reinterpret_cast<char*>(&one), 4);
  write_bytes(p, bytes);
  SafetensorsFile f = SafetensorsFile::open(p);
  EXPECT_EQ(f.keys(), (std::vector<std::string>{"a", "b", "z"}));
  EXPECT_EQ(f.get("a").to_vector<double>(), (std::vector<double>{1, 2, 3, 4}));
  EXPECT_EQ(f.get("z").shape(), (tq::Shape{0, 5}));
  // 'b' is misaligned in the file: it is copied, and still right.
  EXPECT_NE(reinterpret_cast<uintptr_t>(static_cast<char*>(f.get("a").data_ptr()) + 4) % 4, 0u);
  EXPECT_EQ(f.get("b").item<double>(), 1.5);
  write_bytes(p, file_bytes("{}", 0));
  EXPECT_EQ(SafetensorsFile::open(p).size(), 0u);
}

TEST_F(SafetensorsReject, OpenErrorsNameTheFile) {
  for (const std::string& p : {path("missing.safetensors"), dir.string()}) {
    try {
      SafetensorsFile::open(p);
      ADD_FAILURE() << p;
    } catch (const tq::Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("safetensors file '" + p + "': ", 0), 0u) << e.what();
    }
  }
}

// ---- sharded directory errors -------------------------------------------------------------------------

using SafetensorsShards = TempDir;

TEST_F(SafetensorsShards, IndexProblemsAreNamed) {
  for (const auto& e : fs::directory_iterator(kIo + "/sharded")) fs::copy_file(e.path(), dir / e.path().filename());
  const std::string index = path("model.safetensors.index.json");
  auto expect_error = [&](const std::string& index_text, const std::string& piece) {
    write_bytes(index, index_text);
    try {
      SafetensorsDir::open(dir.string());
      ADD_FAILURE() << "accepted: " << index_text;
    } catch (const tq::Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find(piece), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
  };
  const std::string s1 = "model-00001-of-00002.safetensors";
  expect_error("{\"weight_map\":{\"model.norm.weight\":\"model-00003-of-00003.safetensors\"}}",
               "safetensors index '" + index + "': shard 'model-00003-of-00003.safetensors' (listed for tensor "
               "'model.norm.weight') is missing: '" + path("model-00003-of-00003.safetensors") + "' does not exist");
  expect_error("{\"weight_map\":{\"model.norm.weight\":\"" + s1 + "\"}}",
               "tensor 'model.norm.weight' is listed in shard '" + s1 + "' but '" + path(s1) + "' does not contain it");
  expect_error("{\"metadata\":{}}", "safetensors index '" + index + "': missing \"weight_map\"");
  expect_error("{\"weight_map\":{\"a\":\"../x.safetensors\"}}", "must be a relative path inside the model directory");
  expect_error("{\"weight_map\":{\"a\":3}}", "weight_map entry for tensor 'a' is a number, expected a file name");
  expect_error("{\"weight_map\":{", index + ": invalid JSON at byte 15");
  // A shard that is itself corrupt reports the shard's path.
  write_bytes(index, read_bytes(kIo + "/sharded/model.safetensors.index.json"));
  write_bytes(path(s1), "short");
  try {
    SafetensorsDir::open(dir.string());
    FAIL();
  } catch (const tq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("safetensors file '" + path(s1) + "': file has 5 bytes"), std::string::npos)
        << e.what();
  }
  // Neither an index nor a single file.
  fs::remove_all(dir);
  fs::create_directories(dir);
  try {
    SafetensorsDir::open(dir.string());
    FAIL();
  } catch (const tq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("has neither model.safetensors.index.json nor model.safetensors"),
              std::string::npos);
  }
}

TEST_F(SafetensorsShards, SingleModelSafetensorsInADirectory) {
  fs::copy_file(kIo + "/all_dtypes.safetensors", dir / "model.safetensors");
  SafetensorsDir d = SafetensorsDir::open(dir.string());
  const json::Value& exp = expected_files().at("all_dtypes.safetensors").at("tensors");
  EXPECT_EQ(d.size(), exp.size());
  expect_matches(d.get("bf16"), "bf16", exp.at("bf16"));
  EXPECT_EQ(d.info("i64").shape, (tq::Shape{5}));
}
