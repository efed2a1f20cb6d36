// Image-caption datasets as rows in dataset order, from every layout researchers keep RISC in:
//  * an HF dataset directory (its parquet shards in name order, as `datasets` concatenates them) or
//    a single parquet file, with an `image` struct {bytes, path} and caption_* string columns;
//  * a folder of images with `captions.csv` (RISC's own: source, split, image, caption_1..5) or a
//    `.jsonl` file (one object per image);
//  * Karpathy-style JSON (RSICD / UCM: {"images":[{filename, sentences:[{raw}]}]}) and the NWPU
//    variant (an object keyed by class name, entries with raw, raw_1 .. raw_4).
// row(i) is thread-safe so loader workers can share one Dataset. Parquet row groups are decoded on
// demand and kept in a byte-bounded cache, so a shuffled epoch decodes each row group about once.
#pragma once

#include "risc/parquet_reader.hpp"

#include <tq/core/error.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <future>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace tq::risc {

namespace fs = std::filesystem;

struct Row {
  std::optional<std::string> image;  // the stored (encoded) image bytes; null when missing
  std::optional<std::string> image_path;
  std::vector<std::optional<std::string>> captions;  // null = missing caption
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual Row row(int64_t i) const = 0;
  // Where row i lives, for error messages: "file 'X', row group G, row R" or "image 'P'".
  virtual std::string where(int64_t i) const = 0;

 protected:
  void check_index(int64_t i) const {
    TQ_CHECK(i >= 0 && i < size(), "dataset row ", i, " out of range (", size(), " rows)");
  }
};

inline std::string read_whole_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  TQ_CHECK(in.good(), "cannot open '", p.string(), "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  TQ_CHECK(!in.bad(), "cannot read '", p.string(), "'");
  return ss.str();
}

// ---- parquet -------------------------------------------------------------------------------

class ParquetDataset : public Dataset {
 public:
  // Column paths; caption columns default to every top-level caption* leaf in schema order.
  explicit ParquetDataset(std::vector<std::string> files, size_t cache_bytes = size_t{2} << 30)
      : cache_bytes_(cache_bytes) {
    TQ_CHECK(!files.empty(), "no parquet files given");
    int64_t total = 0;
    for (auto& f : files) {
      Shard s;
      s.file = std::make_unique<ParquetFile>(f);
      s.first_row = total;
      s.image = s.file->leaf_index({"image", "bytes"});
      s.path = s.file->find_leaf({"image", "path"});
      for (size_t l = 0; l < s.file->leaves().size(); ++l) {
        const auto& p = s.file->leaves()[l].path;
        if (p.size() == 1 && p[0].rfind("caption", 0) == 0) s.captions.push_back(l);
      }
      TQ_CHECK(!s.captions.empty(), "file '", f, "': missing column 'caption_1' (no caption* columns)");
      if (!shards_.empty())
        TQ_CHECK(s.captions.size() == shards_[0].captions.size(), "file '", f, "' has ",
                 s.captions.size(), " caption columns but '", shards_[0].file->name(), "' has ",
                 shards_[0].captions.size());
      total += s.file->num_rows();
      shards_.push_back(std::move(s));
    }
    size_ = total;
  }

  int64_t size() const override { return size_; }
  size_t num_shards() const { return shards_.size(); }

  Row row(int64_t i) const override {
    check_index(i);
    auto [s, g, r] = locate(i);
    auto data = group(s, g);
    Row out;
    const auto& img = data->columns[0];
    if (img.values[r]) out.image = std::string(*img.values[r]);
    if (data->has_path && data->columns[1].values[r]) out.image_path = std::string(*data->columns[1].values[r]);
    for (size_t c = data->first_caption; c < data->columns.size(); ++c) {
      const auto& v = data->columns[c].values[r];
      out.captions.push_back(v ? std::optional<std::string>(std::string(*v)) : std::nullopt);
    }
    return out;
  }

  std::string where(int64_t i) const override {
    check_index(i);
    auto [s, g, r] = locate(i);
    const auto& f = *shards_[s].file;
    return str_cat("file '", f.name(), "', row group ", g, ", row ", f.row_group_first_row(g) + r);
  }

 private:
  struct Shard {
    std::unique_ptr<ParquetFile> file;
    int64_t first_row = 0;
    size_t image = 0;
    std::optional<size_t> path;
    std::vector<size_t> captions;
  };
  struct GroupData {
    std::vector<ByteArrayColumn> columns;  // image.bytes, [image.path], captions...
    bool has_path = false;
    size_t first_caption = 1;
    size_t bytes = 0;
  };
  using Key = std::pair<size_t, size_t>;

