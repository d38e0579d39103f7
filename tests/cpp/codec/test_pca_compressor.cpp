// Unit tests for include/gradiveq/pca_compressor.h
#include "gradiveq/pca_compressor.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <iostream>
#include <utility>
#include <vector>

#include "kernels/kernels.h"
#include "gradiveq/conv_layout.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;
using testing::low_rank_samples;
using testing::rel_error;

// float32 GEMMs over K <= 3072 values: errors of a few 1e-6 relative are rounding.
constexpr double kF32RelTol = 1e-5;

at::Generator seeded(uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return gen;
}

TEST(PcaCompressor, BasisIsOrthonormalAndEigenvaluesDecrease) {
  for (auto [n, k] : {std::pair<int64_t, int64_t>{100, 768}, {400, 128}}) {  // Gram and covariance paths
    auto pca = PcaCompressor::fit(low_rank_samples(n, k, 20, 0.05, seeded(1)), {0.999});
    const int64_t d = pca.num_components();
    ASSERT_GT(d, 1);
    at::Tensor gram = pca.basis().t().matmul(pca.basis());
    EXPECT_LT((gram - at::eye(d)).abs().max().item<float>(), 1e-5) << "n=" << n << " k=" << k;
    at::Tensor ev = pca.eigenvalues();
    ASSERT_EQ(ev.numel(), k);
    EXPECT_TRUE((ev.narrow(0, 0, k - 1) >= ev.narrow(0, 1, k - 1)).all().item<bool>());
    EXPECT_TRUE((ev >= 0).all().item<bool>());
  }
}

// The Gram path keeps its directions unorthogonalised while the kept eigenvalues stay within 1e-4 of the top
// one, and orthogonalises them below that: both must give an orthonormal basis that spans the kept
// directions.
TEST(PcaCompressor, GramDirectionsStayOrthonormalWhateverTheConditioning) {
  const int64_t n = 300, k = 1024, rank = 120;
  auto gen = seeded(7);
  // Standard deviations falling geometrically from 1 to 1e-4 (variances over 8 decades).
  at::Tensor scales = at::pow(10.0, at::linspace(0.0, -4.0, rank, at::kDouble)).view({rank, 1});
  at::Tensor directions = std::get<0>(at::linalg_qr(at::randn({k, rank}, gen).to(at::kDouble))).t();
  at::Tensor samples = (at::randn({n, rank}, gen).to(at::kDouble).matmul(directions * scales)).to(at::kFloat);
  for (double energy : {0.9, 1.0 - 1e-12}) {  // d well inside the first decades; d = every direction
    const auto pca = PcaCompressor::fit(samples, {energy});
    const int64_t d = pca.num_components();
    const at::Tensor variances = pca.eigenvalues();
    const double ratio = variances[d - 1].item<double>() / variances[0].item<double>();
    at::Tensor u = pca.basis().to(at::kDouble);
    EXPECT_LT((u.t().matmul(u) - at::eye(d, at::kDouble)).abs().max().item<double>(), 1e-5)
        << "energy " << energy << ", d " << d << ", last/first variance " << ratio;
    // The basis spans the window's d strongest directions: the samples' residual off it is the energy the
    // eigenvalues leave out.
    at::Tensor xc = samples.to(at::kDouble) - samples.to(at::kDouble).mean(0);
    const double residual =
        (xc - xc.matmul(u).matmul(u.t())).pow(2).sum().item<double>() / xc.pow(2).sum().item<double>();
    EXPECT_NEAR(residual, 1.0 - pca.explained_variance(), 1e-5) << energy;
    if (energy < 0.95) {
      EXPECT_GT(ratio, 1e-4) << "the first case should skip the orthogonalisation";
    } else {
      EXPECT_LT(ratio, 1e-4) << "the second case should orthogonalise";
    }
  }
}

