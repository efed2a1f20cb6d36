// A compact Parquet reader for BYTE_ARRAY leaves (strings, binary, the `image` struct's fields) of
// flat or struct-nested schemas without repetition — what `datasets` writes for image/caption
// tables (spec/riscm-data.md sections 2-3). It reads the footer once, then decodes one column chunk
// of one row group at a time on demand from an mmap, so only the columns asked for are touched.
//
// Invariants:
//  * every offset, length, count and level read from the file is checked before use; a malformed
//    file ends in one tq::Error naming the file, row group, rows and column, never in UB;
//  * each page is decoded by its own `encoding` (a chunk may switch from dictionary to PLAIN when
//    the writer's dictionary overflowed);
//  * values of PLAIN pages in UNCOMPRESSED chunks are views into the mapping (zero copy); other
//    values point into page buffers owned by the returned ByteArrayColumn.
#pragma once

#include "risc/codecs.hpp"
#include "risc/mapped_file.hpp"
#include "risc/parquet_meta.hpp"
#include "risc/rle_hybrid.hpp"

#include <tq/core/error.hpp>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tq::risc {

// A leaf column of the schema with its level limits.
struct LeafColumn {
  std::vector<std::string> path;
  int32_t type = -1;
  int max_def = 0, max_rep = 0;
  std::string dotted() const {
    std::string s;
    for (const auto& p : path) s += (s.empty() ? "" : ".") + p;
    return s;
  }
};

// One leaf of one row group: a value or null per row. Views stay valid while both this object and
// the ParquetFile live.
struct ByteArrayColumn {
  std::vector<std::optional<std::string_view>> values;
  std::vector<std::vector<uint8_t>> buffers;  // decompressed pages the views point into
  // The level of each row (for struct children: distinguishes a null struct from a null field).
  std::vector<uint8_t> def_levels;
};

inline std::string join_path(const std::vector<std::string>& path) {
  std::string s;
  for (const auto& p : path) s += (s.empty() ? "" : ".") + p;
  return s;
}

class ParquetFile {
 public:
  static constexpr int64_t kMaxRowGroupRows = int64_t{1} << 24;

  explicit ParquetFile(const std::string& path) {
    auto mf = std::make_shared<MappedFile>(path);
    data_ = mf->data();
    size_ = mf->size();
    name_ = path;
    keep_ = mf;
    mapped_ = mf.get();
    open();
  }
  // From memory (fuzzing, tests). `data` must outlive this object.
  ParquetFile(const uint8_t* data, size_t size, std::string name)
      : data_(data), size_(size), name_(std::move(name)) {
    open();
  }

  const std::string& name() const { return name_; }
  const pq::FileMeta& meta() const { return meta_; }
  const std::vector<LeafColumn>& leaves() const { return leaves_; }
  int64_t num_rows() const { return meta_.num_rows; }
  size_t num_row_groups() const { return meta_.row_groups.size(); }
  int64_t row_group_rows(size_t g) const { return meta_.row_groups.at(g).num_rows; }
  int64_t row_group_first_row(size_t g) const { return first_row_.at(g); }

  std::optional<size_t> find_leaf(const std::vector<std::string>& path) const {
    for (size_t i = 0; i < leaves_.size(); ++i)
      if (leaves_[i].path == path) return i;
    return std::nullopt;
  }

  size_t leaf_index(const std::vector<std::string>& path) const {
    auto i = find_leaf(path);
    if (!i) {
      std::vector<std::string> have;
      for (const auto& l : leaves_) have.push_back(l.dotted());
      fail(str_cat("file '", name_, "': missing column '", join_path(path), "' (columns: ", have,
                   ")"));
    }
    return *i;
  }

  // Context prefix for errors about rows of a row group.
  std::string where(size_t g) const {
    int64_t first = first_row_.at(g), n = meta_.row_groups.at(g).num_rows;
    return str_cat("file '", name_, "', row group ", g, ", rows ", first, "..", first + n - 1);
  }

  ByteArrayColumn read_column(size_t g, size_t leaf) const;

