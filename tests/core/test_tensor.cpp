#include "../test_util.hpp"

using namespace tq;
using tq::test::random;

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(bf16(1.0f + 1.0f / 256).bits, bf16(1.0f).bits);
  // 1 + 3·2^-8 is between 1 + 2^-7 (odd) and 1 + 2^-6 (even): ties to 1 + 2^-6.
  EXPECT_EQ(float(bf16(1.0f + 3.0f / 256)), 1.0f + 1.0f / 64);
  EXPECT_EQ(float(bf16(1.0f + 1.0f / 256 + 1e-6f)), 1.0f + 1.0f / 128);  // just above the tie rounds up
  EXPECT_TRUE(std::isnan(float(bf16(NAN))));
  EXPECT_EQ(float(bf16(-3.5f)), -3.5f);
}

TEST(DType, F16MatchesIeeeHalf) {
  EXPECT_EQ(f16(1.0f).bits, 0x3c00);
  EXPECT_EQ(f16(-2.0f).bits, 0xc000);
  EXPECT_EQ(f16(65504.0f).bits, 0x7bff);
  EXPECT_EQ(f16(65520.0f).bits, 0x7c00);        // rounds to inf
  EXPECT_EQ(f16(5.960464477539063e-08f).bits, 0x0001);  // smallest subnormal
  EXPECT_EQ(f16(1.0f + 1.0f / 2048).bits, 0x3c00);      // tie to even
  EXPECT_EQ(f16(1.0f + 3.0f / 2048).bits, 0x3c02);
  for (uint32_t h = 0; h < 0x7c00; ++h) EXPECT_EQ(f16(f16::to_float(uint16_t(h))).bits, h) << h;  // round trip
}

TEST(Tensor, FactoriesAndHostAccess) {
  Tensor z = Tensor::zeros({2, 3});
  EXPECT_EQ(z.numel(), 6);
  EXPECT_EQ(z.to_vector<double>(), std::vector<double>(6, 0.0));
  Tensor f = Tensor::full({2}, 2.5, DType::bf16);
  EXPECT_EQ(f.to_vector<double>(), (std::vector<double>{2.5, 2.5}));
  Tensor a = Tensor::arange(5);
  EXPECT_EQ(a.dtype(), DType::i64);
  EXPECT_EQ(a.to_vector<int64_t>(), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_THROW(Tensor::from_vector<float>({1, 2, 3}, {2, 2}), Error);
}

TEST(Tensor, ViewsShareStorageAndNeverCopy) {
  Tensor t = Tensor::arange(24, DType::f64).reshape({2, 3, 4});
  Tensor tr = t.transpose(0, 2);  // (4, 3, 2)
  EXPECT_EQ(tr.storage().get(), t.storage().get());
  EXPECT_EQ(tr.shape(), (Shape{4, 3, 2}));
  EXPECT_FALSE(tr.is_contiguous());
  // tr[i][j][k] = t[k][j][i] = 12k + 4j + i
  auto v = tr.contiguous().to_vector<double>();
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k) EXPECT_EQ(v[size_t(i * 6 + j * 2 + k)], 12 * k + 4 * j + i);

  Tensor s = t.slice(2, 1, 4, 2);  // elements 1 and 3 of the last dim
  EXPECT_EQ(s.shape(), (Shape{2, 3, 2}));
  EXPECT_EQ(s.contiguous().to_vector<double>()[0], 1);
  EXPECT_EQ(s.contiguous().to_vector<double>()[1], 3);
  EXPECT_EQ(t.select(1, -1).contiguous().to_vector<double>(), (std::vector<double>{8, 9, 10, 11, 20, 21, 22, 23}));
  EXPECT_EQ(t.narrow(0, 1, 1).shape(), (Shape{1, 3, 4}));
  EXPECT_EQ(t.permute({2, 0, 1}).shape(), (Shape{4, 2, 3}));
  EXPECT_EQ(t.unsqueeze(1).shape(), (Shape{2, 1, 3, 4}));
  EXPECT_EQ(t.unsqueeze(-1).shape(), (Shape{2, 3, 4, 1}));
  EXPECT_EQ(t.unsqueeze(1).squeeze(1).shape(), t.shape());
  Tensor e = Tensor::arange(3, DType::f32).reshape({3, 1}).expand({3, 4});
  EXPECT_EQ(e.strides()[1], 0);
  EXPECT_EQ(e.contiguous().to_vector<double>(), (std::vector<double>{0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2}));
  // A view of a transposed tensor that merges dims must copy through reshape, not view.
  EXPECT_THROW(tr.view({24}), Error);
  EXPECT_EQ(tr.reshape({24}).to_vector<double>(), tr.contiguous().to_vector<double>());
  // Splitting a dim of a non-contiguous tensor is a valid view.
  Tensor sp = t.transpose(0, 1).view({3, 2, 2, 2});
  EXPECT_EQ(sp.storage().get(), t.storage().get());
  EXPECT_EQ(sp.contiguous().to_vector<double>(), t.transpose(0, 1).contiguous().to_vector<double>());
  EXPECT_EQ(t.view({-1, 4}).shape(), (Shape{6, 4}));
  EXPECT_EQ(t.flatten(1).shape(), (Shape{2, 12}));
}

