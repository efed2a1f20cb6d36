// PaliGemma's tokenizer as HF GemmaTokenizer(Fast) + PaliGemmaProcessor use it (spec/paligemma.md
// 1.3, 3.2, 3.3, 8.3), on top of the SentencePiece `tokenizer.model` of the model directory.
//
// How HF tokenizes, and therefore how this does:
//  - Added tokens are matched first, leftmost-longest, on the raw text (the tokenizers library's
//    AddedVocabulary). They come from tokenizer_config.json `added_tokens_decoder` (the Hub file,
//    40 kB) or, when that is absent, tokenizer.json `added_tokens` (17.5 MB on the Hub), plus
//    added_tokens.json; the processor then adds `<image>` (special) and the 1024 `<locXXXX>` + 128
//    `<segXXX>` strings (non-special) when missing, reusing ids the vocabulary already has.
//  - The text between added tokens is encoded by SentencePiece (Gemma: BPE, byte fallback, no dummy
//    prefix, identity normalizer, digits split), which is what the converted fast tokenizer does.
//  - No <bos>/<eos> are added here: the processor writes them into the string (spec 3.2).
//  - Decoding maps added tokens to their content and runs SentencePiece on the rest; with
//    skip_special_tokens the added tokens flagged `special` are dropped (<pad>, <eos>, <bos>,
//    <unk>, <image>, <mask>, ...), but not <locXXXX>/<segXXX> (spec 8.3).
#pragma once

#include <nlohmann/json.hpp>
#include <tq/core/error.hpp>

#ifdef TQ_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tq::paligemma {

// Reads a JSON file of the model directory; errors name the file.
inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  TQ_CHECK(in.good(), path.string(), ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    fail(str_cat(path.string(), ": not valid JSON (", e.what(), ")"));
  }
}

// The image placeholder of config.json: which id, and how many per image.
struct ImageTokenConfig {
  int64_t image_token_id = -1;
  int64_t num_image_tokens = 0;
};

// config.json: `image_token_index` (older saves: `image_token_id`) and `text_config.num_image_tokens`,
// which PaliGemmaConfig forces to (image_size / patch_size)^2 — so that is the fallback.
inline ImageTokenConfig read_image_token_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  TQ_CHECK(std::filesystem::exists(path), path.string(), ": not found (the model directory needs HF's config.json)");
  const nlohmann::json cfg = read_json_file(path);
  ImageTokenConfig out;
  for (const char* key : {"image_token_index", "image_token_id"})
    if (cfg.contains(key) && cfg[key].is_number_integer()) {
      out.image_token_id = cfg[key].get<int64_t>();
      break;
    }
  TQ_CHECK(out.image_token_id >= 0, path.string(), ": no integer image_token_index");
  const nlohmann::json vc = cfg.value("vision_config", nlohmann::json::object());
  if (vc.contains("image_size") && vc.contains("patch_size")) {
    const int64_t side = vc["image_size"].get<int64_t>() / vc["patch_size"].get<int64_t>();
    out.num_image_tokens = side * side;
  }
  const nlohmann::json tc = cfg.value("text_config", nlohmann::json::object());
  if (tc.contains("num_image_tokens")) {
    const int64_t n = tc["num_image_tokens"].get<int64_t>();
    TQ_CHECK(out.num_image_tokens == 0 || n == out.num_image_tokens, path.string(),
             ": text_config.num_image_tokens ", n, " != (vision image_size / patch_size)^2 = ", out.num_image_tokens);
    out.num_image_tokens = n;
  }
  TQ_CHECK(out.num_image_tokens > 0, path.string(),
           ": cannot tell the number of image tokens (no text_config.num_image_tokens, no vision image_size/patch_size)");
  return out;
}

struct AddedToken {
  std::string content;
  int64_t id = -1;
  bool special = false;
};

class Tokenizer {
 public:
  // Loads `tokenizer.model` and the special/added tokens of an HF model directory, then registers
  // the tokens PaliGemmaProcessor adds at init.
  static Tokenizer load(const std::filesystem::path& model_dir) {
    const auto model_path = model_dir / "tokenizer.model";
    if (!std::filesystem::exists(model_path))
      fail(str_cat(model_path.string(),
                   ": not found; the PaliGemma processor needs the SentencePiece model `tokenizer.model` from the "
                   "Hugging Face model repo (e.g. google/paligemma-3b-pt-224) in the model directory"));
#ifndef TQ_HAVE_SENTENCEPIECE
    fail(str_cat(model_path.string(), ": this build has no sentencepiece library (install libsentencepiece-dev)"));
#else
    Tokenizer t;
    t.sp_ = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = t.sp_->Load(model_path.string());
    TQ_CHECK(status.ok(), model_path.string(), ": not a SentencePiece model (", status.ToString(), ")");
    t.read_added_tokens(model_dir);
    t.add_processor_tokens();
    t.resolve_special_ids(model_dir);
    return t;
#endif
  }