 private:
  void open();
  void build_leaves();
  void walk_schema(size_t& idx, std::vector<std::string>& path, int def, int rep, int depth);

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string name_;
  std::shared_ptr<const void> keep_;
  const MappedFile* mapped_ = nullptr;
  pq::FileMeta meta_;
  std::vector<LeafColumn> leaves_;
  std::vector<int64_t> first_row_;
};

inline void ParquetFile::open() {
  const std::string f = str_cat("file '", name_, "'");
  TQ_CHECK(size_ >= 12, f, ": not a parquet file (", size_, " bytes; truncated?)");
  TQ_CHECK(std::memcmp(data_, "PAR1", 4) == 0, f, ": bad magic at start (not a parquet file)");
  if (std::memcmp(data_ + size_ - 4, "PARE", 4) == 0)
    fail(str_cat(f, ": encrypted parquet footers are not supported"));
  TQ_CHECK(std::memcmp(data_ + size_ - 4, "PAR1", 4) == 0, f,
           ": bad magic at end (truncated or not a parquet file)");
  uint32_t footer_len;
  std::memcpy(&footer_len, data_ + size_ - 8, 4);
  TQ_CHECK(footer_len <= size_ - 12, f, ": footer length ", footer_len,
           " exceeds the file size ", size_, " (truncated?)");
  meta_ = pq::read_file_meta(data_ + size_ - 8 - footer_len, footer_len, f);
  TQ_CHECK(meta_.num_rows >= 0, f, ": negative num_rows");
  build_leaves();
  int64_t total = 0;
  for (size_t g = 0; g < meta_.row_groups.size(); ++g) {
    const auto& rg = meta_.row_groups[g];
    // The cap keeps a corrupt count from turning into a huge allocation; real row groups hold
    // 100 to a few thousand image rows.
    TQ_CHECK(rg.num_rows >= 0 && rg.num_rows <= kMaxRowGroupRows, f, ", row group ", g,
             ": bad num_rows ", rg.num_rows);
    TQ_CHECK(rg.columns.size() == leaves_.size(), f, ", row group ", g, ": ", rg.columns.size(),
             " column chunks for ", leaves_.size(), " schema leaves");
    first_row_.push_back(total);
    total += rg.num_rows;
  }
  TQ_CHECK(total == meta_.num_rows, f, ": row groups hold ", total, " rows but the footer says ",
           meta_.num_rows);
}

inline void ParquetFile::build_leaves() {
  const auto& s = meta_.schema;
  TQ_CHECK(!s.empty(), "file '", name_, "': empty schema");
  size_t idx = 1;
  std::vector<std::string> path;
  for (int32_t c = 0; c < s[0].num_children; ++c) {
    TQ_CHECK(idx < s.size(), "file '", name_, "': schema has fewer elements than its tree needs");
    walk_schema(idx, path, 0, 0, 0);
  }
  TQ_CHECK(idx == s.size(), "file '", name_, "': schema has ", s.size() - idx,
           " elements outside its tree");
}

// Pre-order walk: a group consumes its next num_children subtrees.
inline void ParquetFile::walk_schema(size_t& idx, std::vector<std::string>& path, int def,
                                     int rep, int depth) {
  const auto& s = meta_.schema;
  TQ_CHECK(idx < s.size() && depth < 64, "file '", name_, "': malformed schema tree");
  const pq::SchemaElement& e = s[idx++];
  if (e.repetition == pq::OPTIONAL) ++def;
  if (e.repetition == pq::REPEATED) ++def, ++rep;
  path.push_back(e.name);
  if (e.num_children > 0) {
    for (int32_t c = 0; c < e.num_children; ++c) walk_schema(idx, path, def, rep, depth + 1);
  } else {
    TQ_CHECK(e.type.has_value(), "file '", name_, "': leaf '", join_path(path), "' has no type");
    leaves_.push_back({path, *e.type, def, rep});
  }
  path.pop_back();
}

