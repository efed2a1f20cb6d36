// QLoRA training of PaliGemma: the reference recipe (spec/qlora.md §0, B, D) as a library, used by
// `paligemma train` and the tests.
//
// Invariants:
//  * one optimizer step = grad_accum micro-batches; the loss of each micro-batch is Σ CE over its
//    supervised tokens / (supervised tokens of the whole step), so the accumulated gradient is the
//    token mean over the effective batch (spec D.3, HF `num_items_in_batch`);
//  * lr of step k (0-based) = initial_lr · f(k), f = linear warmup (ceil(N·ratio) steps) then linear
//    decay; step 0 uses lr 0; the logged lr is group 0's lr of the step just taken (D.2, D.5);
//  * the pre-clip global grad norm is logged, every grad is scaled by min(1, clip/(norm+1e-6)) (D.4);
//  * everything a step depends on — adapter tensors, AdamW moments and step counts, the schedule
//    step, each LoRA layer's dropout offset, the data position (epoch, micro-batch) — is in a
//    checkpoint, so resuming from one continues bit-identically on the CPU;
//  * a checkpoint is written into `<out>/checkpoint-<step>.tmp` and renamed when complete; older
//    checkpoints are removed only after that rename, so a failed write leaves the previous one intact;
//  * data parallel (dist/): every step goes through a Communicator, world size 1 included (NCCL on
//    CUDA, the local one on the CPU). Each rank reads its block of the step's effective batch
//    (dist::shard_step over epoch positions, so any world size resumes any checkpoint), divides
//    its summed CE by T/W (T = supervised tokens of the whole effective batch), and the adapter
//    gradients are averaged in one flat buffer (dist::GradBucket) before clipping and AdamW: the
//    step equals the single-process step up to reduction order (and dropout draws). Only rank 0
//    writes files.
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <tq/tq.hpp>
#include <tq/dist/dist.hpp>

#include "paligemma/adapter.hpp"
#include "paligemma/paligemma.hpp"
#include "paligemma/weights.hpp"
#include "risc/loader.hpp"

namespace tq::paligemma::train {

namespace fs = std::filesystem;

inline const std::vector<std::string>& recipe_targets() {
  static const std::vector<std::string> t = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return t;
}

struct TrainOptions {
  // LoRA (spec B)
  int64_t lora_r = 16;
  double lora_alpha = 32, lora_dropout = 0.05;
  bool rslora = true, dora = false;
  std::vector<std::string> target_modules = recipe_targets();
  // optimizer / schedule (spec B.8, D)
  double lr = 1e-4, lora_plus_ratio = 16, weight_decay = 1e-6, warmup_ratio = 0.03, max_grad_norm = 1.0;
  int batch_size = 4, grad_accum = 4, epochs = 1;
  int64_t max_steps = 0;  // > 0: overrides epochs (as HF max_steps)
  uint64_t seed = 42;
  bool grad_checkpointing = false;
  // logging / checkpoints
  int64_t log_every = 1, save_every = 0, eval_every = 0, eval_batches = 0;
  int64_t fail_after_bytes = -1;  // fault injection: a checkpoint write fails after this many bytes
  std::string out;
};

// LoRA+ parameter groups as the reference notebook builds them: lora_A at lr, lora_B at lr × ratio,
// everything else trainable (DoRA magnitudes) at lr; one weight decay for all.
inline std::vector<optim::ParamGroup> lora_plus_groups(nn::Module& m, double lr, double ratio, double wd) {
  optim::ParamGroup a{"lora_A", {}, lr, wd}, b{"lora_B", {}, lr * ratio, wd}, o{"other", {}, lr, wd};
  for (auto& [name, t] : m.named_parameters()) {
    if (!t->defined() || !t->requires_grad()) continue;
    if (name.find("lora_A") != std::string::npos) a.params.push_back(*t);
    else if (name.find("lora_B") != std::string::npos) b.params.push_back(*t);
    else o.params.push_back(*t);
  }
  std::vector<optim::ParamGroup> g = {a, b};
  if (!o.params.empty()) g.push_back(o);
  return g;
}

// Trainable LoRA parameters of a model with this config, from the config alone (no allocation):
// r·(in + out) per adapted Linear (+ out for DoRA), peft's suffix match over the module names.
inline int64_t lora_trainable_count(const PaliGemmaConfig& c, const nn::LoraConfig& l) {
  auto per = [&](int64_t in, int64_t out, const char* name) -> int64_t {
    if (!nn::lora_target_matches(std::string("x.") + name, l.target_modules)) return 0;
    return l.r * (in + out) + (l.dora ? out : 0);
  };
  const TextConfig& t = c.text_config;
  const VisionConfig& v = c.vision_config;
  const int64_t D = t.hidden_size, q = t.num_attention_heads * t.head_dim, kv = t.num_key_value_heads * t.head_dim,
                I = t.intermediate_size, Dv = v.hidden_size;
  const int64_t text = per(D, q, "q_proj") + per(D, kv, "k_proj") + per(D, kv, "v_proj") + per(q, D, "o_proj") +
                       per(D, I, "gate_proj") + per(D, I, "up_proj") + per(I, D, "down_proj");
  // SigLIP: q/k/v/out_proj (out_proj is not "o_proj"), fc1, fc2.
  const int64_t vis = per(Dv, Dv, "q_proj") + per(Dv, Dv, "k_proj") + per(Dv, Dv, "v_proj") +
                      per(Dv, Dv, "out_proj") + per(Dv, v.intermediate_size, "fc1") + per(v.intermediate_size, Dv, "fc2");
  return t.num_hidden_layers * text + v.num_hidden_layers * vis + per(Dv, c.projection_dim, "linear");
}

// Supervised (row, target) pairs: position t predicts labels[t+1] (spec §7).
struct Supervision {
  std::vector<int64_t> rows, targets;
};
inline Supervision supervision(const Tensor& labels, int64_t ignore_index) {
  const int64_t B = labels.size(0), T = labels.size(1);
  std::vector<int64_t> lab = labels.to_vector<int64_t>();
  Supervision s;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t y = lab[size_t(b * T + t + 1)];
      if (y == ignore_index) continue;
      s.rows.push_back(b * T + t);
      s.targets.push_back(y);
    }
  return s;
}

