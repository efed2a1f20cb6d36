// `paligemma split --n N [--seed 42] [--test-size 0.10] [--val-size 0.05]`: the image-level split
// of the reference run as index lists, {"train":[...],"val":[...],"test":[...]} on stdout.
#include "paligemma/cli_registry.hpp"
#include "risc/split.hpp"

#include <cstdio>
#include <string>

namespace {

void print_list(const char* name, const std::vector<int64_t>& v, bool last) {
  std::string s = std::string("\"") + name + "\":[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  s += last ? "]" : "],";
  std::fputs(s.c_str(), stdout);
}

struct SplitArgs {
  int64_t n = -1;
  uint64_t seed = 42;
  double test_size = 0.10, val_size = 0.05;
};

const tq::cli::Register reg_split(
    "split", "The image-level train/val/test split (numpy default_rng(seed).permutation) as JSON",
    [](CLI::App& app) -> std::function<int()> {
      auto a = std::make_shared<SplitArgs>();
      app.add_option("--n", a->n, "Number of rows in the dataset")->required()->check(CLI::NonNegativeNumber);
      app.add_option("--seed", a->seed, "Shuffle seed")->capture_default_str();
      app.add_option("--test-size", a->test_size, "Test fraction, int(n * ratio) rows")
          ->capture_default_str()->check(CLI::Range(0.0, 1.0));
      app.add_option("--val-size", a->val_size, "Validation fraction, int(n * ratio) rows")
          ->capture_default_str()->check(CLI::Range(0.0, 1.0));
      return [a] {
        tq::risc::Split s = tq::risc::make_split(a->n, a->seed, a->test_size, a->val_size);
        std::fputs("{", stdout);
        print_list("train", s.train, false);
        print_list("val", s.val, false);
        print_list("test", s.test, true);
        std::fputs("}\n", stdout);
        return 0;
      };
    });

}  // namespace
