// TcpStore: the tiny rendezvous of a data-parallel run (POSIX sockets, no other dependency).
//
// Rank 0 listens on a port (all interfaces); every other rank connects to MASTER_ADDR:port,
// retrying until the deadline (rank 0 may start last). The topology is a star: rank 0 relays.
// Operations, called by every rank in the same order:
//   broadcast(bytes)  rank 0's bytes to everyone (the ncclUniqueId);
//   barrier()         returns once every rank has entered it;
//   all_gather(blob)  every rank's blob, indexed by rank (small things: counts, host names).
// Invariants:
//  * every wait has a deadline (the timeout given at construction, per operation); a wait that
//    expires throws tq::Error naming the operation, its sequence number and the missing rank(s);
//  * a peer that exits or crashes closes its socket: whoever waits on it throws at once, naming
//    it; rank 0 relays the failure to every other rank before throwing, so no rank hangs;
//  * a failure (or abort()) leaves the store unusable: later calls rethrow the first error;
//  * frames carry a magic number, the operation kind and a sequence number, so ranks that call
//    different operations fail with a clear error instead of exchanging garbage, and a stray
//    connection to the port (a scanner, torchrun's own store protocol) is told apart;
//  * world size 1 opens no socket at all;
//  * not thread-safe: one thread per process uses it; SIGPIPE is never raised (MSG_NOSIGNAL).
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "tq/core/error.hpp"
#include "tq/dist/env.hpp"

namespace tq::dist {

using Clock = std::chrono::steady_clock;

namespace store_detail {

inline std::string errno_text(int e) { return std::error_code(e, std::generic_category()).message(); }

// "rank 2" or "ranks 2, 5".
inline std::string rank_list(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

inline double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

inline Clock::time_point deadline_after(std::chrono::milliseconds timeout) { return Clock::now() + timeout; }

// Milliseconds left until `deadline`, for poll() (0 when past, rounded up so we never spin).
inline int poll_ms(Clock::time_point deadline) {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return int(std::clamp<int64_t>(left, 0, INT_MAX));
}

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

inline void set_nodelay(int fd) {
  int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// ---- frames ----

enum class Kind : uint32_t {
  hello = 1,        // client → rank 0: (rank, world)
  welcome,          // rank 0 → client: everyone has joined
  broadcast,        // rank 0 → client: the bytes
  barrier_arrive,   // client → rank 0
  barrier_release,  // rank 0 → client
  gather_part,      // client → rank 0: its blob
  gather_result,    // rank 0 → client: every blob
  error,            // either way: the sender failed; payload = the message
};

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::hello: return "rendezvous";
    case Kind::welcome: return "rendezvous";
    case Kind::broadcast: return "broadcast";
    case Kind::barrier_arrive: return "barrier";
    case Kind::barrier_release: return "barrier";
    case Kind::gather_part: return "all_gather";
    case Kind::gather_result: return "all_gather";
    case Kind::error: return "error";
  }
  return "unknown";
}

inline constexpr uint32_t kMagic = 0x31537174;  // "tqS1" little-endian: protocol 1
inline constexpr size_t kHeaderBytes = 24;      // magic u32, kind u32, seq u64, payload length u64
inline constexpr uint64_t kMaxPayload = uint64_t(1) << 30;

struct Frame {
  Kind kind = Kind::error;
  uint64_t seq = 0;
  std::string payload;  // bytes
};

inline void put_u32(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s += char((v >> (8 * i)) & 0xFF);
}
inline void put_u64(std::string& s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s += char((v >> (8 * i)) & 0xFF);
}
inline uint64_t get_le(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

inline std::string encode(const Frame& f) {
  std::string s;
  s.reserve(kHeaderBytes + f.payload.size());
  put_u32(s, kMagic);
  put_u32(s, uint32_t(f.kind));
  put_u64(s, f.seq);
  put_u64(s, f.payload.size());
  s += f.payload;
  return s;
}

enum class Io { ok, timeout, closed, protocol };

// Writes all of `data` to a non-blocking socket before `deadline`.
inline Io write_all(int fd, const std::string& data, Clock::time_point deadline, int& err) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      const int r = ::poll(&p, 1, poll_ms(deadline));
      if (r == 0) return Io::timeout;
      if (r < 0 && errno != EINTR) return err = errno, Io::closed;
      continue;
    }
    err = n < 0 ? errno : EPIPE;
    return Io::closed;
  }
  return Io::ok;
}