// Σ CE over the batch's supervised tokens / normalizer (differentiable, fp32 scalar).
inline Tensor summed_loss(PaliGemmaForConditionalGeneration& m, const Batch& b, double normalizer) {
  const int64_t B = b.input_ids.size(0), T = b.input_ids.size(1);
  Supervision s = supervision(b.labels, m.config.ignore_index);
  TQ_CHECK(!s.rows.empty(), "train: a micro-batch has no supervised tokens");
  Tensor h = m.hidden_states(b.input_ids, b.pixel_values, m.forward_positions(B, T), m.prompt_mask(b));
  const int64_t n = int64_t(s.rows.size()), D = h.size(2);
  Tensor sel = index_select(h.reshape({B * T, D}), 0, m.on_device(Tensor::from_vector(s.rows, {n})));
  return m.lm_loss(sel, m.on_device(Tensor::from_vector(s.targets, {n})), normalizer);
}

inline int64_t count_supervised(const Batch& b, int64_t ignore_index) {
  return int64_t(supervision(b.labels, ignore_index).rows.size());
}

// Loader batch → model batch: right padding with pad_id, attention mask, token types, labels.
inline Batch collate(const risc::Batch& lb, int64_t pad_id, int image_h, int image_w) {
  const int64_t B = lb.size();
  TQ_CHECK(B > 0 && int64_t(lb.tokens.size()) == B, "train: loader batch without tokens");
  size_t T = 0;
  for (const auto& t : lb.tokens) T = std::max(T, t.input_ids.size());
  std::vector<int64_t> ids(size_t(B) * T, pad_id), am(size_t(B) * T, 0), tt(size_t(B) * T, 0), lab(size_t(B) * T, -100);
  for (int64_t b = 0; b < B; ++b) {
    const auto& t = lb.tokens[size_t(b)];
    for (size_t i = 0; i < t.input_ids.size(); ++i) {
      const size_t k = size_t(b) * T + i;
      ids[k] = t.input_ids[i];
      am[k] = 1;
      tt[k] = t.token_type_ids[i];
      lab[k] = t.labels[i];
    }
  }
  Batch out;
  const Shape s{B, int64_t(T)};
  out.input_ids = Tensor::from_vector(ids, s);
  out.attention_mask = Tensor::from_vector(am, s);
  out.token_type_ids = Tensor::from_vector(tt, s);
  out.labels = Tensor::from_vector(lab, s);
  const size_t plane = size_t(3) * image_h * image_w;
  std::vector<float> px(lb.pixels->data(), lb.pixels->data() + plane * size_t(B));
  out.pixel_values = Tensor::from_vector(px, {B, 3, image_h, image_w});
  return out;
}

