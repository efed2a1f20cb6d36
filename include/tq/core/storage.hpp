// Storage: a reference-counted block of bytes on one device. Tensors are views into a Storage;
// many tensors may share one. External memory (an mmap'd safetensors file) is wrapped without a
// copy: the holder keeps the mapping alive as long as any tensor looks at it.
#pragma once

#include <memory>

#include "tq/core/device.hpp"

namespace tq {

class Storage {
 public:
  // Allocates `bytes` on `device` through its backend.
  static std::shared_ptr<Storage> allocate(size_t bytes, Device device) {
    auto s = std::make_shared<Storage>();
    s->bytes_ = bytes;
    s->device_ = device;
    DeviceBackend* b = &backend(device);
    void* p = b->allocate(bytes, device);
    s->data_ = std::shared_ptr<void>(p, [b, bytes, device](void* q) { b->deallocate(q, bytes, device); });
    return s;
  }
  // Wraps memory owned elsewhere; `holder` keeps it alive.
  static std::shared_ptr<Storage> wrap(void* data, size_t bytes, Device device, std::shared_ptr<void> holder) {
    auto s = std::make_shared<Storage>();
    s->bytes_ = bytes;
    s->device_ = device;
    s->data_ = std::shared_ptr<void>(std::move(holder), data);
    return s;
  }

  void* data() const { return data_.get(); }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  std::shared_ptr<void> data_;
  size_t bytes_ = 0;
  Device device_;
};

}  // namespace tq
