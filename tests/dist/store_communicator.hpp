// A test double: a Communicator over CPU tensors whose collectives go through the TcpStore
// (all_gather of the raw values, summed in rank order in double). It lets CPU tests run several
// ranks as threads and check the data-parallel pieces (GradBucket, shard math, normalisation)
// against a single-process run. Test code only: the product's multi-process transport is NCCL.
#pragma once

#include <cstring>

#include <tq/dist/communicator.hpp>

namespace tq::dist::test_double {

class StoreCommunicator final : public Communicator {
 public:
  explicit StoreCommunicator(TcpStore& store) : store_(store) {}
  int rank() const override { return store_.rank(); }
  int size() const override { return store_.size(); }
  Device device() const override { return Device::cpu(); }
  std::string backend_name() const override { return "store (test)"; }
  void all_reduce_mean(const Tensor& t) override { reduce(t, true); }
  void all_reduce_sum(const Tensor& t) override { reduce(t, false); }
  void wait() override {}
  void barrier() override { store_.barrier(); }
  void abort() noexcept override { store_.abort("aborted by the test"); }

 private:
  void reduce(const Tensor& t, bool mean) {
    TQ_CHECK(t.device().is_cpu() && t.is_contiguous(), "StoreCommunicator: dense CPU tensors only");
    TQ_CHECK(!mean || t.dtype() == DType::f32, "StoreCommunicator: all_reduce_mean takes f32");
    const std::string mine(static_cast<const char*>(t.data_ptr()), t.nbytes());
    const std::vector<std::string> all = store_.all_gather(mine);
    std::vector<double> acc(size_t(t.numel()), 0.0);
    for (const std::string& blob : all) {
      TQ_CHECK(blob.size() == mine.size(), "StoreCommunicator: ranks reduce different sizes");
      Tensor other = Tensor::empty(t.shape(), t.dtype());
      std::memcpy(other.data_ptr(), blob.data(), blob.size());
      const std::vector<double> v = other.to_vector<double>();
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += v[i];
    }
    if (mean)
      for (double& a : acc) a /= double(all.size());
    Tensor(t).copy_(Tensor::from_vector(acc, t.shape()).to(t.dtype()));
  }

  TcpStore& store_;
};

}  // namespace tq::dist::test_double