// SIGINT sets this; the loop saves a checkpoint after the current step and stops.
inline std::atomic<bool>& interrupt_flag() {
  static std::atomic<bool> f{false};
  return f;
}

struct StepLog {
  int64_t step = 0;  // optimizer steps done
  int64_t step_samples = 0;  // samples in the step just taken (batch_size × grad_accum, fewer at an epoch's end)
  double loss = 0, lr = 0, grad_norm = 0, samples_per_s = 0, elapsed_s = 0;
  std::optional<double> eval_loss;
};

struct TrainResult {
  int64_t steps_done = 0, total_steps = 0;
  std::vector<double> losses;  // per optimizer step, this run
  bool interrupted = false;
  std::string last_checkpoint;
};

// Where a training step's time goes, when TQ_PROFILE=1: the device is synchronized at every phase
// boundary (so phases do not overlap, and the run is slower than an unprofiled one) and each
// phase's wall time is summed; report() prints milliseconds per step.
class PhaseTimer {
 public:
  enum Phase { data, forward, backward, reduce_clip, optimizer, count };
  explicit PhaseTimer(Device d) : dev_(d), on_(std::getenv("TQ_PROFILE") && *std::getenv("TQ_PROFILE") == '1') {}
  void begin() {
    if (!on_) return;
    synchronize(dev_);
    last_ = clock::now();
  }
  void mark(Phase p) {
    if (!on_) return;
    synchronize(dev_);
    const auto now = clock::now();
    sum_[p] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }
  void report(int64_t steps, bool print) const {
    if (!on_ || !print || steps <= 0) return;
    static const char* names[count] = {"data", "forward", "backward", "all-reduce+clip", "optimizer"};
    std::string line = "profile (ms/step):";
    for (int p = 0; p < count; ++p) line += str_cat(" ", names[p], " ", sum_[p] * 1e3 / double(steps));
    std::fprintf(stderr, "%s\n", line.c_str());
  }

 private:
  using clock = std::chrono::steady_clock;
  Device dev_;
  bool on_;
  clock::time_point last_;
  double sum_[count] = {};
};

class Trainer {
 public:
  using TokenizeFn = risc::TokenizeFn;
  std::function<void(const StepLog&)> on_log;        // every log_every steps
  std::function<void(const StepLog&)> on_step;       // every step (progress bar)

