// Helpers shared by the RISC tests: fixture paths, JSON loading, running the CLI.
#pragma once

#include "risc/dataset.hpp"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>

namespace risc_test {

inline std::string fixture(const std::string& rel) { return std::string(TQ_FIXTURES) + "/risc/" + rel; }

inline nlohmann::json load_json(const std::string& path) {
  return nlohmann::json::parse(tq::risc::read_whole_file(path));
}

inline nlohmann::json opt_json(const std::optional<std::string>& s) {
  return s ? nlohmann::json(*s) : nlohmann::json(nullptr);
}

struct RunResult {
  int rc = -1;
  std::string out;  // stdout + stderr
};

// Runs build/bin/paligemma with `args` (a shell fragment) and captures its output.
inline RunResult run_cli(const std::string& args) {
  const std::string cmd = std::string(TQ_BIN_DIR) + "/paligemma " + args + " 2>&1";
  RunResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 65536> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

inline std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("tq_risc_" + std::to_string(getpid()) + "_" + name)).string();
}

}  // namespace risc_test
