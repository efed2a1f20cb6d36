// CUDA matmul / linear (the entry of ops::cuda_matmul_kernels()) and the 2-D product helper the
// fused linear + cross-entropy shares.
//
// Invariants (the CPU reference in ops/matmul.hpp is the contract):
// - bf16 operands go to tq::kernels::gemm (kernels/gemm): fp32 accumulation, the epilogue (bias,
//   beta·C) in fp32, one rounding at the store (bf16, or f32 when an f32 bias widens the result).
//   Strided views are passed as they are when a layout is row-major or column-major with a
//   leading dimension the GEMM accepts (a transposed view is just trans + ld); anything else is
//   made dense first. A batch whose right operand is shared and whose left rows are evenly spaced
//   runs as one GEMM of batch·M rows; other batches run one GEMM per entry.
// - f32, f64 and f16 operands run the tiled SIMT kernel below, reading any strides directly:
//   accumulation in fp32 (f64 for f64), one rounding to the output dtype, as the CPU does. f16
//   keeps fp16 storage semantics (never converted to bf16). Mixed operand dtypes are first
//   widened to the promoted dtype (exact).
// - K = 0 gives zeros (+ bias); M = 0, N = 0 or an empty batch launch nothing.
// - Nothing synchronizes the host; scratch comes from the stream-ordered pool (graph-capturable).
#pragma once

#include <cuda_bf16.h>

#include <limits>

#include "kernels/copy.cuh"
#include "kernels/gemm/gemm.cuh"
#include "tq/ops/matmul.hpp"

namespace tq::cuda {

// ---- the SIMT kernel (f32, f64, f16 operands) ----

namespace simt {

constexpr int kBM = 64, kBN = 64, kBK = 16;
constexpr int kThreadsPerBlock = 256;  // 16 x 16 threads, each a 4 x 4 block of outputs
static_assert(kBM * kBK == 4 * kThreadsPerBlock && kBK * kBN == 4 * kThreadsPerBlock,
              "every thread loads exactly 4 elements of each operand tile");
static_assert(kBM == 4 * 16 && kBN == 4 * 16, "each thread owns rows ty + 16i and columns tx + 16j");

// One product of the (possibly batched) SIMT kernel. Element (r, c) of A is a[r*a_rs + c*a_cs],
// likewise B; C is (M, N) with leading dimension ldc. Batch entry i reads A and B at the offsets
// the geometry gives for i and writes C at i * c_batch_stride.
template <class T, class O>
struct Problem {
  using Acc = compute_t<T>;
  const T* a;
  int64_t a_rs, a_cs;
  const T* b;
  int64_t b_rs, b_cs;
  O* c;
  int64_t ldc, c_batch_stride;
  int64_t M, N, K, tiles_n;
  Acc beta;         // C = A·B + bias + beta·C (C is read only when beta != 0)
  const Acc* bias;  // (N) or null
  Geometry<2> batch;
  int64_t batch_count;
};

template <class T, class O>
__global__ void __launch_bounds__(kThreadsPerBlock) matmul_simt_kernel(Problem<T, O> p) {
  using Acc = compute_t<T>;
  __shared__ Acc as[kBK][kBM + 1];  // (BK, BM): the A tile, k-major so a thread's rows are adjacent
  __shared__ Acc bs[kBK][kBN + 1];  // (BK, BN)
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t tile_m = int64_t(blockIdx.x) / p.tiles_n, tile_n = int64_t(blockIdx.x) % p.tiles_n;
  const int64_t m0 = tile_m * kBM, n0 = tile_n * kBN;
  // Load order follows the unit stride so that a warp reads consecutive addresses.
  const bool a_k_fast = p.a_cs == 1, b_n_fast = p.b_cs == 1;
  for (int64_t bi = blockIdx.z; bi < p.batch_count; bi += gridDim.z) {
    int64_t off[2];
    offsets_of<int64_t, 2>(p.batch, bi, off);
    const T* a = p.a + off[0];  // (M, K) strided
    const T* b = p.b + off[1];  // (K, N) strided
    Acc acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
    for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int idx = tid + e * kThreadsPerBlock;
        const int r = a_k_fast ? idx / kBK : idx % kBM, k = a_k_fast ? idx % kBK : idx / kBM;
        const int64_t gr = m0 + r, gk = k0 + k;
        as[k][r] = gr < p.M && gk < p.K ? convert<Acc>(a[gr * p.a_rs + gk * p.a_cs]) : Acc(0);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int idx = tid + e * kThreadsPerBlock;
        const int c = b_n_fast ? idx % kBN : idx / kBK, k = b_n_fast ? idx / kBN : idx % kBK;
        const int64_t gc = n0 + c, gk = k0 + k;
        bs[k][c] = gc < p.N && gk < p.K ? convert<Acc>(b[gk * p.b_rs + gc * p.b_cs]) : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        Acc av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = as[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = bs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
      __syncthreads();
    }
    O* c = p.c + bi * p.c_batch_stride;  // (M, N), ld = ldc
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t gr = m0 + ty + 16 * i, gc = n0 + tx + 16 * j;
        if (gr >= p.M || gc >= p.N) continue;
        Acc v = acc[i][j];
        if (p.bias) v += p.bias[gc];
        O* dst = c + gr * p.ldc + gc;
        if (p.beta != Acc(0)) v += p.beta * convert<Acc>(*dst);
        *dst = convert<O>(v);
      }
  }
}

template <class T, class O>
void launch(const Problem<T, O>& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0 || p.batch_count == 0) return;
  TQ_CHECK(p.K >= 1, "matmul (SIMT): K must be >= 1 here (K = 0 is handled by the caller)");
  const int64_t tiles = ((p.M + kBM - 1) / kBM) * p.tiles_n;
  TQ_CHECK(tiles <= int64_t(std::numeric_limits<int>::max()), "matmul (SIMT): too many tiles (", tiles, ")");
  const dim3 grid(unsigned(tiles), 1, unsigned(std::min<int64_t>(p.batch_count, 65535)));
  matmul_simt_kernel<T, O><<<grid, kThreadsPerBlock, 0, stream>>>(p);
  check_launch();
}

}  // namespace simt

