// Unit tests for include/gradiveq/casq.h
#include <cmath>
#include <cstring>

#include "gradiveq/casq.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;

// Bucket b's codebook, read from the packed layout: [codebooks of B float32][indices].
std::vector<float> codebook(const at::Tensor& packed, int64_t levels, int64_t b) {
  std::vector<float> out(static_cast<size_t>(levels));
  std::memcpy(out.data(), packed.data_ptr<uint8_t>() + 4 * levels * b, size_t(4 * levels));
  return out;
}

// 90% of the mass in a narrow mode at -1, 10% in a wider one at +3.
at::Tensor skewed_bimodal(int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor major = at::randn({n}, gen) * 0.1 - 1.0, minor = at::randn({n}, gen) * 0.3 + 3.0;
  return at::where(at::rand({n}, gen) < 0.9, major, minor);
}

// The baseline: per bucket, B evenly spaced levels on [min, max] and unbiased stochastic rounding between the
// two around each value (written here independently of the codec).
at::Tensor uniform_stochastic(const at::Tensor& v, int64_t levels, int64_t bucket, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor out = at::empty_like(v), u = at::rand({v.numel()}, gen).to(at::kDouble);
  const float* x = v.data_ptr<float>();
  const double* r = u.data_ptr<double>();
  float* y = out.data_ptr<float>();
  for (int64_t begin = 0; begin < v.numel(); begin += bucket) {
    const int64_t end = std::min(v.numel(), begin + bucket);
    const double lo = *std::min_element(x + begin, x + end), hi = *std::max_element(x + begin, x + end);
    const double step = (hi - lo) / double(levels - 1);
    for (int64_t i = begin; i < end; ++i) {
      if (step == 0.0) {
        y[i] = float(lo);
        continue;
      }
      const double position = (double(x[i]) - lo) / step;
      const double level = std::min(std::floor(position), double(levels - 2));
      y[i] = float(lo + step * (r[i] < position - level ? level + 1 : level));
    }
  }
  return out;
}

double mse(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).pow(2).mean().item<double>();
}

TEST(Casq, PackedSizeMatchesTheFormula) {
  for (int64_t bits : {2, 3}) {
    for (int64_t bucket : {1, 7, 128, 512}) {
      CasqCodec codec({bits, /*clusters=*/2, bucket});
      const int64_t levels = int64_t(1) << bits;
      for (int64_t n : {1, 5, 511, 512, 513, 4097}) {
        const int64_t expected = 4 * levels * ((n + bucket - 1) / bucket) + (n * bits + 7) / 8;
        ASSERT_EQ(codec.packed_bytes(n), expected);
        ASSERT_EQ(codec.encode(at::randn({n}), 1).numel(), expected)
            << "bits=" << bits << " bucket=" << bucket << " n=" << n;
      }
    }
  }
  // bits + 32 B / bucket: 2 + 128 / 512 and 3 + 256 / 512.
  EXPECT_DOUBLE_EQ(CasqCodec().bits_per_element(512 * 100), 2.25);
  EXPECT_DOUBLE_EQ(CasqCodec({3}).bits_per_element(512 * 100), 3.5);
  EXPECT_EQ(CasqCodec().levels(), 4);
  EXPECT_EQ(CasqCodec({3}).levels(), 8);
}

TEST(Casq, SameSeedSameBytesOtherSeedOtherRounding) {
  CasqCodec codec;
  at::Tensor v = at::randn({3000});
  at::Tensor a = codec.encode(v, 42), b = codec.encode(v, 43);
  EXPECT_TRUE(at::equal(codec.encode(v, 42), a));
  EXPECT_FALSE(at::equal(a, b));
  // The codebooks depend on the values only: the seed moves the rounding, not the levels.
  const int64_t codebook_bytes = 4 * 4 * 6;
  EXPECT_TRUE(at::equal(a.narrow(0, 0, codebook_bytes), b.narrow(0, 0, codebook_bytes)));
}

class CasqUnbiased : public ::testing::TestWithParam<int64_t> {};