namespace detail {

// Decodes n_present PLAIN BYTE_ARRAY values (u32 LE length + bytes each) from [p, end).
inline void plain_byte_arrays(const uint8_t* p, const uint8_t* end, size_t n,
                              std::vector<std::string_view>& out, const std::string& ctx) {
  out.clear();
  // Every value takes at least its 4-byte length, which bounds n before anything is allocated.
  TQ_CHECK(n <= static_cast<size_t>(end - p) / 4, ctx, ": ", n, " PLAIN values cannot fit in ",
           end - p, " bytes");
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TQ_CHECK(end - p >= 4, ctx, ": PLAIN value ", i, " of ", n, " runs past the page end");
    uint32_t len;
    std::memcpy(&len, p, 4);
    p += 4;
    TQ_CHECK(static_cast<uint64_t>(end - p) >= len, ctx, ": PLAIN value ", i, " (", len,
             " bytes) runs past the page end");
    out.emplace_back(reinterpret_cast<const char*>(p), len);
    p += len;
  }
}

// State of one column chunk while its pages are decoded.
struct ChunkDecoder {
  ChunkDecoder(const LeafColumn& l, int32_t c, const std::string& w, ByteArrayColumn& out, size_t n)
      : leaf(l), codec(c), where(w), col(out), rows(n) {}
  const LeafColumn& leaf;
  int32_t codec;
  const std::string& where;  // file + row group
  ByteArrayColumn& col;
  size_t rows;  // rows of the row group: no page may hold more than what is left of them
  std::vector<std::string_view> dict;
  bool have_dict = false;
  std::vector<uint32_t> levels, indices;
  std::vector<std::string_view> plain;

  std::string ctx(int page) const {
    return str_cat(where, ", column ", leaf.dotted(), ", page ", page, " (from row ",
                   col.values.size(), ")");
  }

  // Decompressed bytes of a page part; zero-copy when the chunk is uncompressed.
  std::pair<const uint8_t*, const uint8_t*> payload(const uint8_t* p, size_t csize, size_t usize,
                                                    bool compressed, const std::string& c) {
    if (!compressed || codec == pq::UNCOMPRESSED) return {p, p + csize};
    std::vector<uint8_t> buf;
    decompress(codec, p, csize, usize, buf, c);
    col.buffers.push_back(std::move(buf));
    const auto& b = col.buffers.back();
    return {b.data(), b.data() + b.size()};
  }

  void dictionary_page(const pq::PageHeader& h, const uint8_t* p, int page) {
    std::string c = ctx(page);
    TQ_CHECK(h.dict.has_value(), c, ": dictionary page without its header");
    TQ_CHECK(h.dict->encoding == pq::PLAIN || h.dict->encoding == pq::PLAIN_DICTIONARY, c,
             ": dictionary encoding ", h.dict->encoding, " is not supported");
    TQ_CHECK(h.dict->num_values >= 0, c, ": negative dictionary size");
    auto [b, e] = payload(p, static_cast<size_t>(h.compressed_size),
                          static_cast<size_t>(h.uncompressed_size), true, c);
    plain_byte_arrays(b, e, static_cast<size_t>(h.dict->num_values), dict, c);
    have_dict = true;
  }

  // Levels are decoded into `levels`; returns the number of present values.
  void check_count(size_t n, const std::string& c) const {
    TQ_CHECK(n <= rows - col.values.size(), c, ": page holds ", n, " values but only ",
             rows - col.values.size(), " rows of the row group are left");
  }

  size_t def_levels(const uint8_t* b, size_t nbytes, size_t n, const std::string& c) {
    levels.resize(n);
    if (leaf.max_def == 0) {
      std::fill(levels.begin(), levels.end(), 0u);
      return n;
    }
    RleHybridDecoder dec(b, nbytes, bit_width_of(static_cast<uint32_t>(leaf.max_def)), &c);
    dec.decode(levels.data(), n);
    size_t present = 0;
    for (uint32_t l : levels) {
      TQ_CHECK(l <= static_cast<uint32_t>(leaf.max_def), c, ": definition level ", l,
               " exceeds the maximum ", leaf.max_def);
      present += l == static_cast<uint32_t>(leaf.max_def);
    }
    return present;
  }

