// Loader throughput: 224x224 JPEGs (about RISC's 25 KB each) from an UNCOMPRESSED parquet shard,
// through decode -> (no resize: 224 in = 224 out, as PIL copies) -> normalize into float batches,
// with 2 workers. Items/s = images/s. The JPEGs are made here with stb_image_write (quality 90) from
// a textured pattern, so the bench needs no data files.
#include "risc/loader.hpp"

#include <benchmark/benchmark.h>

#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include <stb/stb_image_write.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#include <random>

namespace {

using namespace tq::risc;

// A Dataset of in-memory JPEGs, so the bench measures decode + normalize + queueing only.
class MemoryJpegs : public Dataset {
 public:
  explicit MemoryJpegs(int n, int size) {
    std::mt19937 rng(1);
    std::vector<uint8_t> px(static_cast<size_t>(size) * size * 3);
    for (int i = 0; i < n; ++i) {
      for (int y = 0; y < size; ++y)
        for (int x = 0; x < size; ++x)
          for (int c = 0; c < 3; ++c)
            px[(static_cast<size_t>(y) * size + x) * 3 + c] = static_cast<uint8_t>(
                (x * (c + 1) + y * (3 - c) + i * 17) / 2 + rng() % 48);
      std::string jpg;
      stbi_write_jpg_to_func([](void* ctx, void* d, int len) {
        static_cast<std::string*>(ctx)->append(static_cast<const char*>(d), static_cast<size_t>(len));
      }, &jpg, size, size, 3, px.data(), 90);
      bytes_ += jpg.size();
      jpegs_.push_back(std::move(jpg));
    }
  }
  int64_t size() const override { return static_cast<int64_t>(jpegs_.size()); }
  Row row(int64_t i) const override {
    Row r;
    r.image = jpegs_[static_cast<size_t>(i)];
    r.captions = {"a caption ."};
    return r;
  }
  std::string where(int64_t i) const override { return "memory row " + std::to_string(i); }
  size_t mean_bytes() const { return bytes_ / jpegs_.size(); }

 private:
  std::vector<std::string> jpegs_;
  size_t bytes_ = 0;
};

void BM_LoaderJpeg224(benchmark::State& state) {
  static MemoryJpegs ds(256, 224);
  std::vector<int64_t> idx(static_cast<size_t>(ds.size()));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
  LoaderOptions o;
  o.batch_size = 16;
  o.workers = static_cast<int>(state.range(0));
  o.prefetch = 4;
  Loader loader(ds, idx, o);
  int64_t images = 0;
  uint64_t epoch = 0;
  for (auto _ : state) {
    loader.begin_epoch(epoch++);
    while (auto b = loader.next()) {
      images += b->size();
      benchmark::DoNotOptimize(b->pixels->data());
    }
  }
  state.SetItemsProcessed(images);
  state.counters["jpeg_bytes"] = static_cast<double>(ds.mean_bytes());
}
BENCHMARK(BM_LoaderJpeg224)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

// Single-thread cost of each step for one 224x224 JPEG.
void BM_DecodeJpeg224(benchmark::State& state) {
  static MemoryJpegs ds(16, 224);
  int64_t i = 0;
  for (auto _ : state) {
    auto img = decode_image(*ds.row(i++ % 16).image, "bench");
    benchmark::DoNotOptimize(img.rgb.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DecodeJpeg224);

void BM_ResizeBicubic256To224(benchmark::State& state) {
  ImageU8 img{256, 256, std::vector<uint8_t>(256 * 256 * 3, 7)};
  for (auto _ : state) {
    auto out = resize_bicubic(img, 224, 224);
    benchmark::DoNotOptimize(out.rgb.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ResizeBicubic256To224);

}  // namespace
