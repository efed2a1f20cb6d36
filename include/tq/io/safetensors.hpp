// safetensors: read (mmap, zero-copy), write (atomic), and sharded model directories.
//
// File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON header, then the data
// section. The header maps tensor names to {dtype, shape, data_offsets: [begin, end)} (offsets
// relative to the data section) plus an optional "__metadata__" object of string → string.
//
// Invariants:
//  - Reading validates what the Rust `safetensors` crate (and so the Python package) validates,
//    and rejects what it rejects: header length within the file and ≤ 100 MB, UTF-8, JSON, every
//    entry's dtype/shape/data_offsets well-formed, end − begin = numel·itemsize, and tensors
//    tiling the data section exactly (sorted by offsets, each starts where the previous ended, the
//    last ends at the end of the file: no overlaps, no holes, no trailing bytes). Like the crate
//    we ignore unknown fields in an entry and accept whitespace around the JSON. Unlike the crate
//    (whose JSON map keeps the last of two equal keys) a duplicate key is an error.
//  - Every failure is one line: "safetensors file '<path>': <problem>".
//  - Tensors from get() are CPU views of a private (copy-on-write) mapping: no copy, and writing
//    into them never touches the file. The mapping lives while any tensor or SafetensorsFile uses
//    it. A tensor whose data is not aligned to its element size (possible only in files not
//    written by the reference library) is copied instead, since typed access would be misaligned.
//  - Dtypes tq lacks (I8, U16, F8_*, ...) are known, sized and validated; get() on them throws
//    "unsupported dtype" naming the tensor, so such a file still serves its other tensors.
//  - Writing orders tensors as the Python library does (dtype descending in the crate's order,
//    which is alignment descending, then name), so every tensor is aligned and, with at most one
//    metadata entry, the bytes are identical to the library's; the file appears atomically
//    (written to path.tmp, fsynced, renamed).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tq/core/tensor.hpp"
#include "tq/io/json.hpp"

