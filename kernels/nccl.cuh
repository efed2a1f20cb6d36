// The NCCL communicator (tq::dist::Communicator on CUDA) and its registration.
//
// Invariants:
//  * one communicator per process, on cuda:<LOCAL_RANK> (env.device_index); world size 1 goes
//    through NCCL exactly like a multi-GPU run;
//  * NCCL_NVLS_ENABLE=0 is forced before the first NCCL call (dist::apply_nccl_env_defaults);
//    nothing here creates multicast objects;
//  * the communicator is non-blocking (ncclConfig_t::blocking = 0): no NCCL call can hang the
//    host; every state is polled with ncclCommGetAsyncError against a deadline
//    (TQ_NCCL_TIMEOUT_S, default 300 s), past which the communicator is aborted (ncclCommAbort)
//    and tq::Error names the collective and the timeout;
//  * each collective runs on a dedicated high-priority stream: it waits (event) for what the
//    caller's current stream has enqueued, and the caller's stream waits (event) for it, so the
//    host never blocks and later work on the caller's stream sees the result;
//  * a watchdog thread watches the outstanding collectives: when the host is blocked elsewhere (a
//    copy to the host waiting on a collective that will never finish), it aborts the
//    communicator past the deadline, which ends the stuck NCCL kernels, prints the error and
//    records it; the next call of this rank (all_reduce_*, wait, barrier) throws it;
//  * every NCCL call, from either thread, holds mu_ (ncclCommAbort frees the communicator).
//
// Without TQ_WITH_NCCL (no nccl.h at configure time) register_nccl_backend() registers nothing and
// dist::init_process_group(cuda) explains that the program was built without NCCL.
#pragma once

#include "tq/dist/communicator.hpp"

#if defined(TQ_WITH_NCCL)

#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "kernels/cuda_check.cuh"
#include "kernels/device.cuh"

static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0),
              "tq needs NCCL >= 2.14 (non-blocking communicators, ncclCommFinalize)");

namespace tq::cuda {

class NcclCommunicator final : public dist::Communicator {
  using Clock = std::chrono::steady_clock;