TEST(PcaCompressor, EigenvaluesMatchTheSampleCovariance) {
  at::Tensor x = low_rank_samples(50, 64, 5, 0.1, seeded(2));
  auto pca = PcaCompressor::fit(x, {1.0});
  at::Tensor xc = x.to(at::kDouble) - x.to(at::kDouble).mean(0);
  at::Tensor expected = std::get<0>(at::linalg_eigh(xc.t().matmul(xc) / 49.0)).flip(0).clamp_min(0);
  EXPECT_LT(rel_error(pca.eigenvalues(), expected), 1e-5);
  EXPECT_LT(rel_error(pca.mean(), x.mean(0)), 1e-6);
}

TEST(PcaCompressor, ReconstructsExactlyAtFullRank) {
  // energy 1.0 keeps all K components, also those with zero variance (n - 1 < K here), so any gradient,
  // not just the samples' span, survives the round trip.
  for (auto [n, k] : {std::pair<int64_t, int64_t>{30, 256}, {600, 256}}) {
    auto pca = PcaCompressor::fit(low_rank_samples(n, k, 8, 0.01, seeded(3)), {1.0});
    ASSERT_EQ(pca.num_components(), k);
    EXPECT_DOUBLE_EQ(pca.compression_ratio(), 1.0);
    at::Tensor g = at::randn({5, k});
    EXPECT_LT(rel_error(pca.decompress(pca.compress(g)), g), kF32RelTol) << "n=" << n;
    at::Tensor gram = pca.basis().t().matmul(pca.basis());
    EXPECT_LT((gram - at::eye(k)).abs().max().item<float>(), 1e-5);
  }
}

TEST(PcaCompressor, EnergyRulePicksTheSmallestD) {
  // Three orthogonal directions with variances 100 : 10 : 1 (no noise), so the energy fractions are
  // 0.9009, 0.9910, 1.0.
  const int64_t k = 32, n = 400;
  auto gen = seeded(4);
  at::Tensor dirs = std::get<0>(at::linalg_qr(at::randn({k, 3}, gen)));
  at::Tensor coeffs = at::randn({n, 3}, gen);
  coeffs = (coeffs - coeffs.mean(0)) / coeffs.std(0);  // exact unit variances, zero mean
  // Make the three columns exactly uncorrelated so the variances are exactly 100, 10, 1.
  coeffs = std::get<0>(at::linalg_qr(coeffs)) * std::sqrt(double(n - 1));
  at::Tensor x = coeffs.matmul((dirs * at::tensor({10.0f, std::sqrt(10.0f), 1.0f})).t());
  EXPECT_EQ(PcaCompressor::fit(x, {0.90}).num_components(), 1);
  EXPECT_EQ(PcaCompressor::fit(x, {0.901}).num_components(), 2);
  EXPECT_EQ(PcaCompressor::fit(x, {0.99}).num_components(), 2);
  EXPECT_EQ(PcaCompressor::fit(x, {0.992}).num_components(), 3);
  EXPECT_EQ(PcaCompressor::fit(x, {0.9999}).num_components(), 3);  // never more than the non-zero directions
  EXPECT_EQ(PcaCompressor::fit(x, {1.0}).num_components(), k);
  EXPECT_EQ(PcaCompressor::fit(x, {0.9999, /*max_components=*/2}).num_components(), 2);
  EXPECT_NEAR(PcaCompressor::fit(x, {0.99}).explained_variance(), 110.0 / 111.0, 1e-5);
}

