// tq::dist on the CPU: environment parsing (and its errors), the TCP rendezvous with ranks as
// threads on 127.0.0.1 (broadcast, barrier, all_gather, a rank that never joins, ranks that die,
// misuse), the shard math against the single-GPU trainer's grouping, GradBucket's views and
// clipping, and a 3-rank data-parallel step (test-double communicator over the store) against
// the same step in one process.
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <chrono>
#include <functional>
#include <thread>

#include "tests/dist/store_communicator.hpp"
#include "tests/test_util.hpp"
#include "tq/dist/dist.hpp"
#include "tq/optim/schedule.hpp"

namespace {

using namespace tq;
using tq::test::throws_with;
using namespace tq::dist;
namespace test = tq::test;
using Millis = std::chrono::milliseconds;

::testing::AssertionResult contains_all(const std::string& m, const std::vector<std::string>& parts) {
  for (const std::string& p : parts)
    if (m.find(p) == std::string::npos) return ::testing::AssertionFailure() << "'" << m << "' lacks '" << p << "'";
  return ::testing::AssertionSuccess();
}

// ---- environment ----

TEST(DistEnv, SingleProcessByDefault) {
  const Env e = env_from(map_env({}));
  EXPECT_EQ(e.rank, 0);
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.local_rank, 0);
  EXPECT_FALSE(e.is_distributed());
  EXPECT_TRUE(e.is_main());
  EXPECT_EQ(e.timeout_s, 300);
  EXPECT_EQ(e.launcher, "single process");
}

TEST(DistEnv, TorchrunVariables) {
  const Env e = env_from(map_env({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "4"},
                                  {"MASTER_ADDR", "node0.example"}, {"MASTER_PORT", "29511"}}));
  EXPECT_EQ(e.rank, 5);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 4);
  EXPECT_EQ(e.master_addr, "node0.example");
  EXPECT_EQ(e.master_port, 29511);
  EXPECT_EQ(e.store_port, 29511);
  EXPECT_TRUE(e.is_distributed());
  EXPECT_FALSE(e.is_main());
  EXPECT_NE(e.describe().find("rank 5 of 8"), std::string::npos) << e.describe();
}

TEST(DistEnv, TorchrunAgentStoreMovesTheRendezvousPort) {
  std::map<std::string, std::string> v = {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"},
                                          {"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"},
                                          {"TORCHELASTIC_USE_AGENT_STORE", "True"}};
  EXPECT_EQ(env_from(map_env(v)).store_port, 29501);
  v["TORCHELASTIC_USE_AGENT_STORE"] = "False";
  EXPECT_EQ(env_from(map_env(v)).store_port, 29500);
  v["TQ_STORE_PORT"] = "40000";
  EXPECT_EQ(env_from(map_env(v)).store_port, 40000);
  v["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  EXPECT_EQ(env_from(map_env(v)).store_port, 40000);  // the explicit port wins
  v.erase("TQ_STORE_PORT");
  v["MASTER_PORT"] = "65535";
  EXPECT_TRUE(throws_with([&] { env_from(map_env(v)); }, {"TQ_STORE_PORT"}));
}

TEST(DistEnv, OpenMpiVariables) {
  // One node (local size == size): rank 0 is on this host, MASTER_ADDR may be omitted.
  const Env e = env_from(map_env({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                                  {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}));
  EXPECT_EQ(e.rank, 2);
  EXPECT_EQ(e.world_size, 4);
  EXPECT_EQ(e.local_rank, 2);
  EXPECT_EQ(e.master_addr, "127.0.0.1");
  EXPECT_EQ(e.master_port, kDefaultMasterPort);
  EXPECT_EQ(e.launcher, "Open MPI");
  // Several nodes: rank 0's address must be given.
  EXPECT_TRUE(throws_with(
      [] {
        env_from(map_env({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "8"},
                          {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}));
      },
      {"MASTER_ADDR", "-x MASTER_ADDR"}));
}

TEST(DistEnv, BothFamiliesMustAgree) {
  const Env e = env_from(map_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "h"},
                                  {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                                  {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}));
  EXPECT_EQ(e.rank, 1);
  EXPECT_EQ(e.world_size, 2);
  EXPECT_TRUE(throws_with(
      [] {
        env_from(map_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "h"},
                          {"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                          {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}}));
      },
      {"RANK=1", "OMPI_COMM_WORLD_RANK=0"}));
  EXPECT_TRUE(throws_with(
      [] {
        env_from(map_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "h"},
                          {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                          {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}}));
      },
      {"LOCAL_RANK=1", "OMPI_COMM_WORLD_LOCAL_RANK=0"}));
}

