// Fused attention (ours: kernels/attention/, through ops::attention_forward_cuda / _backward_cuda)
// vs a composite built from cuBLAS, forward and forward+backward, bf16, same process, same inputs.
//
// The composite is what an eager framework runs: per (batch, KV head) group, with the query heads
// of the group stacked as rows (GQA/MQA without repeating K/V), cublasGemmStridedBatchedEx for
//   S = Q·Kᵀ, O = P·V, and backward dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q,
// bf16 matrices with fp32 accumulation, plus the softmax and softmax-backward kernels below (fp32
// math, the op's scale/softcap/mask, using the same per-key mask records as ours).
//
// Shapes: Gemma (PaliGemma 1: batch 16, 286 tokens, 8 query heads, 1 KV head, d 256, prefix-LM from
// token types + key padding), SigLIP (batch 16, 16 heads, 256 tokens, d 72, no mask), Gemma decode
// (one query against 350 cached keys, forward only). Counters: median microseconds of each and the
// speedup composite / ours. Acceptance: ≥ 2× at the Gemma shape (forward + backward).
//
// Run: build/bin/tq_bench --benchmark_filter=attention
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include <kernels/attention/attention_common.cuh>
#include <tests/cuda/gemm_test_util.cuh>

namespace {

using namespace tq;
using tq::cuda::attention::MaskParams;
using tq::testing::DevBuf;

struct Shape4 {
  const char* name;
  int64_t B, Hq, Hkv, Tq, Tk, D;
  bool gemma_mask;  // prefix-LM from token types + key padding
  bool backward;
};

// ---- the composite's softmax kernels: one warp per row of the (rows, Tk) score matrix ----

struct RowInfo {
  int64_t M;  // stacked rows per (batch, KV head) group = Hq / Hkv · Tq
  int Tq, Hkv;
  float scale, softcap;
  MaskParams mask;
};

__device__ tq::cuda::attention::RowMask row_of(const RowInfo& ri, int64_t r, int& b) {
  const int64_t group = r / ri.M;
  b = int(group / ri.Hkv);
  return tq::cuda::attention::row_mask(ri.mask, b, int((r % ri.M) % ri.Tq));
}

__device__ float logit_of(const RowInfo& ri, float s, float& th) {
  float x = s * ri.scale;
  th = 0.f;
  if (ri.softcap > 0.f) {
    th = tanhf(x / ri.softcap);
    x = ri.softcap * th;
  }
  return x;
}

// P = softmax(mask(softcap(scale·S))) row by row, bf16 in and out, fp32 math; 0 on hidden keys.
__global__ void softmax_forward_kernel(const __nv_bfloat16* __restrict__ S, __nv_bfloat16* __restrict__ P, int64_t rows,
                                       int Tk, RowInfo ri) {
  const int64_t r = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  int b;
  const tq::cuda::attention::RowMask rm = row_of(ri, r, b);
  const __nv_bfloat16* s = S + r * Tk;
  __nv_bfloat16* p = P + r * Tk;
  float mx = -INFINITY, th;
  for (int j = lane; j < Tk; j += 32)
    if (tq::cuda::attention::visible(ri.mask, rm, j, tq::cuda::attention::key_code(ri.mask, b, j)))
      mx = fmaxf(mx, logit_of(ri, __bfloat162float(s[j]), th));
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
  for (int j = lane; j < Tk; j += 32)
    if (tq::cuda::attention::visible(ri.mask, rm, j, tq::cuda::attention::key_code(ri.mask, b, j)))
      sum += __expf(logit_of(ri, __bfloat162float(s[j]), th) - mx);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int j = lane; j < Tk; j += 32) {
    const bool vis = tq::cuda::attention::visible(ri.mask, rm, j, tq::cuda::attention::key_code(ri.mask, b, j));
    p[j] = __float2bfloat16(vis ? __expf(logit_of(ri, __bfloat162float(s[j]), th) - mx) * inv : 0.f);
  }
}

// dS = P ∘ (dP − Σ P∘dP) · (1 − tanh²) · scale, row by row.
__global__ void softmax_backward_kernel(const __nv_bfloat16* __restrict__ S, const __nv_bfloat16* __restrict__ P,
                                        const __nv_bfloat16* __restrict__ dP, __nv_bfloat16* __restrict__ dS,
                                        int64_t rows, int Tk, RowInfo ri) {
  const int64_t r = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t o0 = r * Tk;
  float dot = 0.f;
  for (int j = lane; j < Tk; j += 32) dot += __bfloat162float(P[o0 + j]) * __bfloat162float(dP[o0 + j]);
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  for (int j = lane; j < Tk; j += 32) {
    float th;
    (void)logit_of(ri, __bfloat162float(S[o0 + j]), th);
    float ds = __bfloat162float(P[o0 + j]) * (__bfloat162float(dP[o0 + j]) - dot);
    if (ri.softcap > 0.f) ds *= 1.f - th * th;
    dS[o0 + j] = __float2bfloat16(ds * ri.scale);
  }
}

