// A read-only memory mapping of a whole file. Parquet shards are read through it so that only the
// pages of the columns we ask for are ever paged in, and PLAIN uncompressed values can be handed
// out as views without copying.
#pragma once

#include <tq/core/error.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

namespace tq::risc {

class MappedFile {
 public:
  explicit MappedFile(std::string path) : path_(std::move(path)) {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    TQ_CHECK(fd >= 0, "cannot open '", path_, "': ", std::strerror(errno));
    struct stat st{};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(str_cat("'", path_, "' is not a regular file"));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      int err = errno;
      ::close(fd);
      TQ_CHECK(p != MAP_FAILED, "cannot mmap '", path_, "': ", std::strerror(err));
      data_ = static_cast<const uint8_t*>(p);
    } else {
      ::close(fd);
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Hint that a byte range is about to be read (one column chunk).
  void will_need(size_t offset, size_t length) const {
    if (!data_ || length == 0) return;
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    size_t start = offset / page * page;
    ::madvise(const_cast<uint8_t*>(data_) + start, offset + length - start, MADV_WILLNEED);
  }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace tq::risc