TEST(DistEnv, InconsistentValuesAreClearErrors) {
  using Vars = std::map<std::string, std::string>;
  const Vars base = {{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "h"}};
  auto with = [&](Vars changes, std::vector<std::string> drop = {}) {
    Vars v = base;
    for (auto& [k, x] : changes) v[k] = x;
    for (auto& k : drop) v.erase(k);
    return v;
  };
  struct Case {
    Vars vars;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {with({{"RANK", "4"}}), {"RANK=4", "WORLD_SIZE=4"}},
      {with({{"RANK", "-1"}}), {"RANK=-1", "out of range"}},
      {with({{"RANK", "1x"}}), {"RANK='1x'", "not an integer"}},
      {with({{"RANK", ""}}), {"RANK=''", "not an integer"}},
      {with({{"WORLD_SIZE", "0"}}), {"WORLD_SIZE=0", "out of range"}},
      {with({{"WORLD_SIZE", " 4"}}), {"WORLD_SIZE=' 4'"}},
      {with({}, {"WORLD_SIZE"}), {"WORLD_SIZE is not"}},
      {with({}, {"RANK"}), {"RANK is not"}},
      {with({}, {"LOCAL_RANK"}), {"LOCAL_RANK is not set"}},
      {with({{"LOCAL_RANK", "4"}}), {"LOCAL_RANK=4", "WORLD_SIZE=4"}},
      {with({{"LOCAL_WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"}}), {"LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"}},
      {with({{"LOCAL_WORLD_SIZE", "5"}}), {"LOCAL_WORLD_SIZE=5", "WORLD_SIZE=4"}},
      {with({{"MASTER_ADDR", ""}}), {"MASTER_ADDR", "empty"}},
      {with({}, {"MASTER_ADDR"}), {"MASTER_ADDR is not set"}},
      {with({{"MASTER_PORT", "70000"}}), {"MASTER_PORT=70000", "out of range"}},
      {with({{"MASTER_PORT", "0"}}), {"MASTER_PORT=0"}},
      {with({{"TQ_STORE_PORT", "http"}}), {"TQ_STORE_PORT='http'"}},
      {with({{"TQ_NCCL_TIMEOUT_S", "0"}}), {"TQ_NCCL_TIMEOUT_S='0'"}},
      {with({{"TQ_NCCL_TIMEOUT_S", "-5"}}), {"TQ_NCCL_TIMEOUT_S='-5'"}},
      {with({{"TQ_NCCL_TIMEOUT_S", "10s"}}), {"TQ_NCCL_TIMEOUT_S='10s'"}},
      {with({{"TQ_NCCL_TIMEOUT_S", "inf"}}), {"TQ_NCCL_TIMEOUT_S='inf'"}},
      {{{"OMPI_COMM_WORLD_SIZE", "2"}}, {"OMPI_COMM_WORLD_RANK is not"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(str_cat(c.expect[0]));
    EXPECT_TRUE(throws_with([&] { env_from(map_env(c.vars)); }, c.expect));
  }
  // World size 1 needs neither LOCAL_RANK nor MASTER_ADDR.
  const Env one = env_from(map_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}}));
  EXPECT_EQ(one.world_size, 1);
}

TEST(DistEnv, Timeout) {
  EXPECT_DOUBLE_EQ(env_from(map_env({{"TQ_NCCL_TIMEOUT_S", "2.5"}})).timeout_s, 2.5);
  EXPECT_DOUBLE_EQ(env_from(map_env({{"TQ_NCCL_TIMEOUT_S", "600"}})).timeout_s, 600);
}

TEST(DistEnv, DeviceIndex) {
  Env e;
  e.rank = 6;
  e.local_rank = 2;
  EXPECT_EQ(e.device_index(8), 2);
  EXPECT_EQ(e.device_index(3), 2);
  EXPECT_EQ(e.device_index(1), 0);  // the launcher gave each process one GPU
  EXPECT_TRUE(throws_with([&] { e.device_index(2); }, {"LOCAL_RANK=2", "2 CUDA devices"}));
  EXPECT_TRUE(throws_with([&] { e.device_index(0); }, {"no CUDA device"}));
}

TEST(DistEnv, NcclDefaultsForceNvlsOff) {
  const char* before = std::getenv("NCCL_NVLS_ENABLE");
  const std::string saved = before ? before : "";
  ::setenv("NCCL_NVLS_ENABLE", "1", 1);  // harmless here: this CPU test never loads NCCL
  apply_nccl_env_defaults();
  EXPECT_STREQ(std::getenv("NCCL_NVLS_ENABLE"), "0");
  if (before) ::setenv("NCCL_NVLS_ENABLE", saved.c_str(), 1);
  else ::setenv("NCCL_NVLS_ENABLE", "0", 1);  // leave it off rather than unset
}

// ---- the TCP store, ranks as threads ----

struct Outcome {
  std::string error;  // empty: the rank's body finished
  double seconds = 0; // from the rank's start to its end (or its error)
};

// Rank r runs bodies[r] on its store (an empty body: rank r never starts). Rank 0 listens on a
// free port of 127.0.0.1.
using Body = std::function<void(TcpStore&)>;
std::vector<Outcome> run_world(const std::vector<Body>& bodies, const std::vector<Millis>& timeouts,
                               const std::function<void(int port)>& before_clients = nullptr) {
  const int world = int(bodies.size());
  TcpListener listener(0);
  const int port = listener.port();
  std::vector<Outcome> out(static_cast<size_t>(world));
  auto run = [&](int r) {
    const auto t0 = Clock::now();
    try {
      if (r == 0) {
        TcpStore s(std::move(listener), world, timeouts[0]);
        bodies[0](s);
      } else {
        TcpStore s(r, world, "127.0.0.1", port, timeouts[size_t(r)]);
        bodies[size_t(r)](s);
      }
    } catch (const std::exception& e) {
      out[size_t(r)].error = e.what();
    }
    out[size_t(r)].seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  };
  std::vector<std::thread> threads;
  if (bodies[0]) threads.emplace_back(run, 0);
  if (before_clients) before_clients(port);
  for (int r = 1; r < world; ++r)
    if (bodies[size_t(r)]) threads.emplace_back(run, r);
  for (auto& t : threads) t.join();
  return out;
}

