// Unit tests for include/gradiveq/co3.h
#include <cmath>
#include <cstring>

#include "gradiveq/co3.h"
#include "gradiveq/huffman.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;
using testing::rel_error;

const Co3Codec& fp4() {
  static const Co3Codec codec({Co3Format::kFp4});
  return codec;
}
const Co3Codec& fp8() {
  static const Co3Codec codec({Co3Format::kFp8});
  return codec;
}

at::Tensor laplace(int64_t n, double scale, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor magnitude = at::empty({n}, at::kDouble).exponential_(1.0, gen) * scale;
  at::Tensor sign = at::where(at::rand({n}, gen) < 0.5, -1.0, 1.0).to(at::kDouble);
  return (magnitude * sign).to(at::kFloat);
}

// Samples of the generalized normal with shape beta, scale sigma: |x| = sigma G^(1/beta), G ~ Gamma(1/beta).
at::Tensor generalized_normal(int64_t n, double beta, double sigma, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor g = at::_standard_gamma(at::full({n}, 1.0 / beta, at::kDouble), gen);
  at::Tensor sign = at::where(at::rand({n}, gen) < 0.5, -1.0, 1.0).to(at::kDouble);
  return (g.pow(1.0 / beta) * sigma * sign).to(at::kFloat);
}

// Nearest grid value by brute force; ties go to the lower value.
float brute_force_round(const std::vector<float>& grid, double x) {
  float best = grid[0];
  double best_distance = std::fabs(x - double(grid[0]));
  for (float g : grid) {
    const double d = std::fabs(x - double(g));
    if (d < best_distance) {  // strict: on a tie the earlier (lower) value stays
      best = g;
      best_distance = d;
    }
  }
  return best;
}

TEST(Co3, GridsHaveTheStatedValues) {
  const std::vector<float> expected = {-3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3};
  EXPECT_EQ(fp4().grid(), expected);
  const auto& g8 = fp8().grid();
  ASSERT_EQ(g8.size(), 247u);
  EXPECT_EQ(g8.back(), 57344.0f);  // 1.75 * 2^15
  EXPECT_EQ(g8[123], 0.0f);
  EXPECT_EQ(g8[124], std::ldexp(1.0f, -16));  // smallest subnormal: 0.25 * 2^-14
  EXPECT_EQ(g8[127], std::ldexp(1.0f, -14));  // smallest normal
  for (size_t i = 0; i < g8.size(); ++i) {
    ASSERT_EQ(g8[i], -g8[g8.size() - 1 - i]);
    if (i > 0) ASSERT_LT(g8[i - 1], g8[i]);
  }
  EXPECT_EQ(fp4().header_bytes(), 4 + 6);
  EXPECT_EQ(fp8().header_bytes(), 4 + 124);
}

TEST(Co3, EveryGridValueMapsToItself) {
  for (const Co3Codec* codec : {&fp4(), &fp8()}) {
    const auto& grid = codec->grid();
    at::Tensor g = at::from_blob(const_cast<float*>(grid.data()), {int64_t(grid.size())}, at::kFloat).clone();
    EXPECT_TRUE(at::equal(codec->round_to_grid(g), g));
    // Through the whole codec with alpha = 1: grid values travel exactly.
    EXPECT_TRUE(at::equal(codec->decode(codec->encode_with_scale(g, 1.0f), g.numel()), g));
  }
}

TEST(Co3, RandomValuesRoundToANearestGridValue) {
  at::Generator gen = at::detail::createCPUGenerator(4);
  // fp4: uniform over and past the grid (past +-3 clamps).
  at::Tensor x4 = at::rand({20000}, gen) * 9.0 - 4.5;
  // fp8: magnitudes log-uniform from 2^-20 (below the smallest subnormal) to 2^17 (past the max).
  at::Tensor x8 =
      at::exp2(at::rand({20000}, gen) * 37.0 - 20.0) * at::where(at::rand({20000}, gen) < 0.5, -1, 1);
  for (auto [codec, x] : {std::pair{&fp4(), x4}, std::pair{&fp8(), x8}}) {
    at::Tensor r = codec->round_to_grid(x);
    const float* xp = x.data_ptr<float>();
    const float* rp = r.data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      ASSERT_EQ(rp[i], brute_force_round(codec->grid(), xp[i])) << "x = " << xp[i];
    }
  }
}

