// Text primitives the caption metrics need to reproduce Python and Java string behaviour exactly:
// UTF-8 validation and decoding to code points, Python `str.split()` / `str.split(" ")`, Java's
// `String.hashCode()` (over UTF-16 units), `String.trim()`, `StringTokenizer` splitting and
// `String.toLowerCase()`. Everything works on UTF-8 std::string or on std::u32string code points.
#pragma once

#include <tq/core/error.hpp>

#include <clocale>
#include <cstdint>
#include <cwctype>
#include <locale.h>
#include <string>
#include <string_view>
#include <vector>

namespace tq::metrics {

// Returns the byte offset of the first invalid UTF-8 sequence, or npos when `s` is valid
// (overlong forms, surrogates and code points above U+10FFFF are invalid, as in Python's decoder).
inline size_t find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (int k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

// Decodes valid UTF-8 (check with find_invalid_utf8 first) into code points.
inline std::u32string utf8_to_u32(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(c);
      ++i;
      continue;
    }
    const int len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
    uint32_t cp = c & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
    for (int k = 1; k < len && i + k < s.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(static_cast<char32_t>(cp));
    i += len;
  }
  return out;
}

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

inline std::string u32_to_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

// Python's str.isspace() (the separators of str.split() with no argument).
inline bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Python `s.split()`: runs of Unicode whitespace separate, empty pieces are dropped. ASCII-only
// strings (the common case) take a byte path; others are decoded.
inline std::vector<std::string> python_split(std::string_view s) {
  std::vector<std::string> out;
  bool ascii = true;
  for (char ch : s) ascii = ascii && static_cast<unsigned char>(ch) < 0x80;
  if (ascii) {
    size_t i = 0;
    while (i < s.size()) {
      while (i < s.size() && is_python_space(static_cast<unsigned char>(s[i]))) ++i;
      size_t j = i;
      while (j < s.size() && !is_python_space(static_cast<unsigned char>(s[j]))) ++j;
      if (j > i) out.emplace_back(s.substr(i, j - i));
      i = j;
    }
    return out;
  }
  const std::u32string u = utf8_to_u32(s);
  size_t i = 0;
  while (i < u.size()) {
    while (i < u.size() && is_python_space(u[i])) ++i;
    size_t j = i;
    while (j < u.size() && !is_python_space(u[j])) ++j;
    if (j > i) out.push_back(u32_to_utf8(std::u32string_view(u).substr(i, j - i)));
    i = j;
  }
  return out;
}

// Python `s.split(" ")`: every single space separates and empty pieces are kept.
inline std::vector<std::string> split_single_space(std::string_view s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t p = s.find(' ', start);
    if (p == std::string_view::npos) {
      out.emplace_back(s.substr(start));
      return out;
    }
    out.emplace_back(s.substr(start, p - start));
    start = p + 1;
  }
}

// Java `String.hashCode()`: s[0]*31^(n-1) + ... over UTF-16 code units, in wrapping int32.
inline int32_t java_hash(std::u32string_view s) {
  uint32_t h = 0;
  for (char32_t c : s) {
    if (c >= 0x10000) {
      const uint32_t v = c - 0x10000;
      h = h * 31u + (0xD800u + (v >> 10));
      h = h * 31u + (0xDC00u + (v & 0x3FF));
    } else {
      h = h * 31u + static_cast<uint32_t>(c);
    }
  }
  return static_cast<int32_t>(h);
}

// Java `StringTokenizer` default delimiters.
inline bool is_java_tokenizer_space(char32_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f'; }

inline std::vector<std::u32string> java_tokenize(std::u32string_view s) {
  std::vector<std::u32string> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && is_java_tokenizer_space(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && !is_java_tokenizer_space(s[j])) ++j;
    if (j > i) out.emplace_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

// Java `String.trim()`: strips every char <= U+0020 at both ends.
inline std::u32string_view java_trim(std::u32string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && s[b] <= 0x20) ++b;
  while (e > b && s[e - 1] <= 0x20) --e;
  return s.substr(b, e - b);
}

// Java `String.toLowerCase()` for the characters captions contain: the C.UTF-8 locale's simple
// Unicode mapping, plus Java's one-to-many special case U+0130 → "i̇" and the final-sigma rule.
inline std::u32string java_lower(std::u32string_view s) {
  static const locale_t loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const char32_t c = s[i];
    if (c < 0x80) {
      out.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
    } else if (c == 0x130) {
      out.push_back(U'i');
      out.push_back(0x307);
    } else if (c == 0x3A3) {
      // Final sigma: preceded by a letter and not followed by one.
      auto alpha = [&](char32_t x) { return loc != static_cast<locale_t>(0) && iswalpha_l(static_cast<wint_t>(x), loc); };
      const bool before = i > 0 && alpha(s[i - 1]);
      const bool after = i + 1 < s.size() && alpha(s[i + 1]);
      out.push_back(before && !after ? 0x3C2 : 0x3C3);
    } else if (loc != static_cast<locale_t>(0)) {
      out.push_back(static_cast<char32_t>(towlower_l(static_cast<wint_t>(c), loc)));
    } else {
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace tq::metrics
