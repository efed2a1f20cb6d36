// METEOR 1.5's English tokenizing normalizer (edu/cmu/meteor/util/Normalizer.java, "keep
// punctuation"), reimplemented pass by pass. Each Java `replaceAll` is a left-to-right scan for
// non-overlapping matches, so e.g. "a,b,c" only splits the first comma in the first pass; the
// passes below keep those semantics rather than "fixing" them, because scores depend on them.
#pragma once

#include "metrics/text.hpp"

#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tq::metrics {

enum class NonbreakingType { any, numeric_only };
using NonbreakingPrefixes = std::unordered_map<std::u32string, NonbreakingType>;

// Parses nonbreaking/english.prefixes: "PREFIX" or "PREFIX #NUMERIC_ONLY#"; '#' lines are comments.
inline NonbreakingPrefixes parse_nonbreaking_prefixes(std::string_view text) {
  NonbreakingPrefixes out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    const auto toks = java_tokenize(utf8_to_u32(text.substr(start, end - start)));
    if (!toks.empty() && toks[0][0] != U'#') {
      const bool num = toks.size() > 1 && toks[1] == U"#NUMERIC_ONLY#";
      out[toks[0]] = num ? NonbreakingType::numeric_only : NonbreakingType::any;
    }
    start = end + 1;
  }
  return out;
}

namespace meteor_detail {

inline bool is_alpha(char32_t c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == 0x160 || c == 0x17D || c == 0x161 ||
         c == 0x17E || c == 0x178 || (c >= 0xC0 && c <= 0xD6) || (c >= 0xD8 && c <= 0xF6) ||
         (c >= 0xF8 && c <= 0x17E) || (c >= 0x400 && c <= 0x4FF) || (c >= 0x500 && c <= 0x527) ||
         (c >= 0xA640 && c <= 0xA66E) || (c >= 0xA67E && c <= 0xA697) || (c >= 0x1D00 && c <= 0x1D7F);
}
inline bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }
inline bool is_alnum(char32_t c) { return is_digit(c) || is_alpha(c); }
inline bool is_java_space(char32_t c) { return c == ' ' || c == '\t' || c == '\n' || c == 0x0B || c == '\f' || c == '\r'; }
inline bool is_unicode_space(char32_t c) {
  return c == ' ' || c == 0xA0 || (c >= 0x2000 && c <= 0x200A) || c == 0x202F || c == 0x205F || c == 0x3000;
}

using Pred = bool (*)(char32_t);

// replaceAll of the pattern ([X])[mid]([Y]) with `left + $1? ...`: emits repl(x, y) for each
// non-overlapping match, scanning left to right.
inline std::u32string replace_triple(const std::u32string& s, const std::function<bool(char32_t)>& x, char32_t mid,
                                     const std::function<bool(char32_t)>& y, std::u32string_view between) {
  std::u32string out;
  out.reserve(s.size() + 16);
  size_t i = 0;
  while (i < s.size()) {
    if (i + 2 < s.size() && s[i + 1] == mid && x(s[i]) && y(s[i + 2])) {
      out.push_back(s[i]);
      out.append(between);
      out.push_back(s[i + 2]);
      i += 3;
    } else {
      out.push_back(s[i]);
      ++i;
    }
  }
  return out;
}

// String.replace(literal, literal): non-overlapping, left to right.
inline std::u32string replace_all(const std::u32string& s, std::u32string_view from, std::u32string_view to) {
  std::u32string out;
  size_t i = 0;
  for (;;) {
    const size_t p = s.find(from, i);
    if (p == std::u32string::npos) break;
    out.append(s, i, p - i);
    out.append(to);
    i = p + from.size();
  }
  out.append(s, i, std::u32string::npos);
  return out;
}

inline bool contains(const std::u32string& s, std::u32string_view what) { return s.find(what) != std::u32string::npos; }

inline std::u32string separate_symbols(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size() * 2);
  for (char32_t c : s) {
    const bool keep = is_alnum(c) || is_java_space(c) || c == '.' || c == '\'' || c == '`' || c == ',' || c == '-' ||
                      c == 0x2018 || c == 0x2019;
    if (keep) {
      out.push_back(c);
    } else {
      out.push_back(' ');
      out.push_back(c);
      out.push_back(' ');
    }
  }
  return out;
}

// \.([\.]+) -> " DOTMULTI$1", then the DOTMULTI./DOTDOTMULTI loop.
inline std::u32string escape_multi_dots(const std::u32string& s) {
  std::u32string out;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] == '.' && i + 1 < s.size() && s[i + 1] == '.') {
      size_t j = i + 1;
      while (j < s.size() && s[j] == '.') ++j;
      out.append(U" DOTMULTI");
      out.append(j - i - 1, U'.');
      i = j;
    } else {
      out.push_back(s[i++]);
    }
  }
  while (contains(out, U"DOTMULTI.")) {
    // DOTMULTI\.([^\.]) -> "DOTDOTMULTI $1"
    std::u32string next;
    size_t k = 0;
    for (;;) {
      size_t p = out.find(U"DOTMULTI.", k);
      while (p != std::u32string::npos && !(p + 9 < out.size() && out[p + 9] != '.')) p = out.find(U"DOTMULTI.", p + 1);
      if (p == std::u32string::npos) break;
      next.append(out, k, p - k);
      next.append(U"DOTDOTMULTI ");
      next.push_back(out[p + 9]);
      k = p + 10;
    }
    next.append(out, k, std::u32string::npos);
    out = replace_all(next, U"DOTMULTI.", U"DOTDOTMULTI");
  }
  return out;
}

