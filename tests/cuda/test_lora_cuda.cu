// LoRA / rsLoRA / DoRA layers on CUDA (QLoRA: an NF4 base) against the same layers on the CPU:
// initialization (A is the same uniform draw on every device), outputs and gradients of A, B, the
// DoRA magnitude and x with dropout on (the masks are drawn on the device and equal the CPU's), and
// merge/unmerge on the device.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

using Layer = nn::LoRA<nn::LinearBase>;

// The same QLoRA layer built on the CPU and on CUDA from one NF4 weight, one bias and one seed.
struct LayerPair {
  std::unique_ptr<Layer> cpu, gpu;
  LayerPair(const NF4Tensor& q, const Tensor& bias, const nn::LoraConfig& cfg, uint64_t seed, DType compute) {
    Generator gc(seed), gg(seed);
    cpu = std::make_unique<Layer>(std::make_unique<NF4LinearModule>(NF4Linear(q, bias)), cfg, gc);
    gpu = std::make_unique<Layer>(std::make_unique<NF4LinearModule>(NF4Linear(q, bias).to(kCuda)), cfg, gg);
    cpu->compute_dtype = gpu->compute_dtype = compute;
  }
  // Random B (and magnitude) on both: B = 0 after init would hide every adapter gradient but B's.
  void randomize() {
    Tensor b = rnd(cpu->lora_B.shape(), DType::f32, -0.1, 0.1);
    cpu->lora_B = b.clone().requires_grad_();
    gpu->lora_B = b.to(kCuda).requires_grad_();
    if (!cpu->config.dora) return;
    Tensor m = rnd(cpu->lora_magnitude_vector.shape(), DType::f32, 0.5, 2.0);
    cpu->lora_magnitude_vector = m.clone().requires_grad_();
    gpu->lora_magnitude_vector = m.to(kCuda).requires_grad_();
  }
};

// Elementwise within rel·|ref| + abs_of_max·max|ref|, and ‖got − ref‖ ≤ norm·‖ref‖.
::testing::AssertionResult agree(const Tensor& got, const Tensor& ref, double rel, double abs_of_max, double norm) {
  if (got.shape() != ref.shape()) return ::testing::AssertionFailure() << "shape " << str_cat(got.shape()) << " vs " << str_cat(ref.shape());
  std::vector<double> g = got.to_vector<double>(), r = ref.to_vector<double>();
  double maxref = 0, num = 0, den = 0;
  for (double v : r) maxref = std::max(maxref, std::abs(v));
  for (size_t i = 0; i < r.size(); ++i) {
    const double e = std::abs(g[i] - r[i]);
    if (!(e <= rel * std::abs(r[i]) + abs_of_max * maxref))
      return ::testing::AssertionFailure() << "element " << i << ": got " << g[i] << ", expected " << r[i];
    num += e * e;
    den += r[i] * r[i];
  }
  if (num > norm * norm * den) return ::testing::AssertionFailure() << "relative norm error " << std::sqrt(num / den);
  return ::testing::AssertionSuccess();
}

struct Variant {
  const char* name;
  bool rslora, dora;
  DType compute;
};
const Variant kVariants[] = {{"lora f32", false, false, DType::f32},
                             {"lora bf16", false, false, DType::bf16},
                             {"rslora f32", true, false, DType::f32},
                             {"dora f32", false, true, DType::f32}};

TEST(GpuLora, InitIsTheCpuDrawOnTheDevice) {
  TQ_REQUIRE_GPU();
  const NF4Tensor q = nf4_quantize(rnd({72, 200}, DType::bf16, -0.1, 0.1));
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(v.name);
    nn::LoraConfig cfg{.r = 8, .alpha = 16, .dropout = 0.1, .rslora = v.rslora, .dora = v.dora};
    LayerPair lp(q, Tensor(), cfg, test::fresh_seed(), v.compute);
    EXPECT_EQ(lp.gpu->lora_A.device(), kCuda);
    EXPECT_EQ(lp.gpu->lora_B.device(), kCuda);
    EXPECT_EQ(lp.gpu->lora_A.to_vector<float>(), lp.cpu->lora_A.to_vector<float>());  // bitwise
    EXPECT_EQ(lp.gpu->lora_B.to_vector<float>(), std::vector<float>(size_t(72 * 8), 0.0f));
    EXPECT_EQ(lp.gpu->dropout_seed, lp.cpu->dropout_seed);
    if (v.dora) {
      EXPECT_EQ(lp.gpu->lora_magnitude_vector.device(), kCuda);
      EXPECT_TRUE(close(lp.gpu->lora_magnitude_vector.cpu(), lp.cpu->lora_magnitude_vector, 1e-6));
    }
  }
}

