// Timing helper shared by the CUDA benchmarks: `reps` calls captured as one CUDA graph on `stream`
// (tq ops run on it while it is current), one warm launch, then the median of `launches` timed
// launches (CUDA events), per call. Warm-up calls before the capture are the caller's. graph_time
// adds the stream and the warm-up; copy_time is the same-size device-to-device copy that the
// `vs_copy` counters divide by; rotating_copies sizes the input rotation.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include <tq/tq.hpp>

#include "kernels/device.cuh"

namespace tq::bench {

inline double graph_seconds_per_call(tq::cuda::Stream& stream, int reps, const std::function<void(int)>& call,
                                     int launches = 9) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  TQ_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < reps; ++i) call(i);
  TQ_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  TQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  TQ_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
  stream.synchronize();
  cudaEvent_t e0, e1;
  TQ_CUDA_CHECK(cudaEventCreate(&e0));
  TQ_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> per_call;
  for (int it = 0; it < launches; ++it) {
    TQ_CUDA_CHECK(cudaEventRecord(e0, stream.get()));
    TQ_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
    TQ_CUDA_CHECK(cudaEventRecord(e1, stream.get()));
    TQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    TQ_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    per_call.push_back(double(ms) * 1e-3 / reps);
  }
  TQ_CUDA_CHECK(cudaEventDestroy(e0));
  TQ_CUDA_CHECK(cudaEventDestroy(e1));
  TQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
  TQ_CUDA_CHECK(cudaGraphDestroy(graph));
  std::sort(per_call.begin(), per_call.end());
  return per_call[per_call.size() / 2];
}

// How many copies of a `bytes`-sized input one timed pass rotates over: together at least 256 MiB,
// several times the H200's 60 MB L2, so each call streams from HBM rather than re-reading L2.
inline int rotating_copies(double bytes) {
  return int(std::clamp<double>(std::floor(double(size_t(256) << 20) / std::max(bytes, 1.0)) + 1, 2, 512));
}

// Median seconds per call of call(i), i = 0 .. reps-1, on a fresh stream that is current for tq ops:
// one warm-up pass outside the capture, then graph_seconds_per_call.
inline double graph_time(int reps, const std::function<void(int)>& call, int launches = 9) {
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  for (int i = 0; i < reps; ++i) call(i);
  stream.synchronize();
  return graph_seconds_per_call(stream, reps, call, launches);
}

// Seconds per call of a device-to-device copy of `half` bytes (as many read as written) over `reps`
// rotating buffer pairs, timed as graph_time times: the same-size reference of `vs_copy`.
inline double copy_time(int64_t half, int reps) {
  std::vector<Tensor> src, dst;
  for (int c = 0; c < reps; ++c) {
    src.push_back(Tensor::empty({half}, DType::u8, Device::cuda(0)));
    dst.push_back(Tensor::empty({half}, DType::u8, Device::cuda(0)));
  }
  return graph_time(reps, [&](int i) {
    TQ_CUDA_CHECK(cudaMemcpyAsync(dst[size_t(i)].data_ptr(), src[size_t(i)].data_ptr(), size_t(half),
                                  cudaMemcpyDeviceToDevice, tq::cuda::current_stream()));
  });
}

// Median seconds of a cudaMemsetAsync over `bytes`, rotating over `reps` buffers: the write-only
// rate, the reference for kernels that mostly write.
inline double memset_time(int64_t bytes, int reps) {
  std::vector<Tensor> dst;
  for (int c = 0; c < reps; ++c) dst.push_back(Tensor::empty({bytes}, DType::u8, Device::cuda(0)));
  return graph_time(reps, [&](int i) {
    TQ_CUDA_CHECK(cudaMemsetAsync(dst[size_t(i)].data_ptr(), 0, size_t(bytes), tq::cuda::current_stream()));
  });
}

}  // namespace tq::bench
