// tq::json: a small strict JSON (RFC 8259) reader and writer, enough for safetensors headers,
// config.json, adapter_config.json and model.safetensors.index.json. The framework must not
// depend on a JSON library (apps may use nlohmann), so this is the framework's own.
//
// Invariants:
//  - parse() accepts exactly RFC 8259: no comments, trailing commas, NaN/Infinity, leading zeros,
//    BOM, raw control characters in strings, lone surrogates, invalid UTF-8 or duplicate object
//    keys. Every rejection is a ParseError carrying the byte offset and what was expected.
//  - Numbers keep their original text next to the double, so integers beyond 2^53 (int64 sizes
//    and offsets) are read exactly by as_int64()/as_uint64().
//  - Objects keep key order (a vector of pairs), so a file read and written again keeps its layout.
//  - dump() escapes '"', '\\' and control characters (as serde_json does) and writes other UTF-8
//    verbatim; it refuses invalid UTF-8 and non-finite numbers rather than write invalid JSON.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "tq/core/error.hpp"

namespace tq::json {

// ---- UTF-8 ---------------------------------------------------------------------------------------

// Length of the valid UTF-8 sequence starting at s[i], or 0 when it is invalid (overlong forms,
// UTF-16 surrogates encoded as UTF-8, code points above U+10FFFF and truncation are all invalid).
inline size_t utf8_sequence_length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return uint8_t(s[i + k]); };
  const uint8_t c = b(0);
  if (c < 0x80) return 1;
  size_t n;
  uint8_t lo = 0x80, hi = 0xbf;  // allowed range of the second byte
  if (c >= 0xc2 && c <= 0xdf) n = 2;
  else if (c == 0xe0) n = 3, lo = 0xa0;
  else if (c >= 0xe1 && c <= 0xec) n = 3;
  else if (c == 0xed) n = 3, hi = 0x9f;  // excludes surrogates U+D800..DFFF
  else if (c >= 0xee && c <= 0xef) n = 3;
  else if (c == 0xf0) n = 4, lo = 0x90;
  else if (c >= 0xf1 && c <= 0xf3) n = 4;
  else if (c == 0xf4) n = 4, hi = 0x8f;  // excludes > U+10FFFF
  else return 0;
  if (i + n > s.size()) return 0;
  if (b(1) < lo || b(1) > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if ((b(k) & 0xc0) != 0x80) return 0;
  return n;
}

// Offset of the first byte that is not valid UTF-8, or npos when all of `s` is valid.
inline size_t utf8_invalid_offset(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_sequence_length(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xc0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += char(0xe0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  } else {
    out += char(0xf0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3f));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  }
}

// ---- Value ---------------------------------------------------------------------------------------

enum class Kind { null, boolean, number, string, array, object };

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::null: return "null";
    case Kind::boolean: return "a boolean";
    case Kind::number: return "a number";
    case Kind::string: return "a string";
    case Kind::array: return "an array";
    case Kind::object: return "an object";
  }
  return "?";
}

class Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // key order preserved

// A number: its double value and the exact text it was read from (or written as).
struct Number {
  double value = 0;
  std::string text;
  bool operator==(const Number& o) const { return text == o.text; }
};

class Value {
 public:
  Value() = default;
  Value(std::nullptr_t) {}
  Value(bool b) : data_(b) {}
  template <class I>
    requires(std::is_integral_v<I> && !std::is_same_v<I, bool>)
  Value(I i) : data_(Number{double(i), std::to_string(i)}) {}
  Value(double d) : data_(Number{d, format_double(d)}) {}
  Value(const char* s) : data_(std::string(s)) {}
  Value(std::string s) : data_(std::move(s)) {}
  Value(std::string_view s) : data_(std::string(s)) {}
  Value(Array a) : data_(std::move(a)) {}
  Value(Object o) : data_(std::move(o)) {}
  // A number from already-validated JSON number text (keeps the text exactly).
  static Value number(double v, std::string text) {
    Value out;
    out.data_ = Number{v, std::move(text)};
    return out;
  }