  // Token ids of `text` with no <bos>/<eos> added (HF: add_special_tokens=False).
  std::vector<int64_t> encode(std::string_view text) const {
    std::vector<int64_t> ids;
    size_t plain_begin = 0, i = 0;
    while (i < text.size()) {
      const AddedToken* tok = match_added(text, i);
      if (!tok) {
        ++i;
        continue;
      }
      encode_plain(text.substr(plain_begin, i - plain_begin), ids);
      ids.push_back(tok->id);
      i += tok->content.size();
      plain_begin = i;
    }
    encode_plain(text.substr(plain_begin), ids);
    return ids;
  }

  // HF tokenizer.decode(ids, skip_special_tokens).
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
#ifdef TQ_HAVE_SENTENCEPIECE
      std::string s;
      const auto status = sp_->Decode(run, &s);
      TQ_CHECK(status.ok(), "tokenizer: decode failed (", status.ToString(), ")");
      out += s;
#endif
      run.clear();
    };
    for (int64_t id : ids) {
      TQ_CHECK(id >= 0 && id < size(), "tokenizer: id ", id, " out of range [0, ", size(), ")");
      if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        if (skip_special_tokens && it->second.special) continue;
        flush();
        out += it->second.content;
      } else {
        run.push_back(static_cast<int>(id));
      }
    }
    flush();
    return out;
  }

  // len(tokenizer): SentencePiece pieces plus added tokens beyond them.
  int64_t size() const { return size_; }
  bool is_special(int64_t id) const {
    auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && it->second.special;
  }
  // Id of an added token or SentencePiece piece; nullopt when the vocabulary lacks it.
  std::optional<int64_t> token_to_id(const std::string& token) const {
    if (auto it = added_by_content_.find(token); it != added_by_content_.end()) return it->second;
#ifdef TQ_HAVE_SENTENCEPIECE
    const int id = sp_->PieceToId(token);
    if (id != sp_->unk_id() || token == sp_->IdToPiece(sp_->unk_id())) return id;
#endif
    return std::nullopt;
  }

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t unk_id() const { return unk_id_; }
  int64_t image_id() const { return image_id_; }

 private:
#ifdef TQ_HAVE_SENTENCEPIECE
  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
#else
  std::shared_ptr<void> sp_;
