// The process's place in a data-parallel run, read from the variables the launchers set.
//
// One process per GPU. torchrun (and a shell loop imitating it) sets RANK, WORLD_SIZE, LOCAL_RANK
// (LOCAL_WORLD_SIZE), MASTER_ADDR, MASTER_PORT; Open MPI's mpirun sets OMPI_COMM_WORLD_RANK,
// OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK (OMPI_COMM_WORLD_LOCAL_SIZE). Neither set: a
// single process (world size 1). Both set: they must agree. Every inconsistency is a tq::Error
// naming the variables, so a misconfigured launch fails at once instead of hanging in rendezvous.
//
// Rendezvous port: rank 0 of tq listens on MASTER_PORT, except under torchrun's elastic agent
// (TORCHELASTIC_USE_AGENT_STORE=True), which already serves its own store on MASTER_PORT: then tq
// uses MASTER_PORT + 1. TQ_STORE_PORT overrides both (the same value on every rank).
// TQ_NCCL_TIMEOUT_S (default 300) bounds every wait: rendezvous, NCCL init and each collective.
#pragma once

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "tq/core/error.hpp"

namespace tq::dist {

inline constexpr int kDefaultMasterPort = 29500;  // torchrun's default
inline constexpr double kDefaultTimeoutS = 300;

struct Env {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;  // 0: unknown (the launcher did not say)
  std::string master_addr = "127.0.0.1";
  int master_port = kDefaultMasterPort;
  int store_port = kDefaultMasterPort;  // where tq's rendezvous (TcpStore) listens on rank 0
  double timeout_s = kDefaultTimeoutS;  // TQ_NCCL_TIMEOUT_S
  std::string launcher = "single process";  // which variables the values came from

  bool is_distributed() const { return world_size > 1; }
  bool is_main() const { return rank == 0; }

  // The CUDA device index of this process given `visible` devices: LOCAL_RANK, or 0 when the
  // launcher gave each process exactly one visible GPU (CUDA_VISIBLE_DEVICES per process).
  int device_index(int visible) const {
    TQ_CHECK(visible > 0, "dist: rank ", rank, " sees no CUDA device (no GPU, or no driver)");
    if (local_rank < visible) return local_rank;
    TQ_CHECK(visible == 1, "dist: LOCAL_RANK=", local_rank, " but only ", visible,
             " CUDA devices are visible to rank ", rank, ": start at most one process per visible GPU on each node");
    return 0;
  }

