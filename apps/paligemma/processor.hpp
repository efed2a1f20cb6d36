// HF PaliGemmaProcessor (spec/paligemma.md 3): text layout, labels, token_type_ids, padding, and
// the slow (PIL) SiglipImageProcessor, producing a batch with HF's tensor names and dtypes.
//
// Per sample (the usual "Case A": the prompt holds no <image>):
//   [<image> x num_image_tokens][<bos>][prompt][\n] [suffix][<eos>]      (suffix part optional)
// The prefix and the suffix are tokenized as separate sequences (no merge across the boundary);
// token_type_ids are 0 on the prefix, 1 on suffix + <eos>, 0 on padding; labels are the ids where
// token_type_ids == 1, else -100. Padding (to the longest row) uses the tokenizer's pad id,
// attention_mask 0, on the left or the right.
// Images: decode (stb_image, RGB) -> PIL bicubic resize to `size` (apps/risc/image.hpp) ->
// float32(u8 * rescale_factor in float64) -> (x - mean) / std in float32 -> (3, H, W).
#pragma once

#include "paligemma/tokenizer.hpp"
#include "risc/image.hpp"
#include "risc/loader.hpp"

#include <tq/tq.hpp>

#include <array>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace tq::paligemma {

constexpr int64_t kIgnoreIndex = -100;

enum class PaddingSide { Left, Right };

inline PaddingSide parse_padding_side(const std::string& s) {
  if (s == "left") return PaddingSide::Left;
  if (s == "right") return PaddingSide::Right;
  fail(str_cat("padding side must be 'left' or 'right', got '", s, "'"));
}

// preprocessor_config.json (SiglipImageProcessor) fields the pixel path uses.
struct ImageProcessorConfig {
  int width = 224, height = 224;
  bool do_resize = true, do_rescale = true, do_normalize = true;
  double rescale_factor = 1.0 / 255.0;
  std::array<double, 3> image_mean{0.5, 0.5, 0.5}, image_std{0.5, 0.5, 0.5};
};

inline std::array<double, 3> read_triple(const nlohmann::json& j, const char* key, const std::string& file) {
  const auto& v = j[key];
  if (v.is_number()) return {v.get<double>(), v.get<double>(), v.get<double>()};
  TQ_CHECK(v.is_array() && v.size() == 3, file, ": ", key, " must be a number or 3 numbers");
  return {v[0].get<double>(), v[1].get<double>(), v[2].get<double>()};
}

// preprocessor_config.json, or `image_processor` of processor_config.json (what transformers v5
// writes). Only PIL bicubic resampling (3) is implemented; anything else is refused, not ignored.
inline ImageProcessorConfig read_image_processor_config(const std::filesystem::path& model_dir) {
  auto path = model_dir / "preprocessor_config.json";
  nlohmann::json j;
  if (std::filesystem::exists(path)) {
    j = read_json_file(path);
  } else {
    path = model_dir / "processor_config.json";
    TQ_CHECK(std::filesystem::exists(path), (model_dir / "preprocessor_config.json").string(),
             ": not found (the image processor settings of the HF model repo)");
    j = read_json_file(path).value("image_processor", nlohmann::json());
    TQ_CHECK(j.is_object(), path.string(), ": no image_processor object");
  }
  const std::string file = path.string();
  ImageProcessorConfig c;
  try {
    c.do_resize = j.value("do_resize", true);
    c.do_rescale = j.value("do_rescale", true);
    c.do_normalize = j.value("do_normalize", true);
    c.rescale_factor = j.value("rescale_factor", 1.0 / 255.0);
    if (j.contains("image_mean")) c.image_mean = read_triple(j, "image_mean", file);
    if (j.contains("image_std")) c.image_std = read_triple(j, "image_std", file);
    if (j.contains("size")) {
      const auto& s = j["size"];
      TQ_CHECK(s.contains("height") && s.contains("width"), file, ": size must have height and width");
      c.height = s["height"].get<int>();
      c.width = s["width"].get<int>();
    }
    const int resample = j.value("resample", 3);
    TQ_CHECK(resample == 3, file, ": resample ", resample, " is not supported (only 3 = PIL BICUBIC)");
  } catch (const nlohmann::json::exception& e) {
    fail(str_cat(file, ": bad field (", e.what(), ")"));
  }
  TQ_CHECK(c.width > 0 && c.height > 0, file, ": bad size ", c.width, "x", c.height);
  for (double s : c.image_std) TQ_CHECK(s != 0.0, file, ": image_std has a zero");
  return c;
}

