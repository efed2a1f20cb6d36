// Fused attention (ours: kernels/attention/, through ops::attention_forward_cuda / _backward_cuda)
// vs a composite built from cuBLAS, forward and forward+backward, bf16, same process, same inputs.
//
// The composites run cublasGemmStridedBatchedEx for
//   S = Q·Kᵀ, O = P·V, and backward dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q,
// bf16 matrices with fp32 accumulation, plus the softmax and softmax-backward kernels below (fp32
// math, the op's scale/softcap/mask, using the same per-key mask records as ours), in two layouts:
//   stacked:  one GEMM per (batch, KV head) with the query heads of the group stacked as rows (GQA/MQA
//             without repeating K/V; dK/dV come out summed) — the strongest composite;
//   per_head: HF eager: K/V repeated to every query head (repeat_kv), one GEMM per (batch, query
//             head), dK/dV summed over the group afterwards (both extra kernels are timed).
//
// Shapes: Gemma (PaliGemma 1: batch 16, 286 tokens, 8 query heads, 1 KV head, d 256, prefix-LM from
// token types + key padding), SigLIP (batch 16, 16 heads, 256 tokens, d 72, no mask), Gemma decode
// (one query against 350 cached keys, forward only). Counters: median microseconds of each and the
// speedup composite / ours, for both composites. Acceptance: ≥ 2× at the Gemma shape (forward +
// backward).
//
// Run: build/bin/tq_bench --benchmark_filter=attention
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <kernels/attention/attention_common.cuh>

namespace {

using namespace tq;
using tq::cuda::attention::MaskParams;

// A device buffer of raw bytes (the composite's intermediates).
class DevBuf {
 public:
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (bytes) TQ_CUDA_CHECK(cudaMalloc(&p_, bytes));
  }
  ~DevBuf() {
    if (p_) (void)cudaFree(p_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <class T = void>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Uniform in [−1, 1), rounded to bf16; a different stream of values per seed.
__global__ void fill_uniform_kernel(__nv_bfloat16* p, int64_t n, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + uint64_t(i);
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ull, x ^= x >> 33;
    p[i] = __float2bfloat16(float(uint32_t(x)) * (2.0f / 4294967296.0f) - 1.0f);
  }
}

struct Shape4 {
  const char* name;
  int64_t B, Hq, Hkv, Tq, Tk, D;
  bool gemma_mask;  // prefix-LM from token types + key padding
  bool backward;
};

// ---- the composite's softmax kernels: one warp per row of the (rows, Tk) score matrix ----

struct RowInfo {
  int64_t M;             // rows per GEMM batch entry: Hq / Hkv · Tq (stacked) or Tq (per head)
  int Tq;
  int entries_per_batch;  // GEMM batch entries per batch row: Hkv (stacked) or Hq (per head)
  float scale, softcap;
  MaskParams mask;
};

__device__ tq::cuda::attention::RowMask row_of(const RowInfo& ri, int64_t r, int& b) {
  const int64_t group = r / ri.M;
  b = int(group / ri.entries_per_batch);
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

// dst (B, Hkv, Tk, D) = Σ_r src (B, Hkv · rep, Tk, D) over the rep query heads of each KV head.
__global__ void sum_over_group_kernel(const __nv_bfloat16* __restrict__ src, __nv_bfloat16* __restrict__ dst,
                                      int64_t n, int64_t per_head, int rep) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t kv = i / per_head, e = i % per_head;
    float s = 0.f;
    for (int r = 0; r < rep; ++r) s += __bfloat162float(src[(kv * rep + r) * per_head + e]);
    dst[i] = __float2bfloat16(s);
  }
}

// One composite: its layout and buffers for one shape.
struct Composite {
  bool stacked;
  int64_t B, Hq, Hkv, Tq, Tk, D, rep;
  int64_t entries, M;  // GEMM batch count and rows per entry
  DevBuf S, P, dP, dS, O, dQ, dK, dV, dK_heads, dV_heads;
  Tensor k_heads, v_heads;  // per_head: K, V repeated to (B, Hq, Tk, D)
  RowInfo ri;

