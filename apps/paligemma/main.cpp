// `paligemma SUBCOMMAND ...`: dispatches to the commands registered by apps/*/cli_*.cpp.
// Every failure ends as one line on stderr and a non-zero exit.
#include "paligemma/cli_registry.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>

// Flush float denormals to zero (FTZ/DAZ), as the GPU kernels do: exp() over a large vocabulary
// can land in the denormal range, which x86 handles ~100x slower; no result we compare against a
// reference depends on values below 1.2e-38. Set before any worker thread starts, so the pool
// inherits it. TQ_KEEP_DENORMALS=1 keeps IEEE gradual underflow.
static void flush_denormals() {
#if defined(__x86_64__) || defined(__i386__)
  if (!std::getenv("TQ_KEEP_DENORMALS")) _mm_setcsr(_mm_getcsr() | 0x8040);
#endif
}

int main(int argc, char** argv) {
  flush_denormals();
  CLI::App app{"tq: PaliGemma / PaliGemma 2 QLoRA fine-tuning, evaluation and tools"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Help for every subcommand");
  std::function<int()> action;
  for (auto& cmd : tq::cli::registry()) {
    CLI::App* sub = app.add_subcommand(cmd.name, cmd.description);
    sub->config_formatter(std::make_shared<tq::cli::JsonConfig>());
    sub->set_config("--config", "", "JSON file with the same keys as the flags (flags win)");
    auto run = cmd.setup(*sub);
    sub->callback([&action, run] { action = run; });
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return action ? action() : 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