// Reads exactly `n` bytes from a non-blocking socket before `deadline`.
inline Io read_exact(int fd, char* out, size_t n, Clock::time_point deadline, int& err) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::recv(fd, out + done, n - done, 0);
    if (r > 0) {
      done += size_t(r);
      continue;
    }
    if (r == 0) return err = 0, Io::closed;  // orderly shutdown: the peer closed (or exited)
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      pollfd p{fd, POLLIN, 0};
      const int k = ::poll(&p, 1, poll_ms(deadline));
      if (k == 0) return Io::timeout;
      if (k < 0 && errno != EINTR) return err = errno, Io::closed;
      continue;
    }
    err = errno;  // ECONNRESET etc.: the peer died
    return Io::closed;
  }
  return Io::ok;
}

inline Io read_frame(int fd, Clock::time_point deadline, Frame& f, int& err) {
  char h[kHeaderBytes];
  if (Io s = read_exact(fd, h, kHeaderBytes, deadline, err); s != Io::ok) return s;
  const uint64_t kind = get_le(h + 4, 4), length = get_le(h + 16, 8);
  if (get_le(h, 4) != kMagic || kind < uint32_t(Kind::hello) || kind > uint32_t(Kind::error) || length > kMaxPayload)
    return Io::protocol;
  f.kind = Kind(kind);
  f.seq = get_le(h + 8, 8);
  f.payload.assign(size_t(length), '\0');
  return read_exact(fd, f.payload.data(), f.payload.size(), deadline, err);
}

// all_gather's result: count u32, then per rank length u64 + bytes.
inline std::string pack_blobs(const std::vector<std::string>& blobs) {
  std::string s;
  put_u32(s, uint32_t(blobs.size()));
  for (const std::string& b : blobs) {
    put_u64(s, b.size());
    s += b;
  }
  return s;
}
inline std::optional<std::vector<std::string>> unpack_blobs(const std::string& s, size_t expect) {
  if (s.size() < 4 || get_le(s.data(), 4) != expect) return std::nullopt;
  std::vector<std::string> out;
  size_t at = 4;
  for (size_t i = 0; i < expect; ++i) {
    if (s.size() - at < 8) return std::nullopt;
    const uint64_t n = get_le(s.data() + at, 8);
    at += 8;
    if (s.size() - at < n) return std::nullopt;
    out.emplace_back(s.data() + at, size_t(n));
    at += size_t(n);
  }
  if (at != s.size()) return std::nullopt;
  return out;
}

inline std::string hello_payload(int rank, int world) {
  std::string s;
  put_u32(s, uint32_t(rank));
  put_u32(s, uint32_t(world));
  return s;
}

// Opens a listening socket on every interface (IPv6 dual-stack when available, else IPv4).
inline Fd listen_any(int port) {
  TQ_CHECK(port >= 0 && port <= 65535, "tcp store: invalid port ", port);
  int last_err = 0;
  for (int family : {AF_INET6, AF_INET}) {
    Fd fd(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd.valid()) {
      last_err = errno;
      continue;
    }
    int one = 1, zero = 0;
    (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    int rc;
    if (family == AF_INET6) {
      if (::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) != 0) {
        last_err = errno;
        continue;  // no dual stack: IPv4 clients could not reach us
      }
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_any;
      a.sin6_port = htons(uint16_t(port));
      rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
    } else {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_ANY);
      a.sin_port = htons(uint16_t(port));
      rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
    }
    if (rc != 0) {
      last_err = errno;
      TQ_CHECK(last_err != EADDRINUSE, "tcp store: rank 0 cannot listen on port ", port,
               ": it is in use on this host (another run, or torchrun's own store): set MASTER_PORT or "
               "TQ_STORE_PORT to a free port, the same on every rank");
      continue;
    }
    TQ_CHECK(::listen(fd.get(), 128) == 0, "tcp store: listen on port ", port, ": ", errno_text(errno));
    return fd;
  }
  fail(str_cat("tcp store: rank 0 cannot listen on port ", port, ": ", errno_text(last_err)));
}

inline int bound_port(int fd) {
  sockaddr_storage a{};
  socklen_t n = sizeof(a);
  TQ_CHECK(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n) == 0, "tcp store: getsockname: ",
           errno_text(errno));
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

