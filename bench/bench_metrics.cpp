// Caption metrics on 500 items (the size of the reference evaluation): all seven metrics, raw
// mode as the RISC notebook scores, and each metric family alone. METEOR data is loaded once
// outside the timing (as the eval app does); the benchmark is skipped for METEOR when it is absent.
#include "metrics/meteor_data.hpp"
#include "metrics/scorer.hpp"

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <memory>

namespace {

using namespace tq::metrics;

const std::vector<CaptionItem>& bench_items() {
  static const std::vector<CaptionItem> items = [] {
    std::ifstream in(std::string(TQ_SOURCE_DIR) + "/tests/fixtures/metrics/pycocoevalcap_520.json");
    const auto j = nlohmann::json::parse(in);
    std::vector<CaptionItem> v;
    for (const auto& it : j["items"]) {
      if (v.size() == 500) break;
      v.push_back({it["refs"].get<std::vector<std::string>>(), it["pred"]});
    }
    return v;
  }();
  return items;
}

const MeteorData* bench_meteor() {
  static const std::unique_ptr<MeteorData> d = []() -> std::unique_ptr<MeteorData> {
    const auto dir = default_meteor_data_dir();
    if (!missing_meteor_file(dir).empty()) return nullptr;
    return std::make_unique<MeteorData>(load_meteor_data(dir));
  }();
  return d.get();
}

void BM_score_500_all_metrics(benchmark::State& state, Tokenization tok) {
  const auto& items = bench_items();
  const MeteorData* data = bench_meteor();
  if (!data) {
    state.SkipWithError("METEOR data absent (tools/setup_meteor.sh)");
    return;
  }
  for (auto _ : state) benchmark::DoNotOptimize(score_captions(items, tok, data));
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(items.size()));
}
BENCHMARK_CAPTURE(BM_score_500_all_metrics, raw, Tokenization::raw)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_score_500_all_metrics, ptb, Tokenization::ptb)->Unit(benchmark::kMillisecond);

void BM_score_500_without_meteor(benchmark::State& state) {
  const auto& items = bench_items();
  for (auto _ : state) benchmark::DoNotOptimize(score_captions(items, Tokenization::raw, nullptr));
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(items.size()));
}
BENCHMARK(BM_score_500_without_meteor)->Unit(benchmark::kMillisecond);

void BM_meteor_data_load(benchmark::State& state) {
  const auto dir = default_meteor_data_dir();
  if (!missing_meteor_file(dir).empty()) {
    state.SkipWithError("METEOR data absent (tools/setup_meteor.sh)");
    return;
  }
  for (auto _ : state) benchmark::DoNotOptimize(load_meteor_data(dir));
}
BENCHMARK(BM_meteor_data_load)->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace
