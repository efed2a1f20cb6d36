// The `paligemma` executable is one CLI11 app with a subcommand per task. Each task lives in an
// apps/<area>/cli_<name>.cpp that registers itself here at static-initialization time, so areas
// add commands without editing a shared file.
//
// `--config FILE.json` on every subcommand holds the same keys as the flags (kebab-case, without
// the dashes); flags given on the command line win. JsonConfig converts between CLI11's config
// items and a flat JSON object, so `write_resolved_config` can save what a run actually used.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace tq::cli {

// Returns the subcommand's action; `setup` declares its options on `app`.
using Setup = std::function<std::function<int()>(CLI::App& app)>;

struct Command {
  std::string name;
  std::string description;
  Setup setup;
};

inline std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}

struct Register {
  Register(std::string name, std::string description, Setup setup) {
    registry().push_back({std::move(name), std::move(description), std::move(setup)});
  }
};

// CLI11 config reader/writer for a flat JSON object: {"max-steps": 50, "dora": true, ...}.
class JsonConfig : public CLI::Config {
 public:
  std::string to_config(const CLI::App* app, bool default_also, bool, std::string) const override {
    nlohmann::json j = nlohmann::json::object();
    for (const CLI::Option* opt : app->get_options({})) {
      if (opt->get_lnames().empty() || !opt->get_configurable()) continue;
      const std::string name = opt->get_lnames()[0];
      if (name == "help" || name == "config") continue;
      std::vector<std::string> vals = opt->reduced_results();
      // A flag takes no argument (CLI11 gives it type size 1 but at most 0 expected values). One not
      // given resolves to its default string (set where the default is on) or off, so every flag
      // appears in a resolved config as a JSON bool.
      const bool flag = opt->get_type_size() == 0 || opt->get_expected_max() == 0;
      if (vals.empty() && default_also) {
        if (!opt->get_default_str().empty()) vals = {opt->get_default_str()};
        else if (flag) vals = {"false"};
        else continue;
      }
      if (vals.empty()) continue;
      if (flag) {
        j[name] = vals[0] != "0" && vals[0] != "false" && vals[0] != "-1";
      } else if (opt->get_expected_max() > 1) {
        j[name] = vals;
      } else {
        j[name] = vals[0];
      }
    }
    return j.dump(2) + "\n";
  }

  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override {
    nlohmann::json j;
    try {
      input >> j;
    } catch (const nlohmann::json::exception& e) {
      throw CLI::FileError(std::string("--config: not valid JSON: ") + e.what());
    }
    if (!j.is_object()) throw CLI::FileError("--config: the file must hold one JSON object");
    std::vector<CLI::ConfigItem> items;
    for (auto& [key, value] : j.items()) {
      CLI::ConfigItem item;
      item.name = key;
      if (value.is_array()) {
        for (auto& v : value) item.inputs.push_back(v.is_string() ? v.get<std::string>() : v.dump());
      } else if (value.is_string()) {
        item.inputs = {value.get<std::string>()};
      } else {
        item.inputs = {value.dump()};
      }
      items.push_back(std::move(item));
    }
    return items;
  }
};

// Writes the subcommand's resolved options (defaults included) as JSON to `path`.
inline void write_resolved_config(const CLI::App& app, const std::string& path) {
  std::ofstream out(path);
  out << JsonConfig().to_config(&app, true, false, "");
  if (!out) throw std::runtime_error("cannot write resolved config: " + path);
}

}  // namespace tq::cli