TEST_P(CasqUnbiased, MeanOverSeedsEqualsTheInput) {
  const int64_t n = 1000, bucket = 250, draws = 1500, bits = GetParam(), levels = int64_t(1) << bits;
  CasqCodec codec({bits, /*clusters=*/4, bucket});
  for (at::Tensor v : {at::randn({n}, at::detail::createCPUGenerator(3)), skewed_bimodal(n, 4)}) {
    at::Tensor sum = at::zeros({n}, at::kDouble);
    for (int64_t t = 0; t < draws; ++t) sum += codec.decode(codec.encode(v, 1000 + t), n).to(at::kDouble);
    at::Tensor error = sum / double(draws) - v.to(at::kDouble);
    // A draw is one of the two levels around the value, so its standard deviation is at most half the widest
    // gap of the bucket's codebook; allow 5 standard errors per element, and 5 for the bucket's mean error,
    // which catches a small bias that every element shares.
    at::Tensor packed = codec.encode(v, 0);
    for (int64_t b = 0; b < n / bucket; ++b) {
      const auto book = codebook(packed, levels, b);
      float gap = 0.0f;
      for (size_t l = 1; l < book.size(); ++l) gap = std::max(gap, book[l] - book[l - 1]);
      const double sd = 0.5 * double(gap);
      at::Tensor e = error.narrow(0, b * bucket, bucket);
      EXPECT_LT(e.abs().max().item<double>(), 5.0 * sd / std::sqrt(double(draws))) << "bucket " << b;
      EXPECT_LT(std::fabs(e.mean().item<double>()), 5.0 * sd / std::sqrt(double(draws * bucket)))
          << "bucket " << b;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Bits, CasqUnbiased, ::testing::Values(2, 3),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return std::to_string(info.param) + "Bits";
                         });

TEST(Casq, CodebooksAreSortedAndSpanTheBucketAndDrawsBracketTheValue) {
  for (int64_t bits : {2, 3}) {
    for (int64_t clusters : {1, 2, 3, 4}) {
      CasqCodec codec({bits, clusters, /*bucket_size=*/100});
      const int64_t levels = codec.levels(), n = 1050;  // a partial last bucket of 50
      at::Tensor v = at::cat({skewed_bimodal(525, 7), at::randn({525}) * 0.01});
      at::Tensor packed = codec.encode(v, 5);
      at::Tensor q = codec.decode(packed, n);
      for (int64_t b = 0; b < 11; ++b) {
        const auto book = codebook(packed, levels, b);
        at::Tensor x = v.narrow(0, b * 100, std::min<int64_t>(100, n - b * 100));
        ASSERT_TRUE(std::is_sorted(book.begin(), book.end()));
        ASSERT_EQ(book.front(), x.min().item<float>());
        ASSERT_EQ(book.back(), x.max().item<float>());
      }
      for (int64_t i = 0; i < n; ++i) {
        const auto book = codebook(packed, levels, i / 100);
        const float xi = v[i].item<float>(), qi = q[i].item<float>();
        ASSERT_NE(std::find(book.begin(), book.end(), qi), book.end());
        // No level lies strictly between the value and its draw: the draw is an adjacent level.
        for (float l : book) ASSERT_FALSE(std::min(xi, qi) < l && l < std::max(xi, qi)) << "i " << i;
      }
    }
  }
}

TEST(Casq, OneClusterIsTheUniformGrid) {
  CasqCodec codec({/*bits=*/3, /*clusters=*/1, /*bucket_size=*/64});
  at::Tensor v = at::randn({64});
  const auto book = codebook(codec.encode(v, 0), 8, 0);
  const double lo = v.min().item<float>(), hi = v.max().item<float>();
  for (int l = 0; l < 8; ++l) EXPECT_EQ(book[size_t(l)], float(lo + (hi - lo) * l / 7.0)) << "level " << l;
}

TEST(Casq, NeymanAllocationFollowsClusterSizeTimesSpread) {
  // A wide cluster (n sigma = 256) and a tight one (2.56): at 3 bits the wide one takes 7 of the 8 levels,
  // and the tight one, being the highest, keeps one level at its max.
  at::Generator gen = at::detail::createCPUGenerator(21);
  at::Tensor wide = at::randn({256}, gen), tight = at::randn({256}, gen) * 0.01 + 20.0;
  at::Tensor v = at::cat({wide, tight}).index_select(0, at::randperm(512, gen));
  const auto book = codebook(CasqCodec({3, /*clusters=*/2}).encode(v, 0), 8, 0);
  const double lo = wide.min().item<float>(), hi = wide.max().item<float>();
  for (int l = 0; l < 7; ++l) EXPECT_EQ(book[size_t(l)], float(lo + (hi - lo) * l / 6.0)) << "level " << l;
  EXPECT_EQ(book[7], tight.max().item<float>());

  // Three clusters at 2 bits: the widest (the lowest) gets the spare level; the tight middle one has a single
  // level at its mean, and the highest a single level at its max.
  at::Tensor a = at::randn({200}, gen) * 1.5 - 10.0, m = at::randn({112}, gen) * 0.01;
  at::Tensor c = at::randn({200}, gen) + 10.0;
  const auto book3 = codebook(CasqCodec({2, /*clusters=*/3}).encode(at::cat({c, a, m}), 0), 4, 0);
  EXPECT_EQ(book3[0], a.min().item<float>());
  EXPECT_EQ(book3[1], a.max().item<float>());
  EXPECT_FLOAT_EQ(book3[2], float(m.to(at::kDouble).mean().item<double>()));
  EXPECT_EQ(book3[3], c.max().item<float>());
}

TEST(Casq, BeatsUniformStochasticRoundingOnASkewedBimodalDistribution) {
  // Same bits of indices (2), same bucket; CASQ's codebook costs 4 floats per bucket against the uniform
  // grid's 2 (2.25 vs 2.125 bits per element).
  const int64_t n = 512 * 64;
  at::Tensor v = skewed_bimodal(n, 11);
  CasqCodec codec({/*bits=*/2, /*clusters=*/4, /*bucket_size=*/512});
  double casq = 0.0, uniform = 0.0;
  for (uint64_t seed = 0; seed < 4; ++seed) {
    casq += mse(codec.decode(codec.encode(v, seed), n), v);
    uniform += mse(uniform_stochastic(v, 4, 512, seed), v);
  }
  EXPECT_LT(casq, 0.8 * uniform) << "CASQ " << casq / 4 << " uniform " << uniform / 4;
  // The in-test baseline is what CASQ with one cluster does (same MSE up to the draws).
  double one = 0.0;
  for (uint64_t seed = 0; seed < 4; ++seed)
    one += mse(CasqCodec({2, 1}).decode(CasqCodec({2, 1}).encode(v, seed), n), v);
  EXPECT_NEAR(one, uniform, 0.05 * uniform);
  // More bits, less error.
  EXPECT_LT(mse(CasqCodec({3}).decode(CasqCodec({3}).encode(v, 0), n), v), 0.5 * casq / 4);
}

TEST(Casq, FewDistinctValuesRoundTripExactly) {
  CasqCodec codec;
  at::Tensor z = at::zeros({600});
  EXPECT_TRUE(at::equal(codec.decode(codec.encode(z, 9), 600), z));
  at::Tensor two = at::where(at::rand({1000}) < 0.3, -1.0f, 2.5f).to(at::kFloat);
  for (uint64_t seed : {0, 1, 2}) EXPECT_TRUE(at::equal(codec.decode(codec.encode(two, seed), 1000), two));
  at::Tensor one = at::tensor({3.25f});
  EXPECT_TRUE(at::equal(codec.decode(codec.encode(one, 0), 1), one));
}

TEST(Casq, NonFiniteBucketsDecodeNonFinite) {
  CasqCodec codec({2, 4, /*bucket_size=*/4});
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    at::Tensor v = at::tensor({1.0f, 2.0f, bad, 0.5f, 1.0f, -1.0f, 0.25f, 0.0f});
    at::Tensor out = codec.decode(codec.encode(v, 0), 8);
    EXPECT_FALSE(at::isfinite(out.narrow(0, 0, 4)).any().item<bool>());
    EXPECT_TRUE(at::isfinite(out.narrow(0, 4, 4)).all().item<bool>());
  }
}

