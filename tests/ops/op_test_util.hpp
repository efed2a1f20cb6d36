// Helpers shared by the op tests.
#pragma once

#include <memory>
#include <vector>

#include <tq/tq.hpp>

namespace tq::test {

// A tensor that claims to live on cuda:0 (host bytes behind it, never dereferenced): device-
// mismatch and "no CUDA kernel" errors can be tested without a GPU.
inline Tensor fake_cuda(const Shape& s, DType dt) {
  auto buf = std::make_shared<std::vector<char>>(size_t(numel_of(s)) * dtype_size(dt));
  return Tensor::from_blob(buf->data(), s, dt, Device::cuda(), buf);
}

}  // namespace tq::test
