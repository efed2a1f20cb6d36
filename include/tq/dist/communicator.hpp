// Communicator: the collectives data-parallel training needs, as a plain C++ interface.
//
// The implementation for CUDA is NCCL (kernels/nccl.cuh, registered into communicator_factories()
// by register_nccl_backend() from a CUDA translation unit). World size 1 on CUDA goes through NCCL
// too, so a one-GPU run exercises the same code path as a multi-GPU one. The only other
// implementation is LocalCommunicator: world size 1 on CPU tensors (CPU builds and CPU tests).
//
// Invariants:
//  * collectives are called by every rank in the same order with tensors of the same numel;
//  * all_reduce_* are in place and asynchronous: they return once the work is ordered after what
//    the caller's current stream has enqueued so far, and everything the caller enqueues on that
//    stream afterwards sees the result (no host synchronization);
//  * wait() is the host-side completion point: it returns once every collective this rank enqueued
//    has finished, or throws tq::Error naming the collective (peer failure, timeout);
//  * after a failure (or abort()) the communicator is unusable: every call throws that error.
#pragma once

#include <cmath>
#include <memory>
#include <string>

#include "tq/core/tensor.hpp"
#include "tq/dist/env.hpp"
#include "tq/dist/tcp_store.hpp"

namespace tq::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The device whose tensors this communicator reduces.
  virtual Device device() const = 0;
  virtual std::string backend_name() const = 0;

  // t ← the mean of t over the ranks, in place. t: f32 on device() (dense, or made dense and
  // written back).
  virtual void all_reduce_mean(const Tensor& t) = 0;
  // t ← the sum of t over the ranks, in place. t: f32, f64 or i64 on device().
  virtual void all_reduce_sum(const Tensor& t) = 0;
  // Blocks until every collective this rank enqueued has completed (see the invariants).
  virtual void wait() = 0;
  // wait(), then returns once every rank has called barrier().
  virtual void barrier() = 0;
  // Abandons outstanding collectives (a peer failed): they may never complete. Never throws.
  virtual void abort() noexcept = 0;
};

// World size 1 on the CPU: every collective is the identity (after the checks a real one makes).
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  Device device() const override { return Device::cpu(); }
  std::string backend_name() const override { return "local"; }
  void all_reduce_mean(const Tensor& t) override { check(t, "all_reduce_mean", true); }
  void all_reduce_sum(const Tensor& t) override { check(t, "all_reduce_sum", false); }
  void wait() override {}
  void barrier() override {}
  void abort() noexcept override {}

 private:
  static void check(const Tensor& t, const char* op, bool f32_only) {
    TQ_CHECK(t.defined(), op, ": undefined tensor");
    TQ_CHECK(t.device().is_cpu(), op, ": the local (world size 1, CPU) communicator reduces CPU tensors; got ",
             describe(t), " (CUDA tensors go through NCCL)");
    const DType d = t.dtype();
    TQ_CHECK(f32_only ? d == DType::f32 : (d == DType::f32 || d == DType::f64 || d == DType::i64), op,
             ": unsupported dtype in ", describe(t));
  }
};

// The NCCL factory, filled by register_nccl_backend() (kernels/nccl.cuh). `store` must outlive the
// communicator (its barrier() uses it).
struct CommunicatorFactories {
  std::unique_ptr<Communicator> (*make_nccl)(const Env& env, TcpStore& store) = nullptr;
};

inline CommunicatorFactories& communicator_factories() {
  static CommunicatorFactories f;
  return f;
}

// Everything a rank of a data-parallel run holds, destroyed communicator first, store last.
struct ProcessGroup {
  Env env;
  std::unique_ptr<TcpStore> store;
  std::unique_ptr<Communicator> comm;

  int rank() const { return env.rank; }
  int size() const { return env.world_size; }
  bool is_main() const { return env.rank == 0; }
  Device device() const { return comm->device(); }
};

// The process group for training on `device_type` (cpu or cuda): the rendezvous, then NCCL on
// cuda:<LOCAL_RANK> (any world size), or the local communicator on the CPU (world size 1 only).
inline ProcessGroup init_process_group(DeviceType device_type, const Env& env) {
  ProcessGroup pg;
  pg.env = env;
  if (device_type == DeviceType::cpu) {
    TQ_CHECK(env.world_size == 1, "dist: ", env.describe(), ": multi-process training needs CUDA devices (NCCL); "
             "on the CPU run one process");
    pg.store = std::make_unique<TcpStore>(env);
    pg.comm = std::make_unique<LocalCommunicator>();
    return pg;
  }
  TQ_CHECK(communicator_factories().make_nccl != nullptr, "dist: ", env.describe(), ": this program was built without "
           "NCCL (configure with -DTQ_CUDA=ON on a machine with nccl.h and libnccl, and call "
           "tq::cuda::register_nccl_backend())");
  pg.store = std::make_unique<TcpStore>(env);
  pg.comm = communicator_factories().make_nccl(env, *pg.store);
  return pg;
}

inline ProcessGroup init_process_group(DeviceType device_type) {
  return init_process_group(device_type, env_from_process());
}

// Σ over the ranks of a host value: one small collective, wait(), and a copy to the host.
inline int64_t sum_over_ranks(Communicator& comm, int64_t value) {
  TQ_CHECK(std::abs(value) < (int64_t(1) << 53), "sum_over_ranks: ", value, " is not exact as a double");
  Tensor t = Tensor::full({1}, double(value), DType::i64, comm.device());
  comm.all_reduce_sum(t);
  comm.wait();
  return t.item<int64_t>();
}
inline double sum_over_ranks(Communicator& comm, double value) {
  Tensor t = Tensor::full({1}, value, DType::f64, comm.device());
  comm.all_reduce_sum(t);
  comm.wait();
  return t.item<double>();
}

}  // namespace tq::dist