TEST(PcaCompressor, TargetRatioAndMinRatioSetD) {
  auto gen = seeded(21);
  const int64_t k = 64;
  at::Tensor x = at::randn({300, k}, gen);  // isotropic: the energy rule would keep almost everything
  FitOptions target;
  target.target_ratio = 8.0;
  EXPECT_EQ(PcaCompressor::fit(x, target).num_components(), 8);
  target.target_ratio = 3.0;
  EXPECT_EQ(PcaCompressor::fit(x, target).num_components(), 22);  // ceil(64 / 3)
  target.target_ratio = 1.0;
  EXPECT_EQ(PcaCompressor::fit(x, target).num_components(), k);
  // Never more than the samples' rank: 5 centred samples span 4 directions.
  target.target_ratio = 2.0;
  EXPECT_EQ(PcaCompressor::fit(x.narrow(0, 0, 5), target).num_components(), 4);

  FitOptions capped{0.9999};
  const int64_t uncapped = PcaCompressor::fit(x, capped).num_components();
  EXPECT_GT(uncapped, 60);
  capped.min_ratio = 8.0;
  EXPECT_EQ(PcaCompressor::fit(x, capped).num_components(), 8);
  EXPECT_GE(PcaCompressor::fit(x, capped).compression_ratio(), 8.0);
  capped.min_ratio = 100.0;
  EXPECT_EQ(PcaCompressor::fit(x, capped).num_components(), 1);  // at least one component
  // The cap does not raise d: a spectrum that needs 2 components keeps 2.
  at::Tensor low = low_rank_samples(100, k, 2, 0.0, gen);
  FitOptions low_opts{0.99};
  low_opts.min_ratio = 4.0;
  EXPECT_EQ(PcaCompressor::fit(low, low_opts).num_components(), 2);

  FitOptions bad;
  bad.target_ratio = 0.5;
  expect_invalid([&] { PcaCompressor::fit(x, bad); }, {"target_ratio", ">= 1", "0.5"});
  bad = FitOptions{};
  bad.min_ratio = -2.0;
  expect_invalid([&] { PcaCompressor::fit(x, bad); }, {"min_ratio", "-2"});
  bad = FitOptions{1.0};
  bad.min_ratio = 8.0;  // lossless and capped at once: say so rather than silently dropping one
  expect_invalid([&] { PcaCompressor::fit(x, bad); }, {"energy", "lossless", "min_ratio"});
}

TEST(PcaCompressor, CoefficientsFromNRanksSumToTheCompressedSum) {
  const int64_t k = 192, ranks = 4, slices = 6;
  auto pca = PcaCompressor::fit(low_rank_samples(80, k, 10, 0.05, seeded(5)), {0.95});
  ASSERT_LT(pca.num_components(), k);
  std::vector<at::Tensor> grads;
  at::Tensor coeff_sum = at::zeros({slices, pca.num_components()});
  for (int64_t r = 0; r < ranks; ++r) {
    grads.push_back(at::randn({slices, k}));
    coeff_sum += pca.compress(grads.back(), ranks);
  }
  at::Tensor grad_sum = at::stack(grads).sum(0);
  // decompress(sum_n compress(g_n, N)) == decompress(compress(sum_n g_n, 1))
  EXPECT_LT(rel_error(pca.decompress(coeff_sum), pca.decompress(pca.compress(grad_sum, 1))), kF32RelTol);
  EXPECT_LT(rel_error(coeff_sum, pca.compress(grad_sum, 1)), kF32RelTol);

  // At full rank it is the plain sum.
  auto full = PcaCompressor::fit(low_rank_samples(80, k, 10, 0.05, seeded(6)), {1.0});
  at::Tensor full_sum = at::zeros({slices, k});
  for (const auto& g : grads) full_sum += full.compress(g, ranks);
  EXPECT_LT(rel_error(full.decompress(full_sum), grad_sum), kF32RelTol);
}