namespace tq {

// ---- dtypes --------------------------------------------------------------------------------------

struct SafetensorsDType {
  const char* name;
  int bits;        // element size in bits (F4 and F6_* are sub-byte)
  int rank;        // the crate's Dtype order (= alignment order), used to sort on write
  bool supported;  // tq has a matching DType
  DType dtype;     // valid when supported
};

// Every dtype the format defines (safetensors 0.8), in the crate's enum order.
inline const std::vector<SafetensorsDType>& safetensors_dtypes() {
  static const std::vector<SafetensorsDType> table = {
      {"BOOL", 8, 0, true, DType::boolean},   {"F4", 4, 1, false, DType::u8},
      {"F6_E2M3", 6, 2, false, DType::u8},    {"F6_E3M2", 6, 3, false, DType::u8},
      {"U8", 8, 4, true, DType::u8},          {"I8", 8, 5, false, DType::u8},
      {"F8_E5M2", 8, 6, false, DType::u8},    {"F8_E4M3", 8, 7, false, DType::u8},
      {"F8_E8M0", 8, 8, false, DType::u8},    {"F8_E4M3FNUZ", 8, 9, false, DType::u8},
      {"F8_E5M2FNUZ", 8, 10, false, DType::u8}, {"I16", 16, 11, false, DType::u8},
      {"U16", 16, 12, false, DType::u8},      {"F16", 16, 13, true, DType::f16},
      {"BF16", 16, 14, true, DType::bf16},    {"I32", 32, 15, true, DType::i32},
      {"U32", 32, 16, false, DType::u8},      {"F32", 32, 17, true, DType::f32},
      {"C64", 64, 18, false, DType::u8},      {"F64", 64, 19, true, DType::f64},
      {"I64", 64, 20, true, DType::i64},      {"U64", 64, 21, false, DType::u8},
  };
  return table;
}

inline const SafetensorsDType* find_safetensors_dtype(std::string_view name) {
  for (const auto& d : safetensors_dtypes())
    if (name == d.name) return &d;
  return nullptr;
}

inline const SafetensorsDType& safetensors_dtype_of(DType t) {
  for (const auto& d : safetensors_dtypes())
    if (d.supported && d.dtype == t) return d;
  fail(str_cat("safetensors: no safetensors dtype for ", dtype_name(t)));
}

struct SafetensorsTensorInfo {
  std::string name;
  std::string dtype_name;  // as written in the file: "F32", "BF16", "I8", ...
  bool supported = false;  // tq can load it (dtype is valid)
  DType dtype = DType::u8;
  Shape shape;
  uint64_t data_begin = 0;  // byte offsets within the data section
  uint64_t data_end = 0;
  uint64_t nbytes() const { return data_end - data_begin; }
};

namespace safetensors_detail {

inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the crate's limit

// 'name' for messages, with control characters escaped so an error stays on one line.
inline std::string quote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    if (uint8_t(c) < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(uint8_t(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "'";
}

[[noreturn]] inline void file_error(std::string_view path, const std::string& problem) {
  fail(str_cat("safetensors file ", quote(path), ": ", problem));
}

inline std::string offsets_str(const SafetensorsTensorInfo& t) {
  return str_cat("[", t.data_begin, ", ", t.data_end, "]");
}

// A non-negative JSON integer (shape dim or offset), or nullopt-like failure via `ok`.
inline bool read_non_negative(const json::Value& v, uint64_t& out) {
  if (!v.is_integer() || v.number_text()[0] == '-') return false;
  try {
    out = v.as_uint64();
  } catch (const Error&) {
    return false;
  }
  return true;
}

inline std::string describe_json(const json::Value& v) {
  if (v.is_number()) return v.number_text();
  if (v.is_string()) return str_cat("\"", v.as_string(), "\"");
  return json::kind_name(v.kind());
}

inline void parse_shape(std::string_view path, SafetensorsTensorInfo& t, const json::Value& shape) {
  const std::string who = str_cat("tensor ", quote(t.name), ": ");
  if (!shape.is_array())
    file_error(path, str_cat(who, "shape is ", json::kind_name(shape.kind()), ", expected an array of non-negative integers"));
  for (size_t d = 0; d < shape.size(); ++d) {
    uint64_t dim = 0;
    if (!read_non_negative(shape[d], dim) || dim > uint64_t(INT64_MAX))
      file_error(path, str_cat(who, "shape dimension ", d, " is ", describe_json(shape[d]),
                               ", expected a non-negative integer"));
    t.shape.push_back(int64_t(dim));
  }
}

inline void parse_offsets(std::string_view path, SafetensorsTensorInfo& t, const json::Value& off) {
  const std::string who = str_cat("tensor ", quote(t.name), ": ");
  uint64_t b = 0, e = 0;
  if (!off.is_array() || off.size() != 2 || !read_non_negative(off[0], b) || !read_non_negative(off[1], e))
    file_error(path, str_cat(who, "data_offsets is ", off.is_array() ? json::dump(off) : json::kind_name(off.kind()),
                             ", expected [begin, end] of two non-negative integers"));
  if (e < b) file_error(path, str_cat(who, "data_offsets [", b, ", ", e, "] end before they begin"));
  t.data_begin = b;
  t.data_end = e;
}

// Bytes needed by numel elements of `bits` each; false on overflow or a partial byte.
inline bool needed_bytes(const Shape& shape, int bits, uint64_t& out) {
  uint64_t n = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, uint64_t(d), &n)) return false;
  if (__builtin_mul_overflow(n, uint64_t(bits), &n) || n % 8 != 0) return false;
  out = n / 8;
  return true;
}

inline SafetensorsTensorInfo parse_entry(std::string_view path, const std::string& name, const json::Value& v) {
  SafetensorsTensorInfo t;
  t.name = name;
  const std::string who = str_cat("tensor ", quote(name), ": ");
  if (!v.is_object())
    file_error(path, str_cat(who, "entry is ", json::kind_name(v.kind()),
                             ", expected an object with dtype, shape and data_offsets"));
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!v.contains(field)) file_error(path, str_cat(who, "missing \"", field, "\""));
  const json::Value& dt = v.at("dtype");
  if (!dt.is_string()) file_error(path, str_cat(who, "dtype is ", json::kind_name(dt.kind()), ", expected a string"));
  const SafetensorsDType* info = find_safetensors_dtype(dt.as_string());
  if (!info) file_error(path, str_cat(who, "unknown dtype ", quote(dt.as_string())));
  t.dtype_name = info->name;
  t.supported = info->supported;
  t.dtype = info->dtype;
  parse_shape(path, t, v.at("shape"));
  parse_offsets(path, t, v.at("data_offsets"));
  uint64_t need = 0;
  if (!needed_bytes(t.shape, info->bits, need))
    file_error(path, str_cat(who, "shape ", t.shape, " of ", t.dtype_name, " does not fill a whole number of bytes ",
                             "or overflows"));
  if (need != t.nbytes())
    file_error(path, str_cat(who, "shape ", t.shape, " of ", t.dtype_name, " needs ", need, " bytes, data_offsets give ",
                             t.nbytes()));
  return t;
}

// The tensors must tile [0, data_size) exactly, as the crate requires.
inline void check_layout(std::string_view path, const std::map<std::string, SafetensorsTensorInfo>& tensors,
                         uint64_t data_size) {
  std::vector<const SafetensorsTensorInfo*> order;
  for (const auto& [name, t] : tensors) {
    if (t.data_end > data_size)
      file_error(path, str_cat("tensor ", quote(name), ": data_offsets ", offsets_str(t),
                               " extend past the end of the data section (", data_size, " bytes)"));
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return std::tie(a->data_begin, a->data_end, a->name) < std::tie(b->data_begin, b->data_end, b->name);
  });
  uint64_t cursor = 0;
  const SafetensorsTensorInfo* prev = nullptr;
  for (const auto* t : order) {
    if (t->data_begin < cursor)
      file_error(path, str_cat("tensors ", quote(prev->name), " (data_offsets ", offsets_str(*prev), ") and ",
                               quote(t->name), " (data_offsets ", offsets_str(*t), ") overlap"));
    if (t->data_begin > cursor)
      file_error(path, str_cat("data section bytes [", cursor, ", ", t->data_begin,
                               ") are not covered by any tensor (a hole before tensor ", quote(t->name), ")"));
    cursor = t->data_end;
    prev = t;
  }
  if (cursor != data_size)
    file_error(path, str_cat("data section has ", data_size, " bytes but the tensors cover only the first ", cursor,
                             " (trailing bytes not covered by any tensor)"));
}