  std::tuple<size_t, size_t, size_t> locate(int64_t i) const {
    size_t s = 0;
    while (s + 1 < shards_.size() && shards_[s + 1].first_row <= i) ++s;
    int64_t local = i - shards_[s].first_row;
    const ParquetFile& f = *shards_[s].file;
    // Row groups are few (hundreds); a binary search keeps lookups cheap regardless.
    size_t lo = 0, hi = f.num_row_groups();
    while (hi - lo > 1) {
      size_t mid = (lo + hi) / 2;
      if (f.row_group_first_row(mid) <= local) lo = mid;
      else hi = mid;
    }
    return {s, lo, static_cast<size_t>(local - f.row_group_first_row(lo))};
  }

  std::shared_ptr<const GroupData> decode_group(size_t s, size_t g) const {
    const Shard& sh = shards_[s];
    auto d = std::make_shared<GroupData>();
    d->columns.push_back(sh.file->read_column(g, sh.image));
    if (sh.path) {
      d->columns.push_back(sh.file->read_column(g, *sh.path));
      d->has_path = true;
    }
    d->first_caption = d->columns.size();
    for (size_t c : sh.captions) d->columns.push_back(sh.file->read_column(g, c));
    for (const auto& c : d->columns) {
      d->bytes += c.values.size() * sizeof(c.values[0]);
      for (const auto& b : c.buffers) d->bytes += b.size();
    }
    return d;
  }

  // Decoded row groups, least recently used first out once over the byte budget. A group being
  // decoded by one thread is awaited by the others rather than decoded twice.
  std::shared_ptr<const GroupData> group(size_t s, size_t g) const {
    Key key{s, g};
    std::shared_future<std::shared_ptr<const GroupData>> fut;
    std::promise<std::shared_ptr<const GroupData>> promise;
    bool mine = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = cache_.find(key);
      if (it != cache_.end()) {
        lru_.splice(lru_.end(), lru_, it->second.lru);
        fut = it->second.future;
      } else {
        fut = promise.get_future().share();
        lru_.push_back(key);
        cache_[key] = Entry{fut, std::prev(lru_.end()), 0};
        mine = true;
      }
    }
    if (mine) {
      try {
        auto d = decode_group(s, g);
        promise.set_value(d);
        std::lock_guard<std::mutex> lock(mu_);
        cache_[key].bytes = d->bytes;
        cached_bytes_ += d->bytes;
        evict_locked(key);
      } catch (...) {
        promise.set_exception(std::current_exception());
        std::lock_guard<std::mutex> lock(mu_);
        auto it = cache_.find(key);
        if (it != cache_.end()) {
          lru_.erase(it->second.lru);
          cache_.erase(it);
        }
      }
    }
    return fut.get();
  }

  void evict_locked(const Key& keep) const {
    while (cached_bytes_ > cache_bytes_ && !lru_.empty() && lru_.front() != keep) {
      auto it = cache_.find(lru_.front());
      cached_bytes_ -= it->second.bytes;
      cache_.erase(it);
      lru_.pop_front();
    }
  }

  struct Entry {
    std::shared_future<std::shared_ptr<const GroupData>> future;
    std::list<Key>::iterator lru;
    size_t bytes = 0;
  };

  std::vector<Shard> shards_;
  int64_t size_ = 0;
  size_t cache_bytes_;
  mutable std::mutex mu_;
  mutable std::map<Key, Entry> cache_;
  mutable std::list<Key> lru_;
  mutable size_t cached_bytes_ = 0;
};

// Parquet files of an HF dataset directory in name order. When the files follow HF's split naming,
// the train split is taken (RISC on the Hub has only train).
inline std::vector<std::string> hf_parquet_files(const fs::path& dir) {
  std::vector<fs::path> all;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".parquet") all.push_back(e.path());
  std::sort(all.begin(), all.end(), [&](const fs::path& a, const fs::path& b) {
    return fs::relative(a, dir).string() < fs::relative(b, dir).string();
  });
  std::vector<std::string> train, rest;
  for (const auto& p : all) {
    const std::string name = p.filename().string();
    (name.rfind("train", 0) == 0 || p.parent_path().filename() == "train" ? train : rest)
        .push_back(p.string());
  }
  return train.empty() ? rest : train;
}

// ---- image folders and annotation files ----------------------------------------------------

struct FileEntry {
  fs::path image;
  std::vector<std::optional<std::string>> captions;
  std::string origin;  // "captions.csv line 12"
};

class FileListDataset : public Dataset {
 public:
  explicit FileListDataset(std::vector<FileEntry> entries) : entries_(std::move(entries)) {}
  int64_t size() const override { return static_cast<int64_t>(entries_.size()); }
  Row row(int64_t i) const override {
    check_index(i);
    const FileEntry& e = entries_[static_cast<size_t>(i)];
    Row r;
    r.image_path = e.image.filename().string();
    if (fs::is_regular_file(e.image)) r.image = read_whole_file(e.image);
    r.captions = e.captions;
    return r;
  }
  std::string where(int64_t i) const override {
    check_index(i);
    const FileEntry& e = entries_[static_cast<size_t>(i)];
    return str_cat("image '", e.image.string(), "' (", e.origin, ", row ", i, ")");
  }

