// The CUDA device backend: memory, copies, streams, pinned host buffers, device queries.
//
// Invariants:
// - Memory comes from the stream-ordered allocator (cudaMallocAsync/cudaFreeAsync on the calling
//   thread's current stream, from each device's default pool). The pool's release threshold is
//   set to "never", so freed blocks stay cached in the pool instead of going back to the driver;
//   release_cached_memory() trims it explicitly.
// - A block is freed on the stream that is current when its last tensor dies. Work that used it
//   on another stream must be ordered before that (as with any stream-ordered allocator).
// - Nothing here synchronizes the device except: a copy whose destination is host memory (it
//   waits for the current stream so the host may read at once), synchronize(), and
//   release_cached_memory(). Everything else is capturable into a CUDA graph.
// - Copies from pageable host memory return once the runtime has staged the source, so the
//   caller may free it; copies from pinned memory are truly asynchronous: keep the source alive
//   until the stream has passed the copy.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>

#include "kernels/cuda_check.cuh"
#include "kernels/pdl.cuh"
#include "tq/core/device.hpp"
#include "tq/core/tensor.hpp"

namespace tq::cuda {

inline constexpr int kMaxDevices = 64;

inline cudaStream_t to_cuda(tq::Stream s) { return static_cast<cudaStream_t>(s.handle); }
// The calling thread's current CUDA stream (tq::StreamGuard sets it; null = legacy default).
inline cudaStream_t current_stream() { return to_cuda(tq::current_stream(Device::cuda())); }

// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls are not confused
    return 0;
  }
  return n;
}

// Makes `index` the current device for the guard's lifetime (no call when it already is).
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    TQ_CHECK(index >= 0 && index < kMaxDevices, "cuda: invalid device index ", index);
    TQ_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != index) TQ_CUDA_CHECK(cudaSetDevice(index));
    cur_ = index;
  }
  ~DeviceGuard() {
    if (prev_ != cur_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0, cur_ = 0;
};

// Properties of device `index`, queried once (safe to call during graph capture afterwards).
inline const cudaDeviceProp& device_properties(int index) {
  TQ_CHECK(index >= 0 && index < kMaxDevices, "cuda: invalid device index ", index);
  static std::array<cudaDeviceProp, kMaxDevices> props;
  static std::array<std::once_flag, kMaxDevices> once;
  std::call_once(once[size_t(index)], [&] { TQ_CUDA_CHECK(cudaGetDeviceProperties(&props[size_t(index)], index)); });
  return props[size_t(index)];
}
inline int sm_count(int index) { return device_properties(index).multiProcessorCount; }

// Blocks for a grid-stride loop over `items` work items with `threads` threads per block: enough
// resident blocks to fill every SM a few times over, never more than the work needs.
inline unsigned grid_for(int64_t items, int threads, int device, int blocks_per_sm = 8) {
  const int64_t need = (items + threads - 1) / threads;
  const int64_t cap = int64_t(sm_count(device)) * blocks_per_sm;
  return unsigned(std::max<int64_t>(1, std::min(need, cap)));
}

// How launch_kernel launches: plainly; cooperatively (every block resident at once, or the launch
// fails: for a grid-wide barrier); or as a programmatic dependent of the previous kernel in the
// stream (it may start while that one finishes; griddepcontrol.wait in the kernel orders its reads).
enum class LaunchMode { plain, cooperative, programmatic };

// LaunchMode::programmatic when `wanted` and the device has programmatic dependent launch (sm_90+),
// else plain. The kernel must call grid_dependency_wait() before its first global access.
inline LaunchMode dependent_launch(bool wanted, int device) {
  return wanted && device_properties(device).major >= 9 ? LaunchMode::programmatic : LaunchMode::plain;
}

// kernel<<<grid, block, smem, stream>>>(args...) in `mode`, checked. Capturable into a CUDA graph.
template <class... P, class... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, LaunchMode mode,
                   A&&... args) {
  cudaLaunchAttribute attr{};
  if (mode == LaunchMode::cooperative) {
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
  } else if (mode == LaunchMode::programmatic) {
    attr = programmatic_attribute();
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = mode == LaunchMode::plain ? 0 : 1;
  TQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

// ---- streams ----

// An owned CUDA stream. Converts to tq::Stream, so `tq::StreamGuard g(DeviceType::cuda, s);`
// makes it the current stream for ops on this thread.
class Stream {
 public:
  // Blocking by default: it orders itself with the legacy default stream, so tensors made on
  // the default stream are safe to use on it. non_blocking opts out of that implicit ordering.
  explicit Stream(int device = 0, bool non_blocking = false) : device_(device) {
    DeviceGuard g(device);
    TQ_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, non_blocking ? cudaStreamNonBlocking : cudaStreamDefault));
  }
  ~Stream() {
    if (s_) (void)cudaStreamDestroy(s_);
  }
  Stream(Stream&& o) noexcept : s_(o.s_), device_(o.device_) { o.s_ = nullptr; }
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      if (s_) (void)cudaStreamDestroy(s_);
      s_ = o.s_;
      device_ = o.device_;
      o.s_ = nullptr;
    }
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return s_; }
  int device() const { return device_; }
  operator tq::Stream() const { return tq::Stream{s_}; }
  void synchronize() const { TQ_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
  int device_ = 0;
};

