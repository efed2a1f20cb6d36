// `paligemma generate --model DIR --batch FILE.safetensors --max-new-tokens N [...]`: batched greedy
// decoding; prints {"sequences": [[ids…], …], "texts": [...]} with the prompt included in the
// sequences, as HF's generate returns them, and the texts decoded after the prompt with special
// tokens skipped. `--adapter DIR` applies a PEFT adapter written by tq or peft.
#include <cstdio>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>

#include "paligemma/adapter.hpp"
#include "paligemma/cli_model_common.hpp"
#include "paligemma/generate.hpp"
#include "paligemma/tokenizer.hpp"

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
        auto m = cli::load_cli_model(*a);
        if (!a->adapter.empty()) load_peft_adapter(a->adapter, *m);
        m->train(false);
        // Texts need the model's tokenizer.model; parity checkpoints without one print ids only.
        std::optional<Tokenizer> tok;
        if (std::filesystem::exists(std::filesystem::path(a->model) / "tokenizer.model")) tok = Tokenizer::load(a->model);
        else std::fprintf(stderr, "note: %s has no tokenizer.model: printing token ids only\n", a->model.c_str());
        Batch b = cli::load_batch_file(a->batch);
        const int64_t prompt_len = b.input_ids.size(1);
        GenerateOptions o;
        o.max_new_tokens = a->max_new_tokens;
        o.eos_token_id = m->config.eos_token_id;
        o.pad_token_id = m->config.pad_token_id;
        GenerateStats st;
        o.stats = &st;
        auto seqs = greedy_generate(*m, b, o);
        const double toks = double(st.rows * st.steps), total = st.prefill_s + st.decode_s;
        std::fprintf(stderr,
                     "generate: %lld rows x %lld steps = %.0f tokens in %.3f s (prompt pass + first token %.3f s, "
                     "then %.1f tokens/s); %.1f tokens/s overall; %s\n",
                     (long long)st.rows, (long long)st.steps, toks, total, st.prefill_s,
                     st.decode_s > 0 ? double(st.rows * (st.steps - 1)) / st.decode_s : 0.0,
                     total > 0 ? toks / total : 0.0, cli::peak_memory_line(m->device()).c_str());
        nlohmann::json out;
        out["sequences"] = seqs;
        if (tok) out["texts"] = nlohmann::json::array();
        for (const auto& seq : seqs) {
          if (!tok) break;
          std::vector<int64_t> generated(seq.begin() + std::min<int64_t>(prompt_len, int64_t(seq.size())), seq.end());
          out["texts"].push_back(tok->decode(generated, true));
        }
        std::fputs((out.dump() + "\n").c_str(), stdout);
        return 0;
      };
    });

}  // namespace