  void values(int32_t encoding, const uint8_t* b, const uint8_t* e, size_t n_present,
              const std::string& c) {
    const uint32_t max_def = static_cast<uint32_t>(leaf.max_def);
    size_t k = 0;
    if (encoding == pq::PLAIN) {
      plain_byte_arrays(b, e, n_present, plain, c);
      for (uint32_t l : levels) {
        col.def_levels.push_back(static_cast<uint8_t>(l));
        if (l == max_def) col.values.emplace_back(plain[k++]);
        else col.values.emplace_back(std::nullopt);
      }
      return;
    }
    TQ_CHECK(encoding == pq::RLE_DICTIONARY || encoding == pq::PLAIN_DICTIONARY, c,
             ": value encoding ", encoding, " is not supported (PLAIN and dictionary only)");
    TQ_CHECK(have_dict, c, ": dictionary-encoded page without a dictionary page");
    indices.resize(n_present);
    if (n_present > 0) {
      TQ_CHECK(e > b, c, ": dictionary page data is empty");
      int width = *b;
      TQ_CHECK(width <= 32, c, ": dictionary index bit width ", width, " out of range");
      RleHybridDecoder dec(b + 1, static_cast<size_t>(e - b - 1), width, &c);
      dec.decode(indices.data(), n_present);
    }
    for (uint32_t l : levels) {
      col.def_levels.push_back(static_cast<uint8_t>(l));
      if (l == max_def) {
        uint32_t ix = indices[k++];
        TQ_CHECK(ix < dict.size(), c, ": dictionary index ", ix, " out of range (", dict.size(),
                 " entries)");
        col.values.emplace_back(dict[ix]);
      } else {
        col.values.emplace_back(std::nullopt);
      }
    }
  }

  void data_page_v1(const pq::PageHeader& h, const uint8_t* p, int page) {
    std::string c = ctx(page);
    TQ_CHECK(h.v1.has_value(), c, ": data page without its header");
    const auto& d = *h.v1;
    TQ_CHECK(d.num_values >= 0, c, ": negative value count");
    auto [b, e] = payload(p, static_cast<size_t>(h.compressed_size),
                          static_cast<size_t>(h.uncompressed_size), true, c);
    const auto n = static_cast<size_t>(d.num_values);
    check_count(n, c);
    size_t present = n;
    levels.assign(n, 0);
    if (leaf.max_def > 0) {
      TQ_CHECK(d.def_encoding == pq::RLE, c, ": definition level encoding ", d.def_encoding,
               " is not supported (RLE only)");
      TQ_CHECK(e - b >= 4, c, ": definition levels run past the page end");
      uint32_t len;
      std::memcpy(&len, b, 4);
      b += 4;
      TQ_CHECK(static_cast<uint64_t>(e - b) >= len, c, ": definition levels (", len,
               " bytes) run past the page end");
      present = def_levels(b, len, n, c);
      b += len;
    }
    values(d.encoding, b, e, present, c);
  }

  void data_page_v2(const pq::PageHeader& h, const uint8_t* p, int page) {
    std::string c = ctx(page);
    TQ_CHECK(h.v2.has_value(), c, ": v2 data page without its header");
    const auto& d = *h.v2;
    TQ_CHECK(d.num_values >= 0 && d.def_bytes >= 0 && d.rep_bytes >= 0, c,
             ": negative counts in the v2 page header");
    const uint64_t lv = static_cast<uint64_t>(d.def_bytes) + static_cast<uint64_t>(d.rep_bytes);
    TQ_CHECK(lv <= static_cast<uint64_t>(h.compressed_size) &&
                 lv <= static_cast<uint64_t>(h.uncompressed_size),
             c, ": level sections larger than the page");
    const auto n = static_cast<size_t>(d.num_values);
    check_count(n, c);
    size_t present = n;
    levels.assign(n, 0);
    if (leaf.max_def > 0) present = def_levels(p + d.rep_bytes, static_cast<size_t>(d.def_bytes), n, c);
    auto [b, e] = payload(p + lv, static_cast<size_t>(h.compressed_size) - lv,
                          static_cast<size_t>(h.uncompressed_size) - lv, d.is_compressed, c);
    values(d.encoding, b, e, present, c);
  }
};

}  // namespace detail