struct Header {
  std::map<std::string, SafetensorsTensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

inline void parse_metadata(std::string_view path, const json::Value& v, Header& h) {
  if (!v.is_object())
    file_error(path, str_cat("__metadata__ is ", json::kind_name(v.kind()), ", expected an object of strings"));
  for (const auto& [k, val] : v.as_object()) {
    if (!val.is_string())
      file_error(path, str_cat("__metadata__ ", quote(k), " is ", json::kind_name(val.kind()), ", expected a string"));
    h.metadata[k] = val.as_string();
  }
}

// Validates the header text (the N bytes after the length prefix) against a data section of
// `data_size` bytes.
inline Header parse_header(std::string_view path, std::string_view text, uint64_t data_size) {
  size_t bad = json::utf8_invalid_offset(text);
  if (bad != std::string_view::npos)
    file_error(path, str_cat("header is not valid UTF-8 at header byte ", bad, " (file byte ", bad + 8, ")"));
  json::Value root;
  try {
    root = json::parse(text, "header");
  } catch (const json::ParseError& e) {
    file_error(path, str_cat("header is not valid JSON at header byte ", e.offset(), " (file byte ", e.offset() + 8,
                             "): ", e.problem()));
  }
  if (!root.is_object())
    file_error(path, str_cat("header is ", json::kind_name(root.kind()), ", expected a JSON object"));
  Header h;
  for (const auto& [name, v] : root.as_object()) {
    if (name == "__metadata__") parse_metadata(path, v, h);
    else h.tensors.emplace(name, parse_entry(path, name, v));
  }
  check_layout(path, h.tensors, data_size);
  return h;
}

// The read-only file mapped privately: pages written through a tensor are copied, never stored.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr) ::munmap(addr, size);
  }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(addr); }
};

