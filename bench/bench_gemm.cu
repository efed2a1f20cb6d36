// GEMM: ours (tq::kernels::gemm, automatic kernel choice) vs cuBLASLt, same process, same inputs.
// Shapes: M in {1, 16, 1136, 4544} x (K, N) of the PaliGemma linears, for the forward y = x W^T
// ("fwd", NT), the input gradient dX = dY W ("dx", NN) and the weight gradient dW = dY^T X
// ("dw", TN). bf16 in, fp32 accumulate, bf16 out. Inputs rotate over enough copies that the
// working set is several times the L2, so a timed call never finds its operands cached by the
// previous one. Each benchmark reports the median over its timed iterations as TFLOPS.
// Names: gemm/<impl>/<op>/M/K/N; tools/bench_table.py pairs them into ratios.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <kernels/gemm/gemm.cuh>
#include <tests/cuda/gemm_test_util.cuh>

namespace {

using tq::kernels::GemmDType;
using tq::kernels::GemmParams;
using tq::testing::DevBuf;

enum class Op { fwd, dx, dw };

struct Problem {
  int m, n, k;
  bool ta, tb;
};

// (M, K, N) of y = x W^T, x (M, K), W (N, K) -> the GEMM each pass runs.
Problem problem_for(Op op, int M, int K, int N) {
  switch (op) {
    case Op::fwd: return {M, N, K, false, true};   // (M,K) x (N,K)^T
    case Op::dx: return {M, K, N, false, false};   // dY (M,N) x W (N,K)
    default: return {N, K, M, true, false};        // dY^T: dY (M,N) stored (K=M, N); X (M,K)
  }
}

void run_gemm(benchmark::State& state, bool cublas, Op op, int M, int K, int N) {
  if (!tq::testing::gpu_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const Problem pb = problem_for(op, M, K, N);
  const size_t a_elems = size_t(pb.m) * pb.k, b_elems = size_t(pb.n) * pb.k;
  const size_t set_bytes = (a_elems + b_elems) * 2;
  const int sets = static_cast<int>(std::clamp<size_t>((size_t(512) << 20) / set_bytes + 1, 2, 64));
  std::vector<DevBuf> as, bs;
  for (int s = 0; s < sets; ++s) {
    as.emplace_back(a_elems * 2);
    bs.emplace_back(b_elems * 2);
    tq::testing::fill_bf16(as.back().as(), a_elems, tq::testing::fresh_seed());
    tq::testing::fill_bf16(bs.back().as(), b_elems, tq::testing::fresh_seed());
  }
  DevBuf c(size_t(pb.m) * pb.n * 2);
  GemmParams p;
  p.M = pb.m, p.N = pb.n, p.K = pb.k;
  p.trans_a = pb.ta, p.trans_b = pb.tb;
  p.lda = pb.ta ? pb.m : pb.k;
  p.ldb = pb.tb ? pb.k : pb.n;
  p.C = c.as(), p.ldc = pb.n, p.c_dtype = GemmDType::bf16;
  static std::unique_ptr<tq::kernels::CublasLtGemm> lt;
  if (cublas && !lt) lt = std::make_unique<tq::kernels::CublasLtGemm>();
  cudaStream_t stream = nullptr;
  int cur = 0;
  auto call = [&] {
    p.A = as[cur].as<__nv_bfloat16>();
    p.B = bs[cur].as<__nv_bfloat16>();
    cur = (cur + 1) % sets;
    if (cublas) lt->run(p, stream);
    else tq::kernels::gemm(p, stream);
  };
  const double flops = 2.0 * pb.m * pb.n * double(pb.k);
  const double est_s = std::max(flops / 600e12, (a_elems + b_elems + size_t(pb.m) * pb.n) * 2 / 3e12) + 3e-6;
  const int reps = std::max(sets, static_cast<int>(2e-3 / est_s));
  for (int i = 0; i < 2 * sets; ++i) call();  // warm up: module load, heuristics, attributes
  TQ_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  TQ_CUDA_CHECK(cudaEventCreate(&e0));
  TQ_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> per_call;
  for (auto _ : state) {
    TQ_CUDA_CHECK(cudaEventRecord(e0, stream));
    for (int r = 0; r < reps; ++r) call();
    TQ_CUDA_CHECK(cudaEventRecord(e1, stream));
    TQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    TQ_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    per_call.push_back(ms * 1e-3 / reps);
    state.SetIterationTime(ms * 1e-3 / reps);
  }
  TQ_CUDA_CHECK(cudaEventDestroy(e0));
  TQ_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(per_call.begin(), per_call.end());
  const double med = per_call[per_call.size() / 2];
  state.counters["TFLOPS"] = flops / med * 1e-12;
  state.counters["us"] = med * 1e6;
}

struct Registrar {
  Registrar() {
    const int Ms[] = {1, 16, 1136, 4544};
    const int KN[][2] = {{2048, 2048}, {2048, 256},  {2048, 16384}, {16384, 2048}, {1152, 1152},
                         {1152, 4304}, {4304, 1152}, {1152, 2048},  {2304, 9216},  {9216, 2304}};
    const char* op_names[] = {"fwd", "dx", "dw"};
    for (int M : Ms)
      for (auto& kn : KN)
        for (int o = 0; o < 3; ++o)
          for (int impl = 0; impl < 2; ++impl) {
            const std::string name = std::string("gemm/") + (impl ? "cublas" : "tq") + "/" +
                                     op_names[o] + "/" + std::to_string(M) + "/" +
                                     std::to_string(kn[0]) + "/" + std::to_string(kn[1]);
            const Op op = static_cast<Op>(o);
            const int K = kn[0], N = kn[1];
            benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
              run_gemm(st, impl == 1, op, M, K, N);
            })->UseManualTime()->Iterations(7)->Unit(benchmark::kMicrosecond);
          }
  }
} registrar;

}  // namespace