// Every rank must decode the summed coefficients to the same bits (DDP replicas must not drift), whatever its
// thread count or where its buffers happen to sit in memory; and the result must be the right product.
TEST(PcaCompressor, CpuCodecIsBitIdenticalAcrossThreadCountsAndAlignments) {
  const int64_t k = 1000, slices = 9;  // K not a multiple of the vector widths
  auto fitted = PcaCompressor::fit(low_rank_samples(300, k, 60, 0.1, seeded(21)), {0.99, 0, 8.0});  // d = 125
  const int64_t d = fitted.num_components();
  ASSERT_EQ(d, k / 8);
  at::Tensor g = at::randn({slices, k});
  const int threads_before = at::get_num_threads();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const PcaCompressor pca = fitted.with_basis_dtype(dtype);
    at::Tensor ref_c, ref_x;
    for (int threads : {1, 2, 3}) {
      at::set_num_threads(threads);
      for (int64_t shift : {0, 1, 3}) {  // offsets of 4 and 12 bytes break 16/32-byte alignment
        at::Tensor gbuf = at::empty({slices * k + shift}).narrow(0, shift, slices * k).view({slices, k});
        gbuf.copy_(g);
        at::Tensor c = at::empty({slices * d + shift}).narrow(0, shift, slices * d).view({slices, d});
        pca.compress_into(gbuf, 2, c);
        // Decompress into a strided view, as into a gradient: rows k + 5 apart.
        at::Tensor xbuf = at::zeros({slices, k + 5 + shift});
        at::Tensor x = xbuf.narrow(1, shift, k);
        pca.decompress_into(c, x);
        if (!ref_c.defined()) {
          ref_c = c.clone();
          ref_x = x.clone();
          continue;
        }
        EXPECT_TRUE(at::equal(c, ref_c)) << dtype << " compress differs: threads " << threads << ", shift " << shift;
        EXPECT_TRUE(at::equal(x, ref_x)) << dtype << " decompress differs: threads " << threads << ", shift "
                                         << shift;
      }
    }
    at::set_num_threads(threads_before);
    // A slice gives the same bits alone as within a batch (the kernels interleave slices in groups of four).
    for (int64_t row : {0, 5, 8}) {
      EXPECT_TRUE(at::equal(pca.compress(g.narrow(0, row, 1), 2), ref_c.narrow(0, row, 1))) << dtype << " row " << row;
      EXPECT_TRUE(at::equal(pca.decompress(ref_c.narrow(0, row, 1)), ref_x.narrow(0, row, 1))) << dtype << " row " << row;
    }
    // Against a double-precision reference of U^T (g - mu / 2) and U c + mu, U the stored basis widened.
    at::Tensor u = pca.basis().to(at::kDouble), mu = pca.mean().to(at::kDouble);
    at::Tensor want_c = (g.to(at::kDouble) - mu / 2).matmul(u);
    EXPECT_LT(rel_error(ref_c.to(at::kDouble), want_c), kF32RelTol) << dtype;
    EXPECT_LT(rel_error(ref_x.to(at::kDouble), ref_c.to(at::kDouble).matmul(u.t()) + mu), kF32RelTol) << dtype;
  }
}