// ---- 2-D products on raw operands (shared with the fused linear + cross-entropy) ----

// A (rows, cols) strided operand: element (r, c) at ptr[r*rs + c*cs] (elements of its dtype).
struct MatOperand {
  const void* ptr = nullptr;
  int64_t rs = 0, cs = 0;
};

// C (M, N) [ldc, c_dtype] = A (M, K) · B (K, N) [+ bias (N)] [+ beta·C], A and B of one dtype
// ab_dtype. bias has dtype bias_dtype (bf16/f32 for bf16 operands; the accumulation dtype for the
// SIMT path). bf16 operands must be in a layout gemm_layout accepts.
struct Product2d {
  int64_t M = 0, N = 0, K = 0;
  DType ab_dtype = DType::bf16;
  MatOperand a, b;
  void* c = nullptr;
  int64_t ldc = 0;
  DType c_dtype = DType::bf16;
  double beta = 0.0;
  const void* bias = nullptr;
  DType bias_dtype = DType::f32;
};

// How a (rows, cols) strided view maps onto the GEMM's conventions: row-major with leading
// dimension ld >= cols (transposed = false), or column-major with ld >= rows (transposed = true).
// Strides of size-1 dims are meaningless and ignored. ok = false: the view must be made dense.
struct GemmLayout {
  bool ok = false, transposed = false;
  int64_t ld = 0;
};
inline GemmLayout gemm_layout(int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if (cs == 1 || cols == 1) {
    const int64_t ld = rows == 1 ? cols : rs;
    if (ld >= cols && ld >= 1) return {true, false, ld};
  }
  if (rs == 1 || rows == 1) {
    const int64_t ld = cols == 1 ? rows : cs;
    if (ld >= rows && ld >= 1) return {true, true, ld};
  }
  return {};
}