  Composite(const Shape4& s, bool stacked_, const RowInfo& base)
      : stacked(stacked_), B(s.B), Hq(s.Hq), Hkv(s.Hkv), Tq(s.Tq), Tk(s.Tk), D(s.D), rep(s.Hq / s.Hkv),
        entries(stacked_ ? s.B * s.Hkv : s.B * s.Hq), M(stacked_ ? rep * s.Tq : s.Tq),
        S(size_t(entries * M * Tk) * 2), P(S.bytes()), dP(S.bytes()), dS(S.bytes()), O(size_t(entries * M * D) * 2),
        dQ(O.bytes()), dK(size_t(B * Hkv * Tk * D) * 2), dV(dK.bytes()),
        dK_heads(stacked_ ? 0 : size_t(entries * Tk * D) * 2), dV_heads(dK_heads.bytes()), ri(base) {
    ri.M = M;
    ri.entries_per_batch = int(entries / B);
  }

  // K and V as the GEMMs read them: as given (stacked, or plain MHA), else repeated per query head.
  void prepare_kv(const Tensor& k, const Tensor& v) {
    if (stacked || rep == 1) return;
    k_heads = k.unsqueeze(2).expand({B, Hkv, rep, Tk, D}).reshape({B, Hq, Tk, D});
    v_heads = v.unsqueeze(2).expand({B, Hkv, rep, Tk, D}).reshape({B, Hq, Tk, D});
  }
  const void* kk(const Tensor& k) const { return k_heads.defined() ? k_heads.data_ptr() : k.data_ptr(); }
  const void* vv(const Tensor& v) const { return v_heads.defined() ? v_heads.data_ptr() : v.data_ptr(); }

  void forward(const Tensor& q, const Tensor& k, const Tensor& v, cudaStream_t st) {
    cublasHandle_t h = cublas();
    cublasSetStream(h, st);
    prepare_kv(k, v);
    const int g = int(entries), m = int(M), n = int(Tk), d = int(D);
    gemm_rm(h, false, true, m, n, d, q.data_ptr(), d, M * D, kk(k), d, Tk * D, S.as(), n, M * Tk, g);
    softmax_forward_kernel<<<unsigned((entries * M + 7) / 8), 256, 0, st>>>(S.as<__nv_bfloat16>(),
                                                                          P.as<__nv_bfloat16>(), entries * M, n, ri);
    TQ_CUDA_CHECK_LAUNCH();
    gemm_rm(h, false, false, m, d, n, P.as(), n, M * Tk, vv(v), d, Tk * D, O.as(), d, M * D, g);
  }
  void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, cudaStream_t st) {
    cublasHandle_t h = cublas();
    cublasSetStream(h, st);
    const int g = int(entries), m = int(M), n = int(Tk), d = int(D);
    const bool sum = !stacked && rep > 1;
    void* dv_out = sum ? dV_heads.as() : dV.as();
    void* dk_out = sum ? dK_heads.as() : dK.as();
    gemm_rm(h, true, false, n, d, m, P.as(), n, M * Tk, dout.data_ptr(), d, M * D, dv_out, d, Tk * D, g);
    gemm_rm(h, false, true, m, n, d, dout.data_ptr(), d, M * D, vv(v), d, Tk * D, dP.as(), n, M * Tk, g);
    softmax_backward_kernel<<<unsigned((entries * M + 7) / 8), 256, 0, st>>>(
        S.as<__nv_bfloat16>(), P.as<__nv_bfloat16>(), dP.as<__nv_bfloat16>(), dS.as<__nv_bfloat16>(), entries * M, n,
        ri);
    TQ_CUDA_CHECK_LAUNCH();
    gemm_rm(h, false, false, m, d, n, dS.as(), n, M * Tk, kk(k), d, Tk * D, dQ.as(), d, M * D, g);
    gemm_rm(h, true, false, n, d, m, dS.as(), n, M * Tk, q.data_ptr(), d, M * D, dk_out, d, Tk * D, g);
    if (sum) {
      const int64_t total = B * Hkv * Tk * D;
      for (auto [src, dst] : {std::pair{dV_heads.as<__nv_bfloat16>(), dV.as<__nv_bfloat16>()},
                              std::pair{dK_heads.as<__nv_bfloat16>(), dK.as<__nv_bfloat16>()}}) {
        sum_over_group_kernel<<<unsigned(std::min<int64_t>((total + 255) / 256, 4096)), 256, 0, st>>>(
            src, dst, total, Tk * D, int(rep));
        TQ_CUDA_CHECK_LAUNCH();
      }
    }
  }
};

