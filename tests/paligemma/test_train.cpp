#include <unistd.h>
// Training: one step's loss and adapter gradients against peft + transformers (fp32, dropout 0) for
// LoRA, rsLoRA and DoRA on the tiny PaliGemma fixtures, in-process and through `paligemma grads`;
// bitwise resume; clear errors (bad data, missing model files, a full disk while checkpointing);
// the recipe's trainable-parameter count for PaliGemma-3B from its config alone.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "paligemma/adapter.hpp"
#include "paligemma/cli_model_common.hpp"
#include "paligemma/train.hpp"
#include "risc/dataset.hpp"

namespace {

// ctest runs each test in its own process, two at a time: scratch paths must not collide.
inline std::filesystem::path scratch_dir() {
  static const std::filesystem::path d = [] {
    auto p = std::filesystem::temp_directory_path() / ("tq_train_" + std::to_string(::getpid()));
    std::filesystem::create_directories(p);
    return p;
  }();
  return d;
}

namespace fs = std::filesystem;
using namespace tq;
using namespace tq::paligemma;

const fs::path kFix = fs::path(TQ_FIXTURES) / "train";

double rel_err(const Tensor& got, const Tensor& ref) {
  std::vector<float> g = got.to(DType::f32).to_vector<float>(), r = ref.to(DType::f32).to_vector<float>();
  EXPECT_EQ(g.size(), r.size());
  double md = 0, mr = 0;
  for (size_t i = 0; i < std::min(g.size(), r.size()); ++i) {
    md = std::max(md, double(std::abs(g[i] - r[i])));
    mr = std::max(mr, double(std::abs(r[i])));
  }
  return md / std::max(mr, 1e-30);
}

std::unique_ptr<PaliGemmaForConditionalGeneration> tiny_model(const std::string& kind, bool hf_compat = true) {
  LoadOptions o;
  auto m = load_model((fs::path(TQ_FIXTURES) / "paligemma" / kind / "native").string(), o);
  m->options.hf_compat = hf_compat;
  return m;
}

// Compares a {loss, grad.*} file against the fixture; returns the worst relative error.
double compare(SafetensorsFile& got, SafetensorsFile& ref, const std::string& what) {
  double worst = 0;
  EXPECT_EQ(got.keys().size(), ref.keys().size()) << what;
  for (const auto& k : ref.keys()) {
    if (!got.contains(k)) {
      ADD_FAILURE() << what << ": missing " << k;
      continue;
    }
    const double e = rel_err(got.get(k), ref.get(k));
    EXPECT_LE(e, 1e-4) << what << " " << k;
    worst = std::max(worst, e);
  }
  return worst;
}

class TrainGrads : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(TrainGrads, OneStepMatchesPeft) {
  const auto& [kind, variant] = GetParam();
  auto m = tiny_model(kind);
  m->set_requires_grad(false);
  const fs::path dir = kFix / kind / variant;
  load_peft_adapter((dir / "adapter").string(), *m);
  m->train(false);
  Batch b = tq::paligemma::cli::load_batch_file((kFix / kind / "batch.safetensors").string());
  // The training path: Σ CE / (supervised tokens of the effective batch).
  const double n = double(train::count_supervised(b, m->config.ignore_index));
  Tensor loss = train::summed_loss(*m, b, n);
  loss.backward();
  auto ref = SafetensorsFile::open((dir / "grads.safetensors").string());
  EXPECT_LE(rel_err(loss.reshape({1}), ref.get("loss")), 1e-5);
  double worst = 0;
  std::map<std::string, Tensor*> params;
  for (auto& [name, t] : m->named_parameters()) params[name] = t;
  std::map<std::string, std::string> by_canonical;  // the fixture uses transformers 5.17's module names
  for (auto& [name, mod] : m->named_modules()) by_canonical[canonical_key(name)] = name;
  int checked = 0;
  for (const auto& k : ref.keys()) {
    if (k == "loss") continue;
    std::string p = k.substr(std::string("grad.base_model.model.").size());
    const size_t cut = p.find(".lora_");
    ASSERT_TRUE(by_canonical.count(canonical_key(p.substr(0, cut)))) << p;
    p = by_canonical[canonical_key(p.substr(0, cut))] + p.substr(cut);
    ASSERT_TRUE(params.count(p)) << p;
    ASSERT_TRUE(params[p]->grad().defined()) << p;
    const double e = rel_err(params[p]->grad(), ref.get(k));
    EXPECT_LE(e, 1e-4) << k;
    worst = std::max(worst, e);
    ++checked;
  }
  EXPECT_GT(checked, 30);
  std::printf("[ info ] %s/%s loss %.6f, %d grads, worst relative error %.2e\n", kind.c_str(), variant.c_str(),
              loss.item<double>(), checked, worst);
}

TEST_P(TrainGrads, GradsCliMatchesPeft) {
  const auto& [kind, variant] = GetParam();
  const fs::path dir = kFix / kind / variant;
  const fs::path out = scratch_dir() / ("tq_grads_" + kind + variant + ".safetensors");
  const std::string cmd = std::string(TQ_BIN_DIR) + "/paligemma grads --hf-compat --model " +
                          (fs::path(TQ_FIXTURES) / "paligemma" / kind / "native").string() + " --adapter " +
                          (dir / "adapter").string() + " --batch " + (kFix / kind / "batch.safetensors").string() +
                          " --out " + out.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto got = SafetensorsFile::open(out.string());
  auto ref = SafetensorsFile::open((dir / "grads.safetensors").string());
  const double worst = compare(got, ref, kind + "/" + variant);
  std::printf("[ info ] grads CLI %s/%s worst relative error %.2e\n", kind.c_str(), variant.c_str(), worst);
  fs::remove(out);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TrainGrads,
                         ::testing::Combine(::testing::Values("pg1", "pg2"),
                                            ::testing::Values("lora", "rslora", "dora")),
                         [](const auto& i) { return std::get<0>(i.param) + "_" + std::get<1>(i.param); });

// A tokenizer that fits the tiny model's 288-token vocabulary, laid out as PaliGemmaProcessor does:
// [<image> x4][<bos>][prompt][\n][caption][<eos>], labels on caption + eos.
risc::TokenizeFn tiny_tokenize() {
  return [](const std::string& caption) {
    risc::TokenizedText t;
    auto push = [&](int id, int type) {
      t.input_ids.push_back(id);
      t.token_type_ids.push_back(type);
      t.labels.push_back(type ? id : -100);
    };
    for (int i = 0; i < 4; ++i) push(280, 0);
    for (int id : {2, 40, 41, 10}) push(id, 0);
    for (size_t i = 0; i < caption.size() && i < 8; ++i) push(11 + int((unsigned char)caption[i]) % 260, 1);
    push(1, 1);
    return t;
  };
}

const std::string kData = (fs::path(TQ_FIXTURES) / "risc" / "parquet" / "matrix" / "dense_gzip_dict_v1_small.parquet").string();

train::TrainOptions tiny_options(const fs::path& out) {
  train::TrainOptions o;
  o.batch_size = 2;
  o.grad_accum = 2;
  o.max_steps = 6;
  o.lora_plus_ratio = 16;
  o.lr = 1e-2;  // large enough that every step moves the adapter visibly
  o.out = out.string();
  return o;
}

struct TinyRun {
  std::unique_ptr<PaliGemmaForConditionalGeneration> m = tiny_model("pg1", false);
  std::unique_ptr<risc::Dataset> ds = risc::open_dataset(kData);
  std::unique_ptr<train::Trainer> tr;
  explicit TinyRun(train::TrainOptions o) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < ds->size(); ++i) rows.push_back(i);
    tr = std::make_unique<train::Trainer>(*m, *ds, rows, std::vector<int64_t>{0, 1}, tiny_tokenize(), o);
  }
};