// One sample's token rows before padding.
struct EncodedSample {
  std::vector<int64_t> input_ids, token_type_ids;
};

// HF names, dtypes and shapes: input_ids, attention_mask, token_type_ids, labels (B, T) i64;
// pixel_values (B, 3, H, W) f32. labels are all -100 without suffixes (what transformers v5 returns).
struct PaliGemmaBatch {
  Tensor input_ids, attention_mask, token_type_ids, labels, pixel_values;
  bool has_suffix = false;
};

struct ProcessorSample {
  std::string prompt;
  std::optional<std::string> suffix;
};

class Processor {
 public:
  // `order`: which Pillow version's resize pass order to reproduce (apps/risc/image.hpp).
  static Processor load(const std::filesystem::path& model_dir,
                        risc::PilResizeOrder order = risc::PilResizeOrder::Pillow12_1) {
    Processor p;
    p.tokenizer_ = Tokenizer::load(model_dir);
    p.image_cfg_ = read_image_processor_config(model_dir);
    p.image_tokens_ = read_image_token_config(model_dir);
    p.order_ = order;
    TQ_CHECK(p.image_tokens_.image_token_id == p.tokenizer_.image_id(), (model_dir / "config.json").string(),
             ": image_token_index ", p.image_tokens_.image_token_id, " but the tokenizer maps <image> to ",
             p.tokenizer_.image_id());
    p.build_normalize_tables();
    return p;
  }

  const Tokenizer& tokenizer() const { return tokenizer_; }
  const ImageProcessorConfig& image_config() const { return image_cfg_; }
  int64_t num_image_tokens() const { return image_tokens_.num_image_tokens; }
  int64_t image_token_id() const { return image_tokens_.image_token_id; }

  // Token rows of one sample, unpadded.
  EncodedSample encode(const std::string& prompt, const std::optional<std::string>& suffix) const {
    TQ_CHECK(prompt.find("<image>") == std::string::npos, "prompt '", prompt,
             "' contains <image>; the processor writes the image tokens itself");
    EncodedSample s;
    s.input_ids.assign(static_cast<size_t>(num_image_tokens()), image_token_id());
    s.input_ids.push_back(tokenizer_.bos_id());
    for (int64_t id : tokenizer_.encode(prompt + "\n")) s.input_ids.push_back(id);
    s.token_type_ids.assign(s.input_ids.size(), 0);
    if (suffix) {
      for (int64_t id : tokenizer_.encode(*suffix)) s.input_ids.push_back(id);
      s.input_ids.push_back(tokenizer_.eos_id());
      s.token_type_ids.resize(s.input_ids.size(), 1);
    }
    return s;
  }

  // Encoded image bytes -> (3, H, W) float32 at `out`. `where` names the image in errors.
  void preprocess_image(std::string_view bytes, float* out, const std::string& where) const {
    risc::ImageU8 img = risc::decode_image(bytes, where);
    if (image_cfg_.do_resize && (img.width != image_cfg_.width || img.height != image_cfg_.height))
      img = risc::resize_bicubic(img, image_cfg_.width, image_cfg_.height, order_);
    TQ_CHECK(img.width == image_cfg_.width && img.height == image_cfg_.height, where, ": image is ", img.width, "x",
             img.height, " but do_resize is off and the model wants ", image_cfg_.width, "x", image_cfg_.height);
    const size_t hw = static_cast<size_t>(img.width) * img.height;
    const uint8_t* p = img.rgb.data();
    for (size_t i = 0; i < hw; ++i, p += 3)
      for (int c = 0; c < 3; ++c) out[c * hw + i] = tables_[c][p[c]];
  }