TEST(Co3, TiesGoTowardMinusInfinity) {
  for (const Co3Codec* codec : {&fp4(), &fp8()}) {
    const auto& grid = codec->grid();
    for (size_t i = 0; i + 1 < grid.size(); ++i) {
      const float mid = 0.5f * (grid[i] + grid[i + 1]);  // exact: grid values have <= 3 significant bits
      ASSERT_EQ(codec->round_to_grid(at::tensor({mid})).item<float>(), grid[i]) << "midpoint " << mid;
      ASSERT_EQ(codec->round_to_grid(at::tensor({std::nextafter(mid, INFINITY)})).item<float>(), grid[i + 1]);
    }
  }
}

TEST(Co3, DecodeIsTheScaledRoundingAndBytesAreTheStatedFormula) {
  at::Tensor v = at::randn({5000}, at::detail::createCPUGenerator(8)) * 0.01;
  const float* vp = v.data_ptr<float>();
  for (const Co3Codec* codec : {&fp4(), &fp8()}) {
    const auto& grid = codec->grid();
    for (float alpha : {64.0f, 1000.0f, 1e6f}) {
      Co3EncodeInfo info;
      at::Tensor packed = codec->encode_with_scale(v, alpha, &info);
      // Expected, by brute force: the grid value nearest alpha * v (in double), divided by alpha in double.
      at::Tensor expected = at::empty({5000});
      std::vector<uint64_t> counts(grid.size(), 0);
      for (int64_t i = 0; i < v.numel(); ++i) {
        const float g = brute_force_round(grid, double(alpha) * double(vp[i]));
        expected[i] = float(double(g) / double(alpha));
        ++counts[size_t(std::find(grid.begin(), grid.end(), g) - grid.begin())];
      }
      EXPECT_TRUE(at::equal(codec->decode(packed, v.numel()), expected)) << "alpha " << alpha;
      // Bytes: 4 + ceil(G / 2) + ceil(sum of Huffman lengths / 8), the lengths being those of the code built
      // for this message's symbol counts.
      EXPECT_EQ(info.payload_bits, HuffmanCode::from_counts(counts).encoded_bits(counts));
      EXPECT_EQ(packed.numel(), codec->header_bytes() + (info.payload_bits + 7) / 8);
      EXPECT_EQ(info.packed_bytes, packed.numel());
      EXPECT_EQ(info.alpha, alpha);
      float sent_alpha;
      std::memcpy(&sent_alpha, packed.data_ptr<uint8_t>(), 4);
      EXPECT_EQ(sent_alpha, alpha);
      EXPECT_DOUBLE_EQ(Co3Codec::bits_per_element(packed, v.numel()), 8.0 * double(packed.numel()) / 5000.0);
      EXPECT_TRUE(at::equal(codec->encode_with_scale(v, alpha), packed));  // deterministic
    }
  }
}

TEST(Co3, GeneralizedNormalFitRecoversShapeAndScale) {
  const int64_t n = 200000;
  struct Case {
    at::Tensor x;
    double beta, sigma;
  };
  const Case cases[] = {
      {at::randn({n}, at::detail::createCPUGenerator(1)) * 0.003, 2.0, 0.003 * std::sqrt(2.0)},  // Gaussian
      {laplace(n, 0.02, 2), 1.0, 0.02},                                                          // Laplace
      {generalized_normal(n, 0.6, 1e-4, 3), 0.6, 1e-4},
      {generalized_normal(n, 1.5, 5.0, 4), 1.5, 5.0},
  };
  for (const auto& c : cases) {
    const auto fit = fit_generalized_normal(c.x);
    EXPECT_NEAR(fit.beta, c.beta, 0.04 * c.beta) << "beta " << c.beta;
    EXPECT_NEAR(fit.sigma, c.sigma, 0.04 * c.sigma) << "beta " << c.beta;
  }
  // Degenerate inputs: zeros give sigma 0 (and alpha 1); constant magnitude is the beta -> inf limit.
  EXPECT_EQ(fit_generalized_normal(at::zeros({10})).sigma, 0.0);
  EXPECT_EQ(fp4().fit_scale(at::zeros({10})), 1.0f);
  EXPECT_EQ(fit_generalized_normal(at::tensor({1.0f, -1.0f, 1.0f})).beta, kGnBetaMax);
}

TEST(Co3, Fp4ScaleIsThePolynomialOverSigma) {
  // p(2) = 1.76, p(1) = 0.65, p(0.5) = 0.05375.
  EXPECT_NEAR(co3_fp4_scale({2.0, 1.0}), 1.76, 1e-12);
  EXPECT_NEAR(co3_fp4_scale({1.0, 0.5}), 0.65 / 0.5, 1e-12);
  EXPECT_NEAR(co3_fp4_scale({0.5, 1e-3}), 0.05375 / 1e-3, 1e-9);
  // beta past the cap evaluates p at the cap.
  EXPECT_EQ(co3_fp4_scale({3.0, 2.0}), co3_fp4_scale({kCo3Fp4BetaCap, 2.0}));
  EXPECT_EQ(co3_fp4_scale({1.0, 0.0}), 1.0);
  // encode() uses the fit.
  at::Tensor v = laplace(50000, 0.01, 6);
  Co3EncodeInfo info;
  fp4().encode(v, &info);
  EXPECT_EQ(info.alpha, float(co3_fp4_scale(fit_generalized_normal(v))));
}

TEST(Co3, Fp8ScaleMapsTheMaximumNearTheTopOfTheGrid) {
  for (double scale : {1e-30, 1e-6, 0.37, 1.0, 3e4}) {
    at::Tensor v = at::randn({4000}, at::detail::createCPUGenerator(5)) * scale;
    const float alpha = fp8().fit_scale(v);
    int exponent;
    EXPECT_EQ(std::frexp(alpha, &exponent), 0.5f) << "alpha is a power of two";
    const double top = v.abs().max().item<double>() * double(alpha);
    EXPECT_GE(top, 16384.0);
    EXPECT_LT(top, 32768.0);
    // Every value down to max * 2^-28 keeps 3 significant bits: relative error <= 2^-3.
    at::Tensor q = fp8().decode(fp8().encode(v), v.numel()).to(at::kDouble);
    at::Tensor vd = v.to(at::kDouble);
    at::Tensor big = vd.abs() >= vd.abs().max() * std::ldexp(1.0, -28);
    EXPECT_LE(((q - vd).abs() / vd.abs()).masked_select(big).max().item<double>(), 0.125)
        << "scale " << scale;
  }
}

TEST(Co3, CompressesGaussianAndLaplaceGradients) {
  const int64_t n = 100000;
  for (const auto& v : {at::randn({n}, at::detail::createCPUGenerator(9)) * 1e-3, laplace(n, 1e-3, 10)}) {
    at::Tensor p4 = fp4().encode(v), p8 = fp8().encode(v);
    const double bits4 = Co3Codec::bits_per_element(p4, n), bits8 = Co3Codec::bits_per_element(p8, n);
    // Huffman on an 11-value grid: below the 4 bits of a fixed-width code; fp8: below 8.
    EXPECT_LT(bits4, 4.0);
    EXPECT_GT(bits4, 1.5);
    EXPECT_LT(bits8, 8.0);
    EXPECT_LT(rel_error(fp4().decode(p4, n), v), 0.2);
    // fp8 keeps 3 significant bits: a relative rounding error of about 2^-2 / sqrt(12) / 1.44 = 0.05.
    EXPECT_LT(rel_error(fp8().decode(p8, n), v), 0.07);
  }
}

