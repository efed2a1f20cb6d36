// Page decompression for the Parquet codecs the RISC shards can use, through the system libraries
// (libsnappy, libzstd, zlib). Every codec must produce exactly the size the page header declares;
// anything else is a corrupt page, reported with the caller's context string.
#pragma once

#include "risc/parquet_meta.hpp"

#include <tq/core/error.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(TQ_HAVE_SNAPPY)
#include <snappy.h>
#endif
#if defined(TQ_HAVE_ZSTD)
#include <zstd.h>
#endif
#if defined(TQ_HAVE_ZLIB)
#include <zlib.h>
#endif

namespace tq::risc {

inline const char* codec_name(int32_t codec) {
  switch (codec) {
    case pq::UNCOMPRESSED: return "UNCOMPRESSED";
    case pq::SNAPPY: return "SNAPPY";
    case pq::GZIP: return "GZIP";
    case pq::LZO: return "LZO";
    case pq::BROTLI: return "BROTLI";
    case pq::LZ4: return "LZ4";
    case pq::ZSTD: return "ZSTD";
    case pq::LZ4_RAW: return "LZ4_RAW";
    default: return "unknown";
  }
}

namespace detail {

#if defined(TQ_HAVE_ZLIB)
// A gzip member (or several, concatenated) inflated into exactly out_size bytes.
inline bool gunzip(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size) {
  z_stream zs{};
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) return false;
  zs.next_in = const_cast<Bytef*>(in);
  zs.avail_in = static_cast<uInt>(in_size);
  zs.next_out = out;
  zs.avail_out = static_cast<uInt>(out_size);
  int rc;
  while (true) {
    rc = inflate(&zs, Z_FINISH);
    // A further member may follow the first one's end.
    if (rc == Z_STREAM_END && zs.avail_in > 0 && zs.avail_out > 0) {
      if (inflateReset(&zs) != Z_OK) break;
      continue;
    }
    break;
  }
  bool ok = rc == Z_STREAM_END && zs.avail_out == 0;
  inflateEnd(&zs);
  return ok;
}
#endif

}  // namespace detail

// Decompresses `in` into `out` (resized to out_size). `ctx` names file/row group/column/page.
inline void decompress(int32_t codec, const uint8_t* in, size_t in_size, size_t out_size,
                       std::vector<uint8_t>& out, const std::string& ctx) {
  // The declared size is checked before anything is allocated, so a corrupt header cannot turn
  // into a huge allocation: snappy and zstd state the size themselves; deflate cannot expand data
  // more than 1032-fold.
  bool size_ok = true;
  switch (codec) {
#if defined(TQ_HAVE_SNAPPY)
    case pq::SNAPPY: {
      size_t n = 0;
      size_ok = snappy::GetUncompressedLength(reinterpret_cast<const char*>(in), in_size, &n) &&
                n == out_size;
      break;
    }
#endif
#if defined(TQ_HAVE_ZSTD)
    case pq::ZSTD: {
      unsigned long long n = ZSTD_getFrameContentSize(in, in_size);
      // One frame stating the size (what writers produce), or a plausible ratio otherwise.
      size_ok = n == out_size || (n != ZSTD_CONTENTSIZE_ERROR && n <= out_size &&
                                  out_size <= 1100 * uint64_t{in_size} + 64);
      break;
    }
#endif
    case pq::GZIP: size_ok = out_size <= 1100 * uint64_t{in_size} + 64; break;
    default: break;
  }
  TQ_CHECK(size_ok, ctx, ": corrupt ", codec_name(codec), " data (declared uncompressed size ",
           out_size, " does not match ", in_size, " compressed bytes)");
  out.resize(out_size);
  bool ok = false;
  switch (codec) {
    case pq::UNCOMPRESSED:
      TQ_CHECK(in_size == out_size, ctx, ": uncompressed page size ", in_size, " != declared ",
               out_size);
      if (out_size) std::memcpy(out.data(), in, out_size);
      return;
#if defined(TQ_HAVE_SNAPPY)
    case pq::SNAPPY: {
      ok = snappy::RawUncompress(reinterpret_cast<const char*>(in), in_size,
                                 reinterpret_cast<char*>(out.data()));
      break;
    }
#endif
#if defined(TQ_HAVE_ZSTD)
    case pq::ZSTD: {
      size_t n = ZSTD_decompress(out.data(), out_size, in, in_size);
      ok = !ZSTD_isError(n) && n == out_size;
      break;
    }
#endif
#if defined(TQ_HAVE_ZLIB)
    case pq::GZIP: ok = detail::gunzip(in, in_size, out.data(), out_size); break;
#endif
    default:
      fail(str_cat(ctx, ": compression codec ", codec_name(codec), " (", codec,
                   ") is not supported by this build"));
  }
  TQ_CHECK(ok, ctx, ": corrupt ", codec_name(codec), " data (", in_size, " bytes, expected ",
           out_size, " after decompression)");
}

}  // namespace tq::risc
