// The PaliGemma processor against HF transformers 5.17 PaliGemmaProcessor (GemmaTokenizer + slow
// PIL SiglipImageProcessor) on a tiny Gemma-like SentencePiece model; fixtures and the command that
// made them: tests/fixtures/paligemma_proc/README.md (tools/fixtures/processor_fixtures.py).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <tq/io/safetensors.hpp>

#include "paligemma/processor.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using tq::paligemma::PaddingSide;
using tq::paligemma::Processor;
using tq::paligemma::ProcessorSample;
using tq::paligemma::Tokenizer;

const fs::path kRoot = fs::path(TQ_FIXTURES) / "paligemma_proc";
const fs::path kModel = kRoot / "model";
// The fixtures were made with Pillow 13 (see the safetensors metadata), whose bicubic runs the
// vertical pass first when width grows and height shrinks (images/mixed.png).
constexpr auto kOrder = tq::risc::PilResizeOrder::Pillow13;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  EXPECT_TRUE(in.good()) << p;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("tq_proc_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// A copy of the fixture model directory to break on purpose.
fs::path model_copy(const std::string& name) {
  fs::path d = temp_dir(name);
  for (const auto& e : fs::directory_iterator(kModel)) fs::copy_file(e.path(), d / e.path().filename());
  return d;
}

struct Jsonl {
  std::vector<ProcessorSample> samples;
  std::vector<std::string> images, names, image_files;
};

Jsonl read_jsonl(const std::string& batch) {
  Jsonl j;
  std::ifstream in(kRoot / (batch + ".jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    auto v = nlohmann::json::parse(line);
    ProcessorSample s{v["prompt"].get<std::string>(), std::nullopt};
    if (v.contains("suffix")) s.suffix = v["suffix"].get<std::string>();
    j.samples.push_back(s);
    j.image_files.push_back(v["image"].get<std::string>());
    j.images.push_back(slurp(kRoot / j.image_files.back()));
    j.names.push_back(j.image_files.back());
  }
  EXPECT_FALSE(j.samples.empty());
  return j;
}

const Processor& processor() {
  static const Processor p = Processor::load(kModel, kOrder);
  return p;
}

void expect_same_i64(const tq::Tensor& got, const tq::Tensor& want, const std::string& what) {
  ASSERT_TRUE(got.defined()) << what;
  EXPECT_EQ(got.dtype(), tq::DType::i64) << what;
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const auto g = got.to_vector<int64_t>(), w = want.to_vector<int64_t>();
  for (size_t i = 0; i < w.size(); ++i)
    ASSERT_EQ(g[i], w[i]) << what << " element " << i << " (row " << i / size_t(want.size(1)) << ", col "
                          << i % size_t(want.size(1)) << ")";
}

// Pixel differences of one image in 8-bit levels (one level = 2/255 after normalize with std 0.5).
struct LevelDiff {
  double max = 0, mean = 0, frac_over_1 = 0;
};

LevelDiff level_diff(const tq::Tensor& got, const tq::Tensor& want, int64_t i, double level) {
  const auto g = got.select(0, i).contiguous().to_vector<float>(), w = want.select(0, i).contiguous().to_vector<float>();
  LevelDiff d;
  for (size_t k = 0; k < w.size(); ++k) {
    const double e = std::abs(double(g[k]) - double(w[k])) / level;
    d.max = std::max(d.max, e);
    d.mean += e;
    d.frac_over_1 += e > 1.0 + 1e-3;
  }
  d.mean /= double(w.size());
  d.frac_over_1 /= double(w.size());
  return d;
}

// Checks pixels per image. The acceptance is "within one 8-bit level for resized JPEG and PNG
// images": one level is 1/255 after rescale and (1/255)/std = 2/255 after normalize with std 0.5
// (`level`), plus float32 rounding of the two values (the 1e-3 level slack). Measured, and
// asserted: PNG identical, resized or not; JPEG identical too with libjpeg-turbo decoding as PIL
// does (at the target size and resized); with the stb_image fallback (no TQ_HAVE_LIBJPEG) JPEG
// stays within what two IDCT/upsampling implementations allow (gray <= 1, colour <= 3 levels).
void expect_pixels(const tq::Tensor& got, const tq::Tensor& want, const Jsonl& j, double level) {
  ASSERT_EQ(got.dtype(), tq::DType::f32);
  ASSERT_EQ(got.shape(), want.shape());
  for (int64_t i = 0; i < want.size(0); ++i) {
    const LevelDiff d = level_diff(got, want, i, level);
    const std::string& f = j.image_files[size_t(i)];
    std::printf("  %-20s max %.3f levels, mean %.4f, >1 level %.3f%%\n", f.c_str(), d.max, d.mean,
                100 * d.frac_over_1);
#ifdef TQ_HAVE_LIBJPEG
    const bool exact = true;
#else
    const bool exact = f.ends_with(".png");
#endif
    if (exact) {
      EXPECT_EQ(d.max, 0.0) << f;
    } else if (f.find("gray") != std::string::npos) {
      EXPECT_LE(d.max, 1.0 + 1e-3) << f;  // no chroma: only IDCT rounding differs
    } else {
      EXPECT_LE(d.max, 3.0 + 1e-3) << f;
      EXPECT_LE(d.frac_over_1, 0.03) << f;
      EXPECT_LE(d.mean, 0.25) << f;
    }
  }
}

class HfParity : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(HfParity, BatchMatchesPaliGemmaProcessor) {
  const auto& [batch, side] = GetParam();
  const Jsonl j = read_jsonl(batch);
  const auto b = processor().make_batch(j.samples, j.images, j.names,
                                        side == "left" ? PaddingSide::Left : PaddingSide::Right);
  const auto ref = tq::SafetensorsFile::open((kRoot / (batch + "_" + side + ".safetensors")).string());
  expect_same_i64(b.input_ids, ref.get("input_ids"), "input_ids");
  expect_same_i64(b.attention_mask, ref.get("attention_mask"), "attention_mask");
  expect_same_i64(b.token_type_ids, ref.get("token_type_ids"), "token_type_ids");
  expect_same_i64(b.labels, ref.get("labels"), "labels");  // v5 returns all -100 without suffix
  EXPECT_EQ(b.has_suffix, batch == "suffix");
  expect_pixels(b.pixel_values, ref.get("pixel_values"), j, 2.0 / 255.0);
}

INSTANTIATE_TEST_SUITE_P(Batches, HfParity,
                         ::testing::Combine(::testing::Values("suffix", "nosuffix"), ::testing::Values("left", "right")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// mean/std/size come from preprocessor_config.json, not from constants: a config with CLIP's
// mean/std and a 20x24 size against HF with the same config.
TEST(Processor, NormalizationAndSizeFromPreprocessorConfig) {
  const fs::path d = model_copy("alt_norm");
  fs::copy_file(kRoot / "alt_norm" / "preprocessor_config.json", d / "preprocessor_config.json",
                fs::copy_options::overwrite_existing);
  const Processor p = Processor::load(d, kOrder);
  EXPECT_EQ(p.image_config().width, 20);
  EXPECT_EQ(p.image_config().height, 24);
  const auto ref = tq::SafetensorsFile::open((kRoot / "alt_norm" / "pixel_values.safetensors").string());
  const tq::Tensor want = ref.get("pixel_values");
  ASSERT_EQ(want.shape(), (tq::Shape{3, 3, 24, 20}));
  int64_t i = 0;
  for (const char* name : {"target.png", "down.png", "mixed.png"}) {
    std::vector<float> px(3 * 24 * 20, NAN);
    p.preprocess_image(slurp(kRoot / "images" / name), px.data(), name);
    const auto w = want.select(0, i++).contiguous().to_vector<float>();
    for (size_t k = 0; k < w.size(); ++k) ASSERT_EQ(px[k], w[k]) << name << " element " << k;
  }
}

TEST(Tokenizer, EncodeDecodeMatchHfCases) {
  const nlohmann::json cases = nlohmann::json::parse(slurp(kRoot / "tokenize_cases.json"));
  const Tokenizer& t = processor().tokenizer();
  EXPECT_EQ(t.size(), cases["len_tokenizer"].get<int64_t>());
  EXPECT_EQ(t.bos_id(), cases["bos"].get<int64_t>());
  EXPECT_EQ(t.eos_id(), cases["eos"].get<int64_t>());
  EXPECT_EQ(t.pad_id(), cases["pad"].get<int64_t>());
  EXPECT_EQ(t.unk_id(), cases["unk"].get<int64_t>());
  EXPECT_EQ(t.image_id(), cases["image"].get<int64_t>());
  EXPECT_EQ(processor().num_image_tokens(), cases["image_seq_length"].get<int64_t>());
  std::vector<int64_t> special;
  for (int64_t id = 0; id < t.size(); ++id)
    if (t.is_special(id)) special.push_back(id);
  EXPECT_EQ(special, cases["all_special_ids"].get<std::vector<int64_t>>());
  for (const auto& c : cases["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    EXPECT_EQ(t.encode(text), ids) << "text: " << text;
    EXPECT_EQ(t.decode(ids, true), c["decoded_skip_special"].get<std::string>()) << "text: " << text;
    EXPECT_EQ(t.decode(ids, false), c["decoded"].get<std::string>()) << "text: " << text;
  }
}

// Decoding a processed row with special tokens skipped gives back prompt + "\n" + suffix (spec
// 8.3); the suffix part alone gives the suffix.
TEST(Tokenizer, DecodeRoundTripSkipsSpecialTokens) {
  const Jsonl j = read_jsonl("suffix");
  const Tokenizer& t = processor().tokenizer();
  for (const auto& s : j.samples) {
    const auto enc = processor().encode(s.prompt, s.suffix);
    std::vector<int64_t> suffix_ids;
    for (size_t k = 0; k < enc.input_ids.size(); ++k)
      if (enc.token_type_ids[k] == 1) suffix_ids.push_back(enc.input_ids[k]);
    ASSERT_EQ(suffix_ids.back(), t.eos_id());
    EXPECT_EQ(t.decode(suffix_ids, true), *s.suffix);
    EXPECT_EQ(t.decode(suffix_ids, false), *s.suffix + "<eos>");
    EXPECT_EQ(t.decode(enc.input_ids, true), s.prompt + "\n" + *s.suffix);
  }
}

// Without tokenizer_config.json's added_tokens_decoder the added tokens come from tokenizer.json;
// the ids must not change.
TEST(Tokenizer, AddedTokensFromTokenizerJson) {
  const fs::path d = model_copy("no_decoder");
  auto cfg = nlohmann::json::parse(slurp(d / "tokenizer_config.json"));
  ASSERT_TRUE(cfg.contains("added_tokens_decoder"));
  cfg.erase("added_tokens_decoder");
  std::ofstream(d / "tokenizer_config.json") << cfg.dump();
  const Tokenizer t = Tokenizer::load(d);
  const nlohmann::json cases = nlohmann::json::parse(slurp(kRoot / "tokenize_cases.json"));
  for (const auto& c : cases["cases"]) {
    EXPECT_EQ(t.encode(c["text"].get<std::string>()), c["ids"].get<std::vector<int64_t>>()) << c["text"];
    EXPECT_EQ(t.decode(c["ids"].get<std::vector<int64_t>>(), true), c["decoded_skip_special"].get<std::string>());
  }
}

TEST(Processor, TokenizeFnForRiscLoaderMatchesBatchRows) {
  const auto fn = processor().tokenize_fn("caption en");
  const Jsonl j = read_jsonl("suffix");
  const auto ref = tq::SafetensorsFile::open((kRoot / "suffix_right.safetensors").string());
  const auto ids = ref.get("input_ids").to_vector<int64_t>(), labels = ref.get("labels").to_vector<int64_t>(),
             types = ref.get("token_type_ids").to_vector<int64_t>(), mask = ref.get("attention_mask").to_vector<int64_t>();
  const size_t T = size_t(ref.get("input_ids").size(1));
  int checked = 0;
  for (size_t r = 0; r < j.samples.size(); ++r) {
    if (j.samples[r].prompt != "caption en") continue;
    const tq::risc::TokenizedText t = fn(*j.samples[r].suffix);
    size_t n = 0;
    while (n < T && mask[r * T + n]) ++n;
    ASSERT_EQ(t.input_ids.size(), n);
    for (size_t k = 0; k < n; ++k) {
      EXPECT_EQ(t.input_ids[k], ids[r * T + k]);
      EXPECT_EQ(t.labels[k], labels[r * T + k]);
      EXPECT_EQ(t.token_type_ids[k], types[r * T + k]);
    }
    ++checked;
  }
  EXPECT_EQ(checked, 2);
}

// ---- errors ------------------------------------------------------------------------------------

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ProcessorErrors, MissingTokenizerModelSaysWhatAndWhere) {
  const fs::path d = model_copy("no_model");
  fs::remove(d / "tokenizer.model");
  const std::string e = error_of([&] { Processor::load(d); });
  EXPECT_NE(e.find((d / "tokenizer.model").string()), std::string::npos) << e;
  EXPECT_NE(e.find("Hugging Face model repo"), std::string::npos) << e;
}

TEST(ProcessorErrors, CorruptImagesAndConfigMismatch) {
  for (const char* name : {"corrupt.jpg", "not_an_image.png"}) {
    std::vector<float> px(3 * 28 * 28);
    const std::string e =
        error_of([&] { processor().preprocess_image(slurp(kRoot / "images" / name), px.data(), name); });
    EXPECT_NE(e.find(std::string(name) + ": corrupt image"), std::string::npos) << e;
  }
  const fs::path d = model_copy("bad_config");
  auto cfg = nlohmann::json::parse(slurp(d / "config.json"));
  cfg["image_token_index"] = 5;
  std::ofstream(d / "config.json") << cfg.dump();
  EXPECT_NE(error_of([&] { Processor::load(d); }).find("image_token_index 5"), std::string::npos);
  EXPECT_NE(error_of([&] { processor().encode("<image> x", std::nullopt); }).find("contains <image>"),
            std::string::npos);
  const Jsonl j = read_jsonl("suffix");
  auto samples = j.samples;
  samples[1].suffix.reset();
  EXPECT_NE(error_of([&] { processor().make_batch(samples, j.images, j.names, PaddingSide::Left); })
                .find("sample 1 has no suffix"),
            std::string::npos);
}

// ---- the CLI -----------------------------------------------------------------------------------

struct CliResult {
  int status;
  std::string err;
};

CliResult run_preprocess(const std::string& args) {
  const fs::path err = temp_dir("cli_err") / "stderr.txt";
  const std::string cmd = "'" + std::string(TQ_BIN_DIR) + "/paligemma' preprocess " + args + " >/dev/null 2>'" +
                          err.string() + "'";
  const int rc = std::system(cmd.c_str());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, slurp(err)};
}

std::string q(const fs::path& p) { return "'" + p.string() + "'"; }

TEST(PreprocessCli, WritesHfTensorsWithAndWithoutLabels) {
  const fs::path out = temp_dir("cli_ok");
  for (const std::string batch : {"suffix", "nosuffix"}) {
    const fs::path file = out / (batch + ".safetensors");
    const CliResult r = run_preprocess("--model " + q(kModel) + " --input " + q(kRoot / (batch + ".jsonl")) +
                                       " --out " + q(file) + " --padding right --pillow 13");
    ASSERT_EQ(r.status, 0) << r.err;
    const auto got = tq::SafetensorsFile::open(file.string());
    const auto ref = tq::SafetensorsFile::open((kRoot / (batch + "_right.safetensors")).string());
    for (const char* k : {"input_ids", "attention_mask", "token_type_ids"}) expect_same_i64(got.get(k), ref.get(k), k);
    EXPECT_EQ(got.contains("labels"), batch == "suffix");
    if (batch == "suffix") expect_same_i64(got.get("labels"), ref.get("labels"), "labels");
    expect_pixels(got.get("pixel_values"), ref.get("pixel_values"), read_jsonl(batch), 2.0 / 255.0);
  }
}

// Each bad input: non-zero exit, one line on stderr naming the file (and line) and the problem.
TEST(PreprocessCli, BadInputsFailWithOneClearLine) {
  const fs::path d = temp_dir("cli_bad");
  fs::copy_file(kRoot / "images" / "target.png", d / "ok.png");
  fs::copy_file(kRoot / "images" / "corrupt.jpg", d / "corrupt.jpg");
  const std::string ok = R"({"image": "ok.png", "prompt": "caption en", "suffix": "a plane"})";
  struct Case {
    std::string name, jsonl, expect;
  };
  const std::vector<Case> cases = {
      {"missing_image", ok + "\n" + R"({"image": "nope.png", "prompt": "x", "suffix": "y"})", ":2: image not found"},
      {"corrupt_image", ok + "\n" + R"({"image": "corrupt.jpg", "prompt": "x", "suffix": "y"})",
       ":2: image " + (d / "corrupt.jpg").string() + ": corrupt image"},
      {"bad_json", ok + "\n" + R"({"image": "ok.png", "prompt": )", ":2: not valid JSON"},
      {"not_object", R"(["ok.png", "x"])", ":1: expected an object"},
      {"missing_prompt", R"({"image": "ok.png"})", ":1: missing \"prompt\""},
      {"prompt_not_string", R"({"image": "ok.png", "prompt": 3})", ":1: \"prompt\" must be a string"},
      {"mixed_suffix", ok + "\n" + R"({"image": "ok.png", "prompt": "x"})", ":2: has no \"suffix\" but line 1 has one"},
      {"empty", "\n", ": no samples"},
  };
  for (const auto& c : cases) {
    const fs::path jsonl = d / (c.name + ".jsonl");
    std::ofstream(jsonl) << c.jsonl << "\n";
    const CliResult r = run_preprocess("--model " + q(kModel) + " --input " + q(jsonl) + " --out " + q(d / "o.st"));
    EXPECT_NE(r.status, 0) << c.name;
    EXPECT_NE(r.err.find(jsonl.string() + c.expect), std::string::npos) << c.name << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.name << ": " << r.err;
    EXPECT_FALSE(fs::exists(d / "o.st")) << c.name;
  }
  const fs::path no_model = model_copy("cli_no_model");
  fs::remove(no_model / "tokenizer.model");
  std::ofstream(d / "good.jsonl") << ok << "\n";
  const CliResult r = run_preprocess("--model " + q(no_model) + " --input " + q(d / "good.jsonl") + " --out " +
                                     q(d / "o.st"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find((no_model / "tokenizer.model").string() + ": not found"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

}  // namespace
