// pycocoevalcap's PTBTokenizer step (tokenizer/ptbtokenizer.py): Stanford PTBTokenizer 3.4.1 with
// -preserveLines -lowerCase, then the tokens in pycocoevalcap's punctuation list are dropped.
// This reimplements the parts of PTBLexer that caption text exercises: whitespace splitting,
// punctuation and bracket tokens (-lrb- etc. survive because of the case quirk), quotes, clitics
// ('s n't 're 'll 've 'm 'd), cannot/gonna splitting, numbers with , and . plus a split-off unit,
// hyphenated words kept whole, ellipses, acronyms (u.s.) and a list of common abbreviations.
// It is not the whole PTBLexer grammar (URLs, emoticons, currency, fractions are not modelled).
#pragma once

#include "metrics/text.hpp"

#include <algorithm>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace tq::metrics {

namespace ptb_detail {

inline bool is_letter(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= 0xC0 && c != 0xD7 && c != 0xF7 && c < 0x2000); }
inline bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }
inline bool is_alnum(char32_t c) { return is_letter(c) || is_digit(c); }

inline const std::unordered_set<std::u32string>& abbreviations() {
  // Lowercased forms of PTBLexer's abbreviation classes that occur in English prose.
  static const std::unordered_set<std::u32string> s = {
      U"mr", U"mrs", U"ms", U"dr", U"prof", U"st", U"mt", U"jr", U"sr", U"gen", U"gov", U"sen", U"rep", U"rev",
      U"capt", U"col", U"lt", U"sgt", U"inc", U"ltd", U"co", U"corp", U"bros", U"jan", U"feb", U"mar", U"apr",
      U"jun", U"jul", U"aug", U"sep", U"sept", U"oct", U"nov", U"dec", U"ave", U"blvd", U"rd", U"vs", U"etc",
      U"no", U"dept", U"fig", U"approx", U"est", U"ft", U"mon", U"tue", U"wed", U"thu", U"fri", U"sat", U"sun"};
  return s;
}

inline std::u32string lower_ascii(std::u32string s) {
  for (auto& c : s)
    if (c >= 'A' && c <= 'Z') c += 32;
  return s;
}

// Splits clitics off a word: "isn't" -> "is" "n't", "it's" -> "it" "'s", "cannot" -> "can" "not".
inline void push_word(std::u32string w, std::vector<std::u32string>& out) {
  const std::u32string lw = lower_ascii(w);
  if (lw == U"cannot") {
    out.push_back(w.substr(0, 3));
    out.push_back(w.substr(3));
    return;
  }
  if (lw == U"gonna" || lw == U"gotta" || lw == U"wanna") {
    out.push_back(w.substr(0, 3));
    out.push_back(w.substr(3));
    return;
  }
  static const std::u32string_view clitics[] = {U"n't", U"'s", U"'re", U"'ll", U"'ve", U"'m", U"'d"};
  for (auto c : clitics) {
    if (lw.size() > c.size() && std::u32string_view(lw).ends_with(c)) {
      out.push_back(w.substr(0, w.size() - c.size()));
      out.push_back(w.substr(w.size() - c.size()));
      return;
    }
  }
  out.push_back(std::move(w));
}

// A word starting at `i`: letters/digits joined by '-', '\'', and '.' inside numbers/acronyms.
inline size_t lex_word(const std::u32string& s, size_t i, bool last, std::vector<std::u32string>& out);

