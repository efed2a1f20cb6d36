// METEOR 1.5 English resources, read from the files that tools/setup_meteor.sh extracts from the
// pycocoevalcap wheel: function words, nonbreaking prefixes, WordNet synsets and morphological
// exceptions (from meteor-1.5.jar), and the paraphrase table data/paraphrase-en.gz.
//
// The paraphrase table (5.3 M entries) is held flat: one pool of token ids, one record per entry
// in file order, and an index of (hash of reference-side phrase, entry) sorted by hash then file
// order. Looking up an exact phrase therefore yields its entries in file order, which is the order
// METEOR's trie emits them in — candidate order matters to the alignment search.
#pragma once

#include "metrics/meteor_normalizer.hpp"
#include "metrics/text.hpp"

#include <tq/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(TQ_HAVE_ZLIB)
#include <zlib.h>
#endif

namespace tq::metrics {

// Where setup_meteor.sh puts the data: $XDG_DATA_HOME/tq/meteor or ~/.local/share/tq/meteor.
inline std::filesystem::path default_meteor_data_dir() {
  if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::filesystem::path(x) / "tq" / "meteor";
  if (const char* h = std::getenv("HOME"); h && *h) return std::filesystem::path(h) / ".local" / "share" / "tq" / "meteor";
  return {};
}

inline const char* const kMeteorFiles[] = {"function/english.words", "nonbreaking/english.prefixes",
                                           "synonym/english.exceptions", "synonym/english.synsets",
                                           "data/paraphrase-en.gz"};

// Empty string when every file is present, else the first missing path.
inline std::string missing_meteor_file(const std::filesystem::path& dir) {
  for (const char* f : kMeteorFiles)
    if (!std::filesystem::is_regular_file(dir / f)) return (dir / f).string();
  return {};
}

inline std::string read_text_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  TQ_CHECK(in, "METEOR data: cannot open ", p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Java BufferedReader.readLine over a whole buffer (\n, \r or \r\n end a line).
inline std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    while (j < text.size() && text[j] != '\n' && text[j] != '\r') ++j;
    lines.push_back(text.substr(i, j - i));
    if (j < text.size() && text[j] == '\r' && j + 1 < text.size() && text[j + 1] == '\n') ++j;
    i = j + 1;
  }
  return lines;
}

// Splits on the Java StringTokenizer delimiters (ASCII bytes, so UTF-8 needs no decoding).
inline void split_tokens(std::string_view line, std::vector<std::string_view>& out) {
  out.clear();
  size_t i = 0;
  auto delim = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f'; };
  while (i < line.size()) {
    while (i < line.size() && delim(line[i])) ++i;
    size_t j = i;
    while (j < line.size() && !delim(line[j])) ++j;
    if (j > i) out.push_back(line.substr(i, j - i));
    i = j;
  }
}

struct SynonymDictionary {
  std::unordered_map<std::string, std::vector<int32_t>> synsets;      // word -> sorted synset ids
  std::unordered_map<std::string, std::vector<std::string>> bases;    // irregular form -> base forms

  const std::vector<int32_t>* find(const std::string& w) const {
    auto it = synsets.find(w);
    return it == synsets.end() ? nullptr : &it->second;
  }
};

struct ParaphraseTable {
  struct Entry {
    uint32_t ref_off, par_off;
    uint16_t ref_len, par_len;
  };
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<int32_t> pool;
  std::vector<Entry> entries;
  std::vector<std::pair<uint64_t, uint32_t>> index;  // (phrase hash, entry) sorted
  size_t max_ref_len = 0;

  static uint64_t phrase_hash(std::span<const int32_t> ids) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (int32_t id : ids) h = (h ^ static_cast<uint32_t>(id)) * 0x100000001B3ull;
    return h ^ (ids.size() * 0x9E3779B97F4A7C15ull);
  }

  int32_t translate(const std::string& w) const {
    auto it = vocab.find(w);
    return it == vocab.end() ? -1 : it->second;
  }
  std::span<const int32_t> ref(const Entry& e) const { return {pool.data() + e.ref_off, e.ref_len}; }
  std::span<const int32_t> par(const Entry& e) const { return {pool.data() + e.par_off, e.par_len}; }

  // Entries whose reference side is exactly `phrase`, in file order.
  template <class F>
  void for_each_exact(std::span<const int32_t> phrase, F&& f) const {
    const uint64_t h = phrase_hash(phrase);
    auto it = std::lower_bound(index.begin(), index.end(), std::pair<uint64_t, uint32_t>{h, 0});
    for (; it != index.end() && it->first == h; ++it) {
      const Entry& e = entries[it->second];
      const auto r = ref(e);
      if (std::equal(r.begin(), r.end(), phrase.begin(), phrase.end())) f(e);
    }
  }
};

struct MeteorData {
  std::unordered_set<std::string> function_words;
  NonbreakingPrefixes nonbreaking;
  SynonymDictionary synonyms;
  ParaphraseTable paraphrase;
  std::filesystem::path dir;
};