 public:
  // Cheap and non-throwing; start() does the work (so a failure there still runs the destructor).
  NcclCommunicator(const dist::Env& env, dist::TcpStore& store)
      : rank_(env.rank),
        world_(env.world_size),
        timeout_s_(env.timeout_s),
        timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(env.timeout_s))),
        store_(&store) {}

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  ~NcclCommunicator() override { shutdown(); }

  // Picks and checks the device, shares the ncclUniqueId through the store, creates the
  // communicator (polled against the deadline) and starts the watchdog.
  void start(const dist::Env& env) {
    TQ_CHECK(store_->rank() == rank_ && store_->size() == world_, "nccl: the store is rank ", store_->rank(), " of ",
             store_->size(), ", the environment says rank ", rank_, " of ", world_);
    dist::apply_nccl_env_defaults();
    device_ = env.device_index(tq::cuda::device_count());
    TQ_CUDA_CHECK(cudaSetDevice(device_));  // this thread works on this rank's GPU from now on
    check_one_process_per_gpu();
    int least = 0, greatest = 0;
    TQ_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    TQ_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
    TQ_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));

    ncclUniqueId id{};
    std::string id_bytes;
    if (rank_ == 0) {
      check_result(ncclGetUniqueId(&id), "ncclGetUniqueId");
      id_bytes.assign(id.internal, sizeof(id.internal));
    }
    id_bytes = store_->broadcast(id_bytes);
    TQ_CHECK(id_bytes.size() == sizeof(id.internal), "nccl: rank 0 sent a unique id of ", id_bytes.size(), " bytes");
    std::memcpy(id.internal, id_bytes.data(), sizeof(id.internal));

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    std::unique_lock lock(mu_);
    const auto deadline = Clock::now() + timeout_;
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, world_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      fail_locked(str_cat("nccl: ncclCommInitRankConfig failed on rank ", rank_, " of ", world_, ": ",
                          ncclGetErrorString(r)));  // aborts a half-made communicator
      throw_if_failed_locked();
    }
    settle_locked(str_cat("communicator setup (ncclCommInitRankConfig, ", world_, " ranks)"), deadline);
    lock.unlock();
    watchdog_ = std::thread([this] { watch(); });
  }

  int rank() const override { return rank_; }
  int size() const override { return world_; }
  Device device() const override { return Device::cuda(device_); }
  std::string backend_name() const override { return "nccl"; }

  void all_reduce_mean(const Tensor& t) override {
    TQ_CHECK(!t.defined() || t.dtype() == DType::f32, "all_reduce_mean: expects an f32 tensor, got ", describe(t));
    all_reduce(t, ncclAvg, "all_reduce_mean");
  }
  void all_reduce_sum(const Tensor& t) override { all_reduce(t, ncclSum, "all_reduce_sum"); }

  void wait() override {
    DeviceGuard g(device_);
    std::unique_lock lock(mu_);
    auto nap = std::chrono::microseconds(10);
    while (true) {
      throw_if_failed_locked();
      retire_completed_locked();
      throw_if_failed_locked();
      if (pending_.empty()) return;
      if (!check_front_locked()) throw_if_failed_locked();
      lock.unlock();
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
      lock.lock();
    }
  }

  void barrier() override {
    wait();
    try {
      store_->barrier();
    } catch (const std::exception& e) {
      std::lock_guard lock(mu_);
      fail_locked(str_cat("nccl barrier: ", e.what()));  // a peer is gone: its collectives would hang
      throw;
    }
  }

  void abort() noexcept override {
    std::lock_guard lock(mu_);
    fail_locked(str_cat("nccl: rank ", rank_, " aborted the communicator"));
  }

 private:
  struct Pending {
    std::string what;  // "all_reduce_mean #12 (11534336 f32)"
    cudaEvent_t done = nullptr;
    Clock::time_point enqueued;
  };

  static void check_result(ncclResult_t r, const char* call) {
    TQ_CHECK(r == ncclSuccess || r == ncclInProgress, "nccl: ", call, " failed: ", ncclGetErrorString(r));
  }

  static ncclDataType_t nccl_dtype(DType d, const char* op) {
    switch (d) {
      case DType::f32: return ncclFloat32;
      case DType::f64: return ncclFloat64;
      case DType::i64: return ncclInt64;
      default: fail(str_cat(op, ": NCCL reduces f32, f64 or i64 tensors here, got ", dtype_name(d)));
    }
  }

  std::string timeout_text() const { return str_cat(timeout_s_, " s (TQ_NCCL_TIMEOUT_S)"); }

  // Two ranks on one GPU deadlock or fail deep inside NCCL: catch it at the rendezvous.
  void check_one_process_per_gpu() {
    char bus[64] = {0};
    TQ_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus), device_));
    char host[256] = {0};
    (void)::gethostname(host, sizeof(host) - 1);
    const std::vector<std::string> all = store_->all_gather(str_cat(host, " GPU ", bus));
    for (size_t a = 0; a < all.size(); ++a)
      for (size_t b = a + 1; b < all.size(); ++b)
        TQ_CHECK(all[a] != all[b], "nccl: ranks ", a, " and ", b, " both use ", all[a], ": run one process per GPU ",
                 "(check LOCAL_RANK and CUDA_VISIBLE_DEVICES)");
  }

  void all_reduce(const Tensor& t, ncclRedOp_t op, const char* name) {
    TQ_CHECK(t.defined(), name, ": undefined tensor");
    TQ_CHECK(t.device() == device(), name, ": ", describe(t), " is not on this rank's device ", device().str());
    const ncclDataType_t dt = nccl_dtype(t.dtype(), name);
    if (t.numel() == 0) return;
    NoGradGuard no_grad;
    const Tensor dense = t.is_contiguous() ? t : t.contiguous();
    DeviceGuard g(device_);
    const cudaStream_t compute = current_stream();
    {
      std::unique_lock lock(mu_);
      throw_if_failed_locked();
      Pending p;
      p.what = str_cat(name, " #", ++seq_, " (", t.numel(), " ", dtype_name(t.dtype()), ")");
      TQ_CUDA_CHECK(cudaEventRecord(ready_, compute));
      TQ_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
      void* data = dense.data_ptr();
      check_result(ncclAllReduce(data, data, size_t(t.numel()), dt, op, comm_, stream_), name);
      settle_locked(p.what, Clock::now() + timeout_);  // enqueued once the state leaves ncclInProgress
      p.done = take_event_locked();
      TQ_CUDA_CHECK(cudaEventRecord(p.done, stream_));
      TQ_CUDA_CHECK(cudaStreamWaitEvent(compute, p.done, 0));
      p.enqueued = Clock::now();
      pending_.push_back(std::move(p));
    }
    cv_.notify_all();
    if (!dense.same(t)) Tensor(t).copy_(dense);  // ordered after the collective on `compute`
  }

  // Polls the communicator until a non-blocking call has finished (state ncclSuccess); throws and
  // aborts on an error or past `deadline`.
  void settle_locked(const std::string& what, Clock::time_point deadline) {
    auto nap = std::chrono::microseconds(10);
    while (true) {
      ncclResult_t state = ncclInProgress;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
      if (r != ncclSuccess) state = r;
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) {
        fail_locked(str_cat("nccl: ", what, " failed on rank ", rank_, ": ", ncclGetErrorString(state), " (",
                            ncclGetLastError(comm_), ")"));
        throw_if_failed_locked();
      }
      if (Clock::now() > deadline) {
        fail_locked(str_cat("nccl: ", what, " did not complete on rank ", rank_, " of ", world_, " within ",
                            timeout_text(), ": a peer rank is missing, exited or hangs; the communicator was aborted"));
        throw_if_failed_locked();
      }
      // Holding mu_ while napping is fine: this thread is the only user, and the watchdog only
      // acts on collectives that are already enqueued.
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(1000));
    }
  }

  void retire_completed_locked() {
    while (!pending_.empty()) {
      const cudaError_t q = cudaEventQuery(pending_.front().done);
      if (q == cudaErrorNotReady) return;
      if (q != cudaSuccess) {
        (void)cudaGetLastError();
        fail_locked(str_cat("nccl: ", pending_.front().what, " on rank ", rank_, ": ", cudaGetErrorName(q), ": ",
                            cudaGetErrorString(q)));
        return;
      }
      free_events_.push_back(pending_.front().done);
      pending_.pop_front();
    }
  }

  // The oldest outstanding collective: false (and the communicator aborted) when NCCL reports an
  // error or it has been outstanding longer than the timeout.
  bool check_front_locked() {
    if (comm_ == nullptr || pending_.empty()) return error_.empty();
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) state = r;
    const Pending& p = pending_.front();
    if (state != ncclSuccess && state != ncclInProgress) {
      fail_locked(str_cat("nccl: ", p.what, " failed on rank ", rank_, " of ", world_, ": ", ncclGetErrorString(state),
                          " (", ncclGetLastError(comm_), "); the communicator was aborted"));
      return false;
    }
    if (Clock::now() - p.enqueued > timeout_) {
      fail_locked(str_cat("nccl: ", p.what, " did not complete on rank ", rank_, " of ", world_, " within ",
                          timeout_text(), ": a peer rank exited, crashed or stopped calling collectives; the "
                          "communicator was aborted"));
      return false;
    }
    return true;
  }

  // Records the first failure and aborts the communicator (which ends its stuck kernels).
  void fail_locked(const std::string& message) {
    if (error_.empty()) error_ = message;
    if (comm_ != nullptr) {
      (void)ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    for (Pending& p : pending_) spent_events_.push_back(p.done);  // may complete late: destroy at the end
    pending_.clear();
  }

  void throw_if_failed_locked() const {
    if (!error_.empty()) tq::fail(error_);
    TQ_CHECK(comm_ != nullptr, "nccl: the communicator of rank ", rank_, " is not initialized");
  }

  cudaEvent_t take_event_locked() {
    if (!free_events_.empty()) {
      cudaEvent_t e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    TQ_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }

  // The watchdog: every 100 ms, retires completed collectives and checks the oldest one.
  void watch() {
    (void)cudaSetDevice(device_);
    std::unique_lock lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stop_ || comm_ == nullptr) continue;
      retire_completed_locked();
      if (error_.empty() && check_front_locked()) continue;
      std::fprintf(stderr, "tq: %s\n", error_.c_str());
      std::fflush(stderr);
    }
  }

  // Stops the watchdog, lets outstanding work finish (bounded by the timeout) and releases NCCL:
  // ncclCommFinalize + ncclCommDestroy when healthy, ncclCommAbort otherwise (also when teardown
  // takes over a minute: call barrier() first so the ranks tear down together). Never throws.
  void shutdown() noexcept {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (device_ >= 0) (void)cudaSetDevice(device_);
    try {
      wait();
    } catch (...) {  // already aborted, or it failed now: fail_locked aborted it
    }
    std::unique_lock lock(mu_);
    if (comm_ != nullptr) {
      try {
        check_result(ncclCommFinalize(comm_), "ncclCommFinalize");
        const auto limit = std::min<Clock::duration>(timeout_, std::chrono::seconds(60));
        settle_locked("communicator teardown (ncclCommFinalize)", Clock::now() + limit);
        (void)ncclCommDestroy(comm_);
        comm_ = nullptr;
      } catch (...) {
        fail_locked("nccl: teardown failed");
      }
    }
    for (cudaEvent_t e : free_events_) (void)cudaEventDestroy(e);
    for (cudaEvent_t e : spent_events_) (void)cudaEventDestroy(e);
    if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  const int rank_, world_;
  const double timeout_s_;
  const Clock::duration timeout_;
  dist::TcpStore* store_;
  int device_ = -1;
  cudaStream_t stream_ = nullptr;  // the communication stream
  cudaEvent_t ready_ = nullptr;    // recorded on the caller's stream before each collective
  uint64_t seq_ = 0;

  std::mutex mu_;  // guards everything below and every NCCL call on comm_
  std::condition_variable cv_;
  ncclComm_t comm_ = nullptr;  // null before start() and once aborted or destroyed
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_, spent_events_;
  std::string error_;  // the first failure: every later call throws it
  bool stop_ = false;
  std::thread watchdog_;
};

// The factory behind dist::init_process_group(cuda). A rank that fails here tells the others
// through the store, so they stop waiting for it at once.
inline std::unique_ptr<dist::Communicator> make_nccl_communicator(const dist::Env& env, dist::TcpStore& store) {
  auto comm = std::make_unique<NcclCommunicator>(env, store);
  try {
    comm->start(env);
  } catch (const std::exception& e) {
    store.abort(e.what());
    throw;
  }
  return comm;
}

// Registers the NCCL communicator factory (call once, from a CUDA translation unit).
inline void register_nccl_backend() { dist::communicator_factories().make_nccl = &make_nccl_communicator; }

}  // namespace tq::cuda

#else  // built without NCCL

namespace tq::cuda {
inline void register_nccl_backend() {}
}  // namespace tq::cuda

#endif