inline std::shared_ptr<Mapping> map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) file_error(path, str_cat("cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    file_error(path, str_cat("cannot stat: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    file_error(path, "not a regular file");
  }
  auto m = std::make_shared<Mapping>();
  m->size = size_t(st.st_size);
  if (m->size < 8) {
    ::close(fd);
    file_error(path, str_cat("file has ", m->size, " bytes, fewer than the 8-byte header length"));
  }
  void* p = ::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping stays valid without the descriptor
  if (p == MAP_FAILED) file_error(path, str_cat("cannot mmap ", m->size, " bytes: ", std::strerror(err)));
  m->addr = p;
  return m;
}

}  // namespace safetensors_detail

// ---- reading -------------------------------------------------------------------------------------

class SafetensorsFile {
 public:
  using TensorInfo = SafetensorsTensorInfo;

  // Maps and validates the whole file; throws tq::Error naming the file and the problem.
  static SafetensorsFile open(const std::string& path) {
    namespace sd = safetensors_detail;
    SafetensorsFile f;
    f.path_ = path;
    f.map_ = sd::map_file(path);
    const uint8_t* b = f.map_->bytes();
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = (n << 8) | b[k];  // little-endian, whatever the host
    const uint64_t size = f.map_->size;
    if (n > sd::kMaxHeaderBytes)
      sd::file_error(path, str_cat("header length ", n, " exceeds the limit of ", sd::kMaxHeaderBytes, " bytes"));
    if (n > size - 8)
      sd::file_error(path, str_cat("header length ", n, " is larger than the ", size - 8,
                                   " bytes that follow it (file has ", size, " bytes)"));
    std::string_view text(reinterpret_cast<const char*>(b + 8), size_t(n));
    sd::Header h = sd::parse_header(path, text, size - 8 - n);
    f.tensors_ = std::move(h.tensors);
    f.metadata_ = std::move(h.metadata);
    f.data_start_ = 8 + n;
    return f;
  }

  const std::string& path() const { return path_; }
  // Tensor names, sorted.
  std::vector<std::string> keys() const {
    std::vector<std::string> k;
    k.reserve(tensors_.size());
    for (const auto& kv : tensors_) k.push_back(kv.first);
    return k;
  }
  size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      safetensors_detail::file_error(path_, str_cat("no tensor named ", safetensors_detail::quote(name)));
    return it->second;
  }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // A zero-copy CPU view of the tensor (a copy only when the file leaves it misaligned).
  Tensor get(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (!t.supported)
      safetensors_detail::file_error(path_, str_cat("tensor ", safetensors_detail::quote(name), ": unsupported dtype ",
                                                    t.dtype_name, " (tq reads F64, F32, F16, BF16, I64, I32, U8, BOOL)"));
    uint8_t* p = static_cast<uint8_t*>(map_->addr) + data_start_ + t.data_begin;
    if (reinterpret_cast<uintptr_t>(p) % dtype_size(t.dtype) != 0) {
      Tensor out = Tensor::empty(t.shape, t.dtype);
      if (t.nbytes()) std::memcpy(out.data_ptr(), p, size_t(t.nbytes()));
      return out;
    }
    return Tensor::from_blob(p, t.shape, t.dtype, Device::cpu(), map_);
  }

 private:
  std::string path_;
  std::shared_ptr<safetensors_detail::Mapping> map_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_start_ = 0;
};

// ---- writing -------------------------------------------------------------------------------------