// One connection attempt to host:port within `deadline`; an invalid Fd and `why` on failure.
// A name that cannot be resolved at all throws (retrying would only delay the same error).
inline Fd try_connect(const std::string& host, int port, Clock::time_point deadline, std::string& why) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int g = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (g != 0) {
    TQ_CHECK(g == EAI_AGAIN, "tcp store: cannot resolve MASTER_ADDR '", host, "': ", ::gai_strerror(g));
    why = ::gai_strerror(g);
    return Fd();
  }
  Fd out;
  for (addrinfo* ai = res; ai != nullptr && !out.valid(); ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) {
      why = errno_text(errno);
      continue;
    }
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        why = errno_text(errno);
        continue;
      }
      pollfd p{fd.get(), POLLOUT, 0};
      const auto attempt_end = std::min(deadline, Clock::now() + std::chrono::seconds(2));
      if (::poll(&p, 1, poll_ms(attempt_end)) <= 0) {
        why = "connection attempt timed out";
        continue;
      }
      int so = 0;
      socklen_t len = sizeof(so);
      (void)::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &so, &len);
      if (so != 0) {
        why = errno_text(so);
        continue;
      }
    }
    set_nodelay(fd.get());
    out = std::move(fd);
  }
  ::freeaddrinfo(res);
  return out;
}

// Closes connections after a failure without losing the error frame just sent: a socket closed
// with unread input answers with a reset, which may discard what the peer has not read yet. So:
// half-close, drain what the peers still send until they close (or `grace` passes), then close.
inline void close_gracefully(std::vector<Fd>& fds, std::chrono::milliseconds grace) {
  const auto deadline = Clock::now() + grace;
  std::vector<pollfd> open;
  for (Fd& fd : fds)
    if (fd.valid()) {
      (void)::shutdown(fd.get(), SHUT_WR);
      open.push_back({fd.get(), POLLIN, 0});
    }
  char scratch[4096];
  while (!open.empty() && Clock::now() < deadline && ::poll(open.data(), open.size(), poll_ms(deadline)) > 0) {
    for (pollfd& p : open) {
      if (p.revents == 0) continue;
      const ssize_t n = ::recv(p.fd, scratch, sizeof(scratch), 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) p.fd = -1;  // the peer closed: done with it
    }
    open.erase(std::remove_if(open.begin(), open.end(), [](const pollfd& p) { return p.fd < 0; }), open.end());
    for (pollfd& p : open) p.revents = 0;
  }
  for (Fd& fd : fds) fd.reset();
}

}  // namespace store_detail

// A listening socket of rank 0, bound before the store is built (port 0 = a free port, which
// tests read with port() and hand to the other ranks).
class TcpListener {
 public:
  explicit TcpListener(int port) : fd_(store_detail::listen_any(port)), port_(store_detail::bound_port(fd_.get())) {}
  int port() const { return port_; }

 private:
  friend class TcpStore;
  store_detail::Fd fd_;
  int port_ = 0;
};

class TcpStore {
 public:
  using Millis = std::chrono::milliseconds;

  // Rank 0 listens on `port` (every interface); the others connect to host:port. Returns once
  // every rank has joined; throws past `timeout`.
  TcpStore(int rank, int world_size, const std::string& host, int port, Millis timeout)
      : rank_(rank), world_(world_size), host_(host), port_(port), timeout_(timeout) {
    check_args();
    if (world_ == 1) return;
    if (rank_ == 0) {
      TcpListener l(port);
      serve_rendezvous(std::move(l));
    } else {
      join_rendezvous();
    }
  }

  // Rank 0 with a listener bound already.
  TcpStore(TcpListener listener, int world_size, Millis timeout)
      : rank_(0), world_(world_size), host_("localhost"), port_(listener.port()), timeout_(timeout) {
    check_args();
    if (world_ > 1) serve_rendezvous(std::move(listener));
  }

  // The store of a run described by `env` (MASTER_ADDR, the rendezvous port, TQ_NCCL_TIMEOUT_S).
  explicit TcpStore(const Env& env)
      : TcpStore(env.rank, env.world_size, env.master_addr, env.store_port,
                 Millis(int64_t(std::ceil(env.timeout_s * 1000)))) {}

  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  int rank() const { return rank_; }
  int size() const { return world_; }
  Millis timeout() const { return timeout_; }

  // Rank 0's `data` on every rank (the argument of the other ranks is ignored).
  std::string broadcast(const std::string& data) {
    const uint64_t seq = begin_op();
    if (world_ == 1) return data;
    if (rank_ == 0) {
      send_to_all({store_detail::Kind::broadcast, seq, data}, "broadcast");
      return data;
    }
    return client_receive(store_detail::Kind::broadcast, seq, "broadcast");
  }

  // Returns once every rank has called barrier().
  void barrier() {
    const uint64_t seq = begin_op();
    if (world_ == 1) return;
    if (rank_ == 0) {
      collect(store_detail::Kind::barrier_arrive, seq, "barrier");
      send_to_all({store_detail::Kind::barrier_release, seq, {}}, "barrier");
      return;
    }
    client_send({store_detail::Kind::barrier_arrive, seq, {}}, "barrier");
    client_receive(store_detail::Kind::barrier_release, seq, "barrier");
  }

  // Every rank's `blob`, indexed by rank.
  std::vector<std::string> all_gather(const std::string& blob) {
    const uint64_t seq = begin_op();
    if (world_ == 1) return {blob};
    if (rank_ == 0) {
      std::vector<std::string> blobs = collect(store_detail::Kind::gather_part, seq, "all_gather");
      blobs[0] = blob;
      send_to_all({store_detail::Kind::gather_result, seq, store_detail::pack_blobs(blobs)}, "all_gather");
      return blobs;
    }
    client_send({store_detail::Kind::gather_part, seq, blob}, "all_gather");
    std::optional<std::vector<std::string>> blobs =
        store_detail::unpack_blobs(client_receive(store_detail::Kind::gather_result, seq, "all_gather"), size_t(world_));
    if (!blobs) fail(str_cat("malformed all_gather #", seq, " result from rank 0"), false);
    return *blobs;
  }

  // Tells the other ranks that this one is failing (best effort: they throw with `reason` in their
  // next, or current, store operation) and closes the store. Never throws.
  void abort(const std::string& reason) noexcept {
    if (!error_.empty()) return;
    try {
      error_ = prefix() + "aborted: " + reason;
      notify_peers(str_cat("rank ", rank_, " failed: ", reason));
    } catch (...) {
    }
    close_all();
  }

 private:
  using Frame = store_detail::Frame;
  using Kind = store_detail::Kind;
  using Io = store_detail::Io;

  void check_args() const {
    TQ_CHECK(world_ >= 1 && rank_ >= 0 && rank_ < world_, "tcp store: rank ", rank_, " is not in a world of ", world_);
    TQ_CHECK(timeout_.count() > 0, "tcp store: the timeout must be positive");
  }

  std::string prefix() const { return str_cat("tcp store, rank ", rank_, " of ", world_, ": "); }
  std::string timeout_text() const { return str_cat(store_detail::seconds(timeout_), " s (TQ_NCCL_TIMEOUT_S)"); }
  std::string endpoint() const { return str_cat(host_, ":", port_); }

  uint64_t begin_op() {
    if (!error_.empty()) fail_again();
    return ++seq_;
  }

  [[noreturn]] void fail_again() const { tq::fail(str_cat(error_, " (the store is unusable after that failure)")); }

  // Records the first error, tells the peers (rank 0: every client; a client: rank 0, which relays)
  // unless `tell_peers` is false, closes every socket and throws.
  [[noreturn]] void fail(const std::string& what, bool tell_peers = true) {
    error_ = prefix() + what;
    if (tell_peers) notify_peers(str_cat(rank_ == 0 ? "" : str_cat("rank ", rank_, ": "), what));
    close_all();
    tq::fail(error_);
  }