Tensor random_bf16(const tq::Shape& shape) {
  static uint64_t seed = 0x5eed;
  Tensor t = Tensor::empty(shape, DType::bf16, Device::cuda(0));
  fill_uniform_kernel<<<1024, 256, 0, tq::cuda::current_stream()>>>(static_cast<__nv_bfloat16*>(t.data_ptr()),
                                                                    t.numel(), ++seed);
  TQ_CUDA_CHECK_LAUNCH();
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
double median_time(cudaStream_t st, const std::function<void()>& fn, int reps) {
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
  return t[t.size() / 2];
}

void run_attention(benchmark::State& state, const Shape4& s) {
  if (tq::cuda::device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const cudaStream_t st = tq::cuda::current_stream();
  Tensor q = random_bf16({s.B, s.Hq, s.Tq, s.D}), k = random_bf16({s.B, s.Hkv, s.Tk, s.D});
  Tensor v = random_bf16({s.B, s.Hkv, s.Tk, s.D}), dout = random_bf16({s.B, s.Hq, s.Tq, s.D});
  const AttentionOptions opt = s.gemma_mask ? gemma_options(s) : AttentionOptions{};
  const ops::AttentionGeometry g = ops::attention_geometry(q, k, v, opt);
  const tq::cuda::attention::DeviceMask mask = tq::cuda::attention::build_mask(opt, g, q.device(), st);
  const RowInfo ri{0, int(s.Tq), 0, float(g.scale), float(g.softcap), mask.params};
  Composite stacked(s, true, ri), per_head(s, false, ri);

  auto ours_fwd = [&] { (void)ops::attention_forward_cuda(q, k, v, opt); };
  auto ours_all = [&] {
    const std::vector<Tensor> fw = ops::attention_forward_cuda(q, k, v, opt);
    (void)ops::attention_backward_cuda(dout, q, k, v, fw[0], fw[1], opt);
  };
  const int reps = 20;
  for (auto _ : state) {
    const double of = median_time(st, ours_fwd, reps);
    state.counters["tq_fwd_us"] = of * 1e6;
    double total = of;
    double oa = 0;
    if (s.backward) {
      oa = median_time(st, ours_all, reps);
      state.counters["tq_fwd_bwd_us"] = oa * 1e6;
      total = oa;
    }
    for (Composite* c : {&stacked, &per_head}) {
      const std::string name = c->stacked ? "stacked" : "per_head";
      const double cf = median_time(st, [&] { c->forward(q, k, v, st); }, reps);
      state.counters["cublas_" + name + "_fwd_us"] = cf * 1e6;
      state.counters["speedup_fwd_vs_" + name] = cf / of;
      if (s.backward) {
        const double ca = median_time(st, [&] {
          c->forward(q, k, v, st);
          c->backward(q, k, v, dout, st);
        }, reps);
        state.counters["cublas_" + name + "_fwd_bwd_us"] = ca * 1e6;
        state.counters["speedup_fwd_bwd_vs_" + name] = ca / oa;
      }
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