inline kernels::GemmDType gemm_dtype(DType dt, const char* what) {
  TQ_CHECK(dt == DType::bf16 || dt == DType::f32, "matmul: the GEMM's ", what, " must be bf16 or f32, got ", dt);
  return dt == DType::bf16 ? kernels::GemmDType::bf16 : kernels::GemmDType::f32;
}

inline void run_gemm_2d(const Product2d& p, cudaStream_t stream) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TQ_CHECK(p.M <= kIntMax && p.N <= kIntMax && p.K <= kIntMax, "matmul: GEMM sizes over 2^31: M=", p.M, " N=", p.N,
           " K=", p.K);
  const GemmLayout la = gemm_layout(p.M, p.K, p.a.rs, p.a.cs), lb = gemm_layout(p.K, p.N, p.b.rs, p.b.cs);
  TQ_CHECK(la.ok && lb.ok, "matmul: operand layout the GEMM cannot read (strides A ", p.a.rs, ",", p.a.cs, " B ",
           p.b.rs, ",", p.b.cs, ")");
  kernels::GemmParams g;
  g.M = int(p.M), g.N = int(p.N), g.K = int(p.K);
  g.A = static_cast<const __nv_bfloat16*>(p.a.ptr);
  g.lda = la.ld;
  g.trans_a = la.transposed;  // column-major (M, K) = (K, M) row-major
  g.B = static_cast<const __nv_bfloat16*>(p.b.ptr);
  g.ldb = lb.ld;
  g.trans_b = lb.transposed;  // column-major (K, N) = (N, K) row-major
  g.C = p.c;
  g.ldc = p.ldc;
  g.c_dtype = gemm_dtype(p.c_dtype, "output");
  g.beta = float(p.beta);
  g.bias = p.bias;
  if (p.bias) g.bias_dtype = gemm_dtype(p.bias_dtype, "bias");
  kernels::gemm(g, stream);
}

template <class T, class O>
void run_simt_2d(const Product2d& p, cudaStream_t stream) {
  using Acc = compute_t<T>;
  simt::Problem<T, O> q{};
  q.a = static_cast<const T*>(p.a.ptr);
  q.a_rs = p.a.rs, q.a_cs = p.a.cs;
  q.b = static_cast<const T*>(p.b.ptr);
  q.b_rs = p.b.rs, q.b_cs = p.b.cs;
  q.c = static_cast<O*>(p.c);
  q.ldc = p.ldc, q.c_batch_stride = 0;
  q.M = p.M, q.N = p.N, q.K = p.K;
  q.tiles_n = (p.N + simt::kBN - 1) / simt::kBN;
  q.beta = Acc(p.beta);
  TQ_CHECK(p.bias == nullptr || p.bias_dtype == dtype_v<Acc>, "matmul (SIMT): bias must be ", dtype_v<Acc>);
  q.bias = static_cast<const Acc*>(p.bias);
  q.batch_count = 1;
  simt::launch<T, O>(q, stream);
}

// Runs one 2-D product on the current device and stream (no allocation besides GEMM scratch).
inline void run_product_2d(const Product2d& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  TQ_CHECK(p.K >= 1, "matmul: K must be >= 1");
  const DType ab = p.ab_dtype, cd = p.c_dtype;
  if (ab == DType::bf16) return run_gemm_2d(p, stream);
  if (ab == DType::f32 && cd == DType::f32) return run_simt_2d<float, float>(p, stream);
  if (ab == DType::f64 && cd == DType::f64) return run_simt_2d<double, double>(p, stream);
  if (ab == DType::f16 && cd == DType::f16) return run_simt_2d<f16, f16>(p, stream);
  if (ab == DType::f16 && cd == DType::f32) return run_simt_2d<f16, float>(p, stream);
  fail(str_cat("matmul: no CUDA kernel for ", ab, " operands with a ", cd, " output"));
}

