// `paligemma caption --model DIR [--adapter DIR] IMAGE...`: one greedy caption per line, in order.
#include <cstdio>
#include <memory>

#include "paligemma/cli_model_common.hpp"
#include "paligemma/cli_registry.hpp"
#include "paligemma/evaluate.hpp"

namespace {

struct CaptionArgs {
  std::string model, adapter, prompt = "caption en", device = "cpu", dtype = "f32", quant = "none";
  std::vector<std::string> images;
  int64_t max_new_tokens = 64, batch_size = 8;
};

const tq::cli::Register reg_caption(
    "caption", "Caption image files (one line each)", [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<CaptionArgs>();
      app.add_option("--model", a->model, "Hugging Face model directory")->required();
      app.add_option("--adapter", a->adapter, "PEFT adapter directory");
      app.add_option("--prompt", a->prompt, "Prompt text")->capture_default_str();
      app.add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate per caption")->capture_default_str()
          ->check(CLI::PositiveNumber);
      app.add_option("--batch-size", a->batch_size, "Images per generate call")->capture_default_str()
          ->check(CLI::PositiveNumber);
      app.add_option("--quant", a->quant, "none or nf4")->capture_default_str()->check(CLI::IsMember({"none", "nf4"}));
      app.add_option("--device", a->device, "cpu or cuda")->capture_default_str()
          ->check(CLI::IsMember({"cpu", "cuda"}));
      app.add_option("--dtype", a->dtype, "f32 or bf16")->capture_default_str()->check(CLI::IsMember({"f32", "bf16"}));
      app.add_option("images", a->images, "Image files (JPEG, PNG, BMP)")->required();
      return [a] {
        using namespace tq::paligemma;
        LoadOptions lo;
        lo.device = parse_device(a->device);
        lo.dtype = parse_load_dtype(a->dtype);
        lo.quant = parse_quant(a->quant);
        std::vector<std::string> bytes;
        for (const auto& p : a->images) bytes.push_back(tq::risc::read_whole_file(p));  // fail before loading
        auto m = load_eval_model(a->model, a->adapter, lo);
        const Processor proc = Processor::load(a->model);
        for (size_t s = 0; s < bytes.size(); s += size_t(a->batch_size)) {
          const size_t e = std::min(bytes.size(), s + size_t(a->batch_size));
          std::vector<std::string> imgs(bytes.begin() + long(s), bytes.begin() + long(e)),
              names(a->images.begin() + long(s), a->images.begin() + long(e));
          for (const auto& t : caption_images(*m, proc, imgs, names, a->prompt, a->max_new_tokens)) {
            std::string line = t;
            for (char& c : line)
              if (c == '\n' || c == '\r') c = ' ';  // one caption per line
            std::printf("%s\n", line.c_str());
          }
          std::fflush(stdout);
        }
        return 0;
      };
    });

}  // namespace