std::vector<Millis> same_timeouts(int world, Millis t) { return std::vector<Millis>(size_t(world), t); }

TEST(DistStore, WorldSizeOneNeedsNoNetwork) {
  TcpStore s(0, 1, "no-such-host.invalid", 1, Millis(100));
  EXPECT_EQ(s.broadcast("abc"), "abc");
  s.barrier();
  EXPECT_EQ(s.all_gather("xyz"), std::vector<std::string>{"xyz"});
}

TEST(DistStore, ThreeRanksBroadcastBarrierAllGather) {
  constexpr int kWorld = 3, kRounds = 20;
  std::mt19937_64 rng(test::fresh_seed());
  std::vector<std::string> payloads;  // per round: rank 0's broadcast (random bytes, incl. NUL and empty)
  for (int i = 0; i < kRounds; ++i) {
    std::string s(size_t(i == 3 ? 0 : rng() % (i == 7 ? 3000000 : 300)), '\0');
    for (char& c : s) c = char(rng());
    payloads.push_back(s);
  }
  auto blob_of = [](int rank, int round) {
    return str_cat("rank", rank, "/round", round, std::string(size_t(rank), '\0'));
  };
  std::atomic<int> arrived{0};
  std::vector<std::vector<std::string>> seen(kWorld);
  std::vector<std::string> barrier_errors(kWorld);
  std::vector<Body> bodies;
  for (int r = 0; r < kWorld; ++r)
    bodies.push_back([&, r](TcpStore& s) {
      for (int i = 0; i < kRounds; ++i) {
        seen[size_t(r)].push_back(s.broadcast(r == 0 ? payloads[size_t(i)] : std::string("ignored")));
        if (r == 2 && i % 5 == 0) std::this_thread::sleep_for(Millis(30));  // a late rank
        arrived.fetch_add(1);
        s.barrier();
        // Everyone has arrived at barrier i before anyone leaves it.
        if (arrived.load() < kWorld * (i + 1)) barrier_errors[size_t(r)] += str_cat("left barrier ", i, " early; ");
        const std::vector<std::string> all = s.all_gather(blob_of(r, i));
        ASSERT_EQ(all.size(), size_t(kWorld));
        for (int q = 0; q < kWorld; ++q) EXPECT_EQ(all[size_t(q)], blob_of(q, i));
      }
      EXPECT_EQ(s.rank(), r);
      EXPECT_EQ(s.size(), kWorld);
    });
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(kWorld, Millis(20000)));
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(out[size_t(r)].error, "") << "rank " << r;
    EXPECT_EQ(barrier_errors[size_t(r)], "") << "rank " << r;
    EXPECT_EQ(seen[size_t(r)], payloads) << "rank " << r;
  }
}

TEST(DistStore, ClientsRetryUntilRank0Listens) {
  // Clients start first and connect to a port nobody listens on yet; rank 0 binds it 300 ms later.
  int port = 0;
  {
    TcpListener probe(0);
    port = probe.port();
  }
  std::vector<std::string> got(3), errors(3);
  std::vector<std::thread> clients;
  for (int r = 1; r < 3; ++r)
    clients.emplace_back([&, r] {
      try {
        TcpStore s(r, 3, "127.0.0.1", port, Millis(10000));
        got[size_t(r)] = s.broadcast("");
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      }
    });
  std::this_thread::sleep_for(Millis(300));
  try {
    TcpStore s(0, 3, "127.0.0.1", port, Millis(10000));
    got[0] = s.broadcast("late but here");
  } catch (const std::exception& e) {
    errors[0] = e.what();
  }
  for (auto& t : clients) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(errors[size_t(r)], "") << "rank " << r;
    EXPECT_EQ(got[size_t(r)], "late but here") << "rank " << r;
  }
}

TEST(DistStore, ClientWithoutRank0TimesOut) {
  int port = 0;
  {
    TcpListener probe(0);
    port = probe.port();
  }
  const auto t0 = Clock::now();
  EXPECT_TRUE(throws_with([&] { TcpStore s(1, 2, "127.0.0.1", port, Millis(700)); },
                          {"rank 1 of 2", "could not connect to rank 0", str_cat("127.0.0.1:", port)}));
  const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GE(sec, 0.6);
  EXPECT_LT(sec, 4.0);
  // An unresolvable name fails at once, or (no DNS at all: "try again") at the deadline.
  EXPECT_TRUE(throws_with([] { TcpStore s(1, 2, "no-such-host.invalid", 29500, Millis(1000)); },
                          {"no-such-host.invalid"}));
}

