// `paligemma grads --model DIR --adapter DIR --batch FILE.safetensors --out FILE.safetensors`: a
// parity tool. One forward/backward with the adapter's LoRA layers (dropout off); writes `loss` F32
// (1) and `grad.<key>` for every tensor key of the adapter's adapter_model.safetensors.
#include <cstring>
#include <filesystem>

#include "paligemma/adapter.hpp"
#include "paligemma/cli_model_common.hpp"

namespace {

struct GradsArgs : tq::paligemma::cli::ModelArgs {
  std::string adapter, out;
};

const tq::cli::Register reg_grads(
    "grads", "One forward/backward of a batch through PaliGemma + a PEFT adapter; write loss and adapter grads",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<GradsArgs>();
      tq::paligemma::cli::add_model_flags(app, *a);
      app.add_option("--adapter", a->adapter, "PEFT adapter directory")->required();
      app.add_option("--out", a->out, "Output safetensors file")->required();
      return [a] {
        using namespace tq;
        using namespace tq::paligemma;
        auto m = tq::paligemma::cli::load_cli_model(*a);
        Batch b = tq::paligemma::cli::load_batch_file(a->batch);
        TQ_CHECK(b.labels.defined(), "grads: batch '", a->batch, "' has no labels");
        m->set_requires_grad(false);
        load_peft_adapter(a->adapter, *m, parse_load_dtype(a->dtype));
        m->train(false);  // dropout off
        Tensor loss = m->loss(b);
        loss.backward();
        // Adapter key → tq module via the canonical module path (either HF naming era).
        std::map<std::string, std::string> by_canonical;
        for (auto& [name, mod] : m->named_modules()) by_canonical[canonical_key(name)] = name;
        std::map<std::string, Tensor*> params;
        for (auto& [name, t] : m->named_parameters()) params[name] = t;
        auto file = SafetensorsFile::open((std::filesystem::path(a->adapter) / "adapter_model.safetensors").string());
        std::vector<std::pair<std::string, Tensor>> out = {{"loss", loss.detach().reshape({1}).to(DType::f32)}};
        for (const std::string& key : file.keys()) {
          std::string k = key;
          if (k.rfind(nn::kPeftPrefix, 0) == 0) k = k.substr(std::string(nn::kPeftPrefix).size());
          std::string suffix;
          for (const char* s : {".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"})
            if (k.size() > std::strlen(s) && k.compare(k.size() - std::strlen(s), std::strlen(s), s) == 0) suffix = s;
          TQ_CHECK(!suffix.empty(), "grads: adapter key '", key, "' is not a LoRA tensor");
          auto it = by_canonical.find(canonical_key(k.substr(0, k.size() - suffix.size())));
          TQ_CHECK(it != by_canonical.end(), "grads: no module for adapter key '", key, "'");
          auto p = params.find(it->second + suffix);
          TQ_CHECK(p != params.end(), "grads: no parameter ", it->second + suffix, " for adapter key '", key, "'");
          Tensor g = p->second->grad();
          out.push_back({"grad." + key, g.defined() ? g.to(DType::f32) : Tensor::zeros(p->second->shape(), DType::f32)});
        }
        save_safetensors(a->out, out);
        return 0;
      };
    });

}  // namespace