// ---- pinned host memory ----

// Page-locked host memory (cudaMallocHost): H2D/D2H copies from it run at full link speed and
// asynchronously. Move-only.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes) TQ_CUDA_CHECK(cudaMallocHost(&p_, bytes));
  }
  ~PinnedBuffer() {
    if (p_) (void)cudaFreeHost(p_);
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) (void)cudaFreeHost(p_);
      p_ = o.p_;
      bytes_ = o.bytes_;
      o.p_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return p_; }
  template <class T>
  T* as() const { return static_cast<T*>(p_); }
  size_t size() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// A CPU tensor whose storage is page-locked (freed with cudaFreeHost when the last view dies).
inline Tensor pinned_empty(const Shape& shape, DType dtype) {
  const size_t bytes = size_t(numel_of(shape)) * dtype_size(dtype);
  auto buf = std::make_shared<PinnedBuffer>(bytes);
  void* p = buf->data();
  return Tensor::from_blob(p, shape, dtype, Device::cpu(), std::shared_ptr<void>(buf, p));
}

// ---- the backend ----

// Statistics of a device's default memory pool (bytes), read from the driver: `reserved` is what
// the pool holds from the driver, `used` what is handed out to tensors.
struct PoolStats {
  uint64_t reserved_current = 0, reserved_high = 0, used_current = 0, used_high = 0;
};