TEST(DistStore, MissingRankTimesOutWithinTheDeadline) {
  // Rank 2 never starts. Rank 0 gives up after 1 s and tells rank 1 why.
  std::vector<Body> bodies = {[](TcpStore&) {}, [](TcpStore&) {}, Body()};
  const std::vector<Outcome> out = run_world(bodies, {Millis(1000), Millis(8000), Millis(1000)});
  EXPECT_TRUE(contains_all(out[0].error, {"rank 0 of 3", "rank 2", "did not join", "TQ_NCCL_TIMEOUT_S"}));
  EXPECT_GE(out[0].seconds, 0.9);
  EXPECT_LT(out[0].seconds, 4.0);
  EXPECT_TRUE(contains_all(out[1].error, {"rank 1 of 3", "rank 0 reports", "rank 2", "did not join"}));
  EXPECT_LT(out[1].seconds, 5.0);  // told by rank 0, not its own 8 s deadline
}

TEST(DistStore, MissingRankInABarrierTimesOut) {
  // Everyone joins; rank 2 then never calls the barrier.
  std::vector<Body> bodies = {[](TcpStore& s) { s.barrier(); }, [](TcpStore& s) { s.barrier(); },
                              [](TcpStore&) { std::this_thread::sleep_for(Millis(2500)); }};
  const std::vector<Outcome> out = run_world(bodies, {Millis(1000), Millis(8000), Millis(8000)});
  EXPECT_TRUE(contains_all(out[0].error, {"rank 2", "did not reach barrier #1"}));
  EXPECT_LT(out[0].seconds, 4.0);
  EXPECT_TRUE(contains_all(out[1].error, {"rank 0 reports", "rank 2", "barrier #1"}));
  EXPECT_LT(out[1].seconds, 4.0);
  EXPECT_EQ(out[2].error, "");
}

TEST(DistStore, RankDyingMidwayFailsTheOthersAtOnce) {
  // Rank 2 takes part in one barrier, then its process "exits" (its store closes). The others,
  // in the next all_gather, get an error naming rank 2 right away (their timeout is 30 s).
  std::vector<Body> bodies;
  for (int r = 0; r < 2; ++r)
    bodies.push_back([](TcpStore& s) {
      s.barrier();
      s.all_gather("x");
    });
  bodies.push_back([](TcpStore& s) { s.barrier(); });
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(3, Millis(30000)));
  EXPECT_TRUE(contains_all(out[0].error, {"rank 2", "closed its connection", "all_gather #2"}));
  EXPECT_TRUE(contains_all(out[1].error, {"rank 2", "closed its connection", "all_gather #2"}));
  EXPECT_LT(out[0].seconds, 10.0);
  EXPECT_LT(out[1].seconds, 10.0);
  EXPECT_EQ(out[2].error, "");
  // The store is unusable afterwards: the first error again, at once.
}

TEST(DistStore, Rank0DyingFailsTheOthersAtOnce) {
  std::vector<Body> bodies = {[](TcpStore& s) { s.barrier(); }};
  for (int r = 1; r < 3; ++r)
    bodies.push_back([](TcpStore& s) {
      s.barrier();
      s.barrier();
    });
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(3, Millis(30000)));
  EXPECT_EQ(out[0].error, "");
  for (int r = 1; r < 3; ++r) {
    EXPECT_TRUE(contains_all(out[size_t(r)].error, {"rank 0", "closed the connection", "barrier #2"}));
    EXPECT_LT(out[size_t(r)].seconds, 10.0);
  }
}

TEST(DistStore, FailedStoreRethrowsTheFirstError) {
  std::string first, second;
  std::vector<Body> bodies = {[&](TcpStore& s) {
                                try {
                                  s.barrier();
                                } catch (const tq::Error& e) {
                                  first = e.what();
                                }
                                try {
                                  s.broadcast("again");
                                } catch (const tq::Error& e) {
                                  second = e.what();
                                }
                              },
                              [](TcpStore&) {}};
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(2, Millis(30000)));
  EXPECT_TRUE(contains_all(first, {"rank 1", "closed its connection", "barrier #1"}));
  EXPECT_TRUE(contains_all(second, {first, "unusable"}));
}

TEST(DistStore, MismatchedOperationsFail) {
  std::vector<Body> bodies = {[](TcpStore& s) { s.all_gather("a"); }, [](TcpStore& s) { s.barrier(); },
                              [](TcpStore& s) { s.all_gather("c"); }};
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(3, Millis(30000)));
  for (int r = 0; r < 3; ++r) {
    EXPECT_TRUE(contains_all(out[size_t(r)].error, {"rank 1 called barrier #1", "all_gather #1", "same order"}))
        << "rank " << r;
    EXPECT_LT(out[size_t(r)].seconds, 10.0);
  }
}

TEST(DistStore, WrongWorldSizeFails) {
  TcpListener listener(0);
  const int port = listener.port();
  std::string e0, e1;
  std::thread t0([&] {
    try {
      TcpStore s(std::move(listener), 2, Millis(10000));
    } catch (const std::exception& e) {
      e0 = e.what();
    }
  });
  try {
    TcpStore s(1, 3, "127.0.0.1", port, Millis(10000));
  } catch (const std::exception& e) {
    e1 = e.what();
  }
  t0.join();
  EXPECT_TRUE(contains_all(e0, {"world size 3", "rank 0 with 2"}));
  EXPECT_TRUE(contains_all(e1, {"rank 0 reports", "world size 3", "rank 0 with 2"}));
}

