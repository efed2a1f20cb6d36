// The RLE / bit-packed hybrid of Parquet (definition levels and dictionary indices), decoded with
// bounds checks on both the input bytes and the number of values produced. Values are at most 32
// bits wide; bit-packed groups are LSB-first across byte boundaries.
#pragma once

#include <tq/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <string>

namespace tq::risc {

class RleHybridDecoder {
 public:
  RleHybridDecoder(const uint8_t* data, size_t size, int bit_width, const std::string* ctx)
      : p_(data), end_(data + size), width_(bit_width), ctx_(ctx) {
    if (bit_width < 0 || bit_width > 32) bad(str_cat("bit width ", bit_width, " out of range"));
  }

  // Decodes exactly n values into out (uint32_t). Throws if the data runs out first.
  void decode(uint32_t* out, size_t n) {
    size_t i = 0;
    while (i < n) {
      if (run_left_ == 0) next_run();
      size_t take = std::min<size_t>(run_left_, n - i);
      if (is_rle_) {
        for (size_t k = 0; k < take; ++k) out[i + k] = rle_value_;
      } else {
        for (size_t k = 0; k < take; ++k) out[i + k] = unpack_one();
      }
      run_left_ -= take;
      i += take;
    }
  }

 private:
  [[noreturn]] void bad(const std::string& why) const {
    fail(str_cat(ctx_ ? *ctx_ : std::string("RLE data"), ": corrupt RLE/bit-packed data: ", why));
  }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) bad("run header past end of data");
      uint8_t b = *p_++;
      v |= uint64_t{b & 0x7Fu} << shift;
      if (!(b & 0x80)) return v;
    }
    bad("run header varint too long");
  }

  void next_run() {
    uint64_t h = varint();
    if (h & 1) {
      uint64_t groups = h >> 1;
      if (groups == 0) bad("empty bit-packed run");
      // Bytes the run occupies; a truncated final run still yields the values that are present.
      uint64_t bytes = groups * static_cast<uint64_t>(width_);
      uint64_t avail = static_cast<uint64_t>(end_ - p_);
      uint64_t have_bits = std::min(bytes, avail) * 8;
      uint64_t values = width_ == 0 ? groups * 8 : std::min(groups * 8, have_bits / width_);
      if (values == 0) bad("bit-packed run past end of data");
      is_rle_ = false;
      run_left_ = values;
      bits_ = p_;
      bit_pos_ = 0;
      p_ += std::min(bytes, avail);
    } else {
      run_left_ = h >> 1;
      if (run_left_ == 0) bad("empty RLE run");
      is_rle_ = true;
      size_t nbytes = (static_cast<size_t>(width_) + 7) / 8;
      if (static_cast<size_t>(end_ - p_) < nbytes) bad("RLE run value past end of data");
      uint32_t v = 0;
      for (size_t k = 0; k < nbytes; ++k) v |= uint32_t{p_[k]} << (8 * k);
      p_ += nbytes;
      rle_value_ = v;
    }
  }

  uint32_t unpack_one() {
    uint64_t v = 0;
    int got = 0;
    while (got < width_) {
      size_t byte = bit_pos_ >> 3;
      int off = static_cast<int>(bit_pos_ & 7);
      int take = std::min(8 - off, width_ - got);
      v |= static_cast<uint64_t>((bits_[byte] >> off) & ((1u << take) - 1)) << got;
      got += take;
      bit_pos_ += static_cast<size_t>(take);
    }
    return static_cast<uint32_t>(v);
  }

  const uint8_t* p_;
  const uint8_t* end_;
  int width_;
  const std::string* ctx_;
  uint64_t run_left_ = 0;
  bool is_rle_ = false;
  uint32_t rle_value_ = 0;
  const uint8_t* bits_ = nullptr;
  size_t bit_pos_ = 0;
};

inline int bit_width_of(uint32_t max_value) {
  int w = 0;
  while (max_value) {
    ++w;
    max_value >>= 1;
  }
  return w;
}

}  // namespace tq::risc
