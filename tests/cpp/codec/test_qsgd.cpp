// Unit tests for include/gradiveq/qsgd.h
#include "gradiveq/qsgd.h"

#include <cmath>

#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;

TEST(Qsgd, FourBitMeansSevenLevelsAndOneSignBit) {
  QsgdCodec codec;  // defaults: 7 levels, bucket 512, max norm
  EXPECT_EQ(codec.bits_per_value(), 4);
  EXPECT_EQ(QsgdCodec({/*levels=*/1}).bits_per_value(), 2);
  EXPECT_EQ(QsgdCodec({/*levels=*/3}).bits_per_value(), 3);
  EXPECT_EQ(QsgdCodec({/*levels=*/16}).bits_per_value(), 6);
}

TEST(Qsgd, PackedSizeMatchesTheFormula) {
  for (int64_t levels : {1, 3, 7, 16, 255}) {
    for (int64_t bucket : {1, 7, 128, 512}) {
      QsgdCodec codec({levels, bucket});
      for (int64_t n : {1, 5, 511, 512, 513, 4097}) {
        const int64_t expected = 4 * ((n + bucket - 1) / bucket) + (n * codec.bits_per_value() + 7) / 8;
        ASSERT_EQ(codec.packed_bytes(n), expected);
        ASSERT_EQ(codec.encode(at::randn({n}), 1).numel(), expected)
            << "levels=" << levels << " bucket=" << bucket << " n=" << n;
      }
    }
  }
  // 4-bit, bucket 512: 32 * 512 / (4 * 512 + 32) = 7.88x smaller than float32.
  EXPECT_EQ(QsgdCodec().packed_bytes(512), 4 + 256);
}

TEST(Qsgd, GridValuesRoundTripExactly) {
  // Values already on the quantisation grid (multiples of scale / s) have no rounding choice.
  QsgdCodec codec({/*levels=*/4, /*bucket_size=*/8});
  at::Tensor v = at::tensor({1.0f, -0.75f, 0.5f, -0.25f, 0.0f, 0.25f, -1.0f, 0.75f});
  for (uint64_t seed : {0, 1, 2}) EXPECT_TRUE(at::equal(codec.decode(codec.encode(v, seed), 8), v));
}

TEST(Qsgd, SameSeedSameBytesOtherSeedOtherBytes) {
  QsgdCodec codec;
  at::Tensor v = at::randn({3000});
  EXPECT_TRUE(at::equal(codec.encode(v, 42), codec.encode(v, 42)));
  EXPECT_FALSE(at::equal(codec.encode(v, 42), codec.encode(v, 43)));
}

class QsgdUnbiased : public ::testing::TestWithParam<QsgdNorm> {};

TEST_P(QsgdUnbiased, MeanOverSeedsConvergesAndVarianceIsWithinTheBound) {
  const int64_t n = 1000, bucket = 250, draws = 2000, s = 7;
  QsgdCodec codec({s, bucket, GetParam()});
  at::Tensor v = at::randn({n}, at::detail::createCPUGenerator(3)).to(at::kDouble);
  at::Tensor vf = v.to(at::kFloat);
  at::Tensor sum = at::zeros({n}, at::kDouble), sq_err = at::zeros({n / bucket}, at::kDouble);
  for (int64_t t = 0; t < draws; ++t) {
    at::Tensor q = codec.decode(codec.encode(vf, 1000 + t), n).to(at::kDouble);
    sum += q;
    sq_err += (q - vf.to(at::kDouble)).pow(2).view({n / bucket, bucket}).sum(1);
  }
  at::Tensor mean = sum / double(draws);
  // Per element, the draw is within one level (scale / s) of the value, so the standard error of the mean is
  // at most scale / s / sqrt(draws); allow 5 of those.
  const double scale_bound = GetParam() == QsgdNorm::kMax ? v.abs().max().item<double>() : v.norm().item<double>();
  const double tol = 5.0 * scale_bound / double(s) / std::sqrt(double(draws));
  EXPECT_LT((mean - vf.to(at::kDouble)).abs().max().item<double>(), tol);
  // QSGD Lemma 3.1: E||Q(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2, per bucket (L2 scaling; max scaling
  // has a smaller scale and so a smaller variance).
  at::Tensor bucket_norm_sq = vf.to(at::kDouble).view({n / bucket, bucket}).pow(2).sum(1);
  const double factor = std::min(double(bucket) / double(s * s), std::sqrt(double(bucket)) / double(s));
  at::Tensor variance = sq_err / double(draws);
  EXPECT_TRUE((variance <= factor * bucket_norm_sq).all().item<bool>())
      << "variance " << variance << " bound " << factor * bucket_norm_sq;
}

INSTANTIATE_TEST_SUITE_P(Norms, QsgdUnbiased, ::testing::Values(QsgdNorm::kMax, QsgdNorm::kL2),
                         [](const ::testing::TestParamInfo<QsgdNorm>& info) {
                           return std::string(info.param == QsgdNorm::kMax ? "MaxNorm" : "L2Norm");
                         });

TEST(Qsgd, DecodeAddAccumulates) {
  QsgdCodec codec;
  at::Tensor a = at::randn({700}), b = at::randn({700});
  at::Tensor pa = codec.encode(a, 1), pb = codec.encode(b, 2);
  at::Tensor acc = at::zeros({700});
  codec.decode_add(pa, acc);
  codec.decode_add(pb, acc);
  EXPECT_TRUE(at::allclose(acc, codec.decode(pa, 700) + codec.decode(pb, 700)));
}

TEST(Qsgd, NonFiniteBucketsDecodeNonFinite) {
  QsgdCodec codec({7, 4});
  at::Tensor v = at::tensor({1.0f, 2.0f, INFINITY, 0.5f, 1.0f, -1.0f, 0.25f, 0.0f});
  at::Tensor out = codec.decode(codec.encode(v, 0), 8);
  EXPECT_FALSE(at::isfinite(out.narrow(0, 0, 4)).any().item<bool>());
  EXPECT_TRUE(at::isfinite(out.narrow(0, 4, 4)).all().item<bool>());
}

TEST(Qsgd, ZeroBucketStaysZero) {
  QsgdCodec codec;
  at::Tensor z = at::zeros({600});
  EXPECT_TRUE(at::equal(codec.decode(codec.encode(z, 9), 600), z));
}

TEST(Qsgd, RejectsBadInput) {
  expect_invalid([] { QsgdCodec({0}); }, {"levels", "got 0"});
  expect_invalid([] { QsgdCodec({7, 0}); }, {"bucket_size", "got 0"});
  expect_invalid([] { parse_qsgd_norm("l1"); }, {"norm", "'l1'"});
  QsgdCodec codec;
  expect_invalid([&] { codec.encode(at::randn({4, 4}), 0); }, {"values", "1-D"});
  expect_invalid([&] { codec.encode(at::randn({16}).to(at::kDouble), 0); }, {"values", "float32"});
  at::Tensor packed = codec.encode(at::randn({100}), 0);
  expect_invalid([&] { codec.decode(packed, 101); }, {"packed", "expected"});
  expect_invalid([&] { codec.decode(packed.narrow(0, 0, 10), 100); }, {"packed", "has 10 bytes"});
  expect_invalid([&] { codec.decode(packed.to(at::kInt), 100); }, {"packed", "uint8"});
}

}  // namespace
}  // namespace gradiveq