TEST(TrainResume, BitIdenticalLosses) {
  const fs::path out = scratch_dir() / "tq_train_resume";
  fs::remove_all(out);
  fs::create_directories(out);
  TinyRun full(tiny_options(out / "full"));
  std::vector<double> ref = full.tr->run().losses;
  ASSERT_EQ(ref.size(), 6u);
  EXPECT_NE(ref[0], ref[5]);
  std::vector<double> got;
  {
    TinyRun a(tiny_options(out / "split"));
    fs::create_directories(out / "split");
    got = a.tr->run(3).losses;
    a.tr->save_checkpoint((out / "split").string());
  }
  {
    TinyRun b(tiny_options(out / "split"));
    b.tr->resume((out / "split").string());
    EXPECT_EQ(b.tr->step(), 3);
    for (double l : b.tr->run().losses) got.push_back(l);
  }
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(got[i], ref[i]) << "step " << i;  // bitwise
  fs::remove_all(out);
}

// Runs longer than an epoch: every step takes grad_accum micro-batches (the last step of an epoch
// fewer), never the rest of the next epoch (a step used to swallow a whole epoch after the first).
TEST(TrainEpochs, EveryStepTakesOneAccumulationOfMicroBatches) {
  const fs::path out = scratch_dir() / "tq_train_epochs";
  fs::remove_all(out);
  train::TrainOptions o = tiny_options(out);
  TinyRun probe(o);
  const int64_t rows = probe.ds->size(), per_epoch = (rows + o.batch_size - 1) / o.batch_size;
  o.max_steps = 3 * ((per_epoch + o.grad_accum - 1) / o.grad_accum) + 1;  // into a 4th epoch
  TinyRun run(o);
  std::vector<int64_t> samples;
  run.tr->on_step = [&](const train::StepLog& l) { samples.push_back(l.step_samples); };
  run.tr->run();
  ASSERT_EQ(int64_t(samples.size()), o.max_steps);
  int64_t micro = 0, total = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    const int64_t n_micro = std::min<int64_t>(o.grad_accum, per_epoch - micro);
    int64_t expect = 0;
    for (int64_t k = 0; k < n_micro; ++k) expect += std::min<int64_t>(o.batch_size, rows - (micro + k) * o.batch_size);
    EXPECT_EQ(samples[i], expect) << "step " << i + 1;
    micro = (micro + n_micro) % per_epoch;
    total += samples[i];
  }
  EXPECT_GT(total, 3 * rows);
  fs::remove_all(out);
}