TEST(Casq, DecodeAddAccumulates) {
  CasqCodec codec({3});
  at::Tensor a = at::randn({700}), b = at::randn({700});
  at::Tensor pa = codec.encode(a, 1), pb = codec.encode(b, 2);
  at::Tensor acc = at::zeros({700});
  codec.decode_add(pa, acc);
  codec.decode_add(pb, acc);
  EXPECT_TRUE(at::allclose(acc, codec.decode(pa, 700) + codec.decode(pb, 700)));
}

TEST(Casq, RejectsBadInput) {
  expect_invalid([] { CasqCodec({/*bits=*/1}); }, {"bits", "2 or 3", "got 1"});
  expect_invalid([] { CasqCodec({/*bits=*/4}); }, {"bits", "got 4"});
  expect_invalid([] { CasqCodec({2, /*clusters=*/0}); }, {"clusters", "got 0"});
  expect_invalid([] { CasqCodec({2, /*clusters=*/5}); }, {"clusters", "[1, 4]", "got 5"});
  CasqCodec({3, /*clusters=*/8});  // 8 clusters fit 8 levels
  expect_invalid([] { CasqCodec({2, 4, /*bucket_size=*/0}); }, {"bucket_size", "got 0"});
  expect_invalid([] { CasqCodec({2, 4, 512, /*kmeans_iterations=*/-1}); }, {"kmeans_iterations", "got -1"});
  CasqCodec codec;
  expect_invalid([&] { codec.encode(at::randn({4, 4}), 0); }, {"values", "1-D"});
  expect_invalid([&] { codec.encode(at::randn({16}).to(at::kDouble), 0); }, {"values", "float32"});
  at::Tensor packed = codec.encode(at::randn({100}), 0);
  expect_invalid([&] { codec.decode(packed, 101); }, {"packed", "expected"});
  expect_invalid([&] { codec.decode(packed.narrow(0, 0, 10), 100); }, {"packed", "has 10 bytes"});
  expect_invalid([&] { codec.decode(packed.to(at::kInt), 100); }, {"packed", "uint8"});
  expect_invalid([&] { codec.decode(packed, -1); }, {"numel", "got -1"});
}

}  // namespace
}  // namespace gradiveq