TEST(DistStore, StrayConnectionIsIgnored) {
  // Something that is not a tq rank connects first (a port scanner, another protocol).
  std::vector<Body> bodies = {[](TcpStore& s) { EXPECT_EQ(s.broadcast("ok"), "ok"); },
                              [](TcpStore& s) { EXPECT_EQ(s.broadcast(""), "ok"); }};
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(2, Millis(20000)), [](int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    const std::string junk = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
    ASSERT_EQ(::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL), ssize_t(junk.size()));
    std::this_thread::sleep_for(Millis(100));
    ::close(fd);
  });
  EXPECT_EQ(out[0].error, "");
  EXPECT_EQ(out[1].error, "");
}

TEST(DistStore, AbortReachesThePeers) {
  std::vector<Body> bodies = {[](TcpStore& s) { s.barrier(); },
                              [](TcpStore& s) {
                                std::this_thread::sleep_for(Millis(100));
                                s.abort("disk full");
                              },
                              [](TcpStore& s) { s.barrier(); }};
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(3, Millis(30000)));
  EXPECT_TRUE(contains_all(out[0].error, {"rank 1 failed: disk full"}));
  EXPECT_TRUE(contains_all(out[2].error, {"rank 0 reports", "rank 1 failed: disk full"}));
  EXPECT_LT(out[0].seconds, 10.0);
  EXPECT_LT(out[2].seconds, 10.0);
}

TEST(DistStore, ListenerReportsAPortInUse) {
  TcpListener first(0);
  EXPECT_TRUE(throws_with([&] { TcpListener second(first.port()); }, {"in use", "TQ_STORE_PORT"}));
}

// ---- shard math ----

TEST(DistShard, ShardRowsPartitionsEvenly) {
  for (int64_t rows : {0, 1, 2, 3, 5, 7, 16, 17, 100, 4304}) {
    for (int world = 1; world <= 9; ++world) {
      int64_t next = 0, lo = INT64_MAX, hi = 0;
      for (int r = 0; r < world; ++r) {
        const RowRange g = shard_rows(rows, r, world);
        EXPECT_EQ(g.begin, next) << rows << " rows, rank " << r << " of " << world;
        next = g.end;
        lo = std::min(lo, g.size());
        hi = std::max(hi, g.size());
      }
      EXPECT_EQ(next, rows);
      EXPECT_LE(hi - lo, 1) << rows << " rows over " << world;
    }
  }
  EXPECT_EQ(shard_rows(10, 0, 4), (RowRange{0, 3}));
  EXPECT_EQ(shard_rows(10, 1, 4), (RowRange{3, 6}));
  EXPECT_EQ(shard_rows(10, 2, 4), (RowRange{6, 8}));
  EXPECT_EQ(shard_rows(10, 3, 4), (RowRange{8, 10}));
  EXPECT_EQ(shard_rows(2, 3, 4), (RowRange{2, 2}));  // more ranks than rows: empty
  EXPECT_THROW(shard_rows(5, 4, 4), tq::Error);
  EXPECT_THROW(shard_rows(-1, 0, 1), tq::Error);
}

TEST(DistShard, SplitMicroBatches) {
  EXPECT_TRUE(split_micro_batches({5, 5}, 4).empty());
  EXPECT_EQ(split_micro_batches({3, 10}, 4), (std::vector<RowRange>{{3, 7}, {7, 10}}));
  EXPECT_EQ(split_micro_batches({0, 9}, 4), (std::vector<RowRange>{{0, 4}, {4, 8}, {8, 9}}));  // as one process
  EXPECT_EQ(split_micro_batches({0, 8}, 4), (std::vector<RowRange>{{0, 4}, {4, 8}}));
  EXPECT_EQ(split_micro_batches({0, 1}, 16), (std::vector<RowRange>{{0, 1}}));
  EXPECT_THROW(split_micro_batches({0, 4}, 0), tq::Error);
  for (int64_t n = 0; n < 40; ++n)
    for (int64_t b = 1; b < 9; ++b) {
      const std::vector<RowRange> m = split_micro_batches({7, 7 + n}, b);
      EXPECT_EQ(int64_t(m.size()), (n + b - 1) / b);
      int64_t at = 7;
      for (size_t i = 0; i < m.size(); ++i) {
        const RowRange& r = m[i];
        EXPECT_EQ(r.begin, at);
        EXPECT_GE(r.size(), 1);
        if (i + 1 < m.size()) EXPECT_EQ(r.size(), b);  // full batches, only the last one shorter
        else EXPECT_LE(r.size(), b);
        at = r.end;
      }
      EXPECT_EQ(at, 7 + n);
    }
}

// The single-GPU trainer's grouping, written out as its loop does it (apps/paligemma/train.hpp,
// next_micro_batches): micro-batch k reads positions [k·B, min((k+1)·B, N)).
std::vector<std::vector<int64_t>> trainer_steps(int64_t n, int64_t b, int64_t a) {
  const int64_t micro_per_epoch = (n + b - 1) / b;
  std::vector<std::vector<int64_t>> steps;
  int64_t micro = 0;
  while (micro < micro_per_epoch) {
    const int64_t step_end = std::min(micro_per_epoch, (micro / a + 1) * a);
    std::vector<int64_t> rows;
    for (; micro < step_end; ++micro)
      for (int64_t p = micro * b; p < std::min((micro + 1) * b, n); ++p) rows.push_back(p);
    steps.push_back(rows);
  }
  return steps;
}

TEST(DistShard, StepsCoverTheTrainersEffectiveBatchesOnce) {
  for (int64_t n : {1, 5, 16, 37, 100}) {
    for (int64_t b : {1, 3, 4}) {
      for (int64_t a : {1, 2, 4}) {
        const auto expected = trainer_steps(n, b, a);
        int64_t micro = 0;
        for (size_t s = 0; s < expected.size(); ++s) {
          const EffectiveBatch eb = effective_batch(micro, n, b, a);
          for (int world : {1, 2, 3, 8}) {
            SCOPED_TRACE(str_cat("n=", n, " b=", b, " a=", a, " step ", s, " world ", world));
            std::vector<int64_t> got;  // all ranks' micro-batches, rank after rank
            for (int r = 0; r < world; ++r) {
              const StepShard sh = shard_step(eb, b, r, world);
              int64_t at = sh.positions.begin;
              for (const RowRange& m : sh.micro_batches) {
                EXPECT_LE(m.size(), b);
                EXPECT_EQ(m.begin, at);
                at = m.end;
                for (int64_t p = m.begin; p < m.end; ++p) got.push_back(p);
              }
              EXPECT_EQ(at, sh.positions.end);
            }
            EXPECT_EQ(got, expected[s]);
          }
          micro = eb.end_micro;
        }
        EXPECT_EQ(micro, (n + b - 1) / b);  // the steps end exactly at the epoch's end
      }
    }
  }
  EXPECT_THROW(effective_batch(3, 10, 4, 2), tq::Error);  // only 3 micro-batches in the epoch
  EXPECT_THROW(effective_batch(0, 0, 4, 2), tq::Error);
}

TEST(DistShard, ResumedStepIsTheSameForAnyWorldSize) {
  // Mid-epoch resume: step 3 of (N=37, B=4, A=2) starts at micro-batch 6 whatever the world size.
  const EffectiveBatch eb = effective_batch(6, 37, 4, 2);
  EXPECT_EQ(eb.positions, (RowRange{24, 32}));
  EXPECT_EQ(eb.end_micro, 8);
  const EffectiveBatch last = effective_batch(8, 37, 4, 2);
  EXPECT_EQ(last.positions, (RowRange{32, 37}));
  EXPECT_EQ(last.end_micro, 10);
  // A short last step over 8 ranks: three get no rows.
  int empty = 0;
  for (int r = 0; r < 8; ++r) empty += shard_step(last, 4, r, 8).micro_batches.empty();
  EXPECT_EQ(empty, 3);
}

TEST(DistShard, LossNormalizer) {
  EXPECT_DOUBLE_EQ(loss_normalizer(1000, 1), 1000.0);
  EXPECT_DOUBLE_EQ(loss_normalizer(1000, 8), 125.0);
  EXPECT_DOUBLE_EQ(loss_normalizer(7, 3), 7.0 / 3.0);
  EXPECT_THROW(loss_normalizer(0, 2), tq::Error);
}

// ---- GradBucket ----

std::vector<Tensor> make_params(const std::vector<Shape>& shapes) {
  std::vector<Tensor> ps;
  for (const Shape& s : shapes) ps.push_back(test::random(s, DType::f32).requires_grad_());
  return ps;
}

TEST(DistGradBucket, SlotsAreAlignedViewsInOrder) {
  std::vector<Tensor> ps = make_params({{3, 5}, {72}, {1}, {2, 2, 33}});
  GradBucket b(ps);
  ASSERT_EQ(b.size(), 4u);
  EXPECT_EQ(b.offset(0), 0);
  EXPECT_EQ(b.offset(1), 64);
  EXPECT_EQ(b.offset(2), 64 + 128);
  EXPECT_EQ(b.offset(3), 64 + 128 + 64);
  EXPECT_EQ(b.numel(), 64 + 128 + 64 + 192);
  b.zero_();
  for (size_t i = 0; i < ps.size(); ++i) {
    Tensor g = ps[i].grad();
    ASSERT_TRUE(g.defined());
    EXPECT_TRUE(b.is_slot(i, g));
    EXPECT_EQ(g.shape(), ps[i].shape());
    EXPECT_EQ(g.storage(), b.flat().storage());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(g.data_ptr()) % 256, reinterpret_cast<uintptr_t>(b.flat().data_ptr()) % 256);
  }
  // Writing the flat buffer is writing the gradients.
  Tensor(b.flat()).fill_(1.5);
  for (const Tensor& p : ps)
    for (double v : p.grad().to_vector<double>()) EXPECT_EQ(v, 1.5);
}