TEST(Co3, ErrorCorrectionTelescopesWithGammaOne) {
  // With gamma = 1, e_{t+1} = g_t + e_t - q_t, so sum_t q_t + e_T = sum_t g_t.
  for (const Co3Codec* codec : {&fp4(), &fp8()}) {
    Co3ErrorCorrection ec(1.0);
    const int64_t n = 3000;
    at::Generator gen = at::detail::createCPUGenerator(12);
    at::Tensor sent = at::zeros({n}, at::kDouble), total = at::zeros({n}, at::kDouble);
    for (int t = 0; t < 30; ++t) {
      at::Tensor g = at::randn({n}, gen) * 1e-2;
      total += g.to(at::kDouble);
      sent += codec->decode(ec.step(*codec, g), n).to(at::kDouble);
    }
    at::Tensor residual = sent + ec.error().to(at::kDouble) - total;
    // Float rounding of v and e, 30 steps: a few float ulps of the values involved.
    EXPECT_LT(residual.abs().max().item<double>(), 1e-6);
    // The memory is what closes the gap: what was sent alone misses the sum by e_T.
    EXPECT_GT((sent - total).abs().max().item<double>(), 1e-4);
  }
}

TEST(Co3, ErrorCorrectionFollowsTheRecursionExactly) {
  for (double gamma : {0.0, 0.5, 0.9}) {
    Co3ErrorCorrection ec(gamma);
    const int64_t n = 2000;
    at::Generator gen = at::detail::createCPUGenerator(13);
    at::Tensor e = at::zeros({n});
    for (int t = 0; t < 5; ++t) {
      at::Tensor g = at::randn({n}, gen) * 1e-3;
      // v = g + gamma e in double, rounded once; e' = v - q in float.
      at::Tensor v = (g.to(at::kDouble) + gamma * e.to(at::kDouble)).to(at::kFloat);
      Co3EncodeInfo info;
      at::Tensor packed = ec.step(fp4(), g, &info);
      EXPECT_TRUE(at::equal(packed, fp4().encode(v))) << "the message is the encoding of v";
      at::Tensor q = fp4().decode(packed, n);
      e = v - q;
      ASSERT_TRUE(at::equal(ec.error(), e)) << "gamma " << gamma << " step " << t;
    }
    // A fixed scale goes through as given.
    Co3EncodeInfo info;
    ec.step_with_scale(fp4(), at::randn({n}, gen), 8.0f, &info);
    EXPECT_EQ(info.alpha, 8.0f);
  }
}

TEST(Co3, NonFiniteInputDecodesNonFinite) {
  for (const Co3Codec* codec : {&fp4(), &fp8()}) {
    for (float bad : {NAN, INFINITY, -INFINITY}) {
      at::Tensor v = at::randn({100});
      v[37] = bad;
      Co3EncodeInfo info;
      at::Tensor packed = codec->encode(v, &info);
      EXPECT_EQ(packed.numel(), codec->header_bytes());
      EXPECT_TRUE(std::isnan(info.alpha));
      EXPECT_TRUE(at::isnan(codec->decode(packed, 100)).all().item<bool>());
      // Summed with a finite message, the overflow stays visible.
      at::Tensor acc = codec->decode(codec->encode(at::randn({100})), 100);
      codec->decode_add(packed, acc);
      EXPECT_FALSE(at::isfinite(acc).any().item<bool>());
    }
  }
  // The error memory ignores an overflowed step.
  Co3ErrorCorrection ec(0.9);
  ec.step(fp4(), at::randn({50}));
  at::Tensor before = ec.error().clone();
  at::Tensor g = at::randn({50});
  g[3] = INFINITY;
  EXPECT_TRUE(at::isnan(fp4().decode(ec.step(fp4(), g), 50)).all().item<bool>());
  EXPECT_TRUE(at::equal(ec.error(), before));
}