 private:
  std::vector<FileEntry> entries_;
};

// First existing candidate among the usual image sub-folders; the plain join when none exists
// (the missing image is then reported, with its row, when it is read).
inline fs::path resolve_image(const fs::path& root, const std::string& name,
                              const std::vector<std::string>& extra_dirs = {}) {
  std::vector<fs::path> cands{root / name};
  for (const auto& d : extra_dirs) cands.push_back(root / d / name);
  for (const char* d : {"images", "resized", "imgs", "image"}) cands.push_back(root / d / name);
  for (const auto& c : cands)
    if (fs::is_regular_file(c)) return c;
  return cands[0];
}

// RFC 4180 CSV: quoted fields may hold commas, quotes ("") and newlines.
inline std::vector<std::vector<std::string>> parse_csv(const std::string& text, const std::string& name) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false, any = false;
  for (size_t i = 0; i < text.size(); ++i) {
    char ch = text[i];
    if (quoted) {
      if (ch == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') field += '"', ++i;
        else quoted = false;
      } else {
        field += ch;
      }
      continue;
    }
    if (ch == '"') quoted = true, any = true;
    else if (ch == ',') row.push_back(std::move(field)), field.clear(), any = true;
    else if (ch == '\n' || ch == '\r') {
      if (ch == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      if (any || !field.empty()) row.push_back(std::move(field)), rows.push_back(std::move(row));
      field.clear(), row.clear(), any = false;
    } else {
      field += ch, any = true;
    }
  }
  TQ_CHECK(!quoted, "'", name, "': unterminated quoted field");
  if (any || !field.empty()) row.push_back(std::move(field)), rows.push_back(std::move(row));
  return rows;
}

inline bool is_image_key(const std::string& k) {
  return k == "image" || k == "filename" || k == "file_name" || k == "file" || k == "image_path";
}

inline std::vector<FileEntry> read_captions_csv(const fs::path& csv) {
  const auto rows = parse_csv(read_whole_file(csv), csv.string());
  TQ_CHECK(!rows.empty(), "'", csv.string(), "': empty CSV");
  const auto& hdr = rows[0];
  std::optional<size_t> img;
  std::vector<size_t> caps;
  for (size_t c = 0; c < hdr.size(); ++c) {
    if (!img && is_image_key(hdr[c])) img = c;
    else if (hdr[c].rfind("caption", 0) == 0 || hdr[c] == "text" || hdr[c] == "raw") caps.push_back(c);
  }
  TQ_CHECK(img && !caps.empty(), "'", csv.string(),
           "': missing column: need an image column (image/filename/file_name) and caption* columns");
  std::vector<FileEntry> out;
  const fs::path root = csv.parent_path();
  for (size_t r = 1; r < rows.size(); ++r) {
    const auto& row = rows[r];
    TQ_CHECK(*img < row.size(), "'", csv.string(), "' row ", r, ": no image field");
    FileEntry e;
    e.image = resolve_image(root, row[*img]);
    for (size_t c : caps) {
      // An empty or NaN cell is a missing caption (pandas writes NaN as empty).
      if (c < row.size() && !row[c].empty() && row[c] != "NaN" && row[c] != "nan")
        e.captions.emplace_back(row[c]);
      else
        e.captions.emplace_back(std::nullopt);
    }
    e.origin = str_cat(csv.filename().string(), " row ", r);
    out.push_back(std::move(e));
  }
  return out;
}

inline std::vector<std::optional<std::string>> captions_of_object(const nlohmann::json& j) {
  std::vector<std::optional<std::string>> caps;
  auto add = [&caps](const nlohmann::json& v) {
    if (v.is_string()) caps.emplace_back(v.get<std::string>());
    else if (v.is_object() && v.contains("raw") && v["raw"].is_string()) caps.emplace_back(v["raw"].get<std::string>());
    else caps.emplace_back(std::nullopt);
  };
  for (const char* k : {"captions", "sentences", "text"})
    if (j.contains(k) && j[k].is_array()) {
      for (const auto& v : j[k]) add(v);
      return caps;
    }
  std::vector<std::pair<std::string, const nlohmann::json*>> keyed;
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key().rfind("caption", 0) == 0 || it.key().rfind("raw", 0) == 0 || it.key() == "text")
      keyed.emplace_back(it.key(), &it.value());
  // raw, raw_1, ..., caption_1, ...: natural order (raw < raw_1 as strings already).
  std::sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) {
    return a.first.size() != b.first.size() ? a.first.size() < b.first.size() : a.first < b.first;
  });
  for (const auto& [k, v] : keyed) add(*v);
  return caps;
}