inline std::u32string normalize_quotes_dashes(std::u32string s) {
  for (auto& c : s)
    if (c == '`' || c == 0x2018 || c == 0x2019) c = '\'';
  // ([“”]|'') -> " \" "
  std::u32string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == 0x201C || s[i] == 0x201D) {
      out.append(U" \" ");
    } else if (s[i] == '\'' && i + 1 < s.size() && s[i + 1] == '\'') {
      out.append(U" \" ");
      ++i;
    } else {
      out.push_back(s[i]);
    }
  }
  out = replace_all(out, U"\u2013", U"-");
  out = replace_all(out, U"--", U"-");
  return replace_triple(
      out, [](char32_t c) { return is_alnum(c) || c == '.'; }, '-', is_alnum, U" ");
}

inline std::u32string split_english_apostrophes(const std::u32string& s) {
  auto not_alpha = [](char32_t c) { return !is_alpha(c); };
  auto not_alpha_digit = [](char32_t c) { return !is_alpha(c) && !is_digit(c); };
  std::u32string out = replace_triple(s, not_alpha, '\'', not_alpha, U" ' ");
  out = replace_triple(out, not_alpha_digit, '\'', is_alpha, U" ' ");
  out = replace_triple(out, is_alpha, '\'', not_alpha, U" ' ");
  out = replace_triple(out, is_alpha, '\'', is_alpha, U" '");
  return replace_triple(out, is_digit, '\'', [](char32_t c) { return c == 's'; }, U" '");
}

// Rebuilds the line from whitespace tokens, splitting a final '.' unless nonbreaking.
inline std::u32string split_final_dots(const std::u32string& s, const NonbreakingPrefixes& nbp) {
  const auto words = java_tokenize(s);
  std::u32string out;
  for (size_t i = 0; i < words.size(); ++i) {
    const std::u32string& w = words[i];
    if (w.size() > 1 && w.back() == '.') {
      const std::u32string pre = w.substr(0, w.size() - 1);
      auto it = nbp.find(pre);
      const bool has_dot = pre.find(U'.') != std::u32string::npos;
      bool has_alpha = false;
      for (char32_t c : pre) has_alpha = has_alpha || is_alpha(c);
      const bool next_lower = i + 1 < words.size() && words[i + 1][0] >= 'a' && words[i + 1][0] <= 'z';
      const bool next_digit = i + 1 < words.size() && is_digit(words[i + 1][0]);
      if (has_dot && has_alpha) {
        for (char32_t c : w)
          if (c != '.') out.push_back(c);
      } else if ((it != nbp.end() && it->second == NonbreakingType::any) || next_lower) {
        out.append(w);
      } else if (it != nbp.end() && it->second == NonbreakingType::numeric_only && next_digit) {
        out.append(w);
      } else {
        out.append(pre);
        out.append(U" .");
      }
    } else {
      out.append(w);
    }
    out.push_back(' ');
  }
  return out;
}

}  // namespace meteor_detail

// Normalizer.normalizeLine(line, english, keepPunctuation = true).
inline std::u32string meteor_normalize(std::u32string_view line, const NonbreakingPrefixes& nbp) {
  using namespace meteor_detail;
  std::u32string s = U" ";
  s.append(line);
  s.push_back(U' ');
  s = separate_symbols(s);
  s = escape_multi_dots(s);
  s = replace_triple(s, [](char32_t c) { return !is_digit(c); }, ',', [](char32_t c) { return !is_digit(c); }, U" , ");
  s = replace_triple(s, is_digit, ',', [](char32_t c) { return !is_digit(c); }, U" , ");
  s = replace_triple(s, [](char32_t c) { return !is_digit(c); }, ',', is_digit, U" , ");
  s = normalize_quotes_dashes(std::move(s));
  s = split_english_apostrophes(s);
  s = split_final_dots(s, nbp);
  while (contains(s, U"DOTDOTMULTI")) s = replace_all(s, U"DOTDOTMULTI", U"DOTMULTI.");
  s = replace_all(s, U"DOTMULTI", U".");
  // Collapse runs of (Unicode) spaces, then Java trim.
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    if (is_unicode_space(s[i])) {
      out.push_back(U' ');
      while (i < s.size() && is_unicode_space(s[i])) ++i;
    } else {
      out.push_back(s[i++]);
    }
  }
  return std::u32string(java_trim(out));
}

}  // namespace tq::metrics