TEST(Co3, EmptyAndZeroInput) {
  for (const Co3Codec* codec : {&fp4(), &fp8()}) {
    at::Tensor packed = codec->encode(at::empty({0}));
    EXPECT_EQ(packed.numel(), codec->header_bytes());
    EXPECT_EQ(codec->decode(packed, 0).numel(), 0);
    at::Tensor z = at::zeros({700});
    at::Tensor pz = codec->encode(z);
    EXPECT_EQ(pz.numel(), codec->header_bytes() + (700 + 7) / 8);  // one symbol: a 1-bit code each
    EXPECT_TRUE(at::equal(codec->decode(pz, 700), z));
  }
}

TEST(Co3, DecodeAddAccumulates) {
  at::Tensor a = at::randn({900}), b = at::randn({900});
  at::Tensor pa = fp8().encode(a), pb = fp8().encode(b);
  at::Tensor acc = at::zeros({900});
  fp8().decode_add(pa, acc);
  fp8().decode_add(pb, acc);
  EXPECT_TRUE(at::allclose(acc, fp8().decode(pa, 900) + fp8().decode(pb, 900)));
}

TEST(Co3, RejectsBadInput) {
  expect_invalid([] { Co3ErrorCorrection(-0.1); }, {"gamma", "[0, 1]", "-0.1"});
  expect_invalid([] { Co3ErrorCorrection(1.5); }, {"gamma", "1.5"});
  expect_invalid([] { Co3ErrorCorrection(NAN); }, {"gamma", "nan"});
  expect_invalid([] { parse_co3_format("fp16"); }, {"format", "'fp16'"});
  expect_invalid([] { Co3Codec({Co3Format(7)}); }, {"format"});
  EXPECT_EQ(parse_co3_format("fp8"), Co3Format::kFp8);
  expect_invalid([] { fp4().encode(at::randn({4, 4})); }, {"values", "1-D"});
  expect_invalid([] { fp4().encode(at::randn({16}).to(at::kDouble)); }, {"values", "float32"});
  expect_invalid([] { fp4().encode_with_scale(at::randn({16}), 0.0f); }, {"alpha", "> 0"});
  expect_invalid([] { fp4().encode_with_scale(at::randn({16}), INFINITY); }, {"alpha"});
  expect_invalid([] { fit_generalized_normal(at::tensor({1.0f, NAN})); }, {"values", "finite"});
  at::Tensor packed = fp4().encode(at::randn({1000}, at::detail::createCPUGenerator(14)));
  expect_invalid([&] { fp4().decode(packed.narrow(0, 0, 5), 1000); }, {"packed", "header"});
  expect_invalid([&] { fp4().decode(packed.narrow(0, 0, packed.numel() - 1).contiguous(), 1000); },
                 {"packed", "truncated"});
  expect_invalid([&] { fp4().decode(packed, 10); }, {"packed", "after the last"});
  expect_invalid([&] { fp4().decode(packed.to(at::kInt), 1000); }, {"packed", "uint8"});
  at::Tensor negative_scale = packed.clone();
  const float minus_one = -1.0f;
  std::memcpy(negative_scale.data_ptr<uint8_t>(), &minus_one, 4);
  expect_invalid([&] { fp4().decode(negative_scale, 1000); }, {"packed", "scale -1"});
  // The fp4 table is 6 bytes; an fp8 codec reading an fp4 message finds the wrong layout.
  expect_invalid([&] { fp8().decode(packed, 1000); }, {"packed"});
  Co3ErrorCorrection ec;
  EXPECT_EQ(ec.gamma(), 0.9);
  ec.step(fp4(), at::randn({10}));
  expect_invalid([&] { ec.step(fp4(), at::randn({11})); }, {"gradient", "11 values", "reset()"});
  ec.reset();
  ec.step(fp4(), at::randn({11}));
}

}  // namespace
}  // namespace gradiveq