inline std::string image_name_of(const nlohmann::json& j, const std::string& where) {
  for (const char* k : {"image", "filename", "file_name", "file", "image_path"})
    if (j.contains(k) && j[k].is_string()) return j[k].get<std::string>();
  fail(str_cat(where, ": no image file name (image/filename/file_name)"));
}

inline std::vector<FileEntry> read_captions_jsonl(const fs::path& path) {
  std::ifstream in(path);
  TQ_CHECK(in.good(), "cannot open '", path.string(), "'");
  std::vector<FileEntry> out;
  std::string line;
  for (size_t ln = 1; std::getline(in, line); ++ln) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string w = str_cat("'", path.string(), "' line ", ln);
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    TQ_CHECK(j.is_object(), w, ": not a JSON object");
    FileEntry e;
    e.image = resolve_image(path.parent_path(), image_name_of(j, w));
    e.captions = captions_of_object(j);
    e.origin = str_cat(path.filename().string(), " line ", ln);
    out.push_back(std::move(e));
  }
  return out;
}

// Karpathy JSON ({"images": [...]}) or the NWPU variant ({"<class>": [...], ...}).
inline std::vector<FileEntry> read_karpathy_json(const fs::path& path) {
  nlohmann::json j = nlohmann::json::parse(read_whole_file(path), nullptr, false);
  TQ_CHECK(j.is_object(), "'", path.string(), "': not a JSON object");
  const fs::path root = path.parent_path();
  std::vector<FileEntry> out;
  auto add = [&](const nlohmann::json& img, const std::string& cls, size_t k) {
    const std::string w = str_cat("'", path.string(), "' image ", k);
    TQ_CHECK(img.is_object(), w, ": not an object");
    FileEntry e;
    std::string name = image_name_of(img, w);
    if (img.contains("filepath") && img["filepath"].is_string())
      name = (fs::path(img["filepath"].get<std::string>()) / name).string();
    std::vector<std::string> dirs;
    if (!cls.empty()) dirs = {cls, "images/" + cls};
    e.image = resolve_image(root, name, dirs);
    e.captions = captions_of_object(img);
    e.origin = str_cat(path.filename().string(), " image ", k);
    out.push_back(std::move(e));
  };
  if (j.contains("images") && j["images"].is_array()) {
    size_t k = 0;
    for (const auto& img : j["images"]) add(img, "", k++);
  } else {
    for (auto it = j.begin(); it != j.end(); ++it) {
      TQ_CHECK(it.value().is_array(), "'", path.string(), "': neither {\"images\": [...]} nor ",
               "class-keyed lists (key '", it.key(), "')");
      size_t k = 0;
      for (const auto& img : it.value()) add(img, it.key(), k++);
    }
  }
  return out;
}

// Opens whatever `path` is: HF dataset dir, .parquet, folder with captions.csv/.jsonl, .csv,
// .jsonl or Karpathy .json.
inline std::unique_ptr<Dataset> open_dataset(const std::string& path_str) {
  const fs::path path(path_str);
  TQ_CHECK(fs::exists(path), "dataset path '", path_str, "' does not exist");
  if (fs::is_directory(path)) {
    auto files = hf_parquet_files(path);
    if (!files.empty()) return std::make_unique<ParquetDataset>(files);
    if (fs::is_regular_file(path / "captions.csv"))
      return std::make_unique<FileListDataset>(read_captions_csv(path / "captions.csv"));
    for (const char* n : {"captions.jsonl", "metadata.jsonl"})
      if (fs::is_regular_file(path / n)) return std::make_unique<FileListDataset>(read_captions_jsonl(path / n));
    for (const auto& e : fs::directory_iterator(path))
      if (e.path().extension() == ".json") return std::make_unique<FileListDataset>(read_karpathy_json(e.path()));
    fail(str_cat("dataset directory '", path_str,
                 "' holds no .parquet files, captions.csv, captions.jsonl or Karpathy .json"));
  }
  const std::string ext = path.extension().string();
  if (ext == ".parquet") return std::make_unique<ParquetDataset>(std::vector<std::string>{path_str});
  if (ext == ".csv") return std::make_unique<FileListDataset>(read_captions_csv(path));
  if (ext == ".jsonl") return std::make_unique<FileListDataset>(read_captions_jsonl(path));
  if (ext == ".json") return std::make_unique<FileListDataset>(read_karpathy_json(path));
  fail(str_cat("dataset path '", path_str, "': unknown kind (expected a directory, .parquet, .csv, ",
               ".jsonl or .json)"));
}

}  // namespace tq::risc