  void notify_peers(const std::string& message) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(500);
    const std::string frame = store_detail::encode({Kind::error, seq_, message});
    int err = 0;
    for (store_detail::Fd& fd : rank_ == 0 ? peers_ : client_fd_)
      if (fd.valid()) (void)store_detail::write_all(fd.get(), frame, deadline, err);
  }

  void close_all() {
    store_detail::close_gracefully(peers_, std::chrono::milliseconds(300));
    store_detail::close_gracefully(client_fd_, std::chrono::milliseconds(0));
  }

  // ---- rank 0 ----

  void serve_rendezvous(TcpListener listener) {
    peers_.resize(size_t(world_));
    const auto deadline = store_detail::deadline_after(timeout_);
    int joined = 1;
    while (joined < world_) {
      pollfd p{listener.fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, store_detail::poll_ms(deadline)) == 0 || Clock::now() >= deadline)
        fail(str_cat(missing_ranks_text(), " did not join the rendezvous on port ", port_, " within ", timeout_text()));
      store_detail::Fd conn(::accept4(listener.fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!conn.valid()) continue;  // EAGAIN/EINTR/a connection reset before accept: keep waiting
      store_detail::set_nodelay(conn.get());
      if (admit(std::move(conn), deadline)) ++joined;
    }
    send_to_all({Kind::welcome, 0, {}}, "rendezvous");
  }

  // Reads a new connection's hello; keeps it as its rank's peer. A connection that is not a tq
  // rank (no hello within a few seconds, wrong magic) is dropped; a tq rank that disagrees about
  // the world is a fatal configuration error.
  bool admit(store_detail::Fd conn, Clock::time_point deadline) {
    Frame f;
    int err = 0;
    const auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(5));
    if (store_detail::read_frame(conn.get(), hello_deadline, f, err) != Io::ok || f.kind != Kind::hello ||
        f.payload.size() != 8)
      return false;
    const int64_t r = int64_t(store_detail::get_le(f.payload.data(), 4));
    const int64_t w = int64_t(store_detail::get_le(f.payload.data() + 4, 4));
    std::string problem;
    if (w != world_) problem = str_cat("rank ", r, " started with world size ", w, ", rank 0 with ", world_);
    else if (r <= 0 || r >= world_) problem = str_cat("a process joined as rank ", r, ", outside 1..", world_ - 1);
    else if (peers_[size_t(r)].valid()) problem = str_cat("two processes joined as rank ", r);
    if (!problem.empty()) {
      int e = 0;
      (void)store_detail::write_all(conn.get(), store_detail::encode({Kind::error, 0, problem}),
                                    Clock::now() + std::chrono::milliseconds(500), e);
      fail(problem);
    }
    peers_[size_t(r)] = std::move(conn);
    return true;
  }

  std::string missing_ranks_text() const {
    std::vector<int> missing;
    for (int r = 1; r < world_; ++r)
      if (!peers_[size_t(r)].valid()) missing.push_back(r);
    return store_detail::rank_list(missing);
  }

  // One frame of `kind`/`seq` from every other rank (payloads indexed by rank; [0] empty).
  std::vector<std::string> collect(Kind kind, uint64_t seq, const char* op) {
    std::vector<std::string> got(static_cast<size_t>(world_));
    std::vector<bool> have(static_cast<size_t>(world_), false);
    have[0] = true;
    int missing = world_ - 1;
    const auto deadline = store_detail::deadline_after(timeout_);
    while (missing > 0) {
      std::vector<pollfd> fds;
      std::vector<int> ranks;
      for (int r = 1; r < world_; ++r)
        if (!have[size_t(r)]) fds.push_back({peers_[size_t(r)].get(), POLLIN, 0}), ranks.push_back(r);
      const int n = ::poll(fds.data(), fds.size(), store_detail::poll_ms(deadline));
      if (n == 0 || Clock::now() >= deadline) {
        fail(str_cat(store_detail::rank_list(ranks), " did not reach ", op, " #", seq, " within ", timeout_text()));
      }
      for (size_t i = 0; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        const int r = ranks[i];
        got[size_t(r)] = receive_from(r, kind, seq, op, deadline);
        have[size_t(r)] = true;
        --missing;
      }
    }
    return got;
  }

  std::string receive_from(int r, Kind kind, uint64_t seq, const char* op, Clock::time_point deadline) {
    Frame f;
    int err = 0;
    const Io s = store_detail::read_frame(peers_[size_t(r)].get(), deadline, f, err);
    if (s == Io::closed)
      fail(str_cat("rank ", r, " closed its connection during ", op, " #", seq, " (it exited or crashed",
                   err ? ": " + store_detail::errno_text(err) : std::string(), ")"));
    if (s == Io::timeout) fail(str_cat("rank ", r, " sent an incomplete message in ", op, " #", seq));
    if (s == Io::protocol) fail(str_cat("rank ", r, " sent a malformed message in ", op, " #", seq));
    if (f.kind == Kind::error) fail(f.payload);
    if (f.kind != kind || f.seq != seq)
      fail(str_cat("rank ", r, " called ", store_detail::kind_name(f.kind), " #", f.seq, " while rank 0 is in ", op,
                   " #", seq, ": every rank must call the same store operations in the same order"));
    return std::move(f.payload);
  }

  void send_to_all(const Frame& f, const char* op) {
    const std::string bytes = store_detail::encode(f);
    const auto deadline = store_detail::deadline_after(timeout_);
    for (int r = 1; r < world_; ++r) {
      int err = 0;
      const Io s = store_detail::write_all(peers_[size_t(r)].get(), bytes, deadline, err);
      if (s == Io::timeout) fail(str_cat("rank ", r, " did not take ", op, " #", f.seq, " within ", timeout_text()));
      if (s != Io::ok)
        fail(str_cat("rank ", r, " closed its connection during ", op, " #", f.seq, " (it exited or crashed",
                     err ? ": " + store_detail::errno_text(err) : std::string(), ")"));
    }
  }

  // ---- ranks 1.. ----

  void join_rendezvous() {
    client_fd_.resize(1);
    const auto deadline = store_detail::deadline_after(timeout_);
    auto backoff = std::chrono::milliseconds(50);
    std::string why;
    while (!client_fd_[0].valid()) {
      client_fd_[0] = store_detail::try_connect(host_, port_, deadline, why);
      if (client_fd_[0].valid()) break;
      if (Clock::now() >= deadline)
        fail(str_cat("could not connect to rank 0 at ", endpoint(), " within ", timeout_text(), ": ", why,
                     " (is rank 0 running, and MASTER_ADDR/MASTER_PORT the same on every rank?)"),
             false);
      std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - Clock::now()));
      backoff = std::min(backoff * 2, std::chrono::milliseconds(1000));
    }
    client_send({Kind::hello, 0, store_detail::hello_payload(rank_, world_)}, "rendezvous");
    client_receive(Kind::welcome, 0, "rendezvous");
  }

  void client_send(const Frame& f, const char* op) {
    int err = 0;
    const Io s = store_detail::write_all(client_fd_[0].get(), store_detail::encode(f),
                                         store_detail::deadline_after(timeout_), err);
    if (s == Io::timeout)
      fail(str_cat("rank 0 at ", endpoint(), " did not take ", op, " #", f.seq, " within ", timeout_text()));
    if (s != Io::ok) lost_rank0(op, f.seq, err);
  }

  std::string client_receive(Kind kind, uint64_t seq, const char* op) {
    Frame f;
    int err = 0;
    const Io s = store_detail::read_frame(client_fd_[0].get(), store_detail::deadline_after(timeout_), f, err);
    if (s == Io::timeout)
      fail(str_cat("timed out after ", timeout_text(), " in ", op, " #", seq, " waiting for rank 0 at ", endpoint(),
                   ": some rank has not reached it"));
    if (s == Io::closed) lost_rank0(op, seq, err);
    if (s == Io::protocol)
      fail(str_cat("the service at ", endpoint(), " is not tq's rendezvous (under torchrun MASTER_PORT is torchrun's ",
                   "own store, and tq uses MASTER_PORT+1 only when TORCHELASTIC_USE_AGENT_STORE=True: set TQ_STORE_PORT)"),
           false);
    if (f.kind == Kind::error) fail(str_cat("rank 0 reports: ", f.payload), false);
    if (f.kind != kind || f.seq != seq)
      fail(str_cat("rank 0 answered ", store_detail::kind_name(f.kind), " #", f.seq, " while this rank is in ", op,
                   " #", seq, ": every rank must call the same store operations in the same order"));
    return std::move(f.payload);
  }

  // The connection to rank 0 broke. Rank 0 sends the reason before it closes: report that if it
  // is waiting to be read.
  [[noreturn]] void lost_rank0(const char* op, uint64_t seq, int err) {
    Frame f;
    int e = 0;
    if (store_detail::read_frame(client_fd_[0].get(), Clock::now() + std::chrono::milliseconds(200), f, e) == Io::ok &&
        f.kind == Kind::error)
      fail(str_cat("rank 0 reports: ", f.payload), false);
    fail(str_cat("rank 0 at ", endpoint(), " closed the connection during ", op, " #", seq,
                 " (rank 0 exited or crashed", err ? ": " + store_detail::errno_text(err) : std::string(),
                 seq == 0 ? "; or another program listens on that port" : "", ")"),
         false);
  }

  int rank_ = 0, world_ = 1;
  std::string host_;
  int port_ = 0;
  Millis timeout_;
  uint64_t seq_ = 0;
  std::string error_;                       // the first failure; the store is unusable after it
  std::vector<store_detail::Fd> peers_;     // rank 0: the connection of each rank ([0] unused)
  std::vector<store_detail::Fd> client_fd_; // other ranks: [0] = the connection to rank 0
};

}  // namespace tq::dist