// Row-major C (m, n) = op(A) · op(B) for `batch` matrices at the given element strides (cuBLAS is
// column-major: it computes Cᵀ = op(B)ᵀ · op(A)ᵀ on the same memory).
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int m, int n, int k, const void* A, int lda, long long sa,
             const void* B, int ldb, long long sb, void* C, int ldc, long long sc, int batch) {
  const float one = 1.f, zero = 0.f;
  const cublasStatus_t st = cublasGemmStridedBatchedEx(
      h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &one, B, CUDA_R_16BF, ldb, sb, A,
      CUDA_R_16BF, lda, sa, &zero, C, CUDA_R_16BF, ldc, sc, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  TQ_CHECK(st == CUBLAS_STATUS_SUCCESS, "cublasGemmStridedBatchedEx failed: ", int(st));
}

cublasHandle_t cublas() {
  static cublasHandle_t h = [] {
    cublasHandle_t x;
    TQ_CHECK(cublasCreate(&x) == CUBLAS_STATUS_SUCCESS, "cublasCreate failed");
    return x;
  }();
  return h;
}

// The composite's buffers for one shape.
struct Composite {
  int64_t groups, M, Tk, D;
  DevBuf S, P, dP, dS, O, dQ, dK, dV;
  Composite(const Shape4& s)
      : groups(s.B * s.Hkv), M(s.Hq / s.Hkv * s.Tq), Tk(s.Tk), D(s.D),
        S(size_t(groups * M * Tk) * 2), P(S.bytes()), dP(S.bytes()), dS(S.bytes()), O(size_t(groups * M * D) * 2),
        dQ(O.bytes()), dK(size_t(groups * Tk * D) * 2), dV(dK.bytes()) {}

  void forward(const Tensor& q, const Tensor& k, const Tensor& v, const RowInfo& ri, cudaStream_t st) {
    cublasHandle_t h = cublas();
    cublasSetStream(h, st);
    const int g = int(groups), m = int(M), n = int(Tk), d = int(D);
    gemm_rm(h, false, true, m, n, d, q.data_ptr(), d, M * D, k.data_ptr(), d, Tk * D, S.as(), n, M * Tk, g);
    softmax_forward_kernel<<<unsigned((groups * M + 7) / 8), 256, 0, st>>>(S.as<__nv_bfloat16>(),
                                                                         P.as<__nv_bfloat16>(), groups * M, n, ri);
    TQ_CUDA_CHECK_LAUNCH();
    gemm_rm(h, false, false, m, d, n, P.as(), n, M * Tk, v.data_ptr(), d, Tk * D, O.as(), d, M * D, g);
  }
  void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const RowInfo& ri,
                cudaStream_t st) {
    cublasHandle_t h = cublas();
    cublasSetStream(h, st);
    const int g = int(groups), m = int(M), n = int(Tk), d = int(D);
    gemm_rm(h, true, false, n, d, m, P.as(), n, M * Tk, dout.data_ptr(), d, M * D, dV.as(), d, Tk * D, g);
    gemm_rm(h, false, true, m, n, d, dout.data_ptr(), d, M * D, v.data_ptr(), d, Tk * D, dP.as(), n, M * Tk, g);
    softmax_backward_kernel<<<unsigned((groups * M + 7) / 8), 256, 0, st>>>(
        S.as<__nv_bfloat16>(), P.as<__nv_bfloat16>(), dP.as<__nv_bfloat16>(), dS.as<__nv_bfloat16>(), groups * M, n, ri);
    TQ_CUDA_CHECK_LAUNCH();
    gemm_rm(h, false, false, m, d, n, dS.as(), n, M * Tk, k.data_ptr(), d, Tk * D, dQ.as(), d, M * D, g);
    gemm_rm(h, true, false, n, d, m, dS.as(), n, M * Tk, q.data_ptr(), d, M * D, dK.as(), d, Tk * D, g);
  }
};

Tensor random_bf16(const tq::Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::bf16, Device::cuda(0));
  tq::testing::fill_bf16(t.data_ptr(), size_t(t.numel()), tq::testing::fresh_seed());
  return t;
}