TEST(PcaCompressor, HalfPrecisionWideningIsExactForEveryValue) {
  // Every one of the 65536 float16 and bfloat16 bit patterns through the decompress kernel with d = 1, c = 1 and
  // mu = 0, so each output is 0 + (0 + 1 * u_k): the widened value itself (signed zeros come out as +0).
  const int64_t k = 65536;
  std::vector<c10::Half> halves(k);
  std::vector<c10::BFloat16> bhalves(k);
  for (int64_t i = 0; i < k; ++i) {
    halves[i].x = uint16_t(i);
    bhalves[i].x = uint16_t(i);
  }
  const float one = 1.0f;
  std::vector<float> zeros(k, 0.0f), out(k), bout(k);
  detail::cpu_decompress(&one, halves.data(), zeros.data(), out.data(), k, 1, k, 1);
  detail::cpu_decompress(&one, bhalves.data(), zeros.data(), bout.data(), k, 1, k, 1);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < k; ++i) {
    const float want = static_cast<float>(halves[i]), bwant = static_cast<float>(bhalves[i]);
    const bool ok = std::isnan(want) ? std::isnan(out[i]) : out[i] == want;
    const bool bok = std::isnan(bwant) ? std::isnan(bout[i]) : bout[i] == bwant;
    if (!ok || !bok) {
      if (++mismatches <= 5) ADD_FAILURE() << "bits 0x" << std::hex << i << ": float16 " << out[i] << " want " << want
                                           << ", bfloat16 " << bout[i] << " want " << bwant;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(PcaCompressor, HalfPrecisionBasesMatchTheirFloat32WideningAndStayClose) {
  const int64_t k = 576;  // one kernel position of a 24 -> 24 conv
  auto gen = seeded(41);
  at::Tensor all = low_rank_samples(260, k, 20, 0.05, gen);
  const auto f32 = PcaCompressor::fit(all.narrow(0, 0, 200), {0.999, 0, 0.0, 8.0});
  at::Tensor held_out = all.narrow(0, 200, 60);
  const at::Tensor restored32 = f32.decompress(f32.compress(held_out));
  // Measured on this data: bfloat16 1.7e-3, float16 2.1e-4 relative to the float32 basis' reconstruction.
  for (auto [dtype, tolerance] : {std::pair{at::kBFloat16, 1e-2}, std::pair{at::kHalf, 2e-3}}) {
    const auto half = f32.with_basis_dtype(dtype);
    ASSERT_EQ(half.basis_dtype(), dtype);
    EXPECT_EQ(half.basis().nbytes() * 2, f32.basis().nbytes());
    EXPECT_EQ(half.num_components(), f32.num_components());
    // The image carries the basis in its own dtype: (K d) 2 bytes fewer than the float32 image's 4.
    EXPECT_EQ(f32.serialize().numel() - half.serialize().numel(), k * f32.num_components() * 2) << dtype;
    const auto restored = PcaCompressor::deserialize(half.serialize());
    ASSERT_EQ(restored.basis_dtype(), dtype);
    EXPECT_TRUE(at::equal(restored.basis(), half.basis())) << dtype;
    EXPECT_EQ(restored.checksum(), half.checksum()) << dtype;
    // Exactly the float32 codec with the widened basis.
    const auto widened = half.with_basis_dtype(at::kFloat);
    ASSERT_EQ(widened.basis_dtype(), at::kFloat);
    EXPECT_TRUE(at::equal(half.compress(held_out, 3), widened.compress(held_out, 3))) << dtype;
    const at::Tensor c = half.compress(held_out);
    EXPECT_TRUE(at::equal(half.decompress(c), widened.decompress(c))) << dtype;
    // Rounding the widening again is exact.
    EXPECT_TRUE(at::equal(widened.with_basis_dtype(dtype).serialize(), half.serialize())) << dtype;
    EXPECT_EQ(widened.with_basis_dtype(dtype).checksum(), half.checksum()) << dtype;
    const double drift = rel_error(half.decompress(c), restored32);
    EXPECT_LT(drift, tolerance) << dtype;
    EXPECT_GT(drift, 0.0) << dtype;  // it really is stored rounded
    std::cout << "[ info ] " << dtype << " basis: reconstruction differs from float32's by " << drift << "\n";
  }
  try {
    f32.with_basis_dtype(at::kDouble);
    ADD_FAILURE() << "float64 basis accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("dtype"), std::string::npos) << e.what();
  }
}

TEST(PcaCompressor, CorrelatedGradientsCompressEightfoldWithSmallError) {
  // Low rank plus noise, held-out draws from the same distribution: the property GradiVeQ relies on.
  const int64_t k = 768;
  auto gen = seeded(7);
  at::Tensor all = low_rank_samples(200, k, 12, 0.02, gen);
  at::Tensor window = all.narrow(0, 0, 100), held_out = all.narrow(0, 100, 100);
  auto pca = PcaCompressor::fit(window, {0.99});
  EXPECT_GE(pca.compression_ratio(), 8.0) << "d=" << pca.num_components();
  EXPECT_LT(rel_error(pca.decompress(pca.compress(held_out)), held_out), 0.1);
}

TEST(PcaCompressor, WorksOnConvLayoutSlicesEndToEnd) {
  auto layout = ConvSliceLayout::for_weight({32, 16, 3, 3});
  at::Tensor samples = low_rank_samples(60, layout.slice_len, 6, 0.0, seeded(8));
  auto pca = PcaCompressor::fit(samples, {1.0});
  at::Tensor g = at::randn({32, 16, 3, 3});
  at::Tensor flat = layout.to_paper_order(g);
  at::Tensor restored = at::empty_like(flat);
  pca.decompress_into(pca.compress(layout.slices(flat)), layout.slices(restored));
  EXPECT_LT(rel_error(layout.from_paper_order(restored), g), kF32RelTol);
}

TEST(PcaCompressor, HalfPrecisionCoefficientsDecodeCloseToFloat) {
  auto pca = PcaCompressor::fit(low_rank_samples(100, 256, 10, 0.05, seeded(9)), {0.99});
  at::Tensor g = low_rank_samples(4, 256, 10, 0.05, seeded(10));
  at::Tensor exact = pca.decompress(pca.compress(g));
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    at::Tensor c = at::empty({4, pca.num_components()}, dtype);
    pca.compress_into(g, 1, c);
    EXPECT_LT(rel_error(pca.decompress(c), exact), dtype == at::kHalf ? 2e-3 : 1e-2);
  }
}

TEST(PcaCompressor, SerializationRoundTripsBitForBit) {
  auto pca = PcaCompressor::fit(low_rank_samples(100, 384, 10, 0.05, seeded(11)), {0.99});
  at::Tensor bytes = pca.serialize();
  auto copy = PcaCompressor::deserialize(bytes);
  EXPECT_TRUE(at::equal(copy.basis(), pca.basis()));
  EXPECT_TRUE(at::equal(copy.mean(), pca.mean()));
  EXPECT_TRUE(at::equal(copy.eigenvalues(), pca.eigenvalues()));
  EXPECT_EQ(copy.num_samples(), 100);
  EXPECT_EQ(copy.checksum(), pca.checksum());
  at::Tensor g = at::randn({3, 384});
  EXPECT_TRUE(at::equal(copy.compress(g, 2), pca.compress(g, 2)));

  // One flipped bit in the basis changes the checksum.
  at::Tensor corrupted = bytes.clone();
  corrupted[bytes.numel() - 3] = corrupted[bytes.numel() - 3].item<uint8_t>() ^ 1;
  EXPECT_NE(PcaCompressor::deserialize(corrupted).checksum(), pca.checksum());
}

// Checkpoints written before version 2 hold version-1 images: the same header without the dtype code, all
// float32. They still load, bit for bit.
TEST(PcaCompressor, ReadsVersionOneImages) {
  auto pca = PcaCompressor::fit(low_rank_samples(40, 96, 6, 0.05, seeded(13)), {0.99});
  const at::Tensor v2 = pca.serialize();
  at::Tensor v1 = at::cat({v2.narrow(0, 0, 32), v2.narrow(0, 36, v2.numel() - 36)});
  v1[4] = uint8_t(1);
  const auto copy = PcaCompressor::deserialize(v1);
  EXPECT_EQ(copy.basis_dtype(), at::kFloat);
  EXPECT_TRUE(at::equal(copy.basis(), pca.basis()));
  EXPECT_TRUE(at::equal(copy.mean(), pca.mean()));
  EXPECT_EQ(copy.checksum(), pca.checksum());
}

TEST(PcaCompressor, DeserializeRejectsDamagedImages) {
  auto pca = PcaCompressor::fit(low_rank_samples(20, 64, 4, 0.05, seeded(12)), {0.99});
  at::Tensor bytes = pca.serialize();
  expect_invalid([&] { PcaCompressor::deserialize(bytes.narrow(0, 0, 10)); }, {"bytes", "truncated"});
  expect_invalid([&] { PcaCompressor::deserialize(bytes.narrow(0, 0, bytes.numel() - 4)); },
                 {"bytes", "expected"});
  at::Tensor bad_magic = bytes.clone();
  bad_magic[0] = uint8_t('X');
  expect_invalid([&] { PcaCompressor::deserialize(bad_magic); }, {"bytes", "magic"});
  at::Tensor bad_version = bytes.clone();
  bad_version[4] = uint8_t(99);
  expect_invalid([&] { PcaCompressor::deserialize(bad_version); }, {"bytes", "version 99"});
  at::Tensor bad_dtype = bytes.clone();
  bad_dtype[32] = uint8_t(7);  // the basis dtype code follows the 32-byte version-1 header
  expect_invalid([&] { PcaCompressor::deserialize(bad_dtype); }, {"bytes", "basis dtype code 7"});
  expect_invalid([&] { PcaCompressor::deserialize(at::zeros({100}, at::kFloat)); }, {"bytes", "uint8"});
}

TEST(PcaCompressor, RejectsBadInput) {
  auto gen = seeded(13);
  at::Tensor ok = low_rank_samples(20, 64, 4, 0.05, gen);
  expect_invalid([&] { PcaCompressor::fit(ok.to(at::kDouble)); }, {"samples", "float32", "Double"});
  expect_invalid([&] { PcaCompressor::fit(ok.to(at::kHalf)); }, {"samples", "float32", "Half"});
  expect_invalid([&] { PcaCompressor::fit(ok.view({-1})); }, {"samples", "2-D"});
  expect_invalid([&] { PcaCompressor::fit(ok.narrow(0, 0, 1)); }, {"samples", "at least 2", "got 1"});
  for (double energy : {0.0, -0.5, 1.5}) {
    expect_invalid([&] { PcaCompressor::fit(ok, {energy}); }, {"energy", "(0, 1]"});
  }
  expect_invalid([&] { PcaCompressor::fit(ok, {0.99, -1}); }, {"max_components", "-1"});
  for (float bad : {NAN, INFINITY}) {
    at::Tensor x = ok.clone();
    x[3][5] = bad;
    expect_invalid([&] { PcaCompressor::fit(x); }, {"samples", "non-finite"});
  }
  PcaCompressor unfitted;
  expect_invalid([&] { unfitted.compress(ok); }, {"not fitted"});
  expect_invalid([&] { unfitted.decompress(ok); }, {"not fitted"});
  auto pca = PcaCompressor::fit(ok, {0.99});
  expect_invalid([&] { pca.compress(at::randn({3, 65})); }, {"slices", "K = 64", "[3, 65]"});
  expect_invalid([&] { pca.compress(at::randn({3, 64}), 0); }, {"world_size", "got 0"});
  expect_invalid([&] { pca.compress(at::randn({3, 64}).to(at::kDouble)); }, {"slices", "Double"});
  expect_invalid([&] { pca.decompress(at::randn({3, pca.num_components() + 1})); }, {"coeffs", "d = "});
  expect_invalid([&] { pca.decompress_into(at::randn({3, pca.num_components()}), at::empty({3, 10})); },
                 {"out", "(S, K)"});
}

TEST(PcaCompressor, ConstantWindowFitsWithoutNaN) {
  // Identical samples: zero covariance. The fit must stay finite and reproduce the mean.
  at::Tensor row = at::randn({1, 48});
  auto pca = PcaCompressor::fit(row.repeat({10, 1}), {0.99});
  EXPECT_EQ(pca.num_components(), 1);
  EXPECT_TRUE(at::isfinite(pca.basis()).all().item<bool>());
  EXPECT_DOUBLE_EQ(pca.explained_variance(), 1.0);
  EXPECT_LT(rel_error(pca.decompress(pca.compress(row)), row), kF32RelTol);
}

TEST(PcaCompressor, HugeTinyAndZeroMagnitudesStayFiniteAndAccurate) {
  // Gradients near float32's ends (1e-30: vanishing layers; 1e30: exploding ones) and all-zero windows (frozen
  // or unused layers). The fit squares values in double, so no overflow; codec products stay in range.
  const int64_t k = 96;
  at::Tensor base = low_rank_samples(60, k, 6, 0.0, seeded(31));
  for (double scale : {1e-30, 1e-12, 1e12, 1e30}) {
    at::Tensor samples = base * scale;
    auto pca = PcaCompressor::fit(samples, {0.999});
    EXPECT_TRUE(at::isfinite(pca.basis()).all().item<bool>()) << "scale " << scale;
    EXPECT_TRUE(at::isfinite(pca.eigenvalues()).all().item<bool>()) << "scale " << scale;
    EXPECT_LE(pca.num_components(), 6) << "scale " << scale;
    EXPECT_TRUE(std::isfinite(pca.explained_variance())) << "scale " << scale;
    EXPECT_TRUE(PcaCompressor::deserialize(pca.serialize()).is_fitted()) << "scale " << scale;  // broadcastable
    at::Tensor restored = pca.decompress(pca.compress(samples));
    ASSERT_TRUE(at::isfinite(restored).all().item<bool>()) << "scale " << scale;
    EXPECT_LT(rel_error(restored, samples), 1e-4) << "scale " << scale;
  }
  auto zero = PcaCompressor::fit(at::zeros({20, k}), {0.99});
  EXPECT_EQ(zero.num_components(), 1);
  EXPECT_TRUE(at::equal(zero.decompress(zero.compress(at::zeros({3, k}))), at::zeros({3, k})));
}

}  // namespace
}  // namespace gradiveq
