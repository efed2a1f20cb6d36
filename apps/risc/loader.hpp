// The prefetching training loader: worker threads read rows, decode + resize + normalize images
// into (3, H, W) float32 host buffers (pinned when built with CUDA, so the copy to the device can
// be asynchronous), choose a caption, optionally tokenize it, and hand out whole batches in order.
//
// Invariants:
//  * the batch sequence of an epoch depends only on (indices, seed, epoch, options): the epoch
//    order is numpy's default_rng([seed, epoch]).permutation(n) over the given indices, batches are
//    consecutive slices of it, and workers fill numbered slots that next() returns in order;
//  * at most `prefetch` batches are decoded ahead of the consumer (bounded memory);
//  * rows without any caption are skipped and counted; bad images either stop the epoch with one
//    error naming file, row group and row, or (skip_bad_images) are dropped and counted.
#pragma once

#include "risc/captions.hpp"
#include "risc/dataset.hpp"
#include "risc/image.hpp"
#include "risc/split.hpp"

#include <tq/core/error.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#if defined(TQ_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace tq::risc {

// A float buffer in page-locked memory when CUDA is available, plain heap memory otherwise.
class HostBuffer {
 public:
  explicit HostBuffer(size_t n) : n_(n) {
#if defined(TQ_WITH_CUDA)
    if (cudaHostAlloc(reinterpret_cast<void**>(&p_), n * sizeof(float), cudaHostAllocPortable) ==
        cudaSuccess) {
      pinned_ = true;
      return;
    }
    (void)cudaGetLastError();  // no device: fall back to pageable memory
#endif
    p_ = static_cast<float*>(std::malloc(n * sizeof(float)));
    TQ_CHECK(p_ || n == 0, "HostBuffer: out of memory for ", n, " floats");
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() {
#if defined(TQ_WITH_CUDA)
    if (pinned_) {
      cudaFreeHost(p_);
      return;
    }
#endif
    std::free(p_);
  }
  float* data() { return p_; }
  const float* data() const { return p_; }
  size_t size() const { return n_; }
  bool pinned() const { return pinned_; }

 private:
  float* p_ = nullptr;
  size_t n_ = 0;
  bool pinned_ = false;
};

// What the PaliGemma processor produces for one caption; filled by LoaderOptions::tokenize.
struct TokenizedText {
  std::vector<int32_t> input_ids, token_type_ids, labels;
};
using TokenizeFn = std::function<TokenizedText(const std::string& caption)>;

struct LoaderOptions {
  int batch_size = 16;
  int image_width = 224, image_height = 224;
  int workers = 2;
  int prefetch = 4;  // batches decoded ahead of the consumer
  uint64_t seed = 42;
  bool shuffle = true;
  bool drop_last = false;
  bool skip_bad_images = false;
  CaptionStrategy captions = CaptionStrategy::Random;
  TokenizeFn tokenize;  // empty: no tokenization (captions only)
};

struct Batch {
  int64_t number = 0;                 // position in the epoch
  std::vector<int64_t> rows;          // dataset row of each sample
  std::vector<std::string> captions;  // chosen caption of each sample
  std::vector<TokenizedText> tokens;  // when tokenize is set
  std::shared_ptr<HostBuffer> pixels; // (B, 3, H, W) float32; only the first rows.size() used
  int size() const { return static_cast<int>(rows.size()); }
};

struct LoaderStats {
  std::atomic<int64_t> images{0}, bad_images{0}, rows_without_caption{0};
};

class Loader {
 public:
  Loader(const Dataset& ds, std::vector<int64_t> indices, LoaderOptions opt)
      : ds_(ds), indices_(std::move(indices)), opt_(std::move(opt)) {
    TQ_CHECK(opt_.batch_size > 0 && opt_.workers > 0 && opt_.prefetch > 0, "loader: batch_size, ",
             "workers and prefetch must be positive");
    for (int64_t i : indices_) TQ_CHECK(i >= 0 && i < ds_.size(), "loader: row ", i, " out of range");
  }
  ~Loader() { stop(); }

  // Starts (or restarts) epoch `epoch`: a fresh order, fresh workers; `first_batch` > 0 skips
  // the epoch's first batches without decoding them (resuming a training run mid-epoch).
  void begin_epoch(uint64_t epoch, int64_t first_batch = 0) {
    const auto n = static_cast<int64_t>(indices_.size()), b = static_cast<int64_t>(opt_.batch_size);
    const int64_t count = opt_.drop_last ? n / b : (n + b - 1) / b;
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (int64_t k = 0; k < count; ++k) ranges.push_back({k * b, std::min(n, (k + 1) * b)});
    start(epoch, std::move(ranges), first_batch);
  }

