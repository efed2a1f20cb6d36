// `paligemma preprocess --model DIR --input FILE.jsonl --out FILE.safetensors [--padding left|right]`:
// what HF PaliGemmaProcessor(images, text=prompts, suffix=suffixes, padding="longest") returns,
// written as safetensors with HF's names: input_ids, attention_mask, token_type_ids (I64), labels
// (I64, only when the lines have suffixes) and pixel_values (F32, B x 3 x H x W).
// Each input line is {"image": PATH, "prompt": STR, "suffix": STR?}; PATH is relative to the
// JSONL's folder. Every line has a suffix or none does.
#include "paligemma/cli_registry.hpp"
#include "paligemma/processor.hpp"

#include <tq/io/safetensors.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using tq::fail;
using tq::str_cat;

struct PreprocessArgs {
  std::string model, input, out, padding = "left", pillow = "12.1";
};

struct JsonlInput {
  std::vector<tq::paligemma::ProcessorSample> samples;
  std::vector<std::string> images, image_names;
};

std::string read_binary(const fs::path& path, const std::string& where) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(str_cat(where, ": cannot open image ", path.string()));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string string_field(const nlohmann::json& j, const char* key, const std::string& where, bool required) {
  if (!j.contains(key)) {
    if (required) fail(str_cat(where, ": missing \"", key, "\""));
    return {};
  }
  if (!j[key].is_string()) fail(str_cat(where, ": \"", key, "\" must be a string"));
  return j[key].get<std::string>();
}

// Parses and checks every line, reading the image files; errors name FILE:LINE.
JsonlInput read_jsonl(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(str_cat(file, ": cannot open"));
  const fs::path base = fs::path(file).parent_path();
  JsonlInput out;
  std::string line;
  int first_line = 0;
  for (int lineno = 1; std::getline(in, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines
    const std::string where = str_cat(file, ":", lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail(str_cat(where, ": not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object()) fail(str_cat(where, ": expected an object {\"image\", \"prompt\", \"suffix\"?}"));
    tq::paligemma::ProcessorSample s;
    const std::string image = string_field(j, "image", where, true);
    s.prompt = string_field(j, "prompt", where, true);
    if (j.contains("suffix")) s.suffix = string_field(j, "suffix", where, true);
    if (out.samples.empty()) {
      first_line = lineno;
    } else if (s.suffix.has_value() != out.samples[0].suffix.has_value()) {
      fail(str_cat(where, s.suffix ? ": has a \"suffix\" but line " : ": has no \"suffix\" but line ", first_line,
                   s.suffix ? " has none" : " has one", " (every line has a suffix or none does)"));
    }
    const fs::path image_path = fs::path(image).is_absolute() ? fs::path(image) : base / image;
    if (!fs::is_regular_file(image_path)) fail(str_cat(where, ": image not found: ", image_path.string()));
    out.images.push_back(read_binary(image_path, where));
    out.image_names.push_back(str_cat(where, ": image ", image_path.string()));
    out.samples.push_back(std::move(s));
  }
  if (out.samples.empty()) fail(str_cat(file, ": no samples"));
  return out;
}

tq::risc::PilResizeOrder parse_pillow(const std::string& v) {
  if (v == "12.1") return tq::risc::PilResizeOrder::Pillow12_1;
  if (v == "12.2") return tq::risc::PilResizeOrder::Pillow12_2;
  if (v == "13") return tq::risc::PilResizeOrder::Pillow13;
  fail(str_cat("--pillow must be 12.1, 12.2 or 13, got '", v, "'"));
}

int run_preprocess(const PreprocessArgs& a) {
  const auto side = tq::paligemma::parse_padding_side(a.padding);
  const auto processor = tq::paligemma::Processor::load(a.model, parse_pillow(a.pillow));
  const JsonlInput in = read_jsonl(a.input);
  const auto b = processor.make_batch(in.samples, in.images, in.image_names, side);
  std::vector<std::pair<std::string, tq::Tensor>> tensors = {
      {"input_ids", b.input_ids},
      {"attention_mask", b.attention_mask},
      {"token_type_ids", b.token_type_ids},
      {"pixel_values", b.pixel_values}};
  if (b.has_suffix) tensors.push_back({"labels", b.labels});
  tq::save_safetensors(a.out, tensors, {{"padding_side", a.padding}, {"source", a.input}});
  std::fprintf(stderr, "preprocess: %zu samples, %lld tokens each, wrote %s\n", in.samples.size(),
               static_cast<long long>(b.input_ids.size(1)), a.out.c_str());
  return 0;
}

const tq::cli::Register reg_preprocess(
    "preprocess", "Run the PaliGemma processor on a JSONL of {image, prompt, suffix?} and write HF-named tensors",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<PreprocessArgs>();
      app.add_option("--model", a->model, "HF model directory (tokenizer.model, config.json, preprocessor_config.json)")
          ->required();
      app.add_option("--input", a->input, "JSONL, one {\"image\", \"prompt\", \"suffix\"?} per line")->required();
      app.add_option("--out", a->out, "Output .safetensors")->required();
      app.add_option("--padding", a->padding, "Padding side (HF's Gemma default: left)")
          ->capture_default_str()->check(CLI::IsMember({"left", "right"}));
      app.add_option("--pillow", a->pillow, "Pillow version whose bicubic pass order to reproduce")
          ->capture_default_str()->check(CLI::IsMember({"12.1", "12.2", "13"}));
      return [a] { return run_preprocess(*a); };
    });

}  // namespace
