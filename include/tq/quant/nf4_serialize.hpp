// bitsandbytes' serialized NF4 layer (QuantState.as_dict(packed=True), spec A.8), as name → Tensor pairs
// so it plugs into the safetensors reader/writer:
//   P.weight                                  U8  [(n+1)/2, 1]
//   P.weight.absmax                           U8  [nb] (F32 [nb] without double quant)
//   P.weight.quant_map                        F32 [16]  the NF4 table
//   P.weight.nested_absmax                    F32 [ceil(nb/256)]   (double quant only)
//   P.weight.nested_quant_map                 F32 [256] DYN        (double quant only)
//   P.weight.quant_state.bitsandbytes__nf4    U8  [len] json.dumps(...) bytes, key order as bnb writes it
// Loading validates every piece against the shape in the blob and names the offending tensor.
#pragma once

#include <cstdlib>
#include <variant>

#include "tq/quant/nf4.hpp"

namespace tq {

namespace nf4 {

// Python's repr() of a float (what json.dumps writes): shortest round-trip digits; exponent form when the
// decimal exponent is < -4 or ≥ 16 ("1e-05", "1.5e+16"), else positional with at least one fractional digit.
inline std::string python_float_repr(double v) {
  TQ_CHECK(std::isfinite(v), "python_float_repr: non-finite value ", v);
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, std::fabs(v), std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // d[.ddd]e±XX
  const size_t e_pos = sci.find('e');
  std::string digits = sci.substr(0, e_pos);
  if (digits.size() > 1) digits.erase(1, 1);  // drop the '.'
  const int exp10 = std::atoi(sci.c_str() + e_pos + 1);
  std::string out = v < 0 ? "-" : "";
  if (exp10 < -4 || exp10 >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    return out + e;
  }
  const int point = exp10 + 1;  // digits before the decimal point
  if (point <= 0) return out + "0." + std::string(size_t(-point), '0') + digits;
  if (int(digits.size()) <= point) return out + digits + std::string(size_t(point) - digits.size(), '0') + ".0";
  return out + digits.substr(0, size_t(point)) + "." + digits.substr(size_t(point));
}

// The quant_state JSON: a flat object of strings, numbers and integer arrays (all bnb writes).
using JsonValue = std::variant<std::string, double, std::vector<int64_t>>;

class FlatJsonParser {
 public:
  FlatJsonParser(const std::string& text, const std::string& what) : s_(text), what_(what) {}

  std::vector<std::pair<std::string, JsonValue>> parse() {
    std::vector<std::pair<std::string, JsonValue>> out;
    expect('{');
    if (peek() == '}') return ++i_, finish(out);
    while (true) {
      std::string key = string_value();
      expect(':');
      const char c = peek();
      if (c == '"') out.emplace_back(key, string_value());
      else if (c == '[') out.emplace_back(key, int_array());
      else out.emplace_back(key, number());
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}');
      return finish(out);
    }
  }

 private:
  [[noreturn]] void error(const std::string& msg) const {
    fail(str_cat(what_, ": malformed quant-state JSON (", msg, " at byte ", i_, "): ", s_));
  }
  char peek() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r')) ++i_;
    if (i_ >= s_.size()) error("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) error(str_cat("expected '", c, "'"));
    ++i_;
  }
  std::vector<std::pair<std::string, JsonValue>>& finish(std::vector<std::pair<std::string, JsonValue>>& out) {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n')) ++i_;
    if (i_ != s_.size()) error("trailing characters");
    return out;
  }
  std::string string_value() {
    expect('"');
    std::string v;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') error("escape sequences are not expected");
      v += s_[i_++];
    }
    if (i_ >= s_.size()) error("unterminated string");
    ++i_;
    return v;
  }
  double number() {
    peek();
    const char* begin = s_.c_str() + i_;
    char* end = nullptr;
    const double v = std::strtod(begin, &end);
    if (end == begin) error("expected a value");
    i_ += size_t(end - begin);
    return v;
  }
  std::vector<int64_t> int_array() {
    expect('[');
    std::vector<int64_t> v;
    if (peek() == ']') return ++i_, v;
    while (true) {
      const double d = number();
      if (d != std::floor(d) || std::fabs(d) > 9.0e15) error("expected an integer");
      v.push_back(int64_t(d));
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect(']');
      return v;
    }
  }

  const std::string& s_;
  std::string what_;
  size_t i_ = 0;
};

inline const char* kQuantStateSuffix = ".weight.quant_state.bitsandbytes__nf4";

}  // namespace nf4