  // Starts epoch `epoch` reading only the given ranges of epoch positions [begin, end), each at most
  // batch_size rows, as consecutive batches (a data-parallel rank reads its shard of every step).
  void begin_epoch_ranges(uint64_t epoch, std::vector<std::pair<int64_t, int64_t>> ranges) {
    const auto n = static_cast<int64_t>(indices_.size());
    for (const auto& [a, b] : ranges)
      TQ_CHECK(a >= 0 && a <= b && b <= n && b - a <= opt_.batch_size, "loader: epoch positions [", a, ", ", b,
               ") are not a batch of at most ", opt_.batch_size, " of the ", n, " rows");
    start(epoch, std::move(ranges), 0);
  }

  int64_t num_batches() const { return num_batches_; }
  const LoaderStats& stats() const { return stats_; }

  // The next batch of the epoch in order, or nullopt at its end. Rethrows a worker's error.
  std::optional<Batch> next() {
    std::unique_lock<std::mutex> lock(mu_);
    if (next_out_ >= num_batches_) return std::nullopt;
    cv_.wait(lock, [&] { return ready_.count(next_out_) || error_; });
    if (error_) std::rethrow_exception(error_);
    Batch b = std::move(ready_[next_out_]);
    ready_.erase(next_out_++);
    cv_.notify_all();
    return b;
  }

 private:
  void start(uint64_t epoch, std::vector<std::pair<int64_t, int64_t>> ranges, int64_t first_batch) {
    stop();
    epoch_ = epoch;
    order_ = indices_;
    if (opt_.shuffle) {
      Pcg64 rng(SeedSequence(entropy_words({opt_.seed, epoch})));
      for (int64_t i = static_cast<int64_t>(order_.size()) - 1; i >= 1; --i)
        std::swap(order_[static_cast<size_t>(i)], order_[rng.random_interval(static_cast<uint64_t>(i))]);
    }
    ranges_ = std::move(ranges);
    num_batches_ = static_cast<int64_t>(ranges_.size());
    next_claim_ = std::min(first_batch, num_batches_);
    next_out_ = next_claim_;
    stopping_ = false;
    ready_.clear();
    for (int w = 0; w < opt_.workers; ++w) threads_.emplace_back([this] { work(); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    error_ = nullptr;
  }

  std::shared_ptr<HostBuffer> take_buffer() {
    const size_t n = static_cast<size_t>(opt_.batch_size) * 3 * opt_.image_width * opt_.image_height;
    std::lock_guard<std::mutex> lock(pool_mu_);
    for (auto& b : pool_)
      if (b.use_count() == 1) return b;  // nobody holds it any more: reuse (pinned allocs are slow)
    pool_.push_back(std::make_shared<HostBuffer>(n));
    return pool_.back();
  }

  void work() {
    while (true) {
      int64_t k;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || error_ || next_claim_ < next_out_ + opt_.prefetch; });
        if (stopping_ || error_ || next_claim_ >= num_batches_) return;
        k = next_claim_++;
      }
      try {
        Batch b = build(k);
        std::lock_guard<std::mutex> lock(mu_);
        ready_[k] = std::move(b);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
      cv_.notify_all();
    }
  }

  Batch build(int64_t k) {
    Batch b;
    b.number = k;
    b.pixels = take_buffer();
    const size_t plane = static_cast<size_t>(3) * opt_.image_width * opt_.image_height;
    const auto first = static_cast<size_t>(ranges_[static_cast<size_t>(k)].first);
    const auto last = static_cast<size_t>(ranges_[static_cast<size_t>(k)].second);
    for (size_t i = first; i < last; ++i) {
      const int64_t row = order_[i];
      Row r = ds_.row(row);
      auto cap = choose_caption(r.captions, opt_.captions, opt_.seed, epoch_, row);
      if (!cap) {
        ++stats_.rows_without_caption;
        continue;
      }
      float* dst = b.pixels->data() + b.rows.size() * plane;
      try {
        if (!r.image) fail(str_cat(ds_.where(row), ": missing image"));
        preprocess_image(*r.image, opt_.image_width, opt_.image_height, dst, ds_.where(row));
      } catch (const Error&) {
        if (!opt_.skip_bad_images) throw;
        ++stats_.bad_images;
        continue;
      }
      ++stats_.images;
      if (opt_.tokenize) b.tokens.push_back(opt_.tokenize(*cap));
      b.rows.push_back(row);
      b.captions.push_back(std::move(*cap));
    }
    return b;
  }

  const Dataset& ds_;
  std::vector<int64_t> indices_, order_;
  std::vector<std::pair<int64_t, int64_t>> ranges_;  // epoch positions of each batch
  LoaderOptions opt_;
  uint64_t epoch_ = 0;
  int64_t num_batches_ = 0, next_claim_ = 0, next_out_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::map<int64_t, Batch> ready_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::mutex pool_mu_;
  std::vector<std::shared_ptr<HostBuffer>> pool_;
  LoaderStats stats_;
};

}  // namespace tq::risc
