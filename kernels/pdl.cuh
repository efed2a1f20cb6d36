// Programmatic dependent launch (sm_90+), the device side and its A/B switches. A kernel launched
// with cudaLaunchAttributeProgrammaticStreamSerialization may be scheduled while the kernel before
// it in the stream is still finishing. Inside it, grid_dependents_launch() lets the next such kernel
// be scheduled (its blocks take SMs as this grid's blocks leave them), and grid_dependency_wait()
// returns once the previous grid has completed and its writes are visible. Everything before the
// wait may touch only registers and shared memory. Both are no-ops in a plain launch and before
// sm_90. Standalone (no tq headers), so that kernels/gemm/ can use it too.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

namespace tq::cuda {

__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The launch attribute that makes a launch (cudaLaunchKernelEx) a programmatic dependent of the
// previous kernel in its stream.
inline cudaLaunchAttribute programmatic_attribute() {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

// An environment switch that is on unless set to "0" (the A/B switches of the programmatic
// launches, e.g. TQ_GEMM_PDL=0), read once by the caller's static.
inline bool env_switch_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && e[0] == '0');
}

// An environment switch that is off unless set to "1" (a path not yet measured on a GPU, opted into
// for its tests and benchmarks, e.g. TQ_NF4_DEQ_BULK=1).
inline bool env_opt_in(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && e[0] == '1';
}

}  // namespace tq::cuda