namespace safetensors_detail {

// Writes a file through a descriptor, checking every call; the error names the final path.
class CheckedFile {
 public:
  CheckedFile(std::string tmp_path, std::string final_path) : tmp_(std::move(tmp_path)), final_(std::move(final_path)) {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail_io("cannot create", errno);
  }
  CheckedFile(const CheckedFile&) = delete;
  CheckedFile& operator=(const CheckedFile&) = delete;
  ~CheckedFile() {  // reached with an open descriptor only on failure: leave nothing behind
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }
  void write_all(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail_io("write failed on", w < 0 ? errno : EIO);
      p += w;
      n -= size_t(w);
    }
  }
  // fsync, close, then rename over the destination; the directory is synced best-effort.
  void commit() {
    if (::fsync(fd_) != 0) fail_io("fsync failed on", errno);
    int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      int err = errno;
      ::unlink(tmp_.c_str());
      fail_io("close failed on", err);
    }
    if (::rename(tmp_.c_str(), final_.c_str()) != 0) {
      int err = errno;
      ::unlink(tmp_.c_str());
      fail_io("cannot rename into place", err);
    }
    std::string dir = std::filesystem::path(final_).parent_path().string();
    int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);  // some filesystems refuse directory fsync; the file itself is already durable
      ::close(dfd);
    }
  }

 private:
  int fd_ = -1;
  std::string tmp_, final_;
  [[noreturn]] void fail_io(const char* what, int err) {
    file_error(final_, str_cat(what, " ", quote(tmp_), ": ", std::strerror(err)));
  }
};

}  // namespace safetensors_detail

