// NF4 + double quant against fixtures from the numpy transcription of bnb's CUDA algorithm (IEEE reciprocal)
// and from real bitsandbytes 0.49.2 on an H200 (*.gpu.safetensors): every bit of the packed codes, absmax
// codes, nested absmax, JSON blob and dequantized weight. See tests/fixtures/nf4/README.md.
#include <tq/quant/nf4.hpp>

#include "../test_util.hpp"
#include "nf4_fixture_util.hpp"

namespace tq {
namespace {

using test::same_bits;

DType dtype_of_fixture(const test::FixtureFile& f) {
  auto d = nf4::dtype_from_torch_name(f.metadata.at("dtype"));
  TQ_CHECK(d.has_value(), "bad fixture dtype");
  return *d;
}

std::string blob_text(const Tensor& t) { return std::string(static_cast<const char*>(t.data_ptr()), size_t(t.numel())); }

const char* kSmallCases[] = {"w37x29_f32", "w64x64_f16", "w3x1000_f32bf", "w10x64_zeroblock_f32", "w4x64_ties_f32"};

TEST(Nf4Tables, ThresholdsAreTheKernelLiteralsRoundedOnce) {
  int off_by_one_ulp = 0;
  for (int k = 0; k < 15; ++k) {
    const float mid = (nf4::code(k) + nf4::code(k + 1)) * 0.5f;
    const float t = nf4::threshold(k);
    EXPECT_GT(t, nf4::code(k));
    EXPECT_LT(t, nf4::code(k + 1));
    if (t != mid) {
      ++off_by_one_ulp;
      EXPECT_TRUE(t == std::nextafter(mid, 1.0f) || t == std::nextafter(mid, -1.0f)) << k;
    }
    EXPECT_EQ(nf4::quantize_code(t), k) << "a tie goes to the lower code";
    EXPECT_EQ(nf4::quantize_code(std::nextafter(t, 2.0f)), k + 1);
  }
  EXPECT_EQ(off_by_one_ulp, 4);  // k = 0, 8, 12, 14
  EXPECT_EQ(nf4::quantize_code(NAN), 0);
  EXPECT_EQ(nf4::quantize_code(1.5f), 15);
  EXPECT_EQ(nf4::quantize_code(-1.5f), 0);
  for (int i = 0; i < 256; ++i) {
    EXPECT_EQ(nf4::quantize_dyn(nf4::dyn(i)), i);
    if (i) {
      EXPECT_LT(nf4::dyn(i - 1), nf4::dyn(i));
    }
  }
}

TEST(Nf4Json, PythonFloatRepr) {
  const std::pair<double, const char*> cases[] = {
      {0.052699316293001175, "0.052699316293001175"}, {9.999999747378752e-06, "9.999999747378752e-06"},
      {9.999999747378752e-05, "9.999999747378752e-05"}, {1.500000053056283e-07, "1.500000053056283e-07"},
      {123456.0, "123456.0"}, {1.0000000272564224e+16, "1.0000000272564224e+16"},
      {3.4028234663852886e+38, "3.4028234663852886e+38"}, {2.6248931884765625, "2.6248931884765625"},
      {0.10000000149011612, "0.10000000149011612"}, {-0.7576440572738647, "-0.7576440572738647"},
      {1.401298464324817e-45, "1.401298464324817e-45"}, {100.0, "100.0"}, {12345678.0, "12345678.0"},
      {1e-05, "1e-05"}, {0.0001, "0.0001"}, {1e16, "1e+16"}, {1234567890123456.0, "1234567890123456.0"},
      {0.0, "0.0"}, {-0.0, "-0.0"}, {1.5e300, "1.5e+300"}, {0.00012, "0.00012"}};
  for (auto& [v, s] : cases) EXPECT_EQ(nf4::python_float_repr(v), s);
}

// Quantize the fixture input; compare every serialized tensor with the file, then dequantize.
void check_case(const std::string& name, const std::string& file) {
  SCOPED_TRACE(file);
  auto f = test::read_safetensors(test::fixture_path(file));
  auto ieee = test::read_safetensors(test::fixture_path(name + ".safetensors"));
  const DType dt = dtype_of_fixture(f);
  Tensor w = ieee.tensors.at("input").to(dt);  // exact: the values are representable in dt
  const std::string blob = blob_text(f.tensors.at("layer.weight.quant_state.bitsandbytes__nf4"));
  // The GPU file's offset is torch's CUDA mean; ours is the f64 mean rounded — pass the stored one for parity.
  NF4Tensor q = nf4_quantize(w, {.double_quant = true, .offset = nf4::parse_quant_state(
      f.tensors.at("layer.weight.quant_state.bitsandbytes__nf4"), "blob").offset});
  NF4Tensor q_mean = nf4_quantize(w);
  EXPECT_EQ(q_mean.offset, q.offset) << "f64 mean differs from the stored offset";
  for (auto& [k, t] : nf4_to_state_dict("layer", q)) {
    SCOPED_TRACE(k);
    ASSERT_TRUE(f.tensors.count(k));
    EXPECT_TRUE(same_bits(t, f.tensors.at(k)));
  }
  EXPECT_EQ(nf4_quant_state_json(q), blob);
  Tensor deq = nf4_dequantize(nf4_from_state_dict("layer", f.tensors));
  EXPECT_TRUE(same_bits(deq, f.tensors.at("expected.dequant")));
}

TEST(Nf4Quantize, MatchesTranscriptionFixtures) {
  for (const char* c : kSmallCases) check_case(c, std::string(c) + ".safetensors");
}

TEST(Nf4Quantize, MatchesRealBitsandbytesOnH200) {
  for (const char* c : kSmallCases) check_case(c, std::string(c) + ".gpu.safetensors");
}

TEST(Nf4Quantize, AllZeroBlockIsCodeZero) {
  // GPU: absmax 0 → scale inf → 0·inf = NaN → every comparison false → code 0 (−1.0).
  auto f = test::read_safetensors(test::fixture_path("w10x64_zeroblock_f32.safetensors"));
  for (bool dq : {true, false}) {
    NF4Tensor q = nf4_quantize(f.tensors.at("input"), {.double_quant = dq, .offset = std::nullopt});
    const uint8_t* p = q.packed.data<uint8_t>();
    for (int j = 0; j < 32; ++j) EXPECT_EQ(p[3 * 32 + j], 0) << "block 3 byte " << j;
    const std::vector<float> am = nf4::block_absmax(q);
    Tensor deq = nf4_dequantize(q);
    const float* d = deq.data<float>();
    // Without double quant am = 0 and the block dequantizes to −0.0; with it, am is the nested-code
    // reconstruction of 0 (not exactly 0), so the block becomes −am — the same as bnb (fixture .gpu).
    for (int i = 3 * 64; i < 4 * 64; ++i) {
      EXPECT_EQ(d[i], -am[3]) << i;
      if (!dq) {
        EXPECT_TRUE(d[i] == 0.0f && std::signbit(d[i])) << i;
      }
    }
    // block 5: one value −0.25 → code 0 → exactly −absmax; the zeros around it → code 7 → +0.
    EXPECT_EQ(d[5 * 64 + 17], -am[5]);
    EXPECT_TRUE(d[5 * 64] == 0.0f && !std::signbit(d[5 * 64]));
  }
}

TEST(Nf4Quantize, OddLengthPadNibble) {
  // n odd: the last byte's low nibble is the code of a zero-padded item (7 unless the block is all zero).
  Tensor w = test::random({3, 7}, DType::f32);
  NF4Tensor q = nf4_quantize(w);
  EXPECT_EQ(q.packed.shape(), (Shape{11, 1}));
  EXPECT_EQ(q.packed.data<uint8_t>()[10] & 0xF, 7);
}

TEST(Nf4Quantize, WithoutDoubleQuantRoundTrips) {
  Tensor w = test::random({5, 77}, DType::bf16, -0.1, 0.1);
  NF4Tensor q = nf4_quantize(w, {.double_quant = false, .offset = std::nullopt});
  EXPECT_EQ(q.absmax.dtype(), DType::f32);
  EXPECT_FALSE(q.nested_absmax.defined());
  const std::string blob = nf4_quant_state_json(q);
  EXPECT_EQ(blob, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [5, 77]}");
  auto sd = nf4_to_state_dict("m", q);
  EXPECT_EQ(sd.size(), 4u);
  std::map<std::string, Tensor> m(sd.begin(), sd.end());
  NF4Tensor r = nf4_from_state_dict("m", m);
  EXPECT_TRUE(same_bits(nf4_dequantize(r), nf4_dequantize(q)));
  // Every element is NF4[q]·absmax of its block, and |w − w_deq| ≤ half the largest code gap · absmax.
  std::vector<double> wv = w.to_vector<double>(), dv = nf4_dequantize(q).to_vector<double>();
  const float* am = q.absmax.data<float>();
  for (size_t i = 0; i < wv.size(); ++i) EXPECT_LE(std::abs(wv[i] - dv[i]), 0.16 * am[i / 64] + 1e-9) << i;
}

TEST(Nf4Dequantize, SecondRoundingToBf16) {
  auto f = test::read_safetensors(test::fixture_path("w64x64_f16.gpu.safetensors"));
  NF4Tensor q = nf4_from_state_dict("layer", f.tensors);
  EXPECT_EQ(q.dtype, DType::f16);
  Tensor as_bf16 = nf4_dequantize(q, DType::bf16);
  Tensor via_f16 = f.tensors.at("expected.dequant").to(DType::bf16);  // MatMul4Bit's .to(bf16)
  EXPECT_TRUE(same_bits(as_bf16, via_f16));
}

// 1152×4304 (SigLIP fc2: blocks straddle rows, 303 nested blocks, the last one partial).
TEST(Nf4Quantize, Big1152x4304MatchesFixturesAndBitsandbytes) {
  auto f = test::read_safetensors(test::fixture_path("w1152x4304_bf16.safetensors"));
  auto g = test::read_safetensors(test::fixture_path("w1152x4304_bf16.gpu.safetensors"));
  const int64_t n = 1152 * 4304;
  Tensor w = Tensor::from_vector(test::gen_values(1, n, 0.02), {1152, 4304}).to(DType::bf16);
  ASSERT_EQ(test::fnv1a64(w), f.metadata.at("fnv1a64.input")) << "input generator differs from the script";
  NF4Tensor q = nf4_quantize(w);
  for (auto& [k, t] : nf4_to_state_dict("layer", q)) {
    SCOPED_TRACE(k);
    if (k == "layer.weight") continue;
    EXPECT_TRUE(same_bits(t, f.tensors.at(k)));
    EXPECT_TRUE(same_bits(t, g.tensors.at(k)));
  }
  EXPECT_EQ(test::fnv1a64(q.packed), f.metadata.at("fnv1a64.packed"));
  EXPECT_EQ(test::fnv1a64(q.packed), g.metadata.at("fnv1a64.packed"));
  EXPECT_EQ(g.tensors.at("diff.index").numel(), 0);
  for (int i = 0; i < 2; ++i) {
    const std::string key = "slice" + std::to_string(i) + ".packed";
    const std::string r = f.metadata.at(key);
    const int64_t a = std::stoll(r), b = std::stoll(r.substr(r.find(':') + 1));
    EXPECT_TRUE(same_bits(q.packed.reshape({-1}).slice(0, a, b), f.tensors.at(key)));
  }
  Tensor deq = nf4_dequantize(q);
  EXPECT_EQ(test::fnv1a64(deq), f.metadata.at("fnv1a64.dequant"));
  EXPECT_EQ(test::fnv1a64(deq), g.metadata.at("fnv1a64.dequant"));
  for (int i = 0; i < 3; ++i) {
    const std::string key = "slice" + std::to_string(i) + ".dequant";
    const std::string r = f.metadata.at(key);
    const int64_t a = std::stoll(r), b = std::stoll(r.substr(r.find(':') + 1));
    EXPECT_TRUE(same_bits(deq.reshape({-1}).slice(0, a, b), f.tensors.at(key)));
  }
}

// ---- corrupt / inconsistent serialized state ---------------------------------------------------------------

std::map<std::string, Tensor> good_state() {
  return test::read_safetensors(test::fixture_path("w37x29_f32.gpu.safetensors")).tensors;
}

Tensor bytes_of(const std::string& s) {
  Tensor t = Tensor::empty({int64_t(s.size())}, DType::u8);
  std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

void expect_rejected(const std::map<std::string, Tensor>& sd, const std::string& must_name, const std::string& what) {
  SCOPED_TRACE(what);
  try {
    nf4_from_state_dict("layer", sd);
    ADD_FAILURE() << "accepted: " << what;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(must_name), std::string::npos) << e.what();
  }
}

TEST(Nf4StateDict, RejectsCorruptState) {
  const std::string W = "layer.weight", B = "layer.weight.quant_state.bitsandbytes__nf4";
  const std::string blob = blob_text(good_state().at(B));
  auto with = [&](const std::string& k, Tensor t) {
    auto sd = good_state();
    if (t.defined()) sd[k] = t;
    else sd.erase(k);
    return sd;
  };
  auto with_blob = [&](const std::string& from, const std::string& to) {
    std::string b = blob;
    const size_t p = b.find(from);
    TQ_CHECK(p != std::string::npos, "test: ", from, " not in ", b);
    b.replace(p, from.size(), to);
    return with(B, bytes_of(b));
  };
  EXPECT_NO_THROW(nf4_from_state_dict("layer", good_state()));
  expect_rejected(with(W, Tensor()), W, "missing packed weight");
  expect_rejected(with(W, Tensor::zeros({536, 1}, DType::u8)), W, "packed weight one byte short");
  expect_rejected(with(W, Tensor::zeros({537}, DType::u8)), W, "packed weight 1-D");
  expect_rejected(with(W, Tensor::zeros({537, 1}, DType::f32)), W, "packed weight not u8");
  expect_rejected(with(W + ".absmax", Tensor::zeros({16}, DType::u8)), W + ".absmax", "absmax too short");
  expect_rejected(with(W + ".absmax", Tensor::zeros({17}, DType::f32)), W + ".absmax", "f32 absmax with double quant");
  expect_rejected(with(W + ".nested_absmax", Tensor::zeros({2}, DType::f32)), W + ".nested_absmax", "nested size");
  expect_rejected(with(W + ".nested_absmax", Tensor()), W + ".nested_absmax", "nested missing");
  Tensor qm = good_state().at(W + ".quant_map").clone();
  qm.data<float>()[3] = 0.5f;
  expect_rejected(with(W + ".quant_map", qm), W + ".quant_map", "quant_map not NF4");
  expect_rejected(with(W + ".quant_map", Tensor::zeros({15})), W + ".quant_map", "quant_map size");
  expect_rejected(with(W + ".quant_map", Tensor()), W + ".quant_map", "quant_map missing");
  expect_rejected(with(W + ".nested_quant_map", Tensor::zeros({256})), W + ".nested_quant_map", "nested map");
  expect_rejected(with(B, Tensor()), B, "blob missing");
  expect_rejected(with(B, bytes_of(blob.substr(0, blob.size() - 1))), B, "truncated JSON");
  expect_rejected(with(B, bytes_of("not json")), B, "not JSON");
  expect_rejected(with(B, Tensor::zeros({4}, DType::f32)), B, "blob not u8");
  expect_rejected(with_blob("\"nf4\"", "\"fp4\""), B, "quant_type fp4");
  expect_rejected(with_blob("\"blocksize\": 64", "\"blocksize\": 128"), B, "blocksize 128");
  expect_rejected(with_blob("\"float32\", \"shape\"", "\"int8\", \"shape\""), B, "dtype int8");
  expect_rejected(with_blob("[37, 29]", "[37, 30]"), W, "shape inconsistent with packed size");
  expect_rejected(with_blob("[37, 29]", "[37, -29]"), B, "negative shape");
  expect_rejected(with_blob("[37, 29]", "\"37x29\""), B, "shape not a list");
  expect_rejected(with_blob("\"nested_blocksize\": 256", "\"nested_blocksize\": 128"), B, "nested blocksize");
  expect_rejected(with_blob("\"nested_dtype\": \"float32\"", "\"nested_dtype\": \"float16\""), B, "nested dtype");
  expect_rejected(with_blob("\"nested_offset\": 2.6248931884765625", "\"nested_offset\": \"x\""), B, "offset string");
  expect_rejected(with_blob("\"quant_type\"", "\"bogus\": 1, \"quant_type\""), B, "unknown key");
  expect_rejected(with_blob(", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": "
                            "2.6248931884765625", ""), W + ".nested_absmax", "blob without nested keys");
}

}  // namespace
}  // namespace tq
