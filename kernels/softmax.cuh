// CUDA softmax / log_softmax forward and backward.
// (Placeholder: the kernels and their registration land here.)
#pragma once

#include "kernels/copy.cuh"

namespace tq::cuda {

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_softmax_kernels() {}

}  // namespace tq::cuda
