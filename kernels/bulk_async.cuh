// The sm_90 bulk asynchronous copies between shared and global memory (the TMA unit's non-tensor
// and bookkeeping side), for the issuing thread: a bulk store, the bulk-group commit and waits, and
// the proxy fence that makes a CTA's ordinary shared-memory writes visible to them. Callers use
// them only in sm_90 code. Standalone (no tq headers), like kernels/pdl.cuh, so that kernels/gemm/
// can use it too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tq::cuda {

// `bytes` (a multiple of 16) from shared memory at `src` (a shared-window address) to `dst` (global,
// 16-byte aligned), as one bulk copy of the current bulk group.
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Until at most N of this thread's committed bulk groups still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
// Until every committed bulk group of this thread has completed.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// This thread's earlier shared-memory writes, visible to later bulk (async-proxy) reads once the
// CTA has met a barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

}  // namespace tq::cuda