  Kind kind() const { return Kind(data_.index()); }
  bool is_null() const { return kind() == Kind::null; }
  bool is_bool() const { return kind() == Kind::boolean; }
  bool is_number() const { return kind() == Kind::number; }
  bool is_string() const { return kind() == Kind::string; }
  bool is_array() const { return kind() == Kind::array; }
  bool is_object() const { return kind() == Kind::object; }
  // True for numbers written without fraction or exponent ("12", "-3"), whatever their size.
  bool is_integer() const {
    return is_number() && std::get<Number>(data_).text.find_first_of(".eE") == std::string::npos;
  }

  bool as_bool() const { return std::get<bool>(expect(Kind::boolean)); }
  double as_double() const { return std::get<Number>(expect(Kind::number)).value; }
  const std::string& number_text() const { return std::get<Number>(expect(Kind::number)).text; }
  int64_t as_int64() const { return as_integer<int64_t>(); }
  uint64_t as_uint64() const { return as_integer<uint64_t>(); }
  const std::string& as_string() const { return std::get<std::string>(expect(Kind::string)); }
  const Array& as_array() const { return std::get<Array>(expect(Kind::array)); }
  Array& as_array() { return std::get<Array>(expect_mut(Kind::array)); }
  const Object& as_object() const { return std::get<Object>(expect(Kind::object)); }
  Object& as_object() { return std::get<Object>(expect_mut(Kind::object)); }

  // Object access. find() returns nullptr when absent; at() throws naming the key.
  const Value* find(std::string_view key) const {
    for (const auto& [k, v] : as_object())
      if (k == key) return &v;
    return nullptr;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  const Value& at(std::string_view key) const {
    const Value* v = find(key);
    TQ_CHECK(v != nullptr, "JSON object has no key \"", key, "\"");
    return *v;
  }
  // Sets key to v, replacing an existing entry in place or appending a new one.
  Value& set(std::string key, Value v) {
    Object& o = as_object();
    for (auto& [k, old] : o)
      if (k == key) return old = std::move(v);
    o.emplace_back(std::move(key), std::move(v));
    return o.back().second;
  }
  // Array access.
  const Value& operator[](size_t i) const {
    const Array& a = as_array();
    TQ_CHECK(i < a.size(), "JSON array index ", i, " out of range for ", a.size(), " elements");
    return a[i];
  }
  void push_back(Value v) { as_array().push_back(std::move(v)); }
  size_t size() const {
    if (is_array()) return as_array().size();
    if (is_object()) return as_object().size();
    fail(str_cat("size(): JSON value is ", kind_name(kind()), ", expected an array or an object"));
  }

  bool operator==(const Value& o) const { return data_ == o.data_; }

  // Shortest text that reads back as exactly `d` (std::to_chars round-trips).
  static std::string format_double(double d) {
    TQ_CHECK(std::isfinite(d), "JSON cannot represent the number ", d);
    char buf[32];
    auto r = std::to_chars(buf, buf + sizeof buf, d);
    return std::string(buf, r.ptr);
  }

 private:
  using Data = std::variant<std::monostate, bool, Number, std::string, Array, Object>;
  Data data_;

  const Data& expect(Kind k) const {
    TQ_CHECK(kind() == k, "JSON value is ", kind_name(kind()), ", expected ", kind_name(k));
    return data_;
  }
  Data& expect_mut(Kind k) {
    TQ_CHECK(kind() == k, "JSON value is ", kind_name(kind()), ", expected ", kind_name(k));
    return data_;
  }
  template <class I>
  I as_integer() const {
    const std::string& t = number_text();
    TQ_CHECK(is_integer(), "JSON number ", t, " is not an integer");
    I v{};
    auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    TQ_CHECK(r.ec == std::errc() && r.ptr == t.data() + t.size(), "JSON integer ", t, " does not fit in ",
             std::is_signed_v<I> ? "int64" : "uint64");
    return v;
  }
};

// ---- parse ---------------------------------------------------------------------------------------

// A syntax error: what() is one line naming the source, the byte offset (and line/column) and
// what was expected there.
class ParseError : public Error {
 public:
  ParseError(const std::string& what, size_t offset, std::string problem)
      : Error(what), offset_(offset), problem_(std::move(problem)) {}
  size_t offset() const { return offset_; }
  const std::string& problem() const { return problem_; }  // the message without source/offset