class CudaBackend final : public DeviceBackend {
 public:
  void* allocate(size_t bytes, Device d) override {
    if (bytes == 0) return nullptr;
    DeviceGuard g(d.index);
    init_pool(d.index);
    void* p = nullptr;
    cudaError_t e = cudaMallocAsync(&p, bytes, current_stream());
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      MemoryStats s = memory_stats(d);
      fail(str_cat(d.str(), ": out of memory allocating ", bytes, " bytes (", s.current, " bytes in use by tq, peak ",
                   s.peak, ")"));
    }
    TQ_CUDA_CHECK(e);
    Counters& c = counters_[size_t(d.index)];
    const size_t now = c.current.fetch_add(bytes) + bytes;
    size_t peak = c.peak.load();
    while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
    }
    return p;
  }

  // Never throws (it runs from tensor destructors); errors go to stderr. At process exit the
  // runtime may be torn down before the last static tensor dies: that is not an error.
  void deallocate(void* p, size_t bytes, Device d) noexcept override {
    if (p == nullptr) return;
    counters_[size_t(d.index)].current.fetch_sub(bytes);
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    if (prev != d.index) (void)cudaSetDevice(d.index);
    cudaError_t e = cudaFreeAsync(p, current_stream());
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      if (e != cudaErrorCudartUnloading && e != cudaErrorContextIsDestroyed)
        std::fprintf(stderr, "tq: cudaFreeAsync failed on %s: %s\n", d.str().c_str(), cudaGetErrorString(e));
    }
    if (prev != d.index) (void)cudaSetDevice(prev);
  }

  void copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) override {
    if (bytes == 0) return;
    DeviceGuard g(dst_dev.is_cuda() ? dst_dev.index : src_dev.index);
    cudaStream_t s = current_stream();
    TQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
    if (dst_dev.is_cpu()) TQ_CUDA_CHECK(cudaStreamSynchronize(s));  // the host reads it next
  }

  void fill_zero(void* p, size_t bytes, Device d) override {
    if (bytes == 0) return;
    DeviceGuard g(d.index);
    TQ_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, current_stream()));
  }

  void synchronize(Device d) override {
    DeviceGuard g(d.index);
    TQ_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // Bytes handed to tensors by this backend (current and high-water mark since start or reset).
  MemoryStats memory_stats(Device d) override {
    const Counters& c = counters_[size_t(d.index)];
    return {c.current.load(), c.peak.load()};
  }

  int device_count() override { return tq::cuda::device_count(); }
  void reset_peak_memory(Device d) override { reset_peak(d); }

  void reset_peak(Device d) {
    Counters& c = counters_[size_t(d.index)];
    c.peak.store(c.current.load());
    DeviceGuard g(d.index);
    init_pool(d.index);
    uint64_t zero = 0;
    cudaMemPool_t pool = default_pool(d.index);
    TQ_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
    TQ_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
  }

  PoolStats pool_stats(Device d) {
    DeviceGuard g(d.index);
    init_pool(d.index);
    cudaMemPool_t pool = default_pool(d.index);
    PoolStats s;
    TQ_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &s.reserved_current));
    TQ_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &s.reserved_high));
    TQ_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &s.used_current));
    TQ_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &s.used_high));
    return s;
  }

  // Waits for the device, then returns the pool's unused cached blocks to the driver.
  void release_cached_memory(Device d) {
    DeviceGuard g(d.index);
    init_pool(d.index);
    TQ_CUDA_CHECK(cudaDeviceSynchronize());
    TQ_CUDA_CHECK(cudaMemPoolTrimTo(default_pool(d.index), 0));
  }

 private:
  struct Counters {
    std::atomic<size_t> current{0}, peak{0};
  };

  static cudaMemPool_t default_pool(int index) {
    cudaMemPool_t pool;
    TQ_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, index));
    return pool;
  }
  // Once per device: keep freed memory cached in the pool (threshold = never release).
  void init_pool(int index) {
    std::call_once(pool_once_[size_t(index)], [index] {
      uint64_t threshold = std::numeric_limits<uint64_t>::max();
      TQ_CUDA_CHECK(cudaMemPoolSetAttribute(default_pool(index), cudaMemPoolAttrReleaseThreshold, &threshold));
    });
  }

  std::array<Counters, kMaxDevices> counters_;
  std::array<std::once_flag, kMaxDevices> pool_once_;
};

// The one backend object; never destroyed, so tensors that outlive main() can still free.
inline CudaBackend& backend() {
  static CudaBackend* b = new CudaBackend();
  return *b;
}

inline MemoryStats memory_stats(int device = 0) { return backend().memory_stats(Device::cuda(device)); }
inline void reset_peak_memory_stats(int device = 0) { backend().reset_peak(Device::cuda(device)); }
inline PoolStats pool_stats(int device = 0) { return backend().pool_stats(Device::cuda(device)); }
inline void release_cached_memory(int device = 0) { backend().release_cached_memory(Device::cuda(device)); }
inline void synchronize(int device = 0) { backend().synchronize(Device::cuda(device)); }

}  // namespace tq::cuda
