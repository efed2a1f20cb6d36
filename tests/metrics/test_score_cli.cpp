// `paligemma score` end to end: bad inputs fail with one line on stderr and a non-zero exit; a good
// input without METEOR data prints the pycocoevalcap numbers and METEOR as null.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace {

namespace fs = std::filesystem;

struct CliResult {
  int status;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

fs::path temp_dir() {
  static const fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("tq_score_cli_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

// Runs the CLI with `args` (already shell-quoted) and an environment prefix.
CliResult run_score(const std::string& args, const std::string& env = "") {
  const fs::path out = temp_dir() / "stdout.txt", err = temp_dir() / "stderr.txt";
  const std::string cmd = env + " '" + std::string(TQ_BIN_DIR) + "/paligemma' score " + args + " >'" + out.string() +
                          "' 2>'" + err.string() + "'";
  const int rc = std::system(cmd.c_str());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, slurp(out), slurp(err)};
}

fs::path write_input(const std::string& name, const std::string& bytes) {
  const fs::path p = temp_dir() / name;
  std::ofstream(p, std::ios::binary) << bytes;
  return p;
}

void expect_one_line_error(const std::string& bytes, const std::string& needle) {
  const fs::path p = write_input("bad.json", bytes);
  const CliResult r = run_score("--input '" + p.string() + "'");
  EXPECT_NE(r.status, 0) << bytes;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "not one line: " << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(ScoreCli, MalformedJson) { expect_one_line_error(R"({"items": [{"refs": ["a b"], "pred": "a")", "malformed JSON"); }

TEST(ScoreCli, MissingRefs) { expect_one_line_error(R"({"items": [{"refs": ["a"], "pred": "a"}, {"pred": "b"}]})", "item 1: missing \"refs\""); }

TEST(ScoreCli, EmptyRefList) { expect_one_line_error(R"({"items": [{"refs": [], "pred": "b"}]})", "item 0: \"refs\" is empty"); }

TEST(ScoreCli, EmptyItemList) { expect_one_line_error(R"({"items": []})", "empty"); }

TEST(ScoreCli, InvalidUtf8) { expect_one_line_error("{\"items\": [{\"refs\": [\"a\"], \"pred\": \"caf\xC3\x28\"}]}", "not valid UTF-8"); }

TEST(ScoreCli, MissingInputFile) {
  const CliResult r = run_score("--input /nonexistent/x.json");
  EXPECT_NE(r.status, 0);
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
}

TEST(ScoreCli, ExplicitMeteorDirMustExist) {
  const fs::path p = write_input("ok.json", R"({"items": [{"refs": ["a b c"], "pred": "a b"}]})");
  const CliResult r = run_score("--input '" + p.string() + "' --meteor-data /nonexistent/meteor");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("--meteor-data"), std::string::npos) << r.err;
}

// Without METEOR data: METEOR is null (never another number), the rest equals pycocoevalcap.
TEST(ScoreCli, FixtureWithoutMeteorData) {
  const std::string fixture = std::string(TQ_FIXTURES) + "/metrics/pycocoevalcap_520.json";
  const fs::path empty = temp_dir() / "no_data";
  fs::create_directories(empty);
  const fs::path csv = temp_dir() / "scores.csv";
  const CliResult r = run_score("--input '" + fixture + "' --per-item --csv '" + csv.string() + "'",
                                "XDG_DATA_HOME='" + empty.string() + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("METEOR unavailable"), std::string::npos) << r.err;
  const auto got = nlohmann::json::parse(r.out);
  const auto want = nlohmann::json::parse(slurp(fixture))["raw"];
  EXPECT_TRUE(got["METEOR"].is_null());
  for (const char* k : {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}) {
    EXPECT_NEAR(got[k].get<double>(), want["corpus"][k].get<double>(), 1e-9) << k;
    ASSERT_EQ(got["per_item"].size(), want["per_item"].size());
    for (size_t i = 0; i < got["per_item"].size(); ++i)
      EXPECT_NEAR(got["per_item"][i][k].get<double>(), want["per_item"][i][k].get<double>(), 1e-9) << k << " " << i;
  }
  const std::string text = slurp(csv);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1 + 520 + 1);
}

}  // namespace
