// <tq/cuda.hpp>: the CUDA backend of tq.
//
// Include this header in exactly ONE CUDA translation unit (.cu) of a program, like an stb
// IMPLEMENTATION file:
//
//     // my_app_cuda.cu
//     #include <tq/cuda.hpp>
//
// That translation unit compiles every kernel under kernels/ and, through a static initializer,
// registers them: the CudaBackend into backend_slot(DeviceType::cuda) (memory, copies, streams),
// the Tensor copy_/fill_ hooks, and the kernel tables of each op family
// (ops::cuda_elementwise_kernels(), ops::cuda_reduce_kernels(), cuda_random_kernels()). Every other
// translation unit stays plain C++: it includes <tq/tq.hpp> and uses CUDA tensors through the same
// tq:: API; the ops dispatch through those tables when a tensor is on CUDA. Without this header an
// op on a CUDA tensor throws tq::Error naming it.
//
// (Including it in a second .cu is harmless — the registration is an inline variable, initialized
// once — but compiles every kernel again for nothing.)
//
// Host-side helpers for CUDA code (streams, pinned buffers, memory statistics, device queries)
// are in kernels/device.cuh under tq::cuda; they need no registration and any .cu may include them.
#pragma once

#if !defined(__CUDACC__)
#error "<tq/cuda.hpp> compiles CUDA kernels: include it from a .cu file built by nvcc"
#endif

#include "tq/tq.hpp"

#include "kernels/cuda_check.cuh"
#include "kernels/device.cuh"
#include "kernels/copy.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/reduce.cuh"
#include "kernels/random.cuh"
#include "kernels/norm.cuh"
#include "kernels/rope.cuh"
#include "kernels/softmax.cuh"
#include "kernels/index.cuh"
#include "kernels/patch_embed.cuh"
#include "kernels/dropout.cuh"
#include "kernels/cross_entropy.cuh"
#include "kernels/geglu.cuh"
#include "kernels/attention/attention.cuh"
#include "kernels/matmul.cuh"
#include "kernels/linear_cross_entropy.cuh"
#include "kernels/nf4.cuh"
#include "kernels/adamw.cuh"
#include "kernels/nccl.cuh"  // data-parallel communicator (registers nothing without TQ_WITH_NCCL)

namespace tq::cuda {

// Puts the backend, the copy/fill hooks and every kernel table into their slots.
inline bool register_cuda_backend() {
  backend_slot(DeviceType::cuda) = &backend();
  device_copy_hook() = &copy_tensor;
  device_fill_hook() = &fill_tensor;
  ops::ElementwiseCudaKernels& ew = ops::cuda_elementwise_kernels();
  ew.binary = &cuda::binary;
  ew.unary = &cuda::unary;
  ew.unary_backward = &cuda::unary_backward;
  ops::cuda_reduce_kernels().reduce = &cuda::reduce;
  cuda_random_kernels().fill = &random_fill;
  register_norm_kernels();
  register_rope_kernels();
  register_softmax_kernels();
  register_index_kernels();
  register_patch_embed_kernels();
  register_dropout_kernels();
  register_cross_entropy_kernels();
  register_geglu_kernels();
  register_attention_kernels();
  register_matmul_kernels();
  register_linear_cross_entropy_kernels();
  register_nf4_kernels();
  register_adamw_kernels();
  register_nccl_backend();
  return true;
}

// The static initializer (an inline variable: one initialization per program).
inline const bool cuda_backend_registered = register_cuda_backend();

}  // namespace tq::cuda
