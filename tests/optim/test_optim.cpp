#include <nlohmann/json.hpp>

#include <fstream>

#include "../test_util.hpp"
#include "tq/optim/schedule.hpp"

using namespace tq;
using Json = nlohmann::json;

namespace {
Json load_fixture(const std::string& name) {
  std::string path = std::string(TQ_FIXTURES) + "/optim/" + name;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("missing fixture " + path + " (tools/fixtures/optim_fixtures.py makes it)");
  return Json::parse(in);
}
Tensor tensor_of(const Json& values, const Shape& shape) {
  return Tensor::from_vector<double>(values.get<std::vector<double>>(), shape).to(DType::f32);
}
}  // namespace

TEST(AdamW, MatchesTorchOverTenStepsWithParamGroups) {
  Json fx = load_fixture("adamw_torch.json");
  std::vector<Shape> shapes;
  for (auto& s : fx["shapes"]) shapes.push_back(s.get<Shape>());
  std::vector<Tensor> params;
  for (size_t i = 0; i < shapes.size(); ++i) params.push_back(tensor_of(fx["init"][i], shapes[i]).requires_grad_());
  std::vector<optim::ParamGroup> groups;
  for (auto& g : fx["groups"]) {
    optim::ParamGroup pg;
    pg.name = "g" + std::to_string(groups.size());
    for (auto& i : g["params"]) pg.params.push_back(params[i.get<size_t>()]);
    pg.lr = g["lr"];
    pg.weight_decay = g["weight_decay"];
    groups.push_back(pg);
  }
  optim::AdamW opt(groups, {.beta1 = fx["betas"][0], .beta2 = fx["betas"][1], .eps = fx["eps"]});
  double worst = 0;
  for (auto& step : fx["steps"]) {
    for (size_t i = 0; i < params.size(); ++i) params[i].set_grad(tensor_of(step["grads"][i], shapes[i]));
    opt.step();
    for (size_t i = 0; i < params.size(); ++i) {
      auto ref = step["params"][i].get<std::vector<double>>();
      auto got = params[i].to_vector();
      for (size_t j = 0; j < ref.size(); ++j) worst = std::max(worst, std::abs(got[j] - ref[j]) / std::max(1.0, std::abs(ref[j])));
    }
  }
  EXPECT_LE(worst, 1e-6);
}

TEST(AdamW, StateRoundTripsForResume) {
  Tensor p = test::random({3, 2}, DType::f32).requires_grad_();
  Tensor q = p.detach().clone().requires_grad_();
  optim::AdamW a({{.name = "x", .params = {p}, .lr = 1e-2, .weight_decay = 0.1}});
  optim::AdamW b({{.name = "x", .params = {q}, .lr = 1e-2, .weight_decay = 0.1}});
  std::vector<Tensor> grads;
  for (int i = 0; i < 6; ++i) grads.push_back(test::random({3, 2}, DType::f32));
  for (int i = 0; i < 3; ++i) {
    p.set_grad(grads[size_t(i)]);
    a.step();
  }
  std::map<std::string, Tensor> sd;
  for (auto& [k, v] : a.state_dict()) sd[k] = v.clone();
  q.copy_(p.detach());
  b.load_state_dict(sd);
  for (int i = 3; i < 6; ++i) {
    p.set_grad(grads[size_t(i)]);
    a.step();
    q.set_grad(grads[size_t(i)]);
    b.step();
  }
  EXPECT_EQ(p.to_vector(), q.to_vector());  // bitwise
  sd.erase("x.0.step");
  EXPECT_THROW(b.load_state_dict(sd), Error);
}

TEST(AdamW, SkipsParamsWithoutGradAndRejectsNonLeaves) {
  Tensor p = test::random({4}, DType::f32).requires_grad_();
  auto before = p.to_vector();
  optim::AdamW opt({{.name = "x", .params = {p}, .lr = 1.0}});
  opt.step();
  EXPECT_EQ(p.to_vector(), before);
  EXPECT_THROW(optim::AdamW({{.name = "y", .params = {p * 2.0}}}), Error);
  EXPECT_THROW(optim::AdamW({{.name = "z", .params = {test::random({2}, DType::bf16).requires_grad_()}}}), Error);
}

TEST(Schedule, EqualsHfLinearWarmupFor2366Steps) {
  Json fx = load_fixture("schedule_hf.json");
  const int64_t n = fx["total_steps"];
  EXPECT_EQ(n, 2366);
  EXPECT_EQ(optim::warmup_steps_from_ratio(n, 0.03), fx["warmup_steps"].get<int64_t>());
  EXPECT_EQ(optim::warmup_steps_from_ratio(n, 0.03), 71);
  optim::LinearWarmupDecay sched{.warmup_steps = 71, .total_steps = n};
  auto lrs = fx["lrs"].get<std::vector<double>>();
  ASSERT_EQ(int64_t(lrs.size()), n);
  for (int64_t k = 0; k < n; ++k) ASSERT_NEAR(1e-4 * sched.factor(k), lrs[size_t(k)], 1e-18) << "step " << k;
  EXPECT_EQ(sched.factor(0), 0.0);
}

TEST(ClipGradNorm, MatchesTorch) {
  Json fx = load_fixture("clip_torch.json");
  for (auto& c : fx["cases"]) {
    std::vector<Tensor> params;
    for (size_t i = 0; i < c["shapes"].size(); ++i) {
      Shape s = c["shapes"][i].get<Shape>();
      Tensor p = Tensor::zeros(s).requires_grad_();
      p.set_grad(tensor_of(c["grads"][i], s));
      params.push_back(p);
    }
    double total = optim::clip_grad_norm(params, 1.0);
    EXPECT_NEAR(total, c["total"].get<double>(), 1e-6 * c["total"].get<double>());
    for (size_t i = 0; i < params.size(); ++i) {
      auto ref = c["clipped"][i].get<std::vector<double>>();
      auto got = params[i].grad().to_vector();
      for (size_t j = 0; j < ref.size(); ++j) EXPECT_NEAR(got[j], ref[j], 1e-6 * std::max(1.0, std::abs(ref[j])));
    }
  }
}
