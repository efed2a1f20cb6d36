// Timing helper shared by the CUDA benchmarks: `reps` calls captured as one CUDA graph on `stream`
// (tq ops run on it while it is current), one warm launch, then the median of `launches` timed
// launches (CUDA events), per call. Warm-up calls before the capture are the caller's.
#pragma once

#include <algorithm>
#include <functional>
#include <vector>

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

}  // namespace tq::bench
