// Devices, streams and the backend table.
//
// A Device names where memory lives (CPU or CUDA ordinal). Memory and copies go through a
// DeviceBackend: the CPU one is always present; the CUDA backend registers itself when a CUDA
// translation unit includes <tq/cuda.hpp>, so plain C++ users of tq never link CUDA.
// Each thread has a current stream per device type (a null handle = the default stream); ops
// enqueue work on it and never synchronize the device themselves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>

#include "tq/core/error.hpp"

namespace tq {

enum class DeviceType : uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  bool is_cuda() const { return type == DeviceType::cuda; }
  bool operator==(const Device&) const = default;
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

  // "cpu", "cuda", "cuda:1".
  static Device parse(const std::string& s) {
    if (s == "cpu") return cpu();
    if (s == "cuda") return cuda(0);
    if (s.rfind("cuda:", 0) == 0) return cuda(std::stoi(s.substr(5)));
    fail(str_cat("unknown device '", s, "' (expected cpu, cuda or cuda:N)"));
  }
};

inline std::ostream& operator<<(std::ostream& os, const Device& d) { return os << d.str(); }

// An opaque stream handle (cudaStream_t on CUDA); nullptr = default stream.
struct Stream {
  void* handle = nullptr;
};

inline Stream& current_stream_slot(DeviceType t) {
  thread_local Stream streams[2];
  return streams[static_cast<int>(t)];
}
inline Stream current_stream(Device d) { return current_stream_slot(d.type); }

// Makes `s` the current stream of its device type on this thread for the guard's lifetime.
class StreamGuard {
 public:
  StreamGuard(DeviceType t, Stream s) : type_(t), prev_(current_stream_slot(t)) {
    current_stream_slot(t) = s;
  }
  ~StreamGuard() { current_stream_slot(type_) = prev_; }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  DeviceType type_;
  Stream prev_;
};

struct MemoryStats {
  size_t current = 0;
  size_t peak = 0;
};

// What a device type must provide. allocate/deallocate are stream-ordered where the device
// supports it; copy is asynchronous on the current stream except when a CPU pointer is involved
// that the caller will read right away (copy_to_host waits).
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual void* allocate(size_t bytes, Device d) = 0;
  virtual void deallocate(void* p, size_t bytes, Device d) = 0;
  // Copies `bytes` between any two devices this backend can see (at least one is its own).
  virtual void copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) = 0;
  virtual void fill_zero(void* p, size_t bytes, Device d) = 0;
  virtual void synchronize(Device d) = 0;
  virtual MemoryStats memory_stats(Device d) = 0;
  // Devices of this type that can be used now (0 when a driver or device is missing).
  virtual int device_count() { return 1; }
  // Starts a new peak for memory_stats(d).peak (the current use becomes the peak).
  virtual void reset_peak_memory(Device d) {}
};

class CpuBackend final : public DeviceBackend {
 public:
  static constexpr size_t kAlign = 64;
  void* allocate(size_t bytes, Device) override {
    size_t n = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, n == 0 ? kAlign : n);
    TQ_CHECK(p != nullptr, "cpu: out of memory allocating ", bytes, " bytes");
    std::lock_guard lock(mu_);
    stats_.current += bytes;
    if (stats_.current > stats_.peak) stats_.peak = stats_.current;
    return p;
  }
  void deallocate(void* p, size_t bytes, Device) override {
    std::free(p);
    std::lock_guard lock(mu_);
    stats_.current -= bytes;
  }
  void copy(void* dst, Device, const void* src, Device, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void fill_zero(void* p, size_t bytes, Device) override { std::memset(p, 0, bytes); }
  void synchronize(Device) override {}
  MemoryStats memory_stats(Device) override {
    std::lock_guard lock(mu_);
    return stats_;
  }

 private:
  std::mutex mu_;
  MemoryStats stats_;
};

inline DeviceBackend*& backend_slot(DeviceType t) {
  static CpuBackend cpu;
  static DeviceBackend* slots[2] = {&cpu, nullptr};
  return slots[static_cast<int>(t)];
}

inline DeviceBackend& backend(Device d) {
  DeviceBackend* b = backend_slot(d.type);
  TQ_CHECK(b != nullptr, "device ", d.str(),
           ": the CUDA backend is not compiled in (build with TQ_CUDA=ON and include <tq/cuda.hpp>"
           " in a CUDA translation unit)");
  return *b;
}

inline bool cuda_available() { return backend_slot(DeviceType::cuda) != nullptr; }

// Checks that `d` can be used in this program on this machine, with one clear error otherwise.
inline void require_device_usable(Device d) {
  if (d.is_cpu()) return;
  TQ_CHECK(cuda_available(), "device ", d.str(), ": this program was built without the CUDA backend "
           "(configure with -DTQ_CUDA=ON on a machine with nvcc)");
  const int n = backend_slot(DeviceType::cuda)->device_count();
  TQ_CHECK(n > 0, "device ", d.str(), ": no CUDA device is visible (no GPU, or no driver)");
  TQ_CHECK(d.index >= 0 && d.index < n, "device ", d.str(), ": only ", n, " CUDA device(s) are visible");
}

inline void synchronize(Device d) { backend(d).synchronize(d); }
inline MemoryStats memory_stats(Device d) { return backend(d).memory_stats(d); }

}  // namespace tq