  // The whole batch; `images[i]` holds the encoded bytes of sample i, `image_names[i]` its name.
  PaliGemmaBatch make_batch(const std::vector<ProcessorSample>& samples, const std::vector<std::string>& images,
                            const std::vector<std::string>& image_names, PaddingSide side) const {
    TQ_CHECK(!samples.empty(), "processor: empty batch");
    TQ_CHECK(images.size() == samples.size() && image_names.size() == samples.size(), "processor: ",
             samples.size(), " samples but ", images.size(), " images");
    const bool has_suffix = samples[0].suffix.has_value();
    std::vector<EncodedSample> rows;
    size_t T = 0;
    for (size_t i = 0; i < samples.size(); ++i) {
      TQ_CHECK(samples[i].suffix.has_value() == has_suffix, "processor: sample ", i,
               has_suffix ? " has no suffix but sample 0 has one" : " has a suffix but sample 0 has none");
      rows.push_back(encode(samples[i].prompt, samples[i].suffix));
      T = std::max(T, rows.back().input_ids.size());
    }
    PaliGemmaBatch b = pad_rows(rows, T, side);
    b.has_suffix = has_suffix;
    const int64_t B = static_cast<int64_t>(samples.size()), H = image_cfg_.height, W = image_cfg_.width;
    b.pixel_values = Tensor::empty({B, 3, H, W}, DType::f32);
    float* px = b.pixel_values.data<float>();
    for (int64_t i = 0; i < B; ++i) preprocess_image(images[size_t(i)], px + i * 3 * H * W, image_names[size_t(i)]);
    return b;
  }

  // Rows padded to T: pad id / mask 0 / type 0 / label -100 on the left or the right.
  PaliGemmaBatch pad_rows(const std::vector<EncodedSample>& rows, size_t T, PaddingSide side) const {
    const int64_t B = static_cast<int64_t>(rows.size());
    std::vector<int64_t> ids(size_t(B) * T, tokenizer_.pad_id()), mask(size_t(B) * T, 0), types(size_t(B) * T, 0),
        labels(size_t(B) * T, kIgnoreIndex);
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto& s = rows[r];
      const size_t n = s.input_ids.size(), start = r * T + (side == PaddingSide::Left ? T - n : 0);
      for (size_t j = 0; j < n; ++j) {
        ids[start + j] = s.input_ids[j];
        mask[start + j] = 1;
        types[start + j] = s.token_type_ids[j];
        labels[start + j] = s.token_type_ids[j] == 1 ? s.input_ids[j] : kIgnoreIndex;
      }
    }
    const Shape shape{B, static_cast<int64_t>(T)};
    PaliGemmaBatch b;
    b.input_ids = Tensor::from_vector(ids, shape);
    b.attention_mask = Tensor::from_vector(mask, shape);
    b.token_type_ids = Tensor::from_vector(types, shape);
    b.labels = Tensor::from_vector(labels, shape);
    return b;
  }

  // For the RISC loader: `prompt` as prefix, the caption as suffix; unpadded rows. Holds its own
  // copy of the processor (the SentencePiece model is shared), so it outlives this object safely.
  risc::TokenizeFn tokenize_fn(std::string prompt) const {
    return [self = *this, prompt = std::move(prompt)](const std::string& caption) {
      const EncodedSample s = self.encode(prompt, caption);
      risc::TokenizedText t;
      for (size_t j = 0; j < s.input_ids.size(); ++j) {
        t.input_ids.push_back(static_cast<int32_t>(s.input_ids[j]));
        t.token_type_ids.push_back(static_cast<int32_t>(s.token_type_ids[j]));
        t.labels.push_back(static_cast<int32_t>(s.token_type_ids[j] == 1 ? s.input_ids[j] : kIgnoreIndex));
      }
      return t;
    };
  }

 private:
  Tokenizer tokenizer_;
  ImageProcessorConfig image_cfg_;
  ImageTokenConfig image_tokens_;
  risc::PilResizeOrder order_ = risc::PilResizeOrder::Pillow12_1;
  std::array<std::array<float, 256>, 3> tables_{};

  // u8 -> float: numpy's rescale (float64 multiply, then float32) and normalize (float32 throughout).
  void build_normalize_tables() {
    for (int c = 0; c < 3; ++c)
      for (int v = 0; v < 256; ++v) {
        float x = image_cfg_.do_rescale ? static_cast<float>(v * image_cfg_.rescale_factor) : static_cast<float>(v);
        if (image_cfg_.do_normalize)
          x = (x - static_cast<float>(image_cfg_.image_mean[c])) / static_cast<float>(image_cfg_.image_std[c]);
        tables_[c][v] = x;
      }
  }
};

}  // namespace tq::paligemma