// Gradient checkpointing recomputes decoder layers with the same dropout masks: same losses.
TEST(TrainResume, GradCheckpointingSameLosses) {
  const fs::path out = scratch_dir() / "tq_train_gc";
  train::TrainOptions o = tiny_options(out);
  o.max_steps = 3;
  TinyRun plain(o);
  std::vector<double> ref = plain.tr->run().losses;
  o.grad_checkpointing = true;
  TinyRun gc(o);
  std::vector<double> got = gc.tr->run().losses;
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(got[i], ref[i]) << "step " << i;
}

TEST(TrainCheckpoint, FullDiskKeepsPreviousCheckpoint) {
  const fs::path out = scratch_dir() / "tq_train_fulldisk";
  fs::remove_all(out);
  fs::create_directories(out);
  {
    TinyRun a(tiny_options(out));
    a.tr->run(1);
    a.tr->save_checkpoint(out.string());
  }
  const fs::path prev = out / "checkpoint-1";
  ASSERT_TRUE(fs::exists(prev / "state.safetensors"));
  const auto size_before = fs::file_size(prev / "state.safetensors");
  train::TrainOptions o = tiny_options(out);
  o.fail_after_bytes = 1000;
  TinyRun b(o);
  b.tr->resume(out.string());
  b.tr->run(1);
  try {
    b.tr->save_checkpoint(out.string());
    FAIL() << "the injected full disk did not fail the checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("No space left on device"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("previous checkpoint is intact"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out / "checkpoint-2"));
  EXPECT_FALSE(fs::exists(out / "checkpoint-2.tmp"));
  EXPECT_EQ(fs::file_size(prev / "state.safetensors"), size_before);
  TinyRun c(tiny_options(out));
  c.tr->resume(out.string());  // the previous checkpoint still loads
  EXPECT_EQ(c.tr->step(), 1);
  fs::remove_all(out);
}

int run_cli(const std::string& args, std::string& err) {
  const fs::path log = scratch_dir() / "tq_train_cli.err";
  const int rc = std::system((std::string(TQ_BIN_DIR) + "/paligemma " + args + " 2> " + log.string()).c_str());
  std::ifstream in(log);
  err.assign(std::istreambuf_iterator<char>(in), {});
  return rc;
}

TEST(TrainCli, BadDataAndMissingModelFilesFailClearly) {
  const std::string model = (fs::path(TQ_FIXTURES) / "paligemma_proc" / "model").string();
  const fs::path out = scratch_dir() / "tq_train_cli_out";
  std::string err;
  EXPECT_NE(run_cli("train --model " + model + " --data /nonexistent/risc.parquet --out " + out.string(), err), 0);
  EXPECT_NE(err.find("--data /nonexistent/risc.parquet"), std::string::npos) << err;
  // The processor fixture has a tokenizer and config but no weights.
  EXPECT_NE(run_cli("train --model " + model + " --data " + kData + " --out " + out.string(), err), 0);
  EXPECT_NE(err.find(model), std::string::npos) << err;
  EXPECT_NE(err.find("safetensors"), std::string::npos) << err;
  EXPECT_NE(run_cli("train --model " + model + " --data " + kData + " --out " + out.string() + " --device cuda", err), 0);
  // This (CPU) build has no CUDA backend: one line saying so, before anything is loaded.
  EXPECT_NE(err.find("without the CUDA backend"), std::string::npos) << err;
  fs::remove_all(out);
}

// A tiny model that fits the processor fixture's tokenizer: its config + random weights.
fs::path tiny_model_dir() {
  const fs::path dir = scratch_dir() / "tq_train_tiny_model";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(fs::path(TQ_FIXTURES) / "paligemma_proc" / "model"))
    fs::copy_file(e.path(), dir / e.path().filename());
  PaliGemmaForConditionalGeneration m(load_config(dir.string()), DType::f32);
  Generator gen(7);
  std::vector<std::pair<std::string, Tensor>> w;
  for (auto& [name, t] : m.named_parameters()) w.push_back({name, rand(t->shape(), gen, DType::f32, -0.1, 0.1)});
  save_safetensors((dir / "model.safetensors").string(), w, {{"format", "pt"}});
  return dir;
}

