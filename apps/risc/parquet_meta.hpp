// Parquet metadata (FileMetaData, schema, row groups, column chunks, page headers) decoded from
// Thrift compact with the field ids of apache/parquet-format's parquet.thrift. Only the fields a
// reader of BYTE_ARRAY/struct columns needs are kept; everything else (statistics, page-index
// offsets, logical-type unions, encoding stats, ...) is skipped by type.
#pragma once

#include "risc/thrift_compact.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tq::risc::pq {

enum Type : int32_t { BOOLEAN = 0, INT32 = 1, INT64 = 2, INT96 = 3, FLOAT = 4, DOUBLE = 5,
                      BYTE_ARRAY = 6, FIXED_LEN_BYTE_ARRAY = 7 };
enum Repetition : int32_t { REQUIRED = 0, OPTIONAL = 1, REPEATED = 2 };
enum Encoding : int32_t { PLAIN = 0, PLAIN_DICTIONARY = 2, RLE = 3, BIT_PACKED = 4,
                          RLE_DICTIONARY = 8 };
enum Codec : int32_t { UNCOMPRESSED = 0, SNAPPY = 1, GZIP = 2, LZO = 3, BROTLI = 4, LZ4 = 5,
                       ZSTD = 6, LZ4_RAW = 7 };
enum PageType : int32_t { DATA_PAGE = 0, INDEX_PAGE = 1, DICTIONARY_PAGE = 2, DATA_PAGE_V2 = 3 };

struct SchemaElement {
  std::optional<int32_t> type;  // absent for groups
  int32_t repetition = REQUIRED;
  bool has_repetition = false;
  std::string name;
  int32_t num_children = 0;
};

struct ColumnMeta {
  int32_t type = -1;
  std::vector<std::string> path;
  int32_t codec = UNCOMPRESSED;
  int64_t num_values = 0;
  int64_t total_compressed_size = 0;
  int64_t data_page_offset = -1;
  std::optional<int64_t> dictionary_page_offset;
};

struct ColumnChunk {
  bool external = false;  // file_path set: data lives in another file (unsupported)
  std::optional<ColumnMeta> meta;
};

struct RowGroup {
  std::vector<ColumnChunk> columns;
  int64_t num_rows = 0;
};

struct FileMeta {
  std::vector<SchemaElement> schema;
  int64_t num_rows = 0;
  std::vector<RowGroup> row_groups;
  std::vector<std::pair<std::string, std::string>> key_value;
  std::string created_by;
};

struct DataPageHeader {
  int32_t num_values = 0, encoding = PLAIN, def_encoding = RLE, rep_encoding = RLE;
};
struct DictPageHeader {
  int32_t num_values = 0, encoding = PLAIN;
};
struct DataPageHeaderV2 {
  int32_t num_values = 0, num_nulls = 0, num_rows = 0, encoding = PLAIN;
  int32_t def_bytes = 0, rep_bytes = 0;
  bool is_compressed = true;
};

struct PageHeader {
  int32_t type = -1, uncompressed_size = 0, compressed_size = 0;
  std::optional<DataPageHeader> v1;
  std::optional<DictPageHeader> dict;
  std::optional<DataPageHeaderV2> v2;
};