TEST(Tensor, WritesThroughViews) {
  Tensor t = Tensor::zeros({3, 3}, DType::f32);
  t.select(1, 1).fill_(7);
  t.slice(0, 2, 3).copy_(Tensor::from_vector<float>({1, 2, 3}, {3}));
  EXPECT_EQ(t.to_vector<double>(), (std::vector<double>{0, 7, 0, 0, 7, 0, 1, 2, 3}));
}

TEST(Tensor, DtypeConversionRoundsOnce) {
  Tensor x = random({17, 5}, DType::f64, -100, 100);
  auto v = x.to_vector<double>();
  auto b = x.to(DType::bf16).to_vector<double>();
  auto h = x.to(DType::f16).to_vector<double>();
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_EQ(b[i], double(float(bf16(float(v[i])))));
    EXPECT_EQ(h[i], double(float(f16(float(v[i])))));
  }
  EXPECT_EQ(Tensor::from_vector<double>({-2.7, 3.9}, {2}).to(DType::i64).to_vector<int64_t>(),
            (std::vector<int64_t>{-2, 3}));  // truncation toward zero, as C++ and torch do
}

TEST(Tensor, PrintsReadably) {
  Tensor t = Tensor::from_vector<float>({1, 2, 3, 4}, {2, 2});
  EXPECT_EQ(t.to_string(), "tensor([[1.00000, 2.00000],\n        [3.00000, 4.00000]], dtype=f32, shape=[2, 2])");
  Tensor big = Tensor::arange(100);
  EXPECT_NE(big.to_string().find("..."), std::string::npos);
}

TEST(Tensor, MisuseThrowsWithContext) {
  Tensor a = Tensor::zeros({2, 3});
  try {
    a.select(1, 5);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out of range"), std::string::npos) << e.what();
  }
  EXPECT_THROW(a.transpose(0, 2), Error);
  EXPECT_THROW(a.view({4, 2}), Error);
  EXPECT_THROW(a.expand({3, 3}), Error);
  EXPECT_THROW(a.data<double>(), Error);
  EXPECT_THROW(Tensor().shape(), Error);
  try {
    a.to(Device::cuda());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos) << e.what();
  }
}

TEST(Rng, PhiloxKnownAnswer) {
  // Random123's published known-answer test for philox4x32_10: counter = key = 0.
  uint32_t c[4] = {0, 0, 0, 0};
  Philox::block(c, 0, 0);
  EXPECT_EQ(c[0], 0x6627e8d5u);
  EXPECT_EQ(c[1], 0xe169c58du);
  EXPECT_EQ(c[2], 0xbc57ac4cu);
  EXPECT_EQ(c[3], 0x9b00dbd8u);
  // counter = key = all ones.
  uint32_t d[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};
  Philox::block(d, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(d[0], 0x408f276du);
  EXPECT_EQ(d[1], 0x41c83b0eu);
  EXPECT_EQ(d[2], 0xa20bc7c6u);
  EXPECT_EQ(d[3], 0x6d5451fdu);
}

TEST(Rng, DeterministicAndWellDistributed) {
  Tensor a = random_tensor(Distribution::normal, {100000}, 42, 7, 0, 1, DType::f64);
  Tensor b = random_tensor(Distribution::normal, {100000}, 42, 7, 0, 1, DType::f64);
  EXPECT_EQ(a.to_vector<double>(), b.to_vector<double>());
  Tensor c = random_tensor(Distribution::normal, {100000}, 42, 8, 0, 1, DType::f64);
  EXPECT_NE(a.to_vector<double>(), c.to_vector<double>());
  auto v = a.to_vector<double>();
  double m = 0, s = 0;
  for (double x : v) m += x;
  m /= double(v.size());
  for (double x : v) s += (x - m) * (x - m);
  s = std::sqrt(s / double(v.size()));
  EXPECT_NEAR(m, 0.0, 0.02);
  EXPECT_NEAR(s, 1.0, 0.02);
  auto u = random_tensor(Distribution::uniform, {100000}, 1, 0, 0, 1, DType::f64).to_vector<double>();
  double mu = 0;
  for (double x : u) {
    ASSERT_GE(x, 0.0);
    ASSERT_LT(x, 1.0);
    mu += x;
  }
  EXPECT_NEAR(mu / double(u.size()), 0.5, 0.01);
  auto bern = random_tensor(Distribution::bernoulli, {100000}, 3, 0, 0.3, 0, DType::f64).to_vector<double>();
  double ones = 0;
  for (double x : bern) ones += x;
  EXPECT_NEAR(ones / double(bern.size()), 0.3, 0.01);
}

TEST(ThreadPool, CoversEveryIndexOnce) {
  std::vector<std::atomic<int>> hits(100003);
  for (int rep = 0; rep < 20; ++rep) {
    parallel_for(int64_t(hits.size()), 7, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) hits[size_t(i)]++;
    });
  }
  for (auto& h : hits) ASSERT_EQ(h.load(), 20);
}