// json.dumps of the non-tensor QuantState items, byte for byte as bnb writes them.
inline std::string nf4_quant_state_json(const NF4Tensor& q) {
  std::string s = str_cat("{\"quant_type\": \"nf4\", \"blocksize\": ", nf4::kBlock, ", \"dtype\": \"",
                          nf4::torch_dtype_name(q.dtype), "\", \"shape\": [");
  for (size_t i = 0; i < q.shape.size(); ++i) s += str_cat(i ? ", " : "", q.shape[i]);
  s += "]";
  if (q.double_quant())
    s += str_cat(", \"nested_blocksize\": ", nf4::kNestedBlock, ", \"nested_dtype\": \"float32\", \"nested_offset\": ",
                 nf4::python_float_repr(double(q.offset)));
  return s + "}";
}

// The serialized tensors under `prefix` (the module path, e.g. "model.layers.0.mlp.down_proj"), on the CPU.
inline std::vector<std::pair<std::string, Tensor>> nf4_to_state_dict(const std::string& prefix, const NF4Tensor& q) {
  auto table = [](const auto& bits) {
    std::vector<float> v;
    for (uint32_t b : bits) v.push_back(std::bit_cast<float>(b));
    return Tensor::from_vector(v, {int64_t(v.size())});
  };
  const std::string blob = nf4_quant_state_json(q);
  Tensor blob_t = Tensor::empty({int64_t(blob.size())}, DType::u8);
  std::memcpy(blob_t.data_ptr(), blob.data(), blob.size());
  const std::string w = prefix + ".weight";
  // Always CPU tensors (the safetensors writer's input), also for a weight that lives on a device.
  std::vector<std::pair<std::string, Tensor>> out = {{w, q.packed.detach().cpu().contiguous()},
                                                     {w + ".absmax", q.absmax.detach().cpu().contiguous()},
                                                     {w + ".quant_map", table(nf4::kCodeBits)}};
  if (q.double_quant()) {
    out.emplace_back(w + ".nested_absmax", q.nested_absmax.detach().cpu().contiguous());
    out.emplace_back(w + ".nested_quant_map", table(nf4::kDynBits));
  }
  out.emplace_back(w + ".quant_state.bitsandbytes__nf4", blob_t);
  return out;
}

namespace nf4 {

// Throws unless t is a defined CPU tensor of dtype dt and exactly `shape`, naming the tensor.
inline void require_tensor(const Tensor& t, const std::string& name, DType dt, const Shape& shape,
                           const std::string& why) {
  TQ_CHECK(t.defined(), "nf4: missing tensor ", name, " (", why, ")");
  TQ_CHECK(t.dtype() == dt && t.shape() == shape, "nf4: tensor ", name, " is ", describe(t), ", expected ",
           dtype_name(dt), shape, " (", why, ")");
}

inline void require_table(const Tensor& t, const std::string& name, const uint32_t* bits, int64_t n,
                          const char* what) {
  require_tensor(t, name, DType::f32, {n}, what);
  Tensor c = t.contiguous();
  const uint32_t* v = static_cast<const uint32_t*>(c.data_ptr());
  for (int64_t i = 0; i < n; ++i)
    TQ_CHECK(v[i] == bits[i], "nf4: tensor ", name, " is not ", what, " (entry ", i, " differs)");
}

struct QuantStateBlob {
  DType dtype = DType::bf16;
  Shape shape;
  bool nested = false;
  float offset = 0;
};

inline QuantStateBlob parse_quant_state(const Tensor& blob, const std::string& name) {
  TQ_CHECK(blob.defined(), "nf4: missing tensor ", name, " (the quant-state JSON)");
  TQ_CHECK(blob.dtype() == DType::u8 && blob.dim() == 1, "nf4: tensor ", name, " is ", describe(blob),
           ", expected u8 bytes of the quant-state JSON");
  Tensor c = blob.contiguous();
  const std::string text(static_cast<const char*>(c.data_ptr()), size_t(c.numel()));
  std::map<std::string, JsonValue> kv;
  for (auto& [k, v] : FlatJsonParser(text, "nf4: tensor " + name).parse()) kv[k] = v;
  auto get = [&](const char* key, auto tag) -> decltype(tag) {
    auto it = kv.find(key);
    TQ_CHECK(it != kv.end(), "nf4: tensor ", name, ": quant-state JSON has no \"", key, "\": ", text);
    auto* p = std::get_if<decltype(tag)>(&it->second);
    TQ_CHECK(p != nullptr, "nf4: tensor ", name, ": quant-state \"", key, "\" has the wrong type: ", text);
    return *p;
  };
  QuantStateBlob qs;
  const std::string qt = get("quant_type", std::string());
  TQ_CHECK(qt == "nf4", "nf4: tensor ", name, ": quant_type is \"", qt, "\", only \"nf4\" is supported");
  TQ_CHECK(get("blocksize", 0.0) == double(kBlock), "nf4: tensor ", name, ": blocksize ", get("blocksize", 0.0),
           " is not supported (bitsandbytes' 4-bit default is 64)");
  const std::string dt = get("dtype", std::string());
  auto d = dtype_from_torch_name(dt);
  TQ_CHECK(d.has_value(), "nf4: tensor ", name, ": unsupported dtype \"", dt, "\"");
  qs.dtype = *d;
  for (int64_t s : get("shape", std::vector<int64_t>())) {
    TQ_CHECK(s > 0, "nf4: tensor ", name, ": invalid shape entry ", s, " in ", text);
    qs.shape.push_back(s);
  }
  TQ_CHECK(!qs.shape.empty(), "nf4: tensor ", name, ": empty shape in ", text);
  qs.nested = kv.count("nested_offset") || kv.count("nested_blocksize") || kv.count("nested_dtype");
  if (qs.nested) {
    TQ_CHECK(get("nested_blocksize", 0.0) == double(kNestedBlock), "nf4: tensor ", name, ": nested_blocksize ",
             get("nested_blocksize", 0.0), " is not 256");
    TQ_CHECK(get("nested_dtype", std::string()) == "float32", "nf4: tensor ", name, ": nested_dtype is not float32");
    const double off = get("nested_offset", 0.0);
    TQ_CHECK(std::isfinite(off), "nf4: tensor ", name, ": nested_offset is not finite");
    qs.offset = float(off);
  }
  static const char* known[] = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                                "nested_offset"};
  for (auto& [k, v] : kv)
    TQ_CHECK(std::find_if(std::begin(known), std::end(known), [&](const char* s) { return k == s; }) != std::end(known),
             "nf4: tensor ", name, ": unexpected quant-state key \"", k, "\"");
  return qs;
}

}  // namespace nf4