namespace detail {

// Runs `on_field(id, type)` for every field of the struct at the reader's position; the callback
// returns false for fields it did not consume, which are then skipped.
template <class F>
void read_struct(ThriftReader& r, F&& on_field) {
  int16_t last = 0, id;
  CType t;
  while (r.field(last, id, t)) {
    if (!on_field(id, t)) r.skip(t);
  }
}

inline int32_t read_i32(ThriftReader& r, CType t, const char* name) {
  r.expect(t, CType::I32, name);
  return r.i32();
}
inline int64_t read_i64(ThriftReader& r, CType t, const char* name) {
  if (t != CType::I64 && t != CType::I32) r.expect(t, CType::I64, name);
  return r.zigzag();
}

inline SchemaElement read_schema_element(ThriftReader& r) {
  SchemaElement e;
  read_struct(r, [&](int16_t id, CType t) {
    switch (id) {
      case 1: e.type = read_i32(r, t, "SchemaElement.type"); return true;
      case 3: e.repetition = read_i32(r, t, "SchemaElement.repetition_type");
              e.has_repetition = true; return true;
      case 4: r.expect(t, CType::Binary, "SchemaElement.name"); e.name = r.binary(); return true;
      case 5: e.num_children = read_i32(r, t, "SchemaElement.num_children"); return true;
      default: return false;
    }
  });
  return e;
}

inline ColumnMeta read_column_meta(ThriftReader& r) {
  ColumnMeta m;
  read_struct(r, [&](int16_t id, CType t) {
    switch (id) {
      case 1: m.type = read_i32(r, t, "ColumnMetaData.type"); return true;
      case 3: {
        r.expect(t, CType::List, "ColumnMetaData.path_in_schema");
        CType et;
        size_t n = r.list(et);
        if (et != CType::Binary) r.corrupt("path_in_schema is not a list of strings");
        for (size_t i = 0; i < n; ++i) m.path.emplace_back(r.binary());
        return true;
      }
      case 4: m.codec = read_i32(r, t, "ColumnMetaData.codec"); return true;
      case 5: m.num_values = read_i64(r, t, "ColumnMetaData.num_values"); return true;
      case 7: m.total_compressed_size = read_i64(r, t, "ColumnMetaData.total_compressed_size");
              return true;
      case 9: m.data_page_offset = read_i64(r, t, "ColumnMetaData.data_page_offset"); return true;
      case 11: m.dictionary_page_offset = read_i64(r, t, "ColumnMetaData.dictionary_page_offset");
               return true;
      default: return false;
    }
  });
  return m;
}

inline RowGroup read_row_group(ThriftReader& r) {
  RowGroup g;
  read_struct(r, [&](int16_t id, CType t) {
    switch (id) {
      case 1: {
        r.expect(t, CType::List, "RowGroup.columns");
        CType et;
        size_t n = r.list(et);
        if (et != CType::Struct) r.corrupt("RowGroup.columns is not a list of structs");
        for (size_t i = 0; i < n; ++i) {
          ColumnChunk c;
          read_struct(r, [&](int16_t cid, CType ct) {
            if (cid == 1) { r.expect(ct, CType::Binary, "ColumnChunk.file_path");
                            c.external = !r.binary().empty(); return true; }
            if (cid == 3) { r.expect(ct, CType::Struct, "ColumnChunk.meta_data");
                            c.meta = read_column_meta(r); return true; }
            return false;
          });
          g.columns.push_back(std::move(c));
        }
        return true;
      }
      case 3: g.num_rows = read_i64(r, t, "RowGroup.num_rows"); return true;
      default: return false;
    }
  });
  return g;
}

}  // namespace detail

inline FileMeta read_file_meta(const uint8_t* data, size_t size, const std::string& what) {
  ThriftReader r(data, size, what + " footer");
  FileMeta fm;
  bool have_schema = false, have_rows = false, have_groups = false;
  detail::read_struct(r, [&](int16_t id, CType t) {
    switch (id) {
      case 2: {
        r.expect(t, CType::List, "FileMetaData.schema");
        CType et;
        size_t n = r.list(et);
        if (et != CType::Struct) r.corrupt("schema is not a list of structs");
        for (size_t i = 0; i < n; ++i) fm.schema.push_back(detail::read_schema_element(r));
        have_schema = true;
        return true;
      }
      case 3: fm.num_rows = detail::read_i64(r, t, "FileMetaData.num_rows"); have_rows = true;
              return true;
      case 4: {
        r.expect(t, CType::List, "FileMetaData.row_groups");
        CType et;
        size_t n = r.list(et);
        if (et != CType::Struct) r.corrupt("row_groups is not a list of structs");
        for (size_t i = 0; i < n; ++i) fm.row_groups.push_back(detail::read_row_group(r));
        have_groups = true;
        return true;
      }
      case 5: {
        r.expect(t, CType::List, "FileMetaData.key_value_metadata");
        CType et;
        size_t n = r.list(et);
        if (et != CType::Struct) r.corrupt("key_value_metadata is not a list of structs");
        for (size_t i = 0; i < n; ++i) {
          std::pair<std::string, std::string> kv;
          detail::read_struct(r, [&](int16_t kid, CType kt) {
            if (kid != 1 && kid != 2) return false;
            r.expect(kt, CType::Binary, "KeyValue");
            (kid == 1 ? kv.first : kv.second) = r.binary();
            return true;
          });
          fm.key_value.push_back(std::move(kv));
        }
        return true;
      }
      case 6: r.expect(t, CType::Binary, "FileMetaData.created_by"); fm.created_by = r.binary();
              return true;
      default: return false;
    }
  });
  if (!have_schema || !have_rows || !have_groups)
    r.corrupt("FileMetaData lacks schema, num_rows or row_groups");
  return fm;
}