std::vector<std::string> log_losses(const fs::path& jsonl) {
  std::ifstream in(jsonl);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line)["loss"].dump());
  return out;
}

// The CLI end to end with the recipe's defaults (NF4 base, bf16, rsLoRA, LoRA+, gradient
// checkpointing): outputs, logs, checkpoints, the same losses without checkpointing, and a
// --stop-after / --resume pair that reproduces the uninterrupted run's losses.
TEST(TrainCli, RecipeEndToEndAndResume) {
  const fs::path model = tiny_model_dir(), out = scratch_dir() / "tq_train_cli_e2e";
  fs::remove_all(out);
  const std::string common = "train --model " + model.string() + " --data " + kData +
                             " --max-steps 4 --batch-size 2 --grad-accum 2 --save-every 2 --lr 1e-2 --val-size 0.25 --eval-every 2 --out ";
  std::string err;
  ASSERT_EQ(run_cli(common + (out / "full").string(), err), 0) << err;
  for (const char* f : {"config.json", "log.jsonl", "log.csv", "adapter/adapter_model.safetensors",
                        "adapter/adapter_config.json", "checkpoint-4/state.safetensors", "curves.png"})
    EXPECT_TRUE(fs::exists(out / "full" / f)) << f;
  {  // curves.png: a real PNG of the figure's size (IHDR width/height, big-endian)
    std::ifstream png(out / "full" / "curves.png", std::ios::binary);
    std::string head(24, '\0');
    png.read(head.data(), 24);
    ASSERT_EQ(head.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    auto be32 = [&](size_t o) {
      return (uint32_t(uint8_t(head[o])) << 24) | (uint32_t(uint8_t(head[o + 1])) << 16) |
             (uint32_t(uint8_t(head[o + 2])) << 8) | uint32_t(uint8_t(head[o + 3]));
    };
    EXPECT_EQ(be32(16), 960u);
    EXPECT_EQ(be32(20), 720u);
  }
  EXPECT_FALSE(fs::exists(out / "full" / "checkpoint-2"));  // superseded
  std::vector<std::string> ref = log_losses(out / "full" / "log.jsonl");
  ASSERT_EQ(ref.size(), 4u);
  {
    std::ifstream in(out / "full" / "log.jsonl");
    std::vector<double> eval;
    for (std::string line; std::getline(in, line);)
      if (auto j = nlohmann::json::parse(line); j.contains("eval_loss")) eval.push_back(j["eval_loss"].get<double>());
    ASSERT_EQ(eval.size(), 2u);  // steps 2 and 4
    EXPECT_GT(eval[0], 0);
    EXPECT_NE(eval[0], eval[1]);
  }
  auto cfg = nlohmann::json::parse(std::ifstream(out / "full" / "config.json"));
  EXPECT_EQ(cfg["lora-plus-ratio"], "16");
  EXPECT_EQ(cfg["quant"], "nf4");
  EXPECT_EQ(cfg["grad-checkpointing"], true);  // the notebook's gradient_checkpointing=True
  // Turning it off changes memory, not math: the same losses to the printed digit.
  ASSERT_EQ(run_cli(common + (out / "no_gc").string() + " --no-grad-checkpointing", err), 0) << err;
  EXPECT_EQ(nlohmann::json::parse(std::ifstream(out / "no_gc" / "config.json"))["grad-checkpointing"], false);
  EXPECT_EQ(log_losses(out / "no_gc" / "log.jsonl"), ref);
  ASSERT_EQ(run_cli(common + (out / "split").string() + " --stop-after 2", err), 0) << err;
  EXPECT_TRUE(fs::exists(out / "split" / "checkpoint-2" / "state.safetensors"));
  EXPECT_FALSE(fs::exists(out / "split" / "adapter"));
  ASSERT_EQ(run_cli(common + (out / "split").string() + " --resume " + (out / "split").string(), err), 0) << err;
  EXPECT_EQ(log_losses(out / "split" / "log.jsonl"), ref);  // bitwise: same printed doubles
  fs::remove_all(out);
  fs::remove_all(model);
}

// Ctrl-C: the step in progress finishes, a checkpoint is written, exit status 130; it resumes.
TEST(TrainCli, InterruptSavesCheckpoint) {
  const fs::path model = tiny_model_dir(), out = scratch_dir() / "tq_train_cli_sigint";
  fs::remove_all(out);
  const std::string args = "train --model " + model.string() + " --data " + kData +
                           " --max-steps 100000 --batch-size 2 --grad-accum 1 --out " + out.string();
  const std::string cmd = "timeout --preserve-status -s INT 3 " + std::string(TQ_BIN_DIR) + "/paligemma " + args +
                          " 2> " + (scratch_dir() / "tq_train_sigint.err").string();
  const int rc = std::system(cmd.c_str());
  std::ifstream in(scratch_dir() / "tq_train_sigint.err");
  std::string err(std::istreambuf_iterator<char>(in), {});
  ASSERT_TRUE(WIFEXITED(rc)) << err;
  EXPECT_EQ(WEXITSTATUS(rc), 130) << err;
  EXPECT_NE(err.find("interrupted at step"), std::string::npos) << err;
  const fs::path ck = train::Trainer::find_checkpoint(out.string());
  EXPECT_TRUE(fs::exists(ck / "adapter" / "adapter_model.safetensors"));
  std::string err2;
  EXPECT_EQ(run_cli(args + " --resume " + out.string() + " --stop-after 1", err2), 0) << err2;
  EXPECT_NE(err2.find("resumed at step"), std::string::npos) << err2;
  fs::remove_all(out);
  fs::remove_all(model);
}

TEST(TrainCount, PaliGemma3bRecipeTrainableParameters) {
  // google/paligemma-3b-pt-224 config.json (the fields that set the shapes).
  const char* cfg = R"({"model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
    "hidden_size": 2048, "vocab_size": 257216,
    "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
      "num_attention_heads": 8, "num_key_value_heads": 1, "num_hidden_layers": 18, "head_dim": 256,
      "num_image_tokens": 256, "vocab_size": 257216},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "image_size": 224,
      "projection_dim": 2048}})";
  PaliGemmaConfig c = parse_config(json::parse(cfg));
  nn::LoraConfig l;
  l.r = 16;
  l.target_modules = train::recipe_targets();
  EXPECT_EQ(train::lora_trainable_count(c, l), 22597632);
  // The count formula agrees with the adapters apply_lora actually builds (tiny model, DoRA too).
  for (bool dora : {false, true}) {
    train::TrainOptions o = tiny_options(scratch_dir() / "tq_train_count");
    o.dora = dora;
    TinyRun r(o);
    l.dora = dora;
    EXPECT_EQ(r.tr->trainable_parameters(), train::lora_trainable_count(r.m->config, l));
  }
}

}  // namespace