inline ByteArrayColumn ParquetFile::read_column(size_t g, size_t leaf_ix) const {
  TQ_CHECK(g < meta_.row_groups.size(), "file '", name_, "': row group ", g, " out of range");
  const LeafColumn& leaf = leaves_.at(leaf_ix);
  const std::string where_g = where(g);
  const std::string w = str_cat(where_g, ", column ", leaf.dotted());
  const pq::RowGroup& rg = meta_.row_groups[g];
  const pq::ColumnChunk& cc = rg.columns[leaf_ix];
  TQ_CHECK(!cc.external, w, ": column data in an external file is not supported");
  TQ_CHECK(cc.meta.has_value(), w, ": column chunk without metadata");
  const pq::ColumnMeta& m = *cc.meta;
  TQ_CHECK(m.path == leaf.path, w, ": chunk path '", join_path(m.path), "' differs from the schema");
  TQ_CHECK(leaf.type == pq::BYTE_ARRAY && m.type == pq::BYTE_ARRAY, w, ": physical type ",
           leaf.type, " is not BYTE_ARRAY (string/binary)");
  TQ_CHECK(leaf.max_rep == 0, w, ": repeated columns are not supported");
  TQ_CHECK(leaf.max_def <= 255, w, ": nesting too deep");

  int64_t start = m.data_page_offset;
  if (m.dictionary_page_offset && *m.dictionary_page_offset > 0 &&
      *m.dictionary_page_offset < start)
    start = *m.dictionary_page_offset;
  TQ_CHECK(start >= 4 && m.total_compressed_size >= 0 &&
               static_cast<uint64_t>(start) + static_cast<uint64_t>(m.total_compressed_size) <=
                   size_ - 8,
           w, ": column chunk [", start, ", +", m.total_compressed_size,
           ") lies outside the file (truncated?)");
  if (mapped_) mapped_->will_need(static_cast<size_t>(start), static_cast<size_t>(m.total_compressed_size));

  ByteArrayColumn col;
  const auto rows = static_cast<size_t>(rg.num_rows);
  col.values.reserve(std::min<size_t>(rows, 1 << 16));
  detail::ChunkDecoder dec{leaf, m.codec, where_g, col, rows};
  const uint8_t* p = data_ + start;
  const uint8_t* end = p + m.total_compressed_size;
  for (int page = 0; col.values.size() < rows && p < end; ++page) {
    size_t hsize = 0;
    const std::string hctx = str_cat(dec.ctx(page), " header");
    pq::PageHeader h = pq::read_page_header(p, static_cast<size_t>(end - p), hctx, hsize);
    p += hsize;
    TQ_CHECK(h.compressed_size >= 0 && h.uncompressed_size >= 0 &&
                 h.compressed_size <= end - p,
             dec.ctx(page), ": page of ", h.compressed_size, " bytes runs past the column chunk");
    const size_t before = col.values.size();
    switch (h.type) {
      case pq::DICTIONARY_PAGE: dec.dictionary_page(h, p, page); break;
      case pq::DATA_PAGE: dec.data_page_v1(h, p, page); break;
      case pq::DATA_PAGE_V2: dec.data_page_v2(h, p, page); break;
      default: break;  // index pages and unknown kinds carry no values
    }
    TQ_CHECK(col.values.size() <= rows, dec.ctx(page), ": pages hold more values (",
             col.values.size() - before, " in this page) than the row group's ", rows, " rows");
    p += h.compressed_size;
  }
  TQ_CHECK(col.values.size() == rows, w, ": column chunk ends after ", col.values.size(), " of ",
           rows, " rows (truncated?)");
  return col;
}

}  // namespace tq::risc