  // `comm` (not owned) is the data-parallel group; none = a world of one on the model's device's
  // local communicator (CPU) — CUDA runs pass the NCCL communicator, world size 1 included.
  Trainer(PaliGemmaForConditionalGeneration& m, const risc::Dataset& ds, std::vector<int64_t> train_rows,
          std::vector<int64_t> val_rows, TokenizeFn tokenize, TrainOptions o,
          risc::CaptionStrategy captions = risc::CaptionStrategy::Random, DType compute_dtype = DType::f32,
          dist::Communicator* comm = nullptr)
      : m_(m), ds_(ds), train_rows_(std::move(train_rows)), val_rows_(std::move(val_rows)), opt_(std::move(o)) {
    if (comm == nullptr) {
      TQ_CHECK(m_.device().is_cpu(), "train: a CUDA model trains through a communicator (dist::init_process_group)");
      local_comm_ = std::make_unique<dist::LocalCommunicator>();
      comm = local_comm_.get();
    }
    comm_ = comm;
    TQ_CHECK(opt_.batch_size > 0 && opt_.grad_accum > 0, "train: --batch-size and --grad-accum must be positive");
    TQ_CHECK(!train_rows_.empty(), "train: the training split is empty");
    m_.set_requires_grad(false);
    nn::LoraConfig lc;
    lc.r = opt_.lora_r;
    lc.alpha = opt_.lora_alpha;
    lc.dropout = opt_.lora_dropout;
    lc.rslora = opt_.rslora;
    lc.dora = opt_.dora;
    lc.target_modules = opt_.target_modules;
    lora_cfg_ = lc;
    Generator gen(opt_.seed);
    wrapped_ = nn::apply_lora(m_, lc, gen, compute_dtype);
    // Per-layer dropout streams: distinct, reproducible seeds.
    size_t i = 0;
    for (auto& [name, l] : nn::peft_detail::lora_layers(m_)) {
      // Rank r ≥ 1 draws its own masks (its rows differ); rank 0 draws what a single process draws.
      l->dropout_seed = opt_.seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull * ++i +
                        uint64_t(comm_->rank()) * 0xD1B54A32D192ED03ull;
      layers_.push_back({name, l});
    }
    m_.set_gradient_checkpointing(opt_.grad_checkpointing);
    opt_groups_ = std::make_unique<optim::AdamW>(lora_plus_groups(m_, opt_.lr, opt_.lora_plus_ratio, opt_.weight_decay));
    bucket_ = std::make_unique<dist::GradBucket>(dist::GradBucket::of(m_.named_parameters()));
    risc::LoaderOptions lo;
    lo.batch_size = opt_.batch_size;
    lo.image_width = lo.image_height = int(m_.config.vision_config.image_size);
    lo.seed = opt_.seed;
    lo.captions = captions;
    lo.tokenize = std::move(tokenize);
    loader_opts_ = lo;
    loader_ = std::make_unique<risc::Loader>(ds_, train_rows_, lo);
    const int64_t len_dl = (int64_t(train_rows_.size()) + opt_.batch_size - 1) / opt_.batch_size;
    steps_per_epoch_ = std::max<int64_t>(1, (len_dl + opt_.grad_accum - 1) / opt_.grad_accum);
    micro_per_epoch_ = len_dl;
    total_steps_ = opt_.max_steps > 0 ? opt_.max_steps : steps_per_epoch_ * opt_.epochs;
    sched_.total_steps = total_steps_;
    sched_.warmup_steps = optim::warmup_steps_from_ratio(total_steps_, opt_.warmup_ratio);
  }

  int64_t total_steps() const { return total_steps_; }
  int64_t warmup_steps() const { return sched_.warmup_steps; }
  int64_t step() const { return step_; }
  int64_t trainable_parameters() { return m_.count_parameters(true); }
  const nn::LoraConfig& lora_config() const { return lora_cfg_; }
  optim::AdamW& optimizer() { return *opt_groups_; }

  nn::AdapterInfo adapter_info() const {
    nn::AdapterInfo info;
    info.config = lora_cfg_;
    info.base_model_name_or_path = "google/paligemma-3b-pt-224";
    return info;
  }

