// JPEG -> RGB through libjpeg(-turbo), set up the way Pillow's decoder (libImaging/JpegDecode.c +
// JpegImagePlugin.py) sets it up, so pixels match what HF's processor gets from PIL bit for bit:
//  * JDCT_ISLOW, fancy upsampling on, no scaling (PIL's defaults when draft() is not called);
//  * libjpeg's own guess of the file's colour space (PIL passes jpegmode ""), output by component
//    count as PIL's modes: 1 -> L, 3 -> RGB, 4 -> CMYK (YCCK converted to CMYK by libjpeg);
//  * then Image.convert("RGB"): L replicated; CMYK read as "CMYK;I" (Adobe-inverted, which PIL
//    always assumes) and converted with PIL's cmyk2rgb (nk = 255 - k; c' = nk - c*nk/255 rounded).
//  * Truncation is an error as in PIL: the data is given as one buffer to a suspending source, and
//    running out of it before the last scanline (PIL: "image file is truncated") fails. Data after
//    the last scanline (a missing EOI) is not needed, so PIL and this decoder both accept it.
//  * libjpeg's hard errors come back through setjmp/longjmp into a message (never exit()); its
//    warnings (e.g. extraneous bytes before a marker) are counted and ignored, as PIL does.
//
// Only compiled where TQ_HAVE_LIBJPEG is defined (CMake finds libjpeg through pkg-config).
#pragma once

#ifdef TQ_HAVE_LIBJPEG

#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>  // jpeglib.h uses FILE and size_t without including their headers
#include <cstring>
#include <string>
#include <vector>

#include <jpeglib.h>

namespace tq::risc::jpeg {

// The start of every JPEG stream (SOI marker, then the next marker's 0xFF).
inline bool looks_like_jpeg(const unsigned char* p, size_t n) {
  return n >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF;
}

namespace detail {

struct ErrorMgr {
  jpeg_error_mgr pub;  // first member: libjpeg hands back a jpeg_error_mgr*
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

inline void on_error_exit(j_common_ptr cinfo) {
  auto* e = reinterpret_cast<ErrorMgr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->message);
  std::longjmp(e->jump, 1);
}
// msg_level -1 = warning (counted, silent), >= 0 = trace (dropped). Nothing goes to stderr.
inline void on_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) ++cinfo->err->num_warnings;
}
inline void on_output_message(j_common_ptr) {}

// A suspending source over one in-memory buffer: at its end fill_input_buffer returns FALSE, so
// libjpeg suspends (read_header -> JPEG_SUSPENDED, start_decompress -> FALSE, read_scanlines -> 0)
// instead of inventing an EOI and gray data as jpeg_mem_src does.
inline void src_noop(j_decompress_ptr) {}
inline boolean src_fill(j_decompress_ptr) { return FALSE; }
inline void src_skip(j_decompress_ptr cinfo, long n) {
  jpeg_source_mgr* s = cinfo->src;
  if (n <= 0) return;
  const size_t k = static_cast<size_t>(n) < s->bytes_in_buffer ? static_cast<size_t>(n) : s->bytes_in_buffer;
  s->next_input_byte += k;
  s->bytes_in_buffer -= k;
}

// Owns the libjpeg state, so a C++ exception (bad_alloc) or a longjmp both end in one destroy.
struct Decoder {
  jpeg_decompress_struct cinfo{};
  ErrorMgr err{};
  jpeg_source_mgr src{};
  bool created = false;
  ~Decoder() {
    if (created) jpeg_destroy_decompress(&cinfo);
  }
};

// PIL's MULDIV255: a*b/255 rounded, exact for a, b in [0, 255].
inline int muldiv255(int a, int b) {
  const int t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

// Returns "" on success, else why. Only trivially destructible locals live in this frame, and the
// caller owns everything else, so longjmp back to the setjmp below skips no destructor.
inline const char* decode_into(Decoder& d, const unsigned char* data, size_t size, int& width, int& height,
                               std::vector<uint8_t>& rgb, std::vector<uint8_t>& scratch) {
  d.cinfo.err = jpeg_std_error(&d.err.pub);
  d.err.pub.error_exit = on_error_exit;
  d.err.pub.emit_message = on_emit_message;
  d.err.pub.output_message = on_output_message;
  d.err.message[0] = '\0';
  if (setjmp(d.err.jump)) return d.err.message;

  jpeg_create_decompress(&d.cinfo);
  d.created = true;
  d.src.next_input_byte = data;
  d.src.bytes_in_buffer = size;
  d.src.init_source = src_noop;
  d.src.fill_input_buffer = src_fill;
  d.src.skip_input_data = src_skip;
  d.src.resync_to_restart = jpeg_resync_to_restart;
  d.src.term_source = src_noop;
  d.cinfo.src = &d.src;

  if (jpeg_read_header(&d.cinfo, TRUE) != JPEG_HEADER_OK) return "truncated JPEG (data ends in the header)";
  const int nc = d.cinfo.num_components;
  if (nc == 1) {
    d.cinfo.out_color_space = JCS_GRAYSCALE;
  } else if (nc == 3) {
    d.cinfo.out_color_space = JCS_RGB;
  } else if (nc == 4) {
    d.cinfo.out_color_space = JCS_CMYK;
  } else {
    return "JPEG with an unsupported number of components (not 1, 3 or 4)";
  }
  d.cinfo.dct_method = JDCT_ISLOW;
  d.cinfo.do_fancy_upsampling = TRUE;
  d.cinfo.scale_num = d.cinfo.scale_denom = 1;
  if (!jpeg_start_decompress(&d.cinfo)) return "truncated JPEG (data ends before the first scanline)";

  const int w = static_cast<int>(d.cinfo.output_width), h = static_cast<int>(d.cinfo.output_height);
  const size_t row = static_cast<size_t>(w) * 3;
  rgb.resize(row * static_cast<size_t>(h));
  if (nc == 4) scratch.resize(static_cast<size_t>(w) * 4);
  while (d.cinfo.output_scanline < d.cinfo.output_height) {
    const JDIMENSION y = d.cinfo.output_scanline;
    uint8_t* dst = rgb.data() + row * y;
    JSAMPROW rp = nc == 4 ? scratch.data() : dst;  // gray: w bytes at the row's start, expanded below
    if (jpeg_read_scanlines(&d.cinfo, &rp, 1) != 1) return "truncated JPEG (data ends inside the image)";
    if (nc == 1) {
      for (int x = w - 1; x >= 0; --x) dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = dst[x];
    } else if (nc == 4) {
      const uint8_t* s = scratch.data();
      for (int x = 0; x < w; ++x, s += 4, dst += 3) {
        const int nk = s[3];  // CMYK;I: k = 255 - raw, so nk = 255 - k = raw
        for (int c = 0; c < 3; ++c) {
          const int v = nk - muldiv255(255 - s[c], nk);
          dst[c] = static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
        }
      }
    }
  }
  width = w;
  height = h;
  return "";  // the rest of the file (EOI, trailing markers) is not read, as PIL does not need it
}

}  // namespace detail

// Decodes a JPEG to (H, W, 3) RGB. Returns "" on success, else a one-line reason.
inline std::string decode_rgb(const unsigned char* data, size_t size, int& width, int& height,
                              std::vector<uint8_t>& rgb) {
  detail::Decoder d;
  std::vector<uint8_t> scratch;
  return detail::decode_into(d, data, size, width, height, rgb, scratch);
}

}  // namespace tq::risc::jpeg

#endif  // TQ_HAVE_LIBJPEG
