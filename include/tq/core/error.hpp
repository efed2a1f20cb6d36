// tq::Error: every misuse of the framework (shape, dtype or device mismatch, out-of-range index,
// malformed file) throws one of these, with the context that lets a user find the problem: the
// op or file, and the shapes/dtypes/devices or field involved. The CLI prints what() as one line.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tq {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
inline void stream_all(std::ostringstream&) {}
template <class T, class... Rest>
void stream_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  if constexpr (requires { os << v; }) {
    os << v;
  } else {
    os << "[";
    bool first = true;
    for (const auto& x : v) {
      os << (first ? "" : ", ") << x;
      first = false;
    }
    os << "]";
  }
  stream_all(os, rest...);
}
}  // namespace detail

// Concatenates its arguments (anything streamable, or ranges of streamables) into one message.
template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::stream_all(os, args...);
  return os.str();
}

[[noreturn]] inline void fail(const std::string& msg) { throw Error(msg); }

}  // namespace tq

// TQ_CHECK(cond, parts...): throws tq::Error with the concatenated parts when cond is false.
#define TQ_CHECK(cond, ...)                                    \
  do {                                                         \
    if (!(cond)) [[unlikely]] ::tq::fail(::tq::str_cat(__VA_ARGS__)); \
  } while (0)