  // Runs until total_steps, or `stop_after` more steps when > 0, or an interrupt.
  TrainResult run(int64_t stop_after = 0) {
    TrainResult r;
    r.total_steps = total_steps_;
    const int64_t stop_at = stop_after > 0 ? std::min(total_steps_, step_ + stop_after) : total_steps_;
    const auto t0 = std::chrono::steady_clock::now();
    double loss_acc = 0;
    int64_t since_log = 0, samples = 0;
    m_.train(true);
    PhaseTimer prof(m_.device());  // TQ_PROFILE=1: synchronized per-phase wall time, printed at the end
    const int64_t first_step = step_;
    while (step_ < stop_at) {
      prof.begin();
      std::vector<Batch> micro = next_micro_batches();
      prof.mark(PhaseTimer::data);
      int64_t local_tok = 0;
      for (const Batch& b : micro) local_tok += count_supervised(b, m_.config.ignore_index);
      const int64_t n_tok = dist::global_token_count(*comm_, local_tok);
      TQ_CHECK(n_tok > 0, "train: step ", step_, " has no supervised tokens");
      const double normalizer = dist::loss_normalizer(n_tok, comm_->size());
      sched_.apply(*opt_groups_, step_);
      double step_loss = 0;
      int64_t step_samples = 0;
      for (const Batch& b : micro) {
        Tensor loss = summed_loss(m_, b, normalizer);
        step_loss += loss.item<double>();
        prof.mark(PhaseTimer::forward);
        loss.backward();
        prof.mark(PhaseTimer::backward);
        step_samples += b.input_ids.size(0);
      }
      samples += step_samples;
      ops::check_device_index_errors(m_.device());  // an out-of-range id/target on the GPU: one clear error
      bucket_->all_reduce_mean(*comm_);  // the mean over ranks, in one flat buffer (identity for one rank)
      comm_->wait();
      const double gn = opt_.max_grad_norm > 0 ? bucket_->clip_grad_norm(opt_.max_grad_norm) : bucket_->grad_norm();
      step_loss = comm_->size() > 1 ? dist::mean_over_ranks(*comm_, step_loss) : step_loss;
      prof.mark(PhaseTimer::reduce_clip);
      opt_groups_->step();
      const double lr = opt_groups_->groups()[0].lr;
      opt_groups_->zero_grad();
      prof.mark(PhaseTimer::optimizer);
      ++step_;
      r.losses.push_back(step_loss);
      loss_acc += step_loss;
      ++since_log;
      StepLog lg;
      lg.step = step_;
      lg.step_samples = step_samples;
      lg.loss = step_loss;
      lg.lr = lr;
      lg.grad_norm = gn;
      lg.elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      lg.samples_per_s = lg.elapsed_s > 0 ? double(samples) * comm_->size() / lg.elapsed_s : 0;  // ≈ all ranks
      if (on_step) on_step(lg);
      const bool log_now = opt_.log_every > 0 && (step_ % opt_.log_every == 0 || step_ == total_steps_);
      if (opt_.eval_every > 0 && step_ % opt_.eval_every == 0 && !val_rows_.empty()) lg.eval_loss = eval_loss();
      if (log_now || lg.eval_loss) {
        lg.loss = loss_acc / double(since_log);
        loss_acc = 0;
        since_log = 0;
        if (on_log) on_log(lg);
      }
      if (opt_.save_every > 0 && step_ % opt_.save_every == 0 && !opt_.out.empty())
        r.last_checkpoint = save_checkpoint(opt_.out);
      // Every rank stops at the same step: a Ctrl-C seen by any rank stops them all.
      const bool stop_now = comm_->size() > 1 ? dist::sum_over_ranks(*comm_, int64_t(interrupt_flag().load())) > 0
                                              : interrupt_flag().load();
      if (stop_now) {
        r.interrupted = true;
        if (!opt_.out.empty()) r.last_checkpoint = save_checkpoint(opt_.out);
        break;
      }
    }
    r.steps_done = step_;
    prof.report(step_ - first_step, comm_->rank() == 0);
    m_.train(false);
    return r;
  }

  // Token-mean loss over the validation rows (first caption by strategy, no dropout).
  double eval_loss() {
    const bool was = m_.training();
    m_.train(false);
    NoGradGuard ng;
    risc::LoaderOptions lo = loader_opts_;
    lo.shuffle = false;
    risc::Loader vl(ds_, val_rows_, lo);
    vl.begin_epoch(0);
    double sum = 0;
    int64_t tok = 0, nb = 0;
    while (auto lb = vl.next()) {
      if (lb->size() == 0) continue;
      Batch b = collate(*lb, m_.config.pad_token_id, lo.image_height, lo.image_width);
      const int64_t n = count_supervised(b, m_.config.ignore_index);
      if (n == 0) continue;
      sum += summed_loss(m_, b, 1.0).item<double>();
      tok += n;
      if (opt_.eval_batches > 0 && ++nb >= opt_.eval_batches) break;
    }
    m_.train(was);
    return tok ? sum / double(tok) : 0.0;
  }

  bool is_main_rank() const { return comm_->rank() == 0; }
  dist::Communicator& communicator() { return *comm_; }

  // Rank 0 writes; the others wait for it (the adapter is complete on every rank's return).
  void save_adapter(const std::string& dir) {
    if (is_main_rank()) nn::save_adapter(dir, m_, adapter_info());
    comm_->barrier();
  }

