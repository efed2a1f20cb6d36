// `paligemma logits --model DIR --batch FILE.safetensors --out FILE.safetensors [...]`: a parity tool.
// Writes `logits` F32 (B, T, V) at every position and, when the batch has labels, `loss` F32 (1).
#include "paligemma/cli_model_common.hpp"

namespace {

struct LogitsArgs : tq::paligemma::cli::ModelArgs {
  std::string out;
};

const tq::cli::Register reg_logits(
    "logits", "Run a batch through PaliGemma and write logits (and loss) as safetensors",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<LogitsArgs>();
      tq::paligemma::cli::add_model_flags(app, *a);
      app.add_option("--out", a->out, "Output safetensors file")->required();
      return [a] {
        using namespace tq::paligemma;
        auto m = cli::load_cli_model(*a);
        Batch b = cli::load_batch_file(a->batch);
        tq::NoGradGuard ng;
        std::vector<std::pair<std::string, tq::Tensor>> out;
        out.push_back({"logits", m->logits(b)});
        if (b.labels.defined()) out.push_back({"loss", m->loss(b).reshape({1}).to(tq::DType::f32)});
        tq::save_safetensors(a->out, out);
        return 0;
      };
    });

}  // namespace
