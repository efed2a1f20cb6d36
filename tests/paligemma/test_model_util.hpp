// Shared helpers for the PaliGemma model tests: fixture paths and batch loading.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "paligemma/generate.hpp"
#include "paligemma/weights.hpp"

namespace tq::paligemma::test {

inline std::string fixture(const std::string& rel) { return std::string(TQ_FIXTURES) + "/paligemma/" + rel; }

inline Batch load_batch(const std::string& path, bool with_tt = true) {
  SafetensorsFile f = SafetensorsFile::open(path);
  Batch b;
  b.input_ids = f.get("input_ids").clone();
  b.attention_mask = f.get("attention_mask").clone();
  if (with_tt && f.contains("token_type_ids")) b.token_type_ids = f.get("token_type_ids").clone();
  if (f.contains("labels")) b.labels = f.get("labels").clone();
  b.pixel_values = f.get("pixel_values").clone();
  return b;
}

}  // namespace tq::paligemma::test
