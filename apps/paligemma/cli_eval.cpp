// `paligemma eval`: batched greedy captioning of a split, predictions JSONL, the notebook's
// results.json (+ CSV), a qualitative PNG and the resolved config, all under --out (evaluate.hpp).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "paligemma/cli_model_common.hpp"
#include "paligemma/cli_registry.hpp"
#include "paligemma/evaluate.hpp"

namespace {

struct EvalArgs {
  tq::paligemma::EvalOptions o;
  std::string device = "cpu", dtype = "f32", quant = "none";
  bool no_progress = false;
};

const tq::cli::Register reg_eval(
    "eval", "Caption a split with greedy decoding and score it (BLEU, METEOR, ROUGE-L, CIDEr)",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<EvalArgs>();
      auto& o = a->o;
      app.add_option("--model", o.model, "Hugging Face model directory (config.json, safetensors, tokenizer)")
          ->required();
      app.add_option("--adapter", o.adapter, "PEFT adapter directory; the run is labelled \"finetuned\"");
      app.add_option("--data", o.data, "RISC dataset: HF parquet directory, .parquet, captions.csv, .jsonl, .json")
          ->required();
      app.add_option("--split", o.split, "train, val, test or all (the seed-42 split)")->capture_default_str();
      app.add_option("--limit", o.limit, "Evaluate the first N rows of the split (0: all)")->capture_default_str()
          ->check(CLI::NonNegativeNumber);
      app.add_option("--batch-size", o.batch_size, "Images per generate call")->capture_default_str()
          ->check(CLI::PositiveNumber);
      app.add_option("--max-new-tokens", o.max_new_tokens, "Tokens to generate per caption")->capture_default_str()
          ->check(CLI::PositiveNumber);
      app.add_option("--prompt", o.prompt, "Prompt text")->capture_default_str();
      app.add_option("--out", o.out, "Output directory")->required();
      app.add_option("--compare", o.compare, "An earlier eval's --out: merge its results and show it in the figure");
      app.add_option("--seed", o.seed, "Split seed")->capture_default_str();
      app.add_option("--meteor-data", o.meteor_data, "METEOR data folder (default: ~/.local/share/tq/meteor)");
      app.add_option("--figure-rows", o.figure_rows, "Samples in qualitative.png")->capture_default_str()
          ->check(CLI::NonNegativeNumber);
      app.add_option("--quant", a->quant, "none, or nf4: quantize every Linear on load")->capture_default_str()
          ->check(CLI::IsMember({"none", "nf4"}));
      app.add_option("--device", a->device, "cpu or cuda")->capture_default_str()
          ->check(CLI::IsMember({"cpu", "cuda"}));
      app.add_option("--dtype", a->dtype, "Load/compute dtype: f32 or bf16")->capture_default_str()
          ->check(CLI::IsMember({"f32", "bf16"}));
      app.add_flag("--no-progress", a->no_progress, "No progress output");
      return [a, &app] {
        using namespace tq::paligemma;
        a->o.load.device = parse_device(a->device);
        a->o.load.dtype = parse_load_dtype(a->dtype);
        a->o.load.quant = parse_quant(a->quant);
        a->o.progress = !a->no_progress;
        const auto t0 = std::chrono::steady_clock::now();
        const EvalResult r = run_eval(a->o);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        tq::cli::write_resolved_config(app, (std::filesystem::path(a->o.out) / "eval_config.json").string());
        std::printf("%s\n", r.results.dump(2).c_str());
        std::fprintf(stderr, "wrote %s/{predictions.jsonl,results.json,results.csv,qualitative.png,eval_config.json}\n",
                     a->o.out.c_str());
        std::fprintf(stderr, "eval: %.1f s in all (model load, captioning, scoring, figure); %s\n", secs,
                     cli::peak_memory_line(a->o.load.device).c_str());
        return 0;
      };
    });

}  // namespace
