// AdamW's fused multi-tensor CUDA step and the fused clip_grad_norm against the CPU path: 10 steps
// with two parameter groups and a warmup schedule (bit for bit: both run the same fp32 operations
// in the same order), many tensors spanning several launches (neighbouring memory untouched),
// clipping on and off, and clipping + AdamW together.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "tests/cuda/gpu_test_util.hpp"

namespace {

using namespace tq;
using namespace tq::gpu_test;

// Parameters of the given shapes on the CPU and the same values on CUDA (leaves requiring grad).
struct Mirror {
  std::vector<Tensor> cpu, gpu;
  explicit Mirror(const std::vector<Shape>& shapes, double scale = 1.0) {
    for (const Shape& s : shapes) {
      Tensor p = rnd(s, DType::f32, -scale, scale);
      cpu.push_back(p.clone().requires_grad_());
      gpu.push_back(p.to(kCuda).requires_grad_());
    }
  }
  // A fresh gradient per parameter (none where skip(i)), the same on both sides.
  template <class Skip>
  void set_grads(double scale, Skip skip) {
    for (size_t i = 0; i < cpu.size(); ++i) {
      cpu[i].zero_grad();
      gpu[i].zero_grad();
      if (skip(i)) continue;
      Tensor g = rnd(cpu[i].shape(), DType::f32, -scale, scale);
      cpu[i].set_grad(g);
      gpu[i].set_grad(g.to(kCuda));
    }
  }
};

std::vector<optim::ParamGroup> two_groups(const std::vector<Tensor>& ps) {
  optim::ParamGroup a{.name = "a", .lr = 1e-2, .weight_decay = 0.1}, b{.name = "b", .lr = 3e-3, .weight_decay = 0.0};
  for (size_t i = 0; i < ps.size(); ++i) (i % 2 ? b : a).params.push_back(ps[i]);
  return {a, b};
}

::testing::AssertionResult same_values(const Tensor& got, const Tensor& ref) {
  const std::vector<float> g = got.to_vector<float>(), r = ref.to_vector<float>();
  if (g.size() != r.size()) return ::testing::AssertionFailure() << "size " << g.size() << " vs " << r.size();
  for (size_t i = 0; i < g.size(); ++i)
    if (std::memcmp(&g[i], &r[i], sizeof(float)) != 0)
      return ::testing::AssertionFailure() << "element " << i << " of " << g.size() << ": " << g[i] << " vs " << r[i];
  return ::testing::AssertionSuccess();
}

const std::vector<Shape> kShapes = {{1}, {72}, {4304}, {257216}, {16, 2048}, {2048, 16}, {3, 5, 7}};

TEST(GpuAdamW, TenStepsWithTwoGroupsAreBitIdenticalToTheCpu) {
  TQ_REQUIRE_GPU();
  Mirror m(kShapes);
  const optim::AdamWOptions opt{.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
  optim::AdamW cpu(two_groups(m.cpu), opt), gpu(two_groups(m.gpu), opt);
  optim::LinearWarmupDecay sched{.warmup_steps = 3, .total_steps = 12};
  for (int64_t k = 0; k < 10; ++k) {
    SCOPED_TRACE(str_cat("step ", k));
    sched.apply(cpu, k + 1);
    sched.apply(gpu, k + 1);
    // Parameter 6 has no gradient on steps 3..5: its step count (bias correction) falls behind.
    m.set_grads(k < 5 ? 1.0 : 1e-3, [&](size_t i) { return i == 6 && k >= 3 && k <= 5; });
    cpu.step();
    gpu.step();
    for (size_t i = 0; i < m.cpu.size(); ++i) ASSERT_TRUE(same_values(m.gpu[i], m.cpu[i])) << "parameter " << i;
  }
  auto sc = cpu.state_dict(), sg = gpu.state_dict();
  ASSERT_EQ(sc.size(), sg.size());
  for (size_t i = 0; i < sc.size(); ++i) {
    SCOPED_TRACE(sc[i].first);
    EXPECT_EQ(sg[i].second.device(), sc[i].first.ends_with("step") ? Device::cpu() : kCuda);
    EXPECT_TRUE(same_values(sg[i].second.to(DType::f32), sc[i].second.to(DType::f32)));
  }
}

// 300 parameters (more than one launch holds), views into one buffer whose gaps hold a sentinel:
// the kernel touches exactly each parameter's elements.
TEST(GpuAdamW, ManyTensorsSpanSeveralLaunchesAndTouchNothingElse) {
  TQ_REQUIRE_GPU();
  std::vector<int64_t> sizes;
  for (int i = 0; i < 300; ++i) sizes.push_back(1 + (int64_t(test::rng()() % 5000)));
  sizes[17] = 0;
  sizes[200] = 70000;
  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (int64_t n : sizes) {
    offsets.push_back(total + 3);  // 3 sentinel floats before every parameter
    total += n + 3;
  }
  total += 3;
  Tensor init = rnd({total}, DType::f32);
  std::vector<float> host = init.to_vector<float>();
  const float sentinel = 12345.5f;
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t j = 1; j <= 3; ++j) host[size_t(offsets[i] - j)] = sentinel;
  for (int64_t j = 1; j <= 3; ++j) host[size_t(total - j)] = sentinel;
  Tensor buf = Tensor::from_vector(host, {total}).to(kCuda);
  std::vector<Tensor> pg, pc;
  for (size_t i = 0; i < sizes.size(); ++i) {
    Tensor v = buf.slice(0, offsets[i], offsets[i] + sizes[i]).detach().requires_grad_();
    pg.push_back(v);
    pc.push_back(v.detach().cpu().clone().requires_grad_());
  }
  optim::AdamW gpu(two_groups(pg)), cpu(two_groups(pc));
  for (int step = 0; step < 2; ++step) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      Tensor g = rnd({sizes[i]}, DType::f32);
      pc[i].set_grad(g);
      pg[i].set_grad(g.to(kCuda));
    }
    cpu.step();
    gpu.step();
  }
  for (size_t i = 0; i < sizes.size(); ++i) ASSERT_TRUE(same_values(pg[i], pc[i])) << "parameter " << i;
  const std::vector<float> after = buf.to_vector<float>();
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t j = 1; j <= 3; ++j) ASSERT_EQ(after[size_t(offsets[i] - j)], sentinel) << "gap before parameter " << i;
}