TEST(DistGradBucket, FlattenCopiesAutogradGradientsIntoTheBuffer) {
  std::vector<Tensor> ps = make_params({{4, 7}, {4304}, {1}});
  std::vector<Tensor> coef;
  for (const Tensor& p : ps) coef.push_back(test::random(p.shape(), DType::f32));
  GradBucket b(ps, {"w", "big", "scalar"});
  auto backward = [&] {
    Tensor loss = Tensor::zeros({}, DType::f32);
    for (size_t i = 0; i < ps.size(); ++i) loss = loss + sum(ps[i] * coef[i]);
    loss.backward();
  };
  backward();
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_FALSE(b.is_slot(i, ps[i].grad()));  // autograd made new tensors
  b.flatten_grads();
  const std::vector<float> flat = b.flat().to_vector<float>();
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(b.is_slot(i, ps[i].grad()));
    const std::vector<float> c = coef[i].to_vector<float>();
    for (size_t k = 0; k < c.size(); ++k) ASSERT_EQ(flat[size_t(b.offset(i)) + k], c[k]) << "param " << i;
    for (int64_t k = b.offset(i) + ps[i].numel(); k < (i + 1 < ps.size() ? b.offset(i + 1) : b.numel()); ++k)
      ASSERT_EQ(flat[size_t(k)], 0.0f) << "padding after param " << i;
  }
  // A second backward accumulates (slot + g: a new tensor again); flattening copies the sum.
  backward();
  b.flatten_grads();
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(b.is_slot(i, ps[i].grad()));
    EXPECT_TRUE(test::all_close(ps[i].grad(), (coef[i] * 2.0).to_vector<double>(), 0, 1e-7));
  }
}

TEST(DistGradBucket, MissingGradientBecomesZero) {
  std::vector<Tensor> ps = make_params({{5}, {6}});
  GradBucket b(ps);
  Tensor(b.flat()).fill_(std::nan(""));  // stale values must not survive
  sum(ps[1] * 3.0).backward();
  b.flatten_grads();
  EXPECT_TRUE(test::all_close(ps[0].grad(), std::vector<double>(5, 0.0)));
  EXPECT_TRUE(test::all_close(ps[1].grad(), std::vector<double>(6, 3.0)));
}

TEST(DistGradBucket, RejectsWhatItCannotHold) {
  EXPECT_TRUE(throws_with([] { GradBucket b({}); }, {"no parameters"}));
  EXPECT_TRUE(throws_with([] { GradBucket b({test::random({3}, DType::f64).requires_grad_()}, {"lora_A"}); },
                          {"'lora_A'", "f32"}));
  EXPECT_TRUE(throws_with([] { GradBucket b({test::random({3}, DType::f32)}); }, {"requires grad"}));
  EXPECT_TRUE(throws_with([] { GradBucket b(make_params({{3}}), {"a", "b"}); }, {"2 names for 1"}));
  // A gradient of the wrong shape is named.
  std::vector<Tensor> ps = make_params({{3}});
  GradBucket b(ps, {"lora_B"});
  ps[0].set_grad(test::random({4}, DType::f32));
  EXPECT_TRUE(throws_with([&] { b.flatten_grads(); }, {"'lora_B'", "[3]"}));
}

TEST(DistGradBucket, OfModuleParametersKeepsTrainableOnes) {
  Tensor a = test::random({2, 3}, DType::f32).requires_grad_(), frozen = test::random({4}, DType::f32),
         c = test::random({5}, DType::f32).requires_grad_();
  GradBucket b = GradBucket::of({{"a", &a}, {"frozen", &frozen}, {"c", &c}});
  ASSERT_EQ(b.size(), 2u);
  EXPECT_TRUE(b.params()[0].same(a));
  EXPECT_TRUE(b.params()[1].same(c));
}

TEST(DistGradBucket, ClipMatchesOptimClip) {
  for (double max_norm : {1e-3, 1e9}) {  // clipping, and not
    const std::vector<Shape> shapes = {{16, 72}, {72, 16}, {257}};
    std::vector<Tensor> pa = make_params(shapes), pb;
    for (const Tensor& p : pa) pb.push_back(p.detach().clone().requires_grad_());
    for (size_t i = 0; i < pa.size(); ++i) {
      Tensor g = test::random(shapes[i], DType::f32, -2, 2);
      pa[i].set_grad(g.clone());
      pb[i].set_grad(g.clone());
    }
    GradBucket b(pb);
    EXPECT_TRUE(throws_with([&] { b.grad_norm(); }, {"flatten_grads"}));
    b.flatten_grads();
    const double na = optim::clip_grad_norm(pa, max_norm);
    const double nb = b.clip_grad_norm(max_norm);
    EXPECT_NEAR(nb, na, 1e-12 * na);
    for (size_t i = 0; i < pa.size(); ++i)
      EXPECT_TRUE(test::all_close(pb[i].grad(), pa[i].grad().to_vector<double>(), 0, 1e-6)) << "param " << i;
  }
}

// ---- communicators ----

TEST(DistLocal, LocalCommunicatorIsTheIdentityAndChecks) {
  LocalCommunicator c;
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  Tensor t = test::random({4304}, DType::f32);
  const std::vector<float> before = t.to_vector<float>();
  c.all_reduce_mean(t);
  c.wait();
  EXPECT_EQ(t.to_vector<float>(), before);
  EXPECT_TRUE(throws_with([&] { c.all_reduce_mean(test::random({3}, DType::f64)); }, {"all_reduce_mean", "f64"}));
  EXPECT_EQ(sum_over_ranks(c, int64_t(41)), 41);
  EXPECT_EQ(sum_over_ranks(c, 2.25), 2.25);
}