// Writes `tensors` (any device, dtype and layout; copied to contiguous CPU as needed) with
// optional string metadata. Order in the file: dtype descending in the crate's order, then name —
// what the Python library writes, so every tensor is aligned to its element size.
inline void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  namespace sd = safetensors_detail;
  std::vector<std::pair<std::string, Tensor>> items;
  items.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") sd::file_error(path, "cannot write a tensor named '__metadata__' (reserved key)");
    if (!t.defined()) sd::file_error(path, str_cat("tensor ", sd::quote(name), " is undefined"));
    items.emplace_back(name, t.cpu().contiguous());
  }
  std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) {
    int ra = safetensors_dtype_of(a.second.dtype()).rank, rb = safetensors_dtype_of(b.second.dtype()).rank;
    return ra != rb ? ra > rb : a.first < b.first;
  });
  for (size_t k = 1; k < items.size(); ++k)
    if (items[k].first == items[k - 1].first) sd::file_error(path, str_cat("duplicate tensor name ", sd::quote(items[k].first)));

  json::Object header;
  if (!metadata.empty()) {
    json::Object meta;
    for (const auto& [k, v] : metadata) meta.emplace_back(k, json::Value(v));
    header.emplace_back("__metadata__", json::Value(std::move(meta)));
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : items) {
    json::Array shape;
    for (int64_t d : t.shape()) shape.emplace_back(d);
    uint64_t end = offset + t.nbytes();
    header.emplace_back(name, json::Value(json::Object{{"dtype", json::Value(safetensors_dtype_of(t.dtype()).name)},
                                                       {"shape", json::Value(std::move(shape))},
                                                       {"data_offsets", json::Value(json::Array{offset, end})}}));
    offset = end;
  }
  std::string text;
  try {
    text = json::dump(json::Value(std::move(header)));
  } catch (const Error& e) {
    sd::file_error(path, str_cat("cannot encode the header: ", e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  uint8_t len[8];
  for (int k = 0; k < 8; ++k) len[k] = uint8_t(uint64_t(text.size()) >> (8 * k));

  sd::CheckedFile out(path + ".tmp", path);
  out.write_all(len, 8);
  out.write_all(text.data(), text.size());
  for (const auto& [name, t] : items)
    if (t.nbytes()) out.write_all(t.data_ptr(), t.nbytes());
  out.commit();
}

// ---- sharded model directories ---------------------------------------------------------------------

// One lookup over a Hugging Face model's weights: `model.safetensors.index.json` (weight_map:
// tensor → shard file) or a single `model.safetensors`, or one .safetensors file given directly.
class SafetensorsDir {
 public:
  using TensorInfo = SafetensorsTensorInfo;

  static SafetensorsDir open(const std::string& path) {
    namespace fs = std::filesystem;
    SafetensorsDir d;
    d.root_ = path;
    if (fs::is_regular_file(path)) {
      d.add_single(path);
      return d;
    }
    TQ_CHECK(fs::is_directory(path), "model weights ", safetensors_detail::quote(path), " do not exist");
    fs::path index = fs::path(path) / "model.safetensors.index.json";
    fs::path single = fs::path(path) / "model.safetensors";
    if (fs::exists(index)) d.add_index(index.string());
    else if (fs::exists(single)) d.add_single(single.string());
    else
      fail(str_cat("model directory ", safetensors_detail::quote(path),
                   " has neither model.safetensors.index.json nor model.safetensors"));
    return d;
  }

  std::vector<std::string> keys() const {
    std::vector<std::string> k;
    for (const auto& kv : where_) k.push_back(kv.first);
    return k;
  }
  size_t size() const { return where_.size(); }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const { return shard_of(name).info(name); }
  Tensor get(const std::string& name) const { return shard_of(name).get(name); }
  // The file that holds `name`.
  const std::string& file_of(const std::string& name) const { return shard_of(name).path(); }
  const std::vector<SafetensorsFile>& shards() const { return shards_; }

 private:
  std::string root_;
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, size_t> where_;  // tensor → index into shards_

  const SafetensorsFile& shard_of(const std::string& name) const {
    auto it = where_.find(name);
    TQ_CHECK(it != where_.end(), "model weights ", safetensors_detail::quote(root_), ": no tensor named ",
             safetensors_detail::quote(name));
    return shards_[it->second];
  }

  void add_single(const std::string& file) {
    shards_.push_back(SafetensorsFile::open(file));
    for (const auto& k : shards_.back().keys()) where_[k] = 0;
  }

  void add_index(const std::string& index_path) {
    namespace fs = std::filesystem;
    using safetensors_detail::quote;
    const std::string who = str_cat("safetensors index ", quote(index_path), ": ");
    json::Value index = json::parse_file(index_path);
    TQ_CHECK(index.is_object(), who, "expected a JSON object, got ", json::kind_name(index.kind()));
    const json::Value* wm = index.find("weight_map");
    TQ_CHECK(wm != nullptr, who, "missing \"weight_map\"");
    TQ_CHECK(wm->is_object(), who, "weight_map is ", json::kind_name(wm->kind()), ", expected an object");
    std::map<std::string, size_t> shard_index;
    for (const auto& [tensor, file] : wm->as_object()) {
      TQ_CHECK(file.is_string(), who, "weight_map entry for tensor ", quote(tensor), " is ", json::kind_name(file.kind()),
               ", expected a file name");
      const std::string& rel = file.as_string();
      fs::path rp(rel);
      bool safe = !rel.empty() && rp.is_relative() && std::none_of(rp.begin(), rp.end(), [](const fs::path& c) {
        return c == "..";
      });
      TQ_CHECK(safe, who, "shard file name ", quote(rel), " for tensor ", quote(tensor),
               " must be a relative path inside the model directory");
      auto [it, added] = shard_index.emplace(rel, shards_.size());
      if (added) {
        fs::path full = fs::path(index_path).parent_path() / rp;
        TQ_CHECK(fs::exists(full), who, "shard ", quote(rel), " (listed for tensor ", quote(tensor), ") is missing: ",
                 quote(full.string()), " does not exist");
        shards_.push_back(SafetensorsFile::open(full.string()));
      }
      TQ_CHECK(shards_[it->second].contains(tensor), who, "tensor ", quote(tensor), " is listed in shard ", quote(rel),
               " but ", quote(shards_[it->second].path()), " does not contain it");
      where_[tensor] = it->second;
    }
  }
};

// The weights of a model directory (sharded or single file) or of one .safetensors file.
inline SafetensorsDir open_model_weights(const std::string& path) { return SafetensorsDir::open(path); }

}  // namespace tq
