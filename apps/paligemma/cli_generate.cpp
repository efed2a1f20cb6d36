// `paligemma generate --model DIR --batch FILE.safetensors --max-new-tokens N [...]`: batched greedy
// decoding; prints {"sequences": [[ids…], …]} with the prompt included, as HF's generate returns them.
// "texts" needs the processor's tokenizer (apps/paligemma/tokenizer.hpp), not wired in yet.
#include <cstdio>

#include "paligemma/cli_model_common.hpp"
#include "paligemma/generate.hpp"

namespace {

struct GenerateArgs : tq::paligemma::cli::ModelArgs {
  int64_t max_new_tokens = 0;
  std::string adapter;
};

const tq::cli::Register reg_generate(
    "generate", "Batched greedy decoding with a KV cache; prints the token ids as JSON",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<GenerateArgs>();
      tq::paligemma::cli::add_model_flags(app, *a);
      app.add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate per row")->required()
          ->check(CLI::PositiveNumber);
      app.add_option("--adapter", a->adapter, "PEFT adapter directory (adapter_config.json + "
                                              "adapter_model.safetensors)");
      return [a] {
        using namespace tq::paligemma;
        TQ_CHECK(a->adapter.empty(), "--adapter: loading PEFT adapters is not implemented in `generate` yet");
        auto m = cli::load_cli_model(*a);
        Batch b = cli::load_batch_file(a->batch);
        GenerateOptions o;
        o.max_new_tokens = a->max_new_tokens;
        o.eos_token_id = m->config.eos_token_id;
        o.pad_token_id = m->config.pad_token_id;
        auto seqs = greedy_generate(*m, b, o);
        std::string s = "{\"sequences\": [";
        for (size_t i = 0; i < seqs.size(); ++i) {
          s += i ? ", [" : "[";
          for (size_t j = 0; j < seqs[i].size(); ++j) s += (j ? ", " : "") + std::to_string(seqs[i][j]);
          s += "]";
        }
        s += "]}\n";
        std::fputs(s.c_str(), stdout);
        return 0;
      };
    });

}  // namespace
