// CUDA dropout (Philox, bit-identical masks to the CPU).
// (Placeholder: the kernels and their registration land here.)
#pragma once

#include "kernels/copy.cuh"

namespace tq::cuda {

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_dropout_kernels() {}

}  // namespace tq::cuda
