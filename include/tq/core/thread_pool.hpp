// A small persistent thread pool for the CPU backend's parallel loops.
//
// parallel_for(n, grain, fn) splits [0, n) into contiguous chunks of at least `grain` items and
// runs fn(begin, end) on them, using the calling thread too. Nested calls run serially, so ops
// may call each other freely. Pool size: TQ_NUM_THREADS, else the hardware concurrency.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tq {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  static ThreadPool& global() {
    static ThreadPool pool([] {
      if (const char* e = std::getenv("TQ_NUM_THREADS")) return std::max(1, std::atoi(e));
      return std::max(1, int(std::thread::hardware_concurrency()));
    }());
    return pool;
  }

  // Runs fn(chunk) for chunk in [0, chunks) across the pool and waits for all of them.
  void run(int64_t chunks, const std::function<void(int64_t)>& fn) {
    if (chunks <= 1 || workers_.empty() || in_parallel()) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    std::unique_lock submit(submit_mu_);  // one parallel region at a time
    {
      std::lock_guard lock(mu_);
      job_ = &fn;
      next_ = 0;
      total_ = chunks;
      pending_ = chunks;
      ++generation_;
    }
    cv_.notify_all();
    work();
    // Wait for the chunks and for every worker to leave work(), so none can touch the next job's
    // counters with this job's view of them.
    std::unique_lock lock(mu_);
    done_cv_.wait(lock, [&] { return pending_ == 0 && active_ == 0; });
    job_ = nullptr;
  }

 private:
  static bool& in_parallel() {
    thread_local bool flag = false;
    return flag;
  }
  void work() {
    in_parallel() = true;
    while (true) {
      int64_t c = next_.fetch_add(1);
      if (c >= total_) break;
      (*job_)(c);
      if (pending_.fetch_sub(1) == 1) {
        std::lock_guard lock(mu_);
        done_cv_.notify_all();
      }
    }
    in_parallel() = false;
  }
  void loop() {
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stop_ || (generation_ != seen && job_ != nullptr); });
        if (stop_) return;
        seen = generation_;
        ++active_;
      }
      work();
      {
        std::lock_guard lock(mu_);
        --active_;
      }
      done_cv_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, submit_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_{0}, pending_{0};
  int64_t total_ = 0;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// Calls fn(begin, end) over [0, n) in chunks of at least `grain`, in parallel when worthwhile.
inline void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  ThreadPool& pool = ThreadPool::global();
  int64_t chunks = std::min<int64_t>(pool.size() * 4, (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  int64_t step = (n + chunks - 1) / chunks;
  pool.run(chunks, [&](int64_t c) {
    int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) fn(b, e);
  });
}

}  // namespace tq