// PaliGemma training batch: 256 image + 10 prompt tokens (prefix), then the suffix; odd rows end
// in 8 pad tokens.
AttentionOptions gemma_options(const Shape4& s) {
  AttentionOptions o;
  o.mask = AttentionMask::prefix_lm;
  std::vector<int64_t> types(size_t(s.B * s.Tk)), pad(size_t(s.B * s.Tk));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t x = 0; x < s.Tk; ++x) {
      types[size_t(b * s.Tk + x)] = x < std::min<int64_t>(266, s.Tk) ? 0 : 1;
      pad[size_t(b * s.Tk + x)] = b % 2 == 1 && x >= s.Tk - 8 ? 0 : 1;
    }
  o.token_type_ids = Tensor::from_vector(types, {s.B, s.Tk}).to(Device::cuda(0));
  o.key_padding = Tensor::from_vector(pad, {s.B, s.Tk}).to(Device::cuda(0));
  return o;
}

// Median seconds per call of fn over the timed iterations (CUDA events on the current stream).
double median_time(benchmark::State& state, cudaStream_t st, const std::function<void()>& fn, int reps) {
  for (int i = 0; i < 3; ++i) fn();  // warm-up: module load, kernel attributes, pool growth
  TQ_CUDA_CHECK(cudaStreamSynchronize(st));
  cudaEvent_t e0, e1;
  TQ_CUDA_CHECK(cudaEventCreate(&e0));
  TQ_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int it = 0; it < 7; ++it) {
    TQ_CUDA_CHECK(cudaEventRecord(e0, st));
    for (int r = 0; r < reps; ++r) fn();
    TQ_CUDA_CHECK(cudaEventRecord(e1, st));
    TQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    TQ_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e-3 / reps);
  }
  TQ_CUDA_CHECK(cudaEventDestroy(e0));
  TQ_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(t.begin(), t.end());
  (void)state;
  return t[t.size() / 2];
}

void run_attention(benchmark::State& state, const Shape4& s) {
  if (!tq::testing::gpu_present()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const cudaStream_t st = tq::cuda::current_stream();
  Tensor q = random_bf16({s.B, s.Hq, s.Tq, s.D}), k = random_bf16({s.B, s.Hkv, s.Tk, s.D});
  Tensor v = random_bf16({s.B, s.Hkv, s.Tk, s.D}), dout = random_bf16({s.B, s.Hq, s.Tq, s.D});
  const AttentionOptions opt = s.gemma_mask ? gemma_options(s) : AttentionOptions{};
  const ops::AttentionGeometry g = ops::attention_geometry(q, k, v, opt);
  const tq::cuda::attention::DeviceMask mask = tq::cuda::attention::build_mask(opt, g, q.device(), st);
  const RowInfo ri{s.Hq / s.Hkv * s.Tq, int(s.Tq), int(s.Hkv), float(g.scale), float(g.softcap), mask.params};
  Composite comp(s);

  auto ours_fwd = [&] { (void)ops::attention_forward_cuda(q, k, v, opt); };
  auto ours_all = [&] {
    const std::vector<Tensor> fw = ops::attention_forward_cuda(q, k, v, opt);
    (void)ops::attention_backward_cuda(dout, q, k, v, fw[0], fw[1], opt);
  };
  auto comp_fwd = [&] { comp.forward(q, k, v, ri, st); };
  auto comp_all = [&] {
    comp.forward(q, k, v, ri, st);
    comp.backward(q, k, v, dout, ri, st);
  };
  const int reps = 20;
  for (auto _ : state) {
    const double of = median_time(state, st, ours_fwd, reps), cf = median_time(state, st, comp_fwd, reps);
    state.counters["tq_fwd_us"] = of * 1e6;
    state.counters["cublas_fwd_us"] = cf * 1e6;
    state.counters["speedup_fwd"] = cf / of;
    double total = of;
    if (s.backward) {
      const double oa = median_time(state, st, ours_all, reps), ca = median_time(state, st, comp_all, reps);
      state.counters["tq_fwd_bwd_us"] = oa * 1e6;
      state.counters["cublas_fwd_bwd_us"] = ca * 1e6;
      state.counters["speedup_fwd_bwd"] = ca / oa;
      total = oa;
    }
    state.SetIterationTime(total);
  }
}

struct Registrar {
  Registrar() {
    static const Shape4 shapes[] = {
        {"gemma_b16_t286_h8_kv1_d256_prefix", 16, 8, 1, 286, 286, 256, true, true},
        {"siglip_b16_t256_h16_d72", 16, 16, 16, 256, 256, 72, false, true},
        {"gemma_decode_b16_tk350_h8_kv1_d256", 16, 8, 1, 1, 350, 256, true, false},
    };
    for (const Shape4& s : shapes)
      benchmark::RegisterBenchmark((std::string("attention/") + s.name).c_str(),
                                   [&s](benchmark::State& st) { run_attention(st, s); })
          ->UseManualTime()
          ->Iterations(1)
          ->Unit(benchmark::kMicrosecond);
  }
} registrar;

}  // namespace