  // Writes `<out>/checkpoint-<step>` (via a .tmp directory and a rename) and removes older ones.
  // Rank 0 writes (every rank holds the same adapter and optimizer state); the others wait.
  std::string save_checkpoint(const std::string& out) {
    const fs::path done = fs::path(out) / str_cat("checkpoint-", step_);
    if (!is_main_rank()) {
      comm_->barrier();
      return done.string();
    }
    struct Release {  // the barrier also runs when writing failed, so no rank waits forever
      dist::Communicator* c;
      ~Release() {
        try {
          c->barrier();
        } catch (...) {
        }
      }
    } release{comm_};
    const fs::path final_dir = fs::path(out) / str_cat("checkpoint-", step_);
    const fs::path tmp = fs::path(out) / str_cat("checkpoint-", step_, ".tmp");
    std::error_code ec;
    fs::remove_all(tmp, ec);
    try {
      fs::create_directories(tmp);
      int64_t budget = opt_.fail_after_bytes;
      auto charge = [&](const fs::path& p) {  // fault injection: a full disk after `budget` bytes
        if (opt_.fail_after_bytes < 0) return;
        const int64_t sz = int64_t(fs::file_size(p));
        if (sz > budget) {
          fs::resize_file(p, uintmax_t(std::max<int64_t>(budget, 0)));
          fail(str_cat("writing ", p.string(), ": No space left on device (simulated by --fail-after-bytes ",
                       opt_.fail_after_bytes, ")"));
        }
        budget -= sz;
      };
      save_safetensors((tmp / "state.safetensors").string(), state_tensors(), {{"format", "tq-train"}});
      charge(tmp / "state.safetensors");
      nn::save_adapter((tmp / "adapter").string(), m_, adapter_info());
      charge(tmp / "adapter" / "adapter_model.safetensors");
      charge(tmp / "adapter" / "adapter_config.json");
      fs::remove_all(final_dir, ec);
      fs::rename(tmp, final_dir);
    } catch (const std::exception& e) {
      fs::remove_all(tmp, ec);
      fail(str_cat("checkpoint at step ", step_, " failed: ", e.what(), "; the previous checkpoint is intact"));
    }
    for (const auto& e : fs::directory_iterator(out)) {  // older complete checkpoints
      const std::string n = e.path().filename().string();
      if (e.path() != final_dir && n.rfind("checkpoint-", 0) == 0 && n.find(".tmp") == std::string::npos)
        fs::remove_all(e.path(), ec);
    }
    return final_dir.string();
  }

  // `dir` is a checkpoint directory or an output directory holding checkpoint-<step>.
  void resume(const std::string& dir) {
    const fs::path ck = find_checkpoint(dir);
    const fs::path st = ck / "state.safetensors";
    TQ_CHECK(fs::exists(st), "--resume ", dir, ": no ", st.string());
    SafetensorsFile f = SafetensorsFile::open(st.string());
    auto get = [&](const std::string& k) {
      TQ_CHECK(f.contains(k), "--resume ", st.string(), ": missing '", k, "'");
      return f.get(k).clone();
    };
    for (auto& [name, l] : layers_) {
      copy_param(l->lora_A, get("lora." + name + ".lora_A.weight"), name);
      copy_param(l->lora_B, get("lora." + name + ".lora_B.weight"), name);
      if (lora_cfg_.dora) copy_param(l->lora_magnitude_vector, get("lora." + name + ".lora_magnitude_vector"), name);
    }
    std::vector<int64_t> off = get("rng.dropout_offset").to_vector<int64_t>();
    TQ_CHECK(off.size() == layers_.size(), "--resume: checkpoint has ", off.size(), " LoRA layers, the model ",
             layers_.size(), " (different --lora targets?)");
    for (size_t i = 0; i < layers_.size(); ++i) layers_[i].second->dropout_offset = uint64_t(off[i]);
    std::map<std::string, Tensor> sd;
    for (const auto& k : f.keys())
      if (k.rfind("optim.", 0) == 0) sd[k.substr(6)] = f.get(k).clone();
    opt_groups_->load_state_dict(sd);
    step_ = get("trainer.step").item<int64_t>();
    epoch_ = get("trainer.epoch").item<int64_t>();
    micro_ = get("trainer.micro_batch").item<int64_t>();
    started_ = false;
  }

