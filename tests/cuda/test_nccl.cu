// tq::dist over NCCL on the GPU.
//
// One GPU: world size 1 goes through NCCL (all-reduces are the identity, in place, also for
// non-contiguous tensors; sums of host values; GradBucket through autograd against the CPU); a
// collective that cannot finish (the stream it waits for is busy past the deadline) makes wait()
// throw a tq::Error naming the collective and TQ_NCCL_TIMEOUT_S, and the communicator stays
// unusable afterwards.
// Two GPUs (skipped with fewer): the test spawns two processes of this binary (one per GPU, the
// variables torchrun would set), which run the GpuNcclWorker tests: the mean of different
// buffers, sums, and a data-parallel GradBucket step against the single-process CPU step; and a
// run where rank 1 exits after one collective, whose rank 0 must fail with a clear error.
// Suites are Gpu* (ctest label gpu); every test skips without a GPU, and without NCCL.
#include <gtest/gtest.h>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <thread>

#include "kernels/nccl.cuh"
#include "tests/cuda/gpu_test_util.hpp"
#include "tq/dist/dist.hpp"
#include "tq/optim/schedule.hpp"

extern char** environ;

namespace {

using namespace tq;
using tq::test::throws_with;
using namespace tq::gpu_test;
using namespace tq::dist;
using Seconds = std::chrono::duration<double>;

#if defined(TQ_WITH_NCCL)
#define TQ_REQUIRE_NCCL()                 \
  do {                                    \
    TQ_REQUIRE_GPU();                     \
    tq::cuda::register_nccl_backend();    \
  } while (0)
#else
#define TQ_REQUIRE_NCCL() GTEST_SKIP() << "built without NCCL (no nccl.h / libnccl at configure time)"
#endif

// World size 1 without any launcher variable: no socket is opened.
Env single_process(double timeout_s) {
  Env e;
  e.timeout_s = timeout_s;
  return e;
}

// Spins for `ns` nanoseconds of GPU time (bounded, so the device always drains).
__global__ void spin_kernel(unsigned long long ns) {
  unsigned long long start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

TEST(GpuNccl, WorldSizeOneAllReduceIsTheIdentity) {
  TQ_REQUIRE_NCCL();
  ProcessGroup pg = init_process_group(DeviceType::cuda, single_process(120));
  Communicator& comm = *pg.comm;
  EXPECT_EQ(comm.backend_name(), "nccl");
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  EXPECT_EQ(comm.device(), kCuda);
  ASSERT_NE(std::getenv("NCCL_NVLS_ENABLE"), nullptr);
  EXPECT_STREQ(std::getenv("NCCL_NVLS_ENABLE"), "0");
  for (int64_t n : kSizes) {
    SCOPED_TRACE(str_cat("numel ", n));
    const Tensor x = rnd({n}, DType::f32);
    poison_for(x);
    Tensor d = x.to(kCuda);
    comm.all_reduce_mean(d);
    comm.wait();
    EXPECT_EQ(d.to_vector<float>(), x.to_vector<float>());
  }
  // A transposed view: reduced through a dense copy and written back in place.
  const Tensor m = rnd({72, 33}, DType::f32);
  Tensor mt = m.to(kCuda).t();
  comm.all_reduce_mean(mt);
  EXPECT_EQ(mt.to_vector<float>(), m.t().to_vector<float>());
  // Sums of f64 and i64 tensors, and of host values.
  const Tensor f = rnd({4304}, DType::f64);
  Tensor fd = f.to(kCuda);
  comm.all_reduce_sum(fd);
  EXPECT_EQ(fd.to_vector<double>(), f.to_vector<double>());
  EXPECT_EQ(sum_over_ranks(comm, int64_t(1) << 40), int64_t(1) << 40);
  EXPECT_EQ(sum_over_ranks(comm, 0.1234), 0.1234);
  comm.barrier();
  // What it refuses, by name.
  EXPECT_TRUE(throws_with([&] { comm.all_reduce_mean(rnd({8}, DType::bf16).to(kCuda)); }, {"all_reduce_mean", "bf16"}));
  EXPECT_TRUE(throws_with([&] { comm.all_reduce_mean(rnd({8}, DType::f32)); }, {"all_reduce_mean", "cuda:0"}));
  EXPECT_TRUE(throws_with([&] { comm.all_reduce_sum(rnd({8}, DType::i32).to(kCuda)); }, {"all_reduce_sum", "i32"}));
}

TEST(GpuNccl, RunsOnTheCallersOwnStream) {
  TQ_REQUIRE_NCCL();
  ProcessGroup pg = init_process_group(DeviceType::cuda, single_process(120));
  // The caller's current stream is a non-blocking stream of its own, busy when the collective is
  // enqueued: the events must be recorded and waited on that stream (a world of one rank cannot
  // show a missing order in the values; the two-rank worker does).
  tq::cuda::Stream s(0, /*non_blocking=*/true);
  StreamGuard guard(DeviceType::cuda, s);
  const Tensor x = rnd({257216}, DType::f32);
  Tensor src = x.to(kCuda);
  poison_for(x);
  Tensor d = Tensor::empty({257216}, DType::f32, kCuda);
  spin_kernel<<<1, 1, 0, s.get()>>>(200ull * 1000 * 1000);  // 200 ms
  TQ_CUDA_CHECK_LAUNCH();
  d.copy_(src);
  pg.comm->all_reduce_mean(d);
  Tensor twice = d * 2.0;
  EXPECT_EQ(twice.to_vector<float>(), (x * 2.0).to_vector<float>());
  pg.comm->wait();
}

TEST(GpuNccl, TimeoutAbortsAndNamesTheCollective) {
  TQ_REQUIRE_NCCL();
  ProcessGroup pg = init_process_group(DeviceType::cuda, single_process(1.0));
  Communicator& comm = *pg.comm;
  Tensor t = rnd({4304}, DType::f32).to(kCuda);
  comm.all_reduce_mean(t);
  comm.wait();  // healthy first
  // The collective waits for the caller's stream, busy for 4 s: past the 1 s deadline.
  spin_kernel<<<1, 1, 0, tq::cuda::current_stream()>>>(4ull * 1000 * 1000 * 1000);
  TQ_CUDA_CHECK_LAUNCH();
  const auto t0 = std::chrono::steady_clock::now();
  comm.all_reduce_mean(t);
  EXPECT_TRUE(throws_with([&] { comm.wait(); },
                          {"all_reduce_mean #2", "(4304 f32)", "within 1 s (TQ_NCCL_TIMEOUT_S)", "aborted"}));
  const double waited = Seconds(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(waited, 0.9);
  EXPECT_LT(waited, 30.0);
  tq::cuda::synchronize();  // the device drains: nothing is stuck behind the aborted communicator
  TQ_CUDA_CHECK(cudaGetLastError());
  // Unusable afterwards, with the same error.
  EXPECT_TRUE(throws_with([&] { comm.all_reduce_mean(t); }, {"all_reduce_mean #2", "TQ_NCCL_TIMEOUT_S"}));
  EXPECT_TRUE(throws_with([&] { comm.barrier(); }, {"all_reduce_mean #2"}));
}

// A toy "model" (w: (3, 5), b: (3)) and a masked squared error summed over rows and divided by a
// normaliser: the shape of the trainer's Σ CE / tokens.
struct Toy {
  Tensor x, y, mask, w0, b0;  // CPU, f32
};

Toy make_toy(uint64_t seed, int64_t rows) {
  Generator g(seed);
  Toy t;
  t.x = rand({rows, 5}, g, DType::f32, -1, 1);
  t.y = rand({rows, 3}, g, DType::f32, -1, 1);
  Tensor u = rand({rows, 3}, g, DType::f64, 0, 1);
  std::vector<double> m = u.to_vector<double>();
  for (double& v : m) v = v < 0.7 ? 1.0 : 0.0;
  m[0] = 1.0;
  t.mask = Tensor::from_vector(m, {rows, 3}).to(DType::f32);
  t.w0 = rand({3, 5}, g, DType::f32, -1, 1);
  t.b0 = rand({3}, g, DType::f32, -1, 1);
  return t;
}

Tensor toy_loss(const Toy& t, const Tensor& w, const Tensor& b, const RowRange& r, double normalizer, Device dev) {
  Tensor x = t.x.slice(0, r.begin, r.end).to(dev), y = t.y.slice(0, r.begin, r.end).to(dev),
         m = t.mask.slice(0, r.begin, r.end).to(dev);
  // x·wᵀ as a broadcast product and a row sum: elementwise and reduction kernels only (the GEMM
  // path is tested elsewhere and not needed to exercise the communicator).
  Tensor pred = sum(x.unsqueeze(1) * w.unsqueeze(0), {2}) + b;  // (rows, 3)
  return sum(square(pred - y) * m) / normalizer;
}

int64_t toy_tokens(const Toy& t, const RowRange& r) {
  double n = 0;
  for (double v : t.mask.slice(0, r.begin, r.end).to_vector<double>()) n += v;
  return int64_t(n);
}

// The data-parallel step of rank comm.rank() (micro-batches of 2 rows) against the whole step on
// the CPU in this process; also GradBucket's clip against optim::clip_grad_norm.
void check_data_parallel_step(Communicator& comm, uint64_t seed) {
  constexpr int64_t kRows = 13, kBatch = 2;
  const Toy toy = make_toy(seed, kRows);
  const EffectiveBatch eb = effective_batch(0, kRows, kBatch, (kRows + kBatch - 1) / kBatch);
  const int64_t tokens = toy_tokens(toy, eb.positions);
  Tensor w = toy.w0.clone().requires_grad_(), b = toy.b0.clone().requires_grad_();
  toy_loss(toy, w, b, eb.positions, double(tokens), Device::cpu()).backward();

  const Device dev = comm.device();
  Tensor wd = toy.w0.to(dev).requires_grad_(), bd = toy.b0.to(dev).requires_grad_();
  GradBucket bucket({wd, bd}, {"w", "b"});
  const StepShard shard = shard_step(eb, kBatch, comm.rank(), comm.size());
  const int64_t total = global_token_count(comm, toy_tokens(toy, shard.positions));
  ASSERT_EQ(total, tokens);
  for (const RowRange& m : shard.micro_batches)
    toy_loss(toy, wd, bd, m, loss_normalizer(total, comm.size()), dev).backward();
  bucket.all_reduce_mean(comm);
  comm.wait();
  EXPECT_TRUE(bucket.is_slot(0, wd.grad()));
  EXPECT_TRUE(close(wd.grad().cpu(), w.grad(), 1e-5));
  EXPECT_TRUE(close(bd.grad().cpu(), b.grad(), 1e-5));
  const double cpu_norm = optim::clip_grad_norm({w, b}, 0.01);
  EXPECT_NEAR(bucket.clip_grad_norm(0.01), cpu_norm, 1e-5 * cpu_norm);
  EXPECT_TRUE(close(wd.grad().cpu(), w.grad(), 1e-5));
}

TEST(GpuNccl, GradBucketStepOnOneRankMatchesTheCpu) {
  TQ_REQUIRE_NCCL();
  ProcessGroup pg = init_process_group(DeviceType::cuda, single_process(120));
  check_data_parallel_step(*pg.comm, tq::test::fresh_seed());
  // Bucket slots at the sizes that matter, through autograd on the device.
  std::vector<Tensor> ps, coef;
  for (int64_t n : kSizes) {
    ps.push_back(rnd({n}, DType::f32).to(kCuda).requires_grad_());
    coef.push_back(rnd({n}, DType::f32));
  }
  GradBucket bucket(ps);
  Tensor loss = Tensor::zeros({}, DType::f32, kCuda);
  for (size_t i = 0; i < ps.size(); ++i) loss = loss + sum(ps[i] * coef[i].to(kCuda));
  poison_pool(bucket.numel() * 4 * 2);
  loss.backward();
  bucket.all_reduce_mean(*pg.comm);
  pg.comm->wait();
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_TRUE(close(ps[i].grad().cpu(), coef[i], 0)) << "param " << i;
}

// ---- two ranks, two processes ----

int visible_gpus() { return tq::cuda::device_count(); }

int free_port() {
  TcpListener l(0);
  return l.port();
}

// Starts this binary as rank `rank` of `world`, running the tests matching `filter`, with the
// variables torchrun sets plus `extra`.
pid_t spawn_rank(int rank, int world, int port, const std::string& filter,
                 const std::map<std::string, std::string>& extra) {
  std::map<std::string, std::string> vars = {
      {"RANK", std::to_string(rank)},      {"WORLD_SIZE", std::to_string(world)},
      {"LOCAL_RANK", std::to_string(rank)}, {"LOCAL_WORLD_SIZE", std::to_string(world)},
      {"MASTER_ADDR", "127.0.0.1"},         {"MASTER_PORT", std::to_string(port)},
      {"NCCL_NVLS_ENABLE", "0"},            {"TQ_NCCL_TEST_WORKER", "1"}};
  for (const auto& [k, v] : extra) vars[k] = v;
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    if (!vars.count(key) && key.rfind("OMPI_", 0) != 0 && key != "GTEST_OUTPUT" && key != "TORCHELASTIC_USE_AGENT_STORE")
      env.push_back(kv);
  }
  for (const auto& [k, v] : vars) env.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (std::string& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string exe = "/proc/self/exe", flag = "--gtest_filter=" + filter;
  char* argv[] = {exe.data(), flag.data(), nullptr};
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv, envp.data());
  TQ_CHECK(rc == 0, "posix_spawn: ", std::strerror(rc));
  return pid;
}

// Exit codes of `pids` (-1: killed at the deadline, after `limit`).
std::vector<int> wait_ranks(const std::vector<pid_t>& pids, Seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  std::vector<int> codes(pids.size(), -2);
  size_t left = pids.size();
  while (left > 0 && std::chrono::steady_clock::now() < deadline) {
    for (size_t i = 0; i < pids.size(); ++i) {
      int status = 0;
      if (codes[i] != -2 || waitpid(pids[i], &status, WNOHANG) != pids[i]) continue;
      codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      --left;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (size_t i = 0; i < pids.size(); ++i)
    if (codes[i] == -2) {
      kill(pids[i], SIGKILL);
      waitpid(pids[i], nullptr, 0);
      codes[i] = -1;
    }
  return codes;
}

TEST(GpuNccl, TwoRanksReduceAndMatchTheSingleProcessStep) {
  TQ_REQUIRE_NCCL();
  if (visible_gpus() < 2) GTEST_SKIP() << "needs 2 GPUs (" << visible_gpus() << " visible)";
  const std::string seed = std::to_string(tq::test::fresh_seed() >> 1);
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < 2; ++r)
    pids.push_back(spawn_rank(r, 2, port, "GpuNcclWorker.ReduceAndStep",
                              {{"TQ_NCCL_TIMEOUT_S", "120"}, {"TQ_NCCL_TEST_SEED", seed}}));
  const std::vector<int> codes = wait_ranks(pids, Seconds(300));
  EXPECT_EQ(codes[0], 0) << "rank 0 (-1: killed after 300 s)";
  EXPECT_EQ(codes[1], 0) << "rank 1 (-1: killed after 300 s)";
}

TEST(GpuNccl, TwoRanksPeerExitFailsTheSurvivor) {
  TQ_REQUIRE_NCCL();
  if (visible_gpus() < 2) GTEST_SKIP() << "needs 2 GPUs (" << visible_gpus() << " visible)";
  const int port = free_port();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<pid_t> pids;
  for (int r = 0; r < 2; ++r)
    pids.push_back(spawn_rank(r, 2, port, "GpuNcclWorker.PeerExits", {{"TQ_NCCL_TIMEOUT_S", "10"}}));
  const std::vector<int> codes = wait_ranks(pids, Seconds(180));
  EXPECT_EQ(codes[0], 0) << "rank 0 must see a tq::Error naming the collective (-1: it hung and was killed)";
  EXPECT_EQ(codes[1], 3) << "rank 1 exits with 3 on purpose";
  EXPECT_LT(Seconds(std::chrono::steady_clock::now() - t0).count(), 150.0);
}

// ---- the ranks (children of the tests above; skipped when run directly) ----

#define TQ_REQUIRE_WORKER()                                                          \
  do {                                                                               \
    if (std::getenv("TQ_NCCL_TEST_WORKER") == nullptr)                               \
      GTEST_SKIP() << "runs as a rank spawned by GpuNccl.TwoRanks*";                 \
    TQ_REQUIRE_NCCL();                                                               \
  } while (0)

TEST(GpuNcclWorker, ReduceAndStep) {
  TQ_REQUIRE_WORKER();
  ProcessGroup pg = init_process_group(DeviceType::cuda);
  Communicator& comm = *pg.comm;
  ASSERT_EQ(comm.size(), 2);
  ASSERT_EQ(comm.device(), Device::cuda(comm.rank()));
  const uint64_t seed = std::strtoull(std::getenv("TQ_NCCL_TEST_SEED"), nullptr, 10);
  for (size_t i = 0; i < kSizes.size(); ++i) {
    const int64_t n = kSizes[i];
    SCOPED_TRACE(str_cat("rank ", comm.rank(), ", numel ", n));
    std::vector<Tensor> parts;  // every rank's input, regenerated here from the shared seed
    for (int r = 0; r < 2; ++r) {
      Generator g(seed + 1000 * uint64_t(r) + i);
      parts.push_back(rand({n}, g, DType::f32, -3, 3));
    }
    const Tensor expected = ((parts[0].to(DType::f64) + parts[1].to(DType::f64)) * 0.5).to(DType::f32);
    // The input is written late on the caller's stream (NaN first, the values behind a 100 ms
    // kernel): a collective that did not wait for that stream would reduce the NaNs.
    const Tensor src = parts[size_t(comm.rank())].to(comm.device());
    Tensor d = Tensor::full({n}, std::nan(""), DType::f32, comm.device());
    spin_kernel<<<1, 1, 0, tq::cuda::current_stream()>>>(100ull * 1000 * 1000);
    TQ_CUDA_CHECK_LAUNCH();
    d.copy_(src);
    comm.all_reduce_mean(d);
    comm.wait();
    EXPECT_TRUE(close(d.cpu(), expected, 1e-6));
  }
  EXPECT_EQ(sum_over_ranks(comm, int64_t(comm.rank() + 1)), 3);
  EXPECT_EQ(sum_over_ranks(comm, 0.25 * (comm.rank() + 1)), 0.75);
  check_data_parallel_step(comm, seed);
  comm.barrier();
}

TEST(GpuNcclWorker, PeerExits) {
  TQ_REQUIRE_WORKER();
  ProcessGroup pg = init_process_group(DeviceType::cuda);
  Communicator& comm = *pg.comm;
  Tensor t = rnd({257216}, DType::f32).to(comm.device());
  comm.all_reduce_mean(t);
  comm.wait();
  if (comm.rank() == 1) std::_Exit(3);  // a crash: no teardown, no goodbye
  const auto t0 = std::chrono::steady_clock::now();
  std::string error;
  try {
    for (int i = 0; i < 1000; ++i) {  // the first collective after the exit must fail
      comm.all_reduce_mean(t);
      comm.wait();
    }
  } catch (const tq::Error& e) {
    error = e.what();
  }
  std::printf("rank 0 got: %s\n", error.c_str());
  EXPECT_NE(error.find("all_reduce_mean #"), std::string::npos) << error;
  EXPECT_LT(Seconds(std::chrono::steady_clock::now() - t0).count(), 60.0);
}

}  // namespace