// Tokenizes one whitespace-free chunk; `last` tells whether it ends the line.
inline void lex_chunk(const std::u32string& s, bool last, std::vector<std::u32string>& out) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const char32_t c = s[i];
    if (c == '.' && i + 1 < n && s[i + 1] == '.') {
      while (i < n && s[i] == '.') ++i;
      out.push_back(U"...");
    } else if (c == '-' && i + 1 < n && s[i + 1] == '-') {
      while (i < n && s[i] == '-') ++i;
      out.push_back(U"--");
    } else if (c == '(' || c == ')' || c == '[' || c == ']' || c == '{' || c == '}') {
      static const std::u32string_view names[] = {U"-LRB-", U"-RRB-", U"-LSB-", U"-RSB-", U"-LCB-", U"-RCB-"};
      const size_t k = std::u32string_view(U"()[]{}").find(c);
      out.emplace_back(names[k]);
      ++i;
    } else if (c == '"') {
      out.push_back(i == 0 || !is_alnum(s[i - 1]) ? U"``" : U"''");
      ++i;
    } else if (c == 0x201C || c == 0x201D || c == 0x2018 || c == 0x2019 || c == '`') {
      out.push_back(c == 0x201C ? U"``" : c == 0x201D ? U"''" : c == 0x2018 || c == '`' ? U"`" : U"'");
      ++i;
    } else if (is_alnum(c) || (c == '\'' && i + 1 < n && is_alnum(s[i + 1]) && !out.empty())) {
      i = lex_word(s, i, last, out);
    } else {
      out.push_back(std::u32string(1, c));
      ++i;
    }
  }
}

inline size_t lex_word(const std::u32string& s, size_t i, bool last, std::vector<std::u32string>& out) {
  const size_t n = s.size();
  size_t j = i;
  // Numbers: digits with , and . between digits; a trailing unit is split off ("3.5m" -> 3.5 m).
  if (is_digit(s[j])) {
    while (j < n && (is_digit(s[j]) || ((s[j] == ',' || s[j] == '.') && j + 1 < n && is_digit(s[j + 1])))) ++j;
    const bool hyphenated = j + 1 < n && s[j] == '-' && is_alnum(s[j + 1]);  // "8-lane" stays whole
    if (!hyphenated) {
      out.push_back(s.substr(i, j - i));
      return j;
    }
  }
  while (j < n) {
    if (is_alnum(s[j])) {
      ++j;
    } else if ((s[j] == '-' || s[j] == '\'' || s[j] == 0x2019) && j + 1 < n && is_alnum(s[j + 1])) {
      ++j;
    } else if (s[j] == '.' && j + 1 < n && is_letter(s[j + 1]) && j > i && (j - i == 1 || s[j - 2] == '.')) {
      ++j;  // acronym letters: u.s.
    } else {
      break;
    }
  }
  std::u32string w = s.substr(i, j - i);
  // A following '.' stays on acronyms and known abbreviations unless it ends the line.
  if (j < n && s[j] == '.' && !(j + 1 < n && s[j + 1] == '.')) {
    const bool acronym = w.size() >= 2 && w[w.size() - 2] == '.';
    const bool single = w.size() == 1 && is_letter(w[0]);
    const bool abbrev = abbreviations().count(lower_ascii(w)) > 0;
    if ((acronym || single || abbrev) && !(last && j + 1 == n)) {
      out.push_back(w + U".");
      return j + 1;
    }
  }
  push_word(std::move(w), out);
  return j;
}

}  // namespace ptb_detail

// The caption as pycocoevalcap's PTBTokenizer returns it: lowercased tokens without the
// punctuation list, joined by single spaces.
inline std::string ptb_tokenize(std::string_view caption) {
  static const std::unordered_set<std::u32string> punct = {U"''", U"'", U"``", U"`", U"-LRB-", U"-RRB-", U"-LCB-", U"-RCB-",
                                                           U".",  U"?", U"!",  U",", U":",     U"-",     U"--",
                                                           U"...", U";"};
  const std::u32string u = utf8_to_u32(caption);
  std::vector<std::u32string> chunks;
  size_t i = 0;
  while (i < u.size()) {
    while (i < u.size() && is_python_space(u[i])) ++i;
    size_t j = i;
    while (j < u.size() && !is_python_space(u[j])) ++j;
    if (j > i) chunks.push_back(u.substr(i, j - i));
    i = j;
  }
  std::vector<std::u32string> toks;
  for (size_t k = 0; k < chunks.size(); ++k) ptb_detail::lex_chunk(chunks[k], k + 1 == chunks.size(), toks);
  std::string out;
  for (auto& t : toks) {
    const std::u32string low = java_lower(t);
    // The list holds brackets in uppercase, so the lowercased bracket tokens survive.
    if (punct.count(low)) continue;
    if (!out.empty()) out.push_back(' ');
    out += u32_to_utf8(low);
  }
  return out;
}

}  // namespace tq::metrics