namespace meteor_detail {

inline void load_synonyms(const std::filesystem::path& dir, SynonymDictionary& syn) {
  const std::string exc = read_text_file(dir / "synonym/english.exceptions");
  const auto exc_lines = split_lines(exc);
  std::vector<std::string_view> toks;
  for (size_t i = 0; i + 1 < exc_lines.size(); i += 2) {
    split_tokens(exc_lines[i + 1], toks);
    for (auto form : toks) syn.bases[std::string(form)].emplace_back(exc_lines[i]);
  }
  const std::string sets = read_text_file(dir / "synonym/english.synsets");
  const auto set_lines = split_lines(sets);
  syn.synsets.reserve(set_lines.size() / 2);
  for (size_t i = 0; i + 1 < set_lines.size(); i += 2) {
    split_tokens(set_lines[i + 1], toks);
    std::vector<int32_t> ids;
    for (auto t : toks) ids.push_back(static_cast<int32_t>(std::strtol(std::string(t).c_str(), nullptr, 10)));
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    syn.synsets[std::string(set_lines[i])] = std::move(ids);  // a later duplicate replaces, as Hashtable.put
  }
}

#if defined(TQ_HAVE_ZLIB)
// Streams the lines of a gzip file without holding the decompressed text (272 MB for the table).
class GzLineReader {
 public:
  explicit GzLineReader(const std::filesystem::path& p) : path_(p.string()), f_(gzopen(path_.c_str(), "rb")) {
    TQ_CHECK(f_, "METEOR data: cannot open ", path_);
    gzbuffer(f_, 1 << 20);
  }
  ~GzLineReader() { gzclose(f_); }
  GzLineReader(const GzLineReader&) = delete;
  GzLineReader& operator=(const GzLineReader&) = delete;

  // The next line without its terminator; valid until the next call. False at end of file.
  bool next(std::string_view& line) {
    for (;;) {
      const size_t e = buf_.find('\n', pos_);
      if (e != std::string::npos) {
        line = std::string_view(buf_).substr(pos_, e - pos_);
        pos_ = e + 1;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        return true;
      }
      if (eof_) {
        if (pos_ >= buf_.size()) return false;
        line = std::string_view(buf_).substr(pos_);
        pos_ = buf_.size();
        return true;
      }
      buf_.erase(0, pos_);
      pos_ = 0;
      const size_t old = buf_.size();
      buf_.resize(old + kChunk);
      const int n = gzread(f_, buf_.data() + old, static_cast<unsigned>(kChunk));
      TQ_CHECK(n >= 0, "METEOR data: corrupt gzip file ", path_);
      buf_.resize(old + static_cast<size_t>(n));
      eof_ = n == 0;
    }
  }

 private:
  static constexpr size_t kChunk = size_t{4} << 20;
  std::string path_;
  gzFile f_;
  std::string buf_;
  size_t pos_ = 0;
  bool eof_ = false;
};
#endif

inline void load_paraphrases(const std::filesystem::path& path, ParaphraseTable& t) {
#if defined(TQ_HAVE_ZLIB)
  GzLineReader reader(path);
  t.vocab.reserve(1 << 20);
  t.entries.reserve(5'400'000);
  t.pool.reserve(20'000'000);
  std::vector<std::string_view> toks;
  std::string key;
  auto add_phrase = [&](std::string_view line, uint16_t& len) {
    split_tokens(line, toks);
    len = static_cast<uint16_t>(toks.size());
    const auto off = static_cast<uint32_t>(t.pool.size());
    for (auto tok : toks) {
      key.assign(tok);
      auto [it, inserted] = t.vocab.try_emplace(key, static_cast<int32_t>(t.vocab.size()));
      t.pool.push_back(it->second);
    }
    return off;
  };
  // Groups of three lines: probability (ignored), reference phrase, paraphrase.
  std::string_view line;
  while (reader.next(line)) {
    ParaphraseTable::Entry e{};
    TQ_CHECK(reader.next(line), "METEOR data: truncated paraphrase table ", path.string());
    e.ref_off = add_phrase(line, e.ref_len);
    TQ_CHECK(reader.next(line), "METEOR data: truncated paraphrase table ", path.string());
    e.par_off = add_phrase(line, e.par_len);
    t.max_ref_len = std::max<size_t>(t.max_ref_len, e.ref_len);
    t.entries.push_back(e);
  }
  t.index.resize(t.entries.size());
  for (size_t i = 0; i < t.entries.size(); ++i)
    t.index[i] = {ParaphraseTable::phrase_hash(t.ref(t.entries[i])), static_cast<uint32_t>(i)};
  std::sort(t.index.begin(), t.index.end());
#else
  fail(str_cat("METEOR data: built without zlib, cannot read ", path.string()));
#endif
}

}  // namespace meteor_detail

// Loads every resource from `dir`; throws tq::Error naming the first missing or unreadable file.
inline MeteorData load_meteor_data(const std::filesystem::path& dir) {
  const std::string missing = missing_meteor_file(dir);
  TQ_CHECK(missing.empty(), "METEOR data not found: ", missing, " (run tools/setup_meteor.sh or pass --meteor-data DIR)");
  MeteorData d;
  d.dir = dir;
  const std::string words = read_text_file(dir / "function/english.words");
  for (auto line : split_lines(words)) d.function_words.emplace(line);
  d.nonbreaking = parse_nonbreaking_prefixes(read_text_file(dir / "nonbreaking/english.prefixes"));
  meteor_detail::load_synonyms(dir, d.synonyms);
  meteor_detail::load_paraphrases(dir / "data/paraphrase-en.gz", d.paraphrase);
  return d;
}

}  // namespace tq::metrics