  static fs::path find_checkpoint(const std::string& dir) {
    TQ_CHECK(fs::is_directory(dir), "--resume ", dir, ": not a directory");
    if (fs::exists(fs::path(dir) / "state.safetensors")) return dir;
    fs::path best;
    int64_t best_step = -1;
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string n = e.path().filename().string();
      if (n.rfind("checkpoint-", 0) != 0 || n.find(".tmp") != std::string::npos) continue;
      const int64_t s = std::atoll(n.c_str() + 11);
      if (s > best_step && fs::exists(e.path() / "state.safetensors")) best_step = s, best = e.path();
    }
    TQ_CHECK(best_step >= 0, "--resume ", dir, ": no checkpoint-<step> directory with state.safetensors");
    return best;
  }

 private:
  static void copy_param(Tensor& p, const Tensor& v, const std::string& name) {
    TQ_CHECK(p.shape() == v.shape(), "--resume: ", name, " has shape ", v.shape(), " in the checkpoint, ", p.shape(),
             " in the model");
    NoGradGuard ng;
    p.copy_(v.to(p.dtype()));
  }

  std::vector<std::pair<std::string, Tensor>> state_tensors() {
    std::vector<std::pair<std::string, Tensor>> t;
    std::vector<int64_t> off;
    for (auto& [name, l] : layers_) {
      t.push_back({"lora." + name + ".lora_A.weight", l->lora_A.detach()});
      t.push_back({"lora." + name + ".lora_B.weight", l->lora_B.detach()});
      if (lora_cfg_.dora) t.push_back({"lora." + name + ".lora_magnitude_vector", l->lora_magnitude_vector.detach()});
      off.push_back(int64_t(l->dropout_offset));
    }
    t.push_back({"rng.dropout_offset", Tensor::from_vector(off, {int64_t(off.size())})});
    for (auto& [k, v] : opt_groups_->state_dict()) t.push_back({"optim." + k, v});
    t.push_back({"trainer.step", Tensor::full({}, double(step_), DType::i64)});
    t.push_back({"trainer.epoch", Tensor::full({}, double(epoch_), DType::i64)});
    t.push_back({"trainer.micro_batch", Tensor::full({}, double(micro_), DType::i64)});
    return t;
  }

  // This rank's micro-batches of the next optimizer step. The step's effective batch is the one a
  // single process takes (up to grad_accum micro-batches, fewer at an epoch's end, never crossing
  // it); with W ranks each reads its block of it (dist::shard_step), in micro-batches of at most
  // batch_size rows — for W = 1 exactly the single-process micro-batches. A rank may get no rows.
  std::vector<Batch> next_micro_batches() {
    if (micro_ >= micro_per_epoch_) {  // the previous step ended the epoch
      ++epoch_;
      micro_ = 0;
      started_ = false;
    }
    const int64_t rows = int64_t(train_rows_.size()), bs = opt_.batch_size, ga = opt_.grad_accum;
    if (!started_) {  // this rank's batches for the rest of the epoch, in step order
      std::vector<std::pair<int64_t, int64_t>> ranges;
      for (int64_t m = micro_; m < micro_per_epoch_;) {
        const dist::EffectiveBatch eb = dist::effective_batch(m, rows, bs, ga);
        for (const dist::RowRange& r : dist::shard_step(eb, bs, comm_->rank(), comm_->size()).micro_batches)
          ranges.push_back({r.begin, r.end});
        m = eb.end_micro;
      }
      loader_->begin_epoch_ranges(uint64_t(epoch_), std::move(ranges));
      started_ = true;
    }
    const dist::EffectiveBatch eb = dist::effective_batch(micro_, rows, bs, ga);
    const size_t n_micro = dist::shard_step(eb, bs, comm_->rank(), comm_->size()).micro_batches.size();
    std::vector<Batch> out;
    for (size_t i = 0; i < n_micro; ++i) {
      auto lb = loader_->next();
      TQ_CHECK(lb.has_value(), "train: the loader ended early at micro-batch ", micro_);
      if (lb->size() == 0) continue;  // every row of the batch lacked a caption
      out.push_back(collate(*lb, m_.config.pad_token_id, loader_opts_.image_height, loader_opts_.image_width));
    }
    micro_ = eb.end_micro;
    return out;
  }

  PaliGemmaForConditionalGeneration& m_;
  const risc::Dataset& ds_;
  std::vector<int64_t> train_rows_, val_rows_;
  TrainOptions opt_;
  nn::LoraConfig lora_cfg_;
  std::vector<std::string> wrapped_;
  std::vector<std::pair<std::string, nn::LoRA<nn::LinearBase>*>> layers_;
  std::unique_ptr<optim::AdamW> opt_groups_;
  std::unique_ptr<dist::LocalCommunicator> local_comm_;
  dist::Communicator* comm_ = nullptr;
  std::unique_ptr<dist::GradBucket> bucket_;
  optim::LinearWarmupDecay sched_;
  risc::LoaderOptions loader_opts_;
  std::unique_ptr<risc::Loader> loader_;
  int64_t steps_per_epoch_ = 0, micro_per_epoch_ = 0, total_steps_ = 0;
  int64_t step_ = 0, epoch_ = 0, micro_ = 0;
  bool started_ = false;
};

}  // namespace tq::paligemma::train