// Rebuilds an NF4Tensor from the serialized tensors under `prefix`; `lookup(name)` returns the tensor or an
// undefined Tensor when absent. Every inconsistency throws a tq::Error naming the tensor.
inline NF4Tensor nf4_from_state_dict(const std::string& prefix, const std::function<Tensor(const std::string&)>& lookup) {
  const std::string w = prefix + ".weight";
  const std::string blob_name = prefix + nf4::kQuantStateSuffix;
  const nf4::QuantStateBlob qs = nf4::parse_quant_state(lookup(blob_name), blob_name);
  NF4Tensor q;
  q.shape = qs.shape;
  q.dtype = qs.dtype;
  const int64_t n = q.numel(), nb = q.num_blocks();
  const std::string shape_why = str_cat("shape ", q.shape, " from ", blob_name);
  q.packed = lookup(w);
  nf4::require_tensor(q.packed, w, DType::u8, {(n + 1) / 2, 1}, "packed 4-bit codes for " + shape_why);
  nf4::require_table(lookup(w + ".quant_map"), w + ".quant_map", nf4::kCodeBits.data(), 16, "the NF4 code table");
  q.absmax = lookup(w + ".absmax");
  Tensor nested = lookup(w + ".nested_absmax");
  TQ_CHECK(qs.nested == nested.defined(), "nf4: ", blob_name, (qs.nested ? " has" : " has no"),
           " nested (double-quant) entries but tensor ", w, ".nested_absmax is ", (nested.defined() ? "present" : "missing"));
  if (qs.nested) {
    nf4::require_tensor(q.absmax, w + ".absmax", DType::u8, {nb}, "8-bit absmax codes for " + shape_why);
    const int64_t nb2 = (nb + nf4::kNestedBlock - 1) / nf4::kNestedBlock;
    nf4::require_tensor(nested, w + ".nested_absmax", DType::f32, {nb2}, "one per 256 absmax values for " + shape_why);
    nf4::require_table(lookup(w + ".nested_quant_map"), w + ".nested_quant_map", nf4::kDynBits.data(), 256,
                       "the dynamic 8-bit map (create_dynamic_map)");
    q.nested_absmax = nested.contiguous();
    q.offset = qs.offset;
  } else {
    nf4::require_tensor(q.absmax, w + ".absmax", DType::f32, {nb}, "float32 absmax for " + shape_why);
  }
  q.packed = q.packed.contiguous();
  q.absmax = q.absmax.contiguous();
  return q;
}

inline NF4Tensor nf4_from_state_dict(const std::string& prefix, const std::map<std::string, Tensor>& tensors) {
  return nf4_from_state_dict(prefix, [&](const std::string& k) {
    auto it = tensors.find(k);
    return it == tensors.end() ? Tensor() : it->second;
  });
}

}  // namespace tq