// ---- the op (ops::cuda_matmul_kernels().matmul) ----

namespace matmul_detail {

// Element offset of batch entry i of t (batch dims = all but the last two).
inline int64_t batch_offset(const Tensor& t, int64_t i) {
  int64_t off = 0;
  for (int64_t d = t.dim() - 3; d >= 0; --d) {
    const int64_t size = t.size(d);
    off += (i % size) * t.stride(d);
    i /= size;
  }
  return off;
}

// True when the batch dims of a (batch..., M, K) continue its row stride: row r of entry i is
// row i*M + r of one (batch·M, K) matrix with leading dimension rs.
inline bool rows_fold(const Tensor& a, int64_t rs) {
  int64_t expect = rs * a.size(-2);
  for (int64_t d = a.dim() - 3; d >= 0; --d) {
    if (a.size(d) == 1) continue;
    if (a.stride(d) != expect) return false;
    expect *= a.size(d);
  }
  return true;
}

inline bool batch_is_broadcast(const Tensor& b) {
  for (int64_t d = 0; d + 2 < b.dim(); ++d)
    if (b.size(d) != 1 && b.stride(d) != 0) return false;
  return true;
}

// The bf16 path: one GEMM (folded batch) or one per batch entry.
inline void matmul_gemm(Tensor a, Tensor b, const Tensor& out, const Tensor& bias, cudaStream_t st) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1), nb = out.numel() / std::max<int64_t>(1, M * N);
  if (!gemm_layout(M, K, a.stride(-2), a.stride(-1)).ok) a = a.contiguous();
  if (!gemm_layout(K, N, b.stride(-2), b.stride(-1)).ok) b = b.contiguous();
  const GemmLayout la = gemm_layout(M, K, a.stride(-2), a.stride(-1));
  Product2d p;
  p.M = M, p.N = N, p.K = K;
  p.ab_dtype = DType::bf16;
  p.a = {a.data_ptr(), a.stride(-2), a.stride(-1)};
  p.b = {b.data_ptr(), b.stride(-2), b.stride(-1)};
  p.ldc = N;
  p.c_dtype = out.dtype();
  if (bias.defined()) {
    p.bias = bias.data_ptr();
    p.bias_dtype = bias.dtype();
  }
  char* c0 = static_cast<char*>(out.data_ptr());
  const size_t es = dtype_size(out.dtype());
  if (nb > 1 && !la.transposed && batch_is_broadcast(b) && rows_fold(a, la.ld)) {
    p.M = nb * M;  // (batch·M, K) · (K, N): one GEMM over every row
    p.a.rs = la.ld, p.a.cs = 1;
    p.c = c0;
    return run_product_2d(p, st);
  }
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  for (int64_t i = 0; i < nb; ++i) {
    p.a.ptr = a0 + batch_offset(a, i) * 2;
    p.b.ptr = b0 + batch_offset(b, i) * 2;
    p.c = c0 + size_t(i * M * N) * es;
    run_product_2d(p, st);
  }
}

// The SIMT path: a (batch..., M, K) and b (batch..., K, N) of dtype T, any strides, one launch.
template <class T>
void matmul_simt(const Tensor& a, const Tensor& b, const Tensor& out, const Tensor& bias, cudaStream_t st) {
  using Acc = compute_t<T>;
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  Shape batch(a.shape().begin(), a.shape().end() - 2);
  Shape sa(a.strides().begin(), a.strides().end() - 2), sb(b.strides().begin(), b.strides().end() - 2);
  simt::Problem<T, T> q{};
  q.a = static_cast<const T*>(a.data_ptr());
  q.a_rs = a.stride(-2), q.a_cs = a.stride(-1);
  q.b = static_cast<const T*>(b.data_ptr());
  q.b_rs = b.stride(-2), q.b_cs = b.stride(-1);
  q.c = static_cast<T*>(out.data_ptr());
  q.ldc = N, q.c_batch_stride = M * N;
  q.M = M, q.N = N, q.K = K;
  q.tiles_n = (N + simt::kBN - 1) / simt::kBN;
  q.beta = Acc(0);
  q.bias = bias.defined() ? static_cast<const Acc*>(bias.data_ptr()) : nullptr;
  q.batch = make_geometry<2>(batch, {&sa, &sb}, "matmul");
  q.batch_count = numel_of(batch);
  simt::launch<T, T>(q, st);
}

}  // namespace matmul_detail