TEST(GpuAdamW, RejectsMismatchedGradients) {
  TQ_REQUIRE_GPU();
  Tensor p = rnd({8}, DType::f32).to(kCuda).requires_grad_();
  optim::AdamW opt({{.name = "x", .params = {p}, .lr = 1e-3}});
  p.set_grad(rnd({8}, DType::f32));  // a CPU gradient for a CUDA parameter
  EXPECT_THROW(opt.step(), Error);
}

// ---- clipping ----

void expect_clip_matches(const std::vector<Shape>& shapes, double grad_scale, double max_norm, bool some_without_grad) {
  Mirror m(shapes);
  m.set_grads(grad_scale, [&](size_t i) { return some_without_grad && i % 7 == 3; });
  std::vector<Tensor> before;
  for (const Tensor& p : m.gpu) before.push_back(p.grad().defined() ? p.grad().cpu() : Tensor());
  const double total_cpu = optim::clip_grad_norm(m.cpu, max_norm);
  const double total_gpu = optim::clip_grad_norm(m.gpu, max_norm);
  EXPECT_NEAR(total_gpu, total_cpu, 2e-6 * total_cpu);  // fp32 accumulation (as torch) vs f64
  for (size_t i = 0; i < m.cpu.size(); ++i) {
    SCOPED_TRACE(str_cat("parameter ", i));
    ASSERT_EQ(m.gpu[i].grad().defined(), m.cpu[i].grad().defined());
    if (!m.cpu[i].grad().defined()) continue;
    EXPECT_EQ(m.gpu[i].grad().device(), kCuda);
    if (total_cpu + 1e-6 <= max_norm) {
      EXPECT_TRUE(same_values(m.gpu[i].grad(), before[i])) << "coefficient 1 leaves the gradient as it was";
    } else {
      EXPECT_TRUE(close(m.gpu[i].grad().cpu(), m.cpu[i].grad(), 2e-6));
    }
  }
}

TEST(GpuClipGradNorm, MatchesTheCpuWhenClipping) {
  TQ_REQUIRE_GPU();
  expect_clip_matches(kShapes, 1.0, 1.0, false);
  expect_clip_matches(kShapes, 1.0, 0.5, true);
}

TEST(GpuClipGradNorm, LeavesGradientsAloneBelowTheLimit) {
  TQ_REQUIRE_GPU();
  expect_clip_matches(kShapes, 1e-3, 1e6, true);
}

TEST(GpuClipGradNorm, ManyTensorsAcrossLaunches) {
  TQ_REQUIRE_GPU();
  std::vector<Shape> shapes;
  for (int i = 0; i < 600; ++i) shapes.push_back({1 + int64_t(test::rng()() % 3000)});
  shapes[5] = {0};
  expect_clip_matches(shapes, 1.0, 1.0, true);
}

// The trainer's order: clip, then step; 10 steps. The clip coefficient may differ from the CPU's
// (f64) in its last bit, so the parameters agree to fp32 accuracy rather than bitwise.
TEST(GpuAdamW, ClipThenStepForTenStepsMatchesTheCpu) {
  TQ_REQUIRE_GPU();
  Mirror m(kShapes);
  optim::AdamW cpu(two_groups(m.cpu)), gpu(two_groups(m.gpu));
  for (int k = 0; k < 10; ++k) {
    SCOPED_TRACE(str_cat("step ", k));
    m.set_grads(k % 2 ? 5.0 : 1e-4, [](size_t) { return false; });
    const double tc = optim::clip_grad_norm(m.cpu, 1.0), tg = optim::clip_grad_norm(m.gpu, 1.0);
    EXPECT_NEAR(tg, tc, 2e-6 * tc);
    cpu.step();
    gpu.step();
    for (size_t i = 0; i < m.cpu.size(); ++i) EXPECT_TRUE(close(m.gpu[i].cpu(), m.cpu[i], 1e-5)) << "parameter " << i;
  }
}

// An optimizer step is a few kernel launches and no host synchronization: it captures into a graph.
TEST(GpuAdamW, StepCapturesIntoAGraph) {
  TQ_REQUIRE_GPU();
  tq::cuda::Stream stream;
  StreamGuard guard(DeviceType::cuda, stream);
  Mirror m(kShapes);
  m.set_grads(1.0, [](size_t) { return false; });
  optim::AdamW cpu(two_groups(m.cpu)), gpu(two_groups(m.gpu));
  stream.synchronize();
  const CapturedGraph graph(stream.get(), [&] { gpu.step(); });
  graph.launch();  // the captured step (t = 1) runs once, here
  stream.synchronize();
  cpu.step();
  for (size_t i = 0; i < m.cpu.size(); ++i) EXPECT_TRUE(same_values(m.gpu[i], m.cpu[i])) << "parameter " << i;
}

}  // namespace