TEST(DistLocal, InitProcessGroup) {
  ProcessGroup pg = init_process_group(DeviceType::cpu, env_from(map_env({})));
  EXPECT_EQ(pg.comm->backend_name(), "local");
  EXPECT_EQ(pg.size(), 1);
  EXPECT_TRUE(pg.is_main());
  EXPECT_TRUE(throws_with(
      [] {
        init_process_group(DeviceType::cpu, env_from(map_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"},
                                                              {"MASTER_ADDR", "127.0.0.1"}})));
      },
      {"needs CUDA", "rank 0 of 2"}));
  if (communicator_factories().make_nccl == nullptr) {
    EXPECT_TRUE(throws_with([] { init_process_group(DeviceType::cuda, env_from(map_env({}))); }, {"without NCCL"}));
  }
}

// ---- a data-parallel step against the same step in one process ----

struct ToyData {
  Tensor x, y, mask;  // (E, 5), (E, 3), (E, 3) f32; mask: which outputs are "supervised tokens"
  Tensor w0, b0;      // (3, 5), (3) f32 initial parameters
};

ToyData toy_data(int64_t rows) {
  ToyData d;
  d.x = test::random({rows, 5}, DType::f32);
  d.y = test::random({rows, 3}, DType::f32);
  std::vector<float> m(size_t(rows) * 3);
  std::mt19937_64 rng(test::fresh_seed());
  for (size_t i = 0; i < m.size(); ++i) m[i] = (rng() % 3 != 0) ? 1.0f : 0.0f;
  m[0] = 1.0f;  // at least one token
  d.mask = Tensor::from_vector(m, {rows, 3});
  d.w0 = test::random({3, 5}, DType::f32);
  d.b0 = test::random({3}, DType::f32);
  return d;
}

// Σ over rows [r) of the masked squared error / normaliser (the "summed CE / tokens" of the toy).
Tensor toy_loss(const ToyData& d, const Tensor& w, const Tensor& b, const RowRange& r, double normalizer) {
  Tensor x = d.x.slice(0, r.begin, r.end), y = d.y.slice(0, r.begin, r.end), m = d.mask.slice(0, r.begin, r.end);
  Tensor err = matmul(x, w, false, true) + b - y;
  return sum(square(err) * m) / normalizer;
}

int64_t tokens_in(const ToyData& d, const RowRange& r) {
  double t = 0;
  for (double v : d.mask.slice(0, r.begin, r.end).to_vector<double>()) t += v;
  return int64_t(t);
}

TEST(DistDataParallel, ThreeRanksReproduceTheSingleProcessStep) {
  constexpr int kWorld = 3;
  constexpr int64_t kRows = 11, kBatch = 2;  // blocks of 4, 4, 3 rows; micro-batches of ≤ 2
  const ToyData d = toy_data(kRows);
  const EffectiveBatch eb = effective_batch(0, kRows, kBatch, (kRows + kBatch - 1) / kBatch);
  ASSERT_EQ(eb.positions, (RowRange{0, kRows}));

  // One process: the whole effective batch, normalised by its token count.
  const int64_t tokens = tokens_in(d, eb.positions);
  Tensor w = d.w0.clone().requires_grad_(), b = d.b0.clone().requires_grad_();
  Tensor ref_loss = toy_loss(d, w, b, eb.positions, double(tokens));
  ref_loss.backward();

  std::vector<std::vector<float>> gw(kWorld), gb(kWorld);
  std::vector<double> logged(kWorld), counted(kWorld);
  std::vector<Body> bodies;
  for (int r = 0; r < kWorld; ++r)
    bodies.push_back([&, r](TcpStore& store) {
      test_double::StoreCommunicator comm(store);
      Tensor wr = d.w0.clone().requires_grad_(), br = d.b0.clone().requires_grad_();
      GradBucket bucket({wr, br}, {"w", "b"});
      const StepShard shard = shard_step(eb, kBatch, r, kWorld);
      const int64_t total = global_token_count(comm, tokens_in(d, shard.positions));
      counted[size_t(r)] = double(total);
      double step_loss = 0;
      for (const RowRange& m : shard.micro_batches) {
        Tensor loss = toy_loss(d, wr, br, m, loss_normalizer(total, kWorld));
        step_loss += loss.item<double>();
        loss.backward();
      }
      bucket.all_reduce_mean(comm);
      comm.wait();
      logged[size_t(r)] = mean_over_ranks(comm, step_loss);
      gw[size_t(r)] = wr.grad().to_vector<float>();
      gb[size_t(r)] = br.grad().to_vector<float>();
    });
  const std::vector<Outcome> out = run_world(bodies, same_timeouts(kWorld, Millis(30000)));
  for (int r = 0; r < kWorld; ++r) {
    SCOPED_TRACE(str_cat("rank ", r));
    EXPECT_EQ(out[size_t(r)].error, "");
    EXPECT_EQ(counted[size_t(r)], double(tokens));
    EXPECT_NEAR(logged[size_t(r)], ref_loss.item<double>(), 1e-5 * std::abs(ref_loss.item<double>()));
    std::vector<double> gwd(gw[size_t(r)].begin(), gw[size_t(r)].end()), gbd(gb[size_t(r)].begin(), gb[size_t(r)].end());
    EXPECT_TRUE(test::all_close(w.grad(), gwd, 1e-6, 1e-5));
    EXPECT_TRUE(test::all_close(b.grad(), gbd, 1e-6, 1e-5));
  }
}

}  // namespace
