// A decoder for the Thrift compact protocol, just enough for Parquet metadata (spec/riscm-data.md
// section 3.2). Every read is bounds-checked against the buffer and nesting is depth-limited, so a
// corrupt or hostile footer ends in one tq::Error ("corrupt Thrift ...") and never in a crash or
// an unbounded allocation. Callers drive it field by field and skip() whatever they do not need.
#pragma once

#include <tq/core/error.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace tq::risc {

enum class CType : uint8_t {
  Stop = 0, True = 1, False = 2, I8 = 3, I16 = 4, I32 = 5, I64 = 6, Double = 7, Binary = 8,
  List = 9, Set = 10, Map = 11, Struct = 12,
};

class ThriftReader {
 public:
  ThriftReader(const uint8_t* data, size_t size, std::string what)
      : p_(data), end_(data + size), begin_(data), what_(std::move(what)) {}

  size_t consumed() const { return static_cast<size_t>(p_ - begin_); }

  [[noreturn]] void corrupt(std::string_view why) const {
    fail(str_cat("corrupt Thrift in ", what_, " at byte ", consumed(), ": ", why));
  }

  uint8_t byte() {
    if (p_ >= end_) corrupt("unexpected end of data");
    return *p_++;
  }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b = byte();
      v |= uint64_t{b & 0x7Fu} << shift;
      if (!(b & 0x80)) return v;
    }
    corrupt("varint longer than 10 bytes");
  }

  int64_t zigzag() {
    uint64_t u = varint();
    return static_cast<int64_t>(u >> 1) ^ -static_cast<int64_t>(u & 1);
  }

  int32_t i32() {
    int64_t v = zigzag();
    if (v < INT32_MIN || v > INT32_MAX) corrupt("i32 out of range");
    return static_cast<int32_t>(v);
  }

  std::string_view binary() {
    uint64_t n = varint();
    if (n > static_cast<uint64_t>(end_ - p_)) corrupt("string length past end of data");
    std::string_view s(reinterpret_cast<const char*>(p_), static_cast<size_t>(n));
    p_ += n;
    return s;
  }

  // One field header. Returns false at STOP. `last_id` is the previous field id of this struct.
  bool field(int16_t& last_id, int16_t& id, CType& type) {
    uint8_t h = byte();
    if (h == 0) return false;
    type = static_cast<CType>(h & 0x0F);
    if (static_cast<uint8_t>(type) > 12) corrupt("unknown field type");
    uint8_t delta = h >> 4;
    if (delta != 0) {
      id = static_cast<int16_t>(last_id + delta);
    } else {
      int64_t v = zigzag();
      if (v < INT16_MIN || v > INT16_MAX) corrupt("field id out of range");
      id = static_cast<int16_t>(v);
    }
    last_id = id;
    return true;
  }

  // List/set header: element type and size. The size is checked against the bytes left (every
  // element takes at least one byte, except bools which we never ask for in bulk).
  size_t list(CType& elem) {
    uint8_t h = byte();
    elem = static_cast<CType>(h & 0x0F);
    uint64_t n = h >> 4;
    if (n == 15) n = varint();
    if (n > static_cast<uint64_t>(end_ - p_)) corrupt("list size past end of data");
    return static_cast<size_t>(n);
  }

  // A bool field carries its value in the type nibble.
  static bool bool_of(CType t) { return t == CType::True; }

  void expect(CType got, CType want, std::string_view field_name) {
    bool ok = got == want || (want == CType::True && got == CType::False);
    if (!ok) corrupt(str_cat("field ", field_name, " has wrong type ", static_cast<int>(got)));
  }

  void skip(CType type, int depth = 0) {
    if (depth > kMaxDepth) corrupt("nesting too deep");
    switch (type) {
      case CType::True:
      case CType::False: return;
      case CType::I8: byte(); return;
      case CType::I16:
      case CType::I32:
      case CType::I64: varint(); return;
      case CType::Double: advance(8); return;
      case CType::Binary: binary(); return;
      case CType::List:
      case CType::Set: {
        CType elem;
        size_t n = list(elem);
        for (size_t i = 0; i < n; ++i) {
          if (elem == CType::True || elem == CType::False) byte();  // bool elements take a byte
          else skip(elem, depth + 1);
        }
        return;
      }
      case CType::Map: {
        uint64_t n = varint();
        if (n == 0) return;
        if (n > static_cast<uint64_t>(end_ - p_)) corrupt("map size past end of data");
        uint8_t kv = byte();
        auto kt = static_cast<CType>(kv >> 4), vt = static_cast<CType>(kv & 0x0F);
        for (uint64_t i = 0; i < n; ++i) {
          skip_elem(kt, depth + 1);
          skip_elem(vt, depth + 1);
        }
        return;
      }
      case CType::Struct: skip_struct(depth + 1); return;
      default: corrupt("unknown type");
    }
  }

  void skip_struct(int depth = 0) {
    if (depth > kMaxDepth) corrupt("nesting too deep");
    int16_t last = 0, id;
    CType t;
    while (field(last, id, t)) skip(t, depth);
  }

 private:
  static constexpr int kMaxDepth = 32;
  void skip_elem(CType t, int depth) {
    if (t == CType::True || t == CType::False) byte();
    else skip(t, depth);
  }
  void advance(size_t n) {
    if (n > static_cast<size_t>(end_ - p_)) corrupt("unexpected end of data");
    p_ += n;
  }
  const uint8_t* p_;
  const uint8_t* end_;
  const uint8_t* begin_;
  std::string what_;
};

}  // namespace tq::risc