 private:
  size_t offset_;
  std::string problem_;
};

namespace detail {

inline void dump_string(std::string& out, std::string_view s) {
  size_t bad = utf8_invalid_offset(s);
  TQ_CHECK(bad == std::string_view::npos, "JSON writer: string has invalid UTF-8 at byte ", bad);
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (char ch : s) {
    const uint8_t c = uint8_t(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

class Parser {
 public:
  static constexpr int kMaxDepth = 256;  // nesting limit: protects the stack from hostile input

  Parser(std::string_view text, std::string_view source) : s_(text), source_(source) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (i_ != s_.size()) error("expected end of input after the top-level value");
    return v;
  }

 private:
  std::string_view s_;
  std::string_view source_;
  size_t i_ = 0;

  [[noreturn]] void error(const std::string& expected, size_t at) const {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < at && k < s_.size(); ++k) {
      if (s_[k] == '\n') ++line, col = 1;
      else ++col;
    }
    std::string got = at < s_.size() ? describe_byte(uint8_t(s_[at])) : std::string("end of input");
    std::string problem = str_cat(expected, ", got ", got);
    throw ParseError(str_cat(source_, ": invalid JSON at byte ", at, " (line ", line, ", column ", col, "): ", problem),
                     at, problem);
  }
  [[noreturn]] void error(const std::string& expected) const { error(expected, i_); }

  static std::string describe_byte(uint8_t c) {
    if (c >= 0x20 && c < 0x7f) return str_cat("'", char(c), "'");
    char buf[8];
    std::snprintf(buf, sizeof buf, "0x%02x", c);
    return str_cat("byte ", buf);
  }

  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[i_]; }
  void skip_ws() {
    while (!at_end() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  void expect_literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) error(str_cat("expected '", word, "'"));
    i_ += word.size();
  }

  Value parse_value(int depth) {
    if (at_end()) error("expected a value");
    switch (s_[i_]) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"': return Value(parse_string());
      case 't': expect_literal("true"); return Value(true);
      case 'f': expect_literal("false"); return Value(false);
      case 'n': expect_literal("null"); return Value(nullptr);
      default:
        if (s_[i_] == '-' || (s_[i_] >= '0' && s_[i_] <= '9')) return parse_number();
        error("expected a value (object, array, string, number, true, false or null)");
    }
  }

  Value parse_object(int depth) {
    if (depth > kMaxDepth) error(str_cat("nesting deeper than ", kMaxDepth, " levels"));
    ++i_;  // '{'
    Object obj;
    skip_ws();
    if (peek() == '}') {
      ++i_;
      return Value(std::move(obj));
    }
    while (true) {
      skip_ws();
      if (peek() != '"') error("expected '\"' starting an object key");
      size_t key_at = i_;
      std::string key = parse_string();
      for (const auto& kv : obj)
        if (kv.first == key) {
          std::string quoted;
          dump_string(quoted, key);  // escaped, so the message stays on one line
          error(str_cat("expected a unique key, but ", quoted, " appears twice"), key_at);
        }
      skip_ws();
      if (peek() != ':') error("expected ':' after an object key");
      ++i_;
      skip_ws();
      Value v = parse_value(depth);
      obj.emplace_back(std::move(key), std::move(v));
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == '}') {
        ++i_;
        return Value(std::move(obj));
      }
      error("expected ',' or '}' after an object member");
    }
  }