// Reads one PageHeader at `data`; `header_size` receives the number of bytes it took.
inline PageHeader read_page_header(const uint8_t* data, size_t size, const std::string& what,
                                   size_t& header_size) {
  ThriftReader r(data, size, what);
  PageHeader h;
  detail::read_struct(r, [&](int16_t id, CType t) {
    using detail::read_i32;
    switch (id) {
      case 1: h.type = read_i32(r, t, "PageHeader.type"); return true;
      case 2: h.uncompressed_size = read_i32(r, t, "PageHeader.uncompressed_page_size"); return true;
      case 3: h.compressed_size = read_i32(r, t, "PageHeader.compressed_page_size"); return true;
      case 5: {
        r.expect(t, CType::Struct, "PageHeader.data_page_header");
        DataPageHeader d;
        detail::read_struct(r, [&](int16_t fid, CType ft) {
          switch (fid) {
            case 1: d.num_values = read_i32(r, ft, "DataPageHeader.num_values"); return true;
            case 2: d.encoding = read_i32(r, ft, "DataPageHeader.encoding"); return true;
            case 3: d.def_encoding = read_i32(r, ft, "DataPageHeader.definition_level_encoding");
                    return true;
            case 4: d.rep_encoding = read_i32(r, ft, "DataPageHeader.repetition_level_encoding");
                    return true;
            default: return false;
          }
        });
        h.v1 = d;
        return true;
      }
      case 7: {
        r.expect(t, CType::Struct, "PageHeader.dictionary_page_header");
        DictPageHeader d;
        detail::read_struct(r, [&](int16_t fid, CType ft) {
          if (fid == 1) { d.num_values = read_i32(r, ft, "DictionaryPageHeader.num_values"); return true; }
          if (fid == 2) { d.encoding = read_i32(r, ft, "DictionaryPageHeader.encoding"); return true; }
          return false;
        });
        h.dict = d;
        return true;
      }
      case 8: {
        r.expect(t, CType::Struct, "PageHeader.data_page_header_v2");
        DataPageHeaderV2 d;
        detail::read_struct(r, [&](int16_t fid, CType ft) {
          switch (fid) {
            case 1: d.num_values = read_i32(r, ft, "DataPageHeaderV2.num_values"); return true;
            case 2: d.num_nulls = read_i32(r, ft, "DataPageHeaderV2.num_nulls"); return true;
            case 3: d.num_rows = read_i32(r, ft, "DataPageHeaderV2.num_rows"); return true;
            case 4: d.encoding = read_i32(r, ft, "DataPageHeaderV2.encoding"); return true;
            case 5: d.def_bytes = read_i32(r, ft, "DataPageHeaderV2.definition_levels_byte_length");
                    return true;
            case 6: d.rep_bytes = read_i32(r, ft, "DataPageHeaderV2.repetition_levels_byte_length");
                    return true;
            case 7: r.expect(ft, CType::True, "DataPageHeaderV2.is_compressed");
                    d.is_compressed = ThriftReader::bool_of(ft); return true;
            default: return false;
          }
        });
        h.v2 = d;
        return true;
      }
      default: return false;
    }
  });
  header_size = r.consumed();
  return h;
}

}  // namespace tq::risc::pq