// a (batch..., M, K), b (batch..., K, N) with one batch shape (any strides); out (batch..., M, N)
// dense in out_dtype; bias (N) or undefined (see ops::MatmulCudaKernels).
inline Tensor matmul(const Tensor& a_in, const Tensor& b_in, DType out_dtype, const Tensor& bias_in) {
  const char* op = "matmul";
  TQ_CHECK(a_in.dim() >= 2 && b_in.dim() == a_in.dim(), op, ": operands must share their batch dims: ",
           describe(a_in), ", ", describe(b_in));
  TQ_CHECK(a_in.device().is_cuda() && b_in.device() == a_in.device(), op, ": operands on different devices: ",
           describe(a_in), ", ", describe(b_in));
  TQ_CHECK(!bias_in.defined() || (bias_in.dim() == 1 && bias_in.size(0) == b_in.size(-1) &&
                                  bias_in.device() == a_in.device()),
           op, ": bias ", describe(bias_in), " does not match ", describe(b_in));
  const int64_t M = a_in.size(-2), K = a_in.size(-1), N = b_in.size(-1);
  Shape os(a_in.shape().begin(), a_in.shape().end() - 2);
  os.insert(os.end(), {M, N});
  DeviceGuard guard(a_in.device().index);
  Tensor out = Tensor::empty(os, out_dtype, a_in.device());
  if (out.numel() == 0) return out;
  if (K == 0) {  // an empty sum: zeros, plus the bias rounded once
    out.zero_();
    if (bias_in.defined()) out.copy_(bias_in.detach());
    return out;
  }
  cudaStream_t st = current_stream();
  const DType mm = promote(a_in.dtype(), b_in.dtype());
  Tensor a = a_in.detach().to(mm), b = b_in.detach().to(mm);  // widening a mixed pair is exact
  if (mm == DType::bf16) {
    TQ_CHECK(out_dtype == DType::bf16 || out_dtype == DType::f32, op, ": bf16 operands give bf16 or f32, not ",
             out_dtype);
    Tensor bias;
    if (bias_in.defined()) {
      TQ_CHECK(bias_in.dtype() == DType::bf16 || bias_in.dtype() == DType::f32, op, ": the GEMM's bias must be bf16 or f32, got ",
               describe(bias_in));
      bias = bias_in.detach().contiguous();
    }
    matmul_detail::matmul_gemm(a, b, out, bias, st);
    return out;
  }
  TQ_CHECK(out_dtype == mm, op, ": ", mm, " operands give ", mm, ", not ", out_dtype);
  const DType acc = ops::compute_dtype(mm);
  Tensor bias = bias_in.defined() ? bias_in.detach().to(acc).contiguous() : Tensor();
  switch (mm) {
    case DType::f32: matmul_detail::matmul_simt<float>(a, b, out, bias, st); break;
    case DType::f64: matmul_detail::matmul_simt<double>(a, b, out, bias, st); break;
    case DType::f16: matmul_detail::matmul_simt<f16>(a, b, out, bias, st); break;
    default: fail(str_cat(op, ": expected float operands, got ", describe(a_in), " and ", describe(b_in)));
  }
  return out;
}

// Fills this family's CUDA kernel table(s); called once by register_cuda_backend() (<tq/cuda.hpp>).
inline void register_matmul_kernels() { ops::cuda_matmul_kernels().matmul = &cuda::matmul; }

}  // namespace tq::cuda