  Value parse_array(int depth) {
    if (depth > kMaxDepth) error(str_cat("nesting deeper than ", kMaxDepth, " levels"));
    ++i_;  // '['
    Array arr;
    skip_ws();
    if (peek() == ']') {
      ++i_;
      return Value(std::move(arr));
    }
    while (true) {
      skip_ws();
      arr.push_back(parse_value(depth));
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == ']') {
        ++i_;
        return Value(std::move(arr));
      }
      error("expected ',' or ']' after an array element");
    }
  }

  Value parse_number() {
    const size_t start = i_;
    auto digits = [&] {
      size_t d = i_;
      while (!at_end() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      return i_ - d;
    };
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
      if (peek() >= '0' && peek() <= '9') error("expected no leading zeros in a number");
    } else if (digits() == 0) {
      error("expected a digit");
    }
    if (peek() == '.') {
      ++i_;
      if (digits() == 0) error("expected a digit after the decimal point");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (digits() == 0) error("expected a digit in the exponent");
    }
    std::string text(s_.substr(start, i_ - start));
    double v = 0;
    auto r = std::from_chars(text.data(), text.data() + text.size(), v);
    if (r.ec == std::errc::result_out_of_range) {
      // from_chars reports underflow as out of range too; tiny values read as strtod rounds them
      // (0 or a subnormal), only overflow to infinity is an error.
      v = std::strtod(text.c_str(), nullptr);
      if (!std::isfinite(v)) error("expected a number within the range of a double", start);
    } else if (r.ec != std::errc()) {
      error("expected a number", start);
    }
    return Value::number(v, std::move(text));
  }

  uint32_t parse_hex4() {
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      char c = peek();
      uint32_t d;
      if (c >= '0' && c <= '9') d = uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') d = uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = uint32_t(c - 'A' + 10);
      else error("expected 4 hex digits after \\u");
      cp = cp * 16 + d;
      ++i_;
    }
    return cp;
  }

  // \uXXXX, with surrogate pairs combined; a lone surrogate is an error.
  void parse_unicode_escape(std::string& out) {
    const size_t esc_at = i_ - 2;
    uint32_t cp = parse_hex4();
    if (cp >= 0xdc00 && cp <= 0xdfff) error("expected a high surrogate before a low surrogate \\u escape", esc_at);
    if (cp >= 0xd800 && cp <= 0xdbff) {
      if (s_.substr(i_, 2) != "\\u") error("expected a \\u low surrogate after a high surrogate");
      i_ += 2;
      uint32_t lo = parse_hex4();
      if (lo < 0xdc00 || lo > 0xdfff) error("expected a low surrogate (\\uDC00..\\uDFFF)", i_ - 6);
      cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
    }
    append_utf8(out, cp);
  }

  std::string parse_string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (at_end()) error("expected '\"' closing the string");
      const uint8_t c = uint8_t(s_[i_]);
      if (c == '"') {
        ++i_;
        return out;
      }
      if (c < 0x20) error("expected no raw control characters in a string (escape them)");
      if (c == '\\') {
        ++i_;
        char e = peek();
        ++i_;
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': parse_unicode_escape(out); break;
          default: error("expected an escape character (one of \"\\/bfnrtu) after '\\'", i_ - 1);
        }
        continue;
      }
      size_t n = utf8_sequence_length(s_, i_);
      if (n == 0) error("expected valid UTF-8 in a string");
      out.append(s_.substr(i_, n));
      i_ += n;
    }
  }
};

inline void dump_value(std::string& out, const Value& v, int indent, int level) {
  auto newline = [&](int lvl) {
    if (indent < 0) return;
    out += '\n';
    out.append(size_t(indent) * size_t(lvl), ' ');
  };
  switch (v.kind()) {
    case Kind::null: out += "null"; break;
    case Kind::boolean: out += v.as_bool() ? "true" : "false"; break;
    case Kind::number: out += v.number_text(); break;
    case Kind::string: dump_string(out, v.as_string()); break;
    case Kind::array: {
      const Array& a = v.as_array();
      out += '[';
      for (size_t k = 0; k < a.size(); ++k) {
        if (k) out += ',';
        newline(level + 1);
        dump_value(out, a[k], indent, level + 1);
      }
      if (!a.empty()) newline(level);
      out += ']';
      break;
    }
    case Kind::object: {
      const Object& o = v.as_object();
      out += '{';
      for (size_t k = 0; k < o.size(); ++k) {
        if (k) out += ',';
        newline(level + 1);
        dump_string(out, o[k].first);
        out += indent < 0 ? ":" : ": ";
        dump_value(out, o[k].second, indent, level + 1);
      }
      if (!o.empty()) newline(level);
      out += '}';
      break;
    }
  }
}

}  // namespace detail

// Parses one JSON document; `source` names it in errors (a file path, "safetensors header", ...).
inline Value parse(std::string_view text, std::string_view source = "JSON") {
  return detail::Parser(text, source).parse_document();
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TQ_CHECK(f.good(), "cannot open '", path, "': ", std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  TQ_CHECK(!f.bad(), "error reading '", path, "'");
  return ss.str();
}

inline Value parse_file(const std::string& path) { return parse(read_text_file(path), path); }

// Compact (indent < 0, serde_json's layout: no spaces) or pretty-printed with `indent` spaces.
inline std::string dump(const Value& v, int indent = -1) {
  std::string out;
  detail::dump_value(out, v, indent, 0);
  return out;
}

}  // namespace tq::json