  std::string describe() const {
    const std::string local_world = local_world_size > 0 ? std::to_string(local_world_size) : "?";
    return str_cat("rank ", rank, " of ", world_size, " (local rank ", local_rank, " of ", local_world, ", ",
                   launcher, ", rendezvous ", master_addr, ":", store_port, ")");
  }
};

// Looks a variable up; nullopt when unset. Tests pass a map, programs the process environment.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

inline EnvLookup process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

inline EnvLookup map_env(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

namespace detail {

// The whole value must be a decimal integer in [lo, hi] ("4 ", "0x4", "4.0" are errors).
inline int parse_int_var(const std::string& name, const std::string& value, long lo, long hi) {
  const bool digits_first = !value.empty() && (std::isdigit(static_cast<unsigned char>(value[0])) ||
                                               (value[0] == '-' && value.size() > 1));
  TQ_CHECK(digits_first, "dist: ", name, "='", value, "' is not an integer");
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(value.c_str(), &end, 10);
  TQ_CHECK(!value.empty() && end == value.c_str() + value.size() && errno == 0, "dist: ", name, "='", value,
           "' is not an integer");
  TQ_CHECK(v >= lo && v <= hi, "dist: ", name, "=", value, " is out of range [", lo, ", ", hi, "]");
  return int(v);
}

inline std::optional<int> int_var(const EnvLookup& get, const std::string& name, long lo, long hi) {
  std::optional<std::string> v = get(name);
  if (!v) return std::nullopt;
  return parse_int_var(name, *v, lo, hi);
}

inline bool truthy(const std::optional<std::string>& v) {
  if (!v) return false;
  std::string s;
  for (char c : *v) s += char(std::tolower(static_cast<unsigned char>(c)));
  return s == "1" || s == "true" || s == "yes" || s == "on";
}

// Rank, world, local rank and local world of one launcher's variable family, or nullopt when none
// of its variables is set. `names` = {rank, world, local rank, local world}.
struct Placement {
  int rank = 0, world = 1, local_rank = 0;
  std::optional<int> local_world;
  bool local_rank_given = false;
};

inline std::optional<Placement> read_placement(const EnvLookup& get, const std::string (&names)[4]) {
  constexpr long kMaxRanks = 1 << 20;
  std::optional<int> world = int_var(get, names[1], 1, kMaxRanks);
  std::optional<int> rank = int_var(get, names[0], 0, kMaxRanks);
  std::optional<int> local = int_var(get, names[2], 0, kMaxRanks);
  std::optional<int> local_world = int_var(get, names[3], 1, kMaxRanks);
  if (!world && !rank && !local && !local_world) return std::nullopt;
  TQ_CHECK(rank.has_value(), "dist: ", names[1], " or ", names[2], " is set but ", names[0], " is not");
  TQ_CHECK(world.has_value(), "dist: ", names[0], "=", *rank, " is set but ", names[1], " is not");
  TQ_CHECK(*rank < *world, "dist: ", names[0], "=", *rank, " must be less than ", names[1], "=", *world);
  Placement p;
  p.rank = *rank;
  p.world = *world;
  p.local_rank_given = local.has_value();
  p.local_rank = local.value_or(0);
  p.local_world = local_world;
  TQ_CHECK(p.local_rank_given || p.world == 1, "dist: ", names[2], " is not set (", names[1], "=", p.world,
           "): set it to this process's GPU index on its node (torchrun and mpirun set it)");
  TQ_CHECK(p.local_rank < p.world, "dist: ", names[2], "=", p.local_rank, " must be less than ", names[1], "=",
           p.world);
  if (local_world) {
    TQ_CHECK(*local_world <= p.world, "dist: ", names[3], "=", *local_world, " exceeds ", names[1], "=", p.world);
    TQ_CHECK(p.local_rank < *local_world, "dist: ", names[2], "=", p.local_rank, " must be less than ", names[3], "=",
             *local_world);
  }
  return p;
}

inline Placement agreed_placement(const std::optional<Placement>& torch, const std::optional<Placement>& mpi,
                                  std::string& launcher) {
  if (torch && mpi) {
    TQ_CHECK(torch->rank == mpi->rank && torch->world == mpi->world, "dist: RANK=", torch->rank, " WORLD_SIZE=",
             torch->world, " disagree with OMPI_COMM_WORLD_RANK=", mpi->rank, " OMPI_COMM_WORLD_SIZE=", mpi->world,
             ": unset one family of variables");
    TQ_CHECK(!torch->local_rank_given || !mpi->local_rank_given || torch->local_rank == mpi->local_rank,
             "dist: LOCAL_RANK=", torch->local_rank, " disagrees with OMPI_COMM_WORLD_LOCAL_RANK=", mpi->local_rank);
    launcher = "RANK/WORLD_SIZE and Open MPI";
    Placement p = torch->local_rank_given ? *torch : *mpi;
    if (!p.local_world) p.local_world = torch->local_world ? torch->local_world : mpi->local_world;
    return p;
  }
  if (torch) {
    launcher = "RANK/WORLD_SIZE (torchrun-style)";
    return *torch;
  }
  if (mpi) {
    launcher = "Open MPI";
    return *mpi;
  }
  launcher = "single process";
  return Placement{};
}

}  // namespace detail

// Reads and checks the variables (see the top of this file).
inline Env env_from(const EnvLookup& get) {
  static const std::string torch_names[4] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"};
  static const std::string mpi_names[4] = {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"};
  Env e;
  const detail::Placement p = detail::agreed_placement(detail::read_placement(get, torch_names),
                                                       detail::read_placement(get, mpi_names), e.launcher);
  e.rank = p.rank;
  e.world_size = p.world;
  e.local_rank = p.local_rank;
  e.local_world_size = p.local_world.value_or(p.world == 1 ? 1 : 0);  // 0: unknown

  std::optional<std::string> addr = get("MASTER_ADDR");
  if (addr) {
    TQ_CHECK(!addr->empty(), "dist: MASTER_ADDR is set but empty");
    e.master_addr = *addr;
  } else {
    // Without MASTER_ADDR only a run whose ranks all live on this node can find rank 0.
    const bool one_node = e.world_size == 1 || e.local_world_size == e.world_size;
    TQ_CHECK(one_node, "dist: MASTER_ADDR is not set (", e.launcher, ", WORLD_SIZE=", e.world_size,
             "): set it to rank 0's host name or address on every rank ",
             "(mpirun: -x MASTER_ADDR=<host> -x MASTER_PORT=<port>)");
  }
  e.master_port = detail::int_var(get, "MASTER_PORT", 1, 65535).value_or(kDefaultMasterPort);
  e.store_port = e.master_port;
  if (detail::truthy(get("TORCHELASTIC_USE_AGENT_STORE"))) {
    TQ_CHECK(e.master_port < 65535, "dist: MASTER_PORT=65535 leaves no port for tq's rendezvous next to torchrun's "
             "agent store: set TQ_STORE_PORT");
    e.store_port = e.master_port + 1;
  }
  if (std::optional<int> sp = detail::int_var(get, "TQ_STORE_PORT", 1, 65535)) e.store_port = *sp;

  if (std::optional<std::string> t = get("TQ_NCCL_TIMEOUT_S")) {
    char* end = nullptr;
    const double v = std::strtod(t->c_str(), &end);
    TQ_CHECK(!t->empty() && end == t->c_str() + t->size() && std::isfinite(v) && v > 0, "dist: TQ_NCCL_TIMEOUT_S='",
             *t, "' is not a positive number of seconds");
    e.timeout_s = v;
  }
  return e;
}

inline Env env_from_process() { return env_from(process_env()); }

// NCCL settings tq requires, applied before NCCL reads its environment (the first NCCL call of the
// process). NVLink multicast (NVLS) is forced off, whatever the environment says: on the lent
// multi-GPU machines a program using it can take the host's shared GPUs out of service.
inline void apply_nccl_env_defaults() { ::setenv("NCCL_NVLS_ENABLE", "0", 1); }

}  // namespace tq::dist