#endif
  std::unordered_map<int64_t, AddedToken> added_by_id_;
  std::unordered_map<std::string, int64_t> added_by_content_;
  // First byte -> added tokens starting with it, longest first (leftmost-longest matching). Copies,
  // not pointers into the maps, so the Tokenizer copies safely.
  std::vector<std::vector<AddedToken>> by_first_byte_ = std::vector<std::vector<AddedToken>>(256);
  int64_t size_ = 0;
  int64_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1, image_id_ = -1;

  void encode_plain(std::string_view s, std::vector<int64_t>& ids) const {
    if (s.empty()) return;
#ifdef TQ_HAVE_SENTENCEPIECE
    std::vector<int> piece_ids;
    const auto status = sp_->Encode(s, &piece_ids);
    TQ_CHECK(status.ok(), "tokenizer: encode failed (", status.ToString(), ")");
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
#endif
  }

  const AddedToken* match_added(std::string_view text, size_t i) const {
    for (const AddedToken& t : by_first_byte_[static_cast<uint8_t>(text[i])])
      if (text.compare(i, t.content.size(), t.content) == 0) return &t;
    return nullptr;
  }

  void add(const AddedToken& t, const std::string& source) {
    TQ_CHECK(!t.content.empty(), source, ": empty added token (id ", t.id, ")");
    if (auto it = added_by_id_.find(t.id); it != added_by_id_.end()) {
      TQ_CHECK(it->second.content == t.content, source, ": id ", t.id, " is both '", it->second.content, "' and '",
               t.content, "'");
      it->second.special = it->second.special || t.special;
      return;
    }
    added_by_id_[t.id] = t;
    added_by_content_[t.content] = t.id;
    size_ = std::max(size_, t.id + 1);
  }

  void read_added_tokens(const std::filesystem::path& dir) {
#ifdef TQ_HAVE_SENTENCEPIECE
    size_ = sp_->GetPieceSize();
#endif
    const auto cfg_path = dir / "tokenizer_config.json", json_path = dir / "tokenizer.json";
    const nlohmann::json cfg = std::filesystem::exists(cfg_path) ? read_json_file(cfg_path) : nlohmann::json::object();
    try {
      if (cfg.contains("added_tokens_decoder")) {
        for (const auto& [id, v] : cfg["added_tokens_decoder"].items())
          add({v.at("content").get<std::string>(), std::stoll(id), v.value("special", false)}, cfg_path.string());
      } else if (std::filesystem::exists(json_path)) {
        const nlohmann::json tj = read_json_file(json_path);  // a named local: the loop must not outlive it
        for (const auto& v : tj.at("added_tokens"))
          add({v.at("content").get<std::string>(), v.at("id").get<int64_t>(), v.value("special", false)},
              json_path.string());
      }
    } catch (const nlohmann::json::exception& e) {
      fail(str_cat(cfg.contains("added_tokens_decoder") ? cfg_path.string() : json_path.string(),
                   ": bad added token entry (", e.what(), ")"));
    }
    const auto added_path = dir / "added_tokens.json";
    if (std::filesystem::exists(added_path)) {
      const nlohmann::json added = read_json_file(added_path);
      for (const auto& [content, id] : added.items()) {
        TQ_CHECK(id.is_number_integer(), added_path.string(), ": id of '", content, "' is not an integer");
        if (!added_by_content_.count(content)) add({content, id.get<int64_t>(), false}, added_path.string());
      }
    }
#ifdef TQ_HAVE_SENTENCEPIECE
    // Control and unknown pieces are special added tokens of the converted fast tokenizer; register
    // those the files did not list, so a directory with only tokenizer.model behaves the same
    // (user-defined pieces need nothing: SentencePiece itself matches them whole).
    for (int id = 0; id < sp_->GetPieceSize(); ++id)
      if ((sp_->IsControl(id) || sp_->IsUnknown(id)) && !added_by_id_.count(id))
        add({sp_->IdToPiece(id), id, true}, "tokenizer.model");
#endif
    // Names listed as special anywhere are special (the Hub's special_tokens_map.json holds <image>).
    for (const std::string& name : special_token_names(dir))
      if (auto it = added_by_content_.find(name); it != added_by_content_.end()) added_by_id_[it->second].special = true;
  }

  // PaliGemmaProcessor.__init__: <image> as a special token, then loc/seg as normal added tokens.
  void add_processor_tokens() {
    auto ensure = [&](const std::string& content, bool special) {
      if (auto it = added_by_content_.find(content); it != added_by_content_.end()) {
        if (special) added_by_id_[it->second].special = true;
        return;
      }
      std::optional<int64_t> id = token_to_id(content);
      add({content, id ? *id : size_, special}, "processor");
    };
    ensure("<image>", true);
    char buf[16];
    for (int i = 0; i < 1024; ++i) {
      std::snprintf(buf, sizeof buf, "<loc%04d>", i);
      ensure(buf, false);
    }
    for (int i = 0; i < 128; ++i) {
      std::snprintf(buf, sizeof buf, "<seg%03d>", i);
      ensure(buf, false);
    }
    for (auto& v : by_first_byte_) v.clear();
    for (const auto& [id, t] : added_by_id_) by_first_byte_[static_cast<uint8_t>(t.content[0])].push_back(t);
    for (auto& v : by_first_byte_)
      std::sort(v.begin(), v.end(), [](const AddedToken& a, const AddedToken& b) {
        return a.content.size() != b.content.size() ? a.content.size() > b.content.size() : a.id < b.id;
      });
  }

  // bos/eos/pad/unk/additional special token strings: special_tokens_map.json, then
  // tokenizer_config.json, then Gemma's defaults.
  static std::map<std::string, std::string> special_token_map(const std::filesystem::path& dir) {
    std::map<std::string, std::string> names = {
        {"bos_token", "<bos>"}, {"eos_token", "<eos>"}, {"pad_token", "<pad>"}, {"unk_token", "<unk>"}};
    for (const char* file : {"tokenizer_config.json", "special_tokens_map.json"}) {  // later wins
      const auto path = dir / file;
      if (!std::filesystem::exists(path)) continue;
      const nlohmann::json j = read_json_file(path);
      for (auto& [key, value] : names) {
        if (!j.contains(key) || j[key].is_null()) continue;
        const auto& v = j[key];
        TQ_CHECK(v.is_string() || (v.is_object() && v.contains("content")), path.string(), ": ", key,
                 " is neither a string nor {\"content\": ...}");
        value = v.is_string() ? v.get<std::string>() : v["content"].get<std::string>();
      }
    }
    return names;
  }

  static std::vector<std::string> special_token_names(const std::filesystem::path& dir) {
    std::vector<std::string> out;
    for (const auto& [k, v] : special_token_map(dir)) out.push_back(v);
    for (const char* file : {"tokenizer_config.json", "special_tokens_map.json"}) {
      const auto path = dir / file;
      if (!std::filesystem::exists(path)) continue;
      const nlohmann::json j = read_json_file(path);
      for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
        if (!j.contains(key) || !j[key].is_array()) continue;
        for (const auto& v : j[key])
          if (v.is_string()) out.push_back(v.get<std::string>());
          else if (v.is_object() && v.contains("content")) out.push_back(v["content"].get<std::string>());
      }
    }
    return out;
  }

  void resolve_special_ids(const std::filesystem::path& dir) {
    const auto names = special_token_map(dir);
    auto id_of = [&](const std::string& key) {
      const std::string& name = names.at(key);
      std::optional<int64_t> id = token_to_id(name);
      TQ_CHECK(id.has_value(), (dir / "special_tokens_map.json").string(), ": ", key, " '", name,
               "' is not in the vocabulary of ", (dir / "tokenizer.model").string());
      return *id;
    };
    bos_id_ = id_of("bos_token");
    eos_id_ = id_of("eos_token");
    pad_id_ = id_of("pad_token");
    unk_id_ = id_of("unk_token");
    image_id_ = added_by_content_.at("<image>");
  }
};

}  // namespace tq::paligemma