// Outputs and every gradient, dropout off and on (training mode), over two forward calls so the
// second draws a new mask on both sides. M = 18 rows: the NF4 base dequantizes into its scratch
// and runs the GEMM, as the CPU does (the fused decode path is tested in test_nf4_cuda.cu).
TEST(GpuLora, ForwardAndGradientsMatchTheCpuLayer) {
  TQ_REQUIRE_GPU();
  const int64_t K = 200, N = 72;
  const NF4Tensor q = nf4_quantize(rnd({N, K}, DType::bf16, -0.1, 0.1));
  const Tensor bias = rnd({N}, DType::f32, -0.5, 0.5);
  for (const Variant& v : kVariants) {
    for (double p : {0.0, 0.3}) {
      SCOPED_TRACE(str_cat(v.name, " dropout ", p));
      nn::LoraConfig cfg{.r = 8, .alpha = 16, .dropout = p, .rslora = v.rslora, .dora = v.dora};
      LayerPair lp(q, bias, cfg, test::fresh_seed(), v.compute);
      lp.randomize();
      lp.cpu->train(true);
      lp.gpu->train(true);
      for (int call = 0; call < 2; ++call) {
        SCOPED_TRACE(str_cat("call ", call));
        Tensor x = rnd({2, 9, K}, DType::f32, -1.0, 1.0), up = rnd({2, 9, N}, DType::f32, -1.0, 1.0);
        Tensor xc = x.clone().requires_grad_(), xg = x.to(kCuda).requires_grad_();
        for (Layer* l : {lp.cpu.get(), lp.gpu.get()}) l->zero_grad();
        Tensor yc = lp.cpu->forward(xc);
        poison_pool(size_t(N * K) * 8);
        Tensor yg = lp.gpu->forward(xg);
        ASSERT_EQ(yg.device(), kCuda);
        // The base output is bf16-rounded on both sides (an accumulation-order ulp apart at most).
        EXPECT_TRUE(agree(yg.cpu(), yc, 1e-2, 2e-3, 4e-3));
        yc.backward(up);
        yg.backward(up.to(kCuda));
        const bool f32 = v.compute == DType::f32;
        EXPECT_TRUE(agree(lp.gpu->lora_A.grad().cpu(), lp.cpu->lora_A.grad(), f32 ? 1e-4 : 2e-2, f32 ? 1e-5 : 4e-3,
                          f32 ? 1e-5 : 8e-3));
        EXPECT_TRUE(agree(lp.gpu->lora_B.grad().cpu(), lp.cpu->lora_B.grad(), f32 ? 1e-4 : 2e-2, f32 ? 1e-5 : 4e-3,
                          f32 ? 1e-5 : 8e-3));
        if (v.dora) EXPECT_TRUE(agree(lp.gpu->lora_magnitude_vector.grad().cpu(), lp.cpu->lora_magnitude_vector.grad(), 1e-2, 2e-3, 4e-3));
        EXPECT_TRUE(agree(xg.grad().cpu(), xc.grad(), 1e-2, 2e-3, 4e-3));
      }
      EXPECT_EQ(lp.gpu->dropout_offset, lp.cpu->dropout_offset);
    }
  }
}

// Replaying a forward at the same dropout offset (what gradient checkpointing does) reproduces it.
TEST(GpuLora, DropoutReplaysAtTheSameOffset) {
  TQ_REQUIRE_GPU();
  const NF4Tensor q = nf4_quantize(rnd({64, 128}, DType::bf16, -0.1, 0.1));
  nn::LoraConfig cfg{.r = 4, .alpha = 8, .dropout = 0.5};
  LayerPair lp(q, Tensor(), cfg, test::fresh_seed(), DType::f32);
  lp.randomize();
  lp.gpu->train(true);
  Tensor x = rnd({20, 128}, DType::f32).to(kCuda);
  const uint64_t off = lp.gpu->dropout_offset;
  const std::vector<float> a = lp.gpu->forward(x).to_vector<float>();
  lp.gpu->dropout_offset = off;
  EXPECT_EQ(lp.gpu->forward(x).to_vector<float>(), a);
  EXPECT_NE(lp.gpu->forward(x).to_vector<float>(), a);
}

TEST(GpuLora, MergeOnTheDeviceMatchesTheCpu) {
  TQ_REQUIRE_GPU();
  const NF4Tensor q = nf4_quantize(rnd({72, 200}, DType::bf16, -0.1, 0.1));
  const Tensor bias = rnd({72}, DType::f32);
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(v.name);
    nn::LoraConfig cfg{.r = 8, .alpha = 16, .rslora = v.rslora, .dora = v.dora};
    LayerPair lp(q, bias, cfg, test::fresh_seed(), v.compute);
    lp.randomize();
    nn::LinearBase* original = lp.gpu->base.get();
    lp.cpu->merge();
    lp.gpu->merge();
    auto* dc = dynamic_cast<nn::Linear*>(lp.cpu->base.get());
    auto* dg = dynamic_cast<nn::Linear*>(lp.gpu->base.get());
    ASSERT_TRUE(dc && dg);
    EXPECT_EQ(dg->weight.device(), kCuda);
    EXPECT_EQ(dg->weight.dtype(), DType::bf16);
    // f32 math on both sides, one bf16 rounding: at most an occasional ulp apart, plus the f32
    // roundings of W + s·B·A in another order, a few u·(|W| + s·|B|·|A|) (times DoRA's row scale),
    // which dominate where W and s·B·A nearly cancel (a fresh seed drew 3.0e-7 vs 3.0e-8 terms).
    const std::vector<double> got = dg->weight.cpu().to_vector<double>(), ref = dc->weight.to_vector<double>();
    const int64_t out = 72, in = 200, r = 8;
    const test::LoraMergeRef f64 = test::lora_merge_f64(
        nf4_dequantize(q, DType::bf16).to_vector<double>(), lp.cpu->lora_A.to_vector<double>(),
        lp.cpu->lora_B.to_vector<double>(), v.dora ? lp.cpu->lora_magnitude_vector.to_vector<double>() : std::vector<double>{},
        in, out, r, cfg.scaling(), v.dora);
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double e = std::abs(got[i] - ref[i]);
      EXPECT_LE(e, std::abs(ref[i]) / 128 + 4 * std::ldexp(f64.terms[i], -24)) << "row " << i / in << " column " << i % in;
      num += e * e;
      den += ref[i] * ref[i];
    }
    EXPECT_LE(std::sqrt(num / den), 1e-3);
    lp.gpu->unmerge();
    EXPECT_EQ(lp.gpu->base.get(), original);
  }
}

}  // namespace
