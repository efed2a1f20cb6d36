// LoRA / rsLoRA / DoRA against peft 0.21 fixtures (tools/fixtures/peft_fixtures.py), and the
// adapter file format in both directions.
#include <filesystem>

#include "../test_util.hpp"

using namespace tq;

namespace {

std::string fixture(const std::string& name) { return std::string(TQ_FIXTURES) + "/lora/" + name; }

// The fixture's model: `lin` Linear(37 → 29, bias) is targeted, `other` is not.
struct Tiny : nn::Module {
  std::unique_ptr<nn::LinearBase> lin, other;
  explicit Tiny(const SafetensorsFile& f) {
    lin = std::make_unique<nn::Linear>(f.get("base.weight").clone(), f.get("base.bias").clone());
    other = std::make_unique<nn::Linear>(Tensor::zeros({29, 29}), Tensor());
    register_linear("lin", &lin);
    register_linear("other", &other);
  }
};

double rel_err(const Tensor& got, const Tensor& ref) {
  auto g = got.to_vector(), r = ref.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    num = std::max(num, std::abs(g[i] - r[i]));
    den = std::max(den, std::abs(r[i]));
  }
  return num / den;
}

}  // namespace

class PeftFixture : public ::testing::TestWithParam<std::string> {};

// Load peft's own adapter directory, then compare forward and every gradient with peft's.
TEST_P(PeftFixture, AdapterWrittenByPeftReproducesPeft) {
  const std::string v = GetParam();
  auto f = SafetensorsFile::open(fixture(v + ".safetensors"));
  Tiny model(f);
  nn::AdapterInfo info = nn::load_adapter(fixture(v + "_adapter"), model);
  EXPECT_EQ(info.config.r, 4);
  EXPECT_EQ(info.config.dora, v == "dora");
  auto* l = dynamic_cast<nn::LoRA<>*>(model.lin.get());
  ASSERT_NE(l, nullptr);
  EXPECT_EQ(dynamic_cast<nn::LoRA<>*>(model.other.get()), nullptr);  // not a target
  EXPECT_DOUBLE_EQ(l->scaling(), v == "rslora" ? 4.0 : 2.0);
  EXPECT_EQ(l->lora_A.to_vector(), f.get("lora_A").to_vector());
  EXPECT_EQ(l->lora_B.to_vector(), f.get("lora_B").to_vector());
  model.train(false);
  Tensor x = f.get("x").clone().requires_grad_();
  Tensor y = model.lin->forward(x);
  EXPECT_LE(rel_err(y, f.get("y")), 1e-5);
  sum(y * f.get("w")).backward();
  EXPECT_LE(rel_err(x.grad(), f.get("grad.x")), 1e-5);
  EXPECT_LE(rel_err(l->lora_A.grad(), f.get("grad.lora_A")), 1e-5);
  EXPECT_LE(rel_err(l->lora_B.grad(), f.get("grad.lora_B")), 1e-5);
  if (v == "dora") {
    EXPECT_LE(rel_err(l->lora_magnitude_vector.grad(), f.get("grad.magnitude")), 1e-5);
  }
}

// An adapter written by tq reads back identically and carries peft's keys and config fields.
TEST_P(PeftFixture, TqWrittenAdapterHasPeftLayout) {
  const std::string v = GetParam();
  auto f = SafetensorsFile::open(fixture(v + ".safetensors"));
  Tiny model(f);
  nn::load_adapter(fixture(v + "_adapter"), model);
  const std::string dir = ::testing::TempDir() + "/tq_adapter_" + v;
  // task_type null, as for the fixture's plain module (CAUSAL_LM needs a generation-capable model).
  nn::save_adapter(dir, model, {.config = dynamic_cast<nn::LoRA<>*>(model.lin.get())->config, .task_type = ""});
  auto peft_file = SafetensorsFile::open(fixture(v + "_adapter/adapter_model.safetensors"));
  auto ours = SafetensorsFile::open(dir + "/adapter_model.safetensors");
  EXPECT_EQ(ours.keys(), peft_file.keys());
  for (const auto& k : ours.keys()) EXPECT_EQ(ours.get(k).to_vector(), peft_file.get(k).to_vector()) << k;
  EXPECT_EQ(ours.metadata().at("format"), "pt");
  json::Value cfg = json::parse_file(dir + "/adapter_config.json");
  EXPECT_EQ(cfg.at("peft_type").as_string(), "LORA");
  EXPECT_EQ(cfg.at("use_dora").as_bool(), v == "dora");
  EXPECT_EQ(cfg.at("use_rslora").as_bool(), v == "rslora");
  // A fresh model loads it to the same outputs.
  Tiny again(f);
  nn::load_adapter(dir, again);
  Tensor x = f.get("x");
  again.train(false);
  model.train(false);
  Tensor y = again.lin->forward(x);
  EXPECT_EQ(y.to_vector(), model.lin->forward(x).to_vector());
  // For tools/fixtures/peft_roundtrip.py: peft loads this directory and must reproduce y.
  save_safetensors(dir + "/tq_outputs.safetensors", {{"x", x}, {"y", y}});
}

INSTANTIATE_TEST_SUITE_P(Variants, PeftFixture, ::testing::Values("lora", "rslora", "dora"));

TEST(PeftAdapter, BadAdaptersAreRejectedWithTheKey) {
  auto f = SafetensorsFile::open(fixture("lora.safetensors"));
  const std::string dir = ::testing::TempDir() + "/tq_bad_adapter";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(fixture("lora_adapter/adapter_config.json"), dir + "/adapter_config.json",
                             std::filesystem::copy_options::overwrite_existing);
  auto expect_error = [&](const std::vector<std::pair<std::string, Tensor>>& tensors, const std::string& needle) {
    save_safetensors(dir + "/adapter_model.safetensors", tensors);
    Tiny model(f);
    try {
      nn::load_adapter(dir, model);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  Tensor A = f.get("lora_A"), B = f.get("lora_B");
  expect_error({{"base_model.model.lin.lora_A.weight", A}}, "missing tensor 'base_model.model.lin.lora_B.weight'");
  expect_error({{"base_model.model.lin.lora_A.weight", A}, {"base_model.model.lin.lora_B.weight", A}},
               "'base_model.model.lin.lora_B.weight' has shape");
  expect_error({{"lin.lora_A.weight", A}, {"lin.lora_B.weight", B}}, "lacks the 'base_model.model.' prefix");
  expect_error({{"base_model.model.lin.lora_A.weight", A},
                {"base_model.model.lin.lora_B.weight", B},
                {"base_model.model.nothere.lora_A.weight", A}},
               "matches no LoRA layer");
  std::filesystem::remove(dir + "/adapter_config.json");
  Tiny model(f);
  EXPECT_THROW(nn::load_adapter(dir, model), Error);
}
