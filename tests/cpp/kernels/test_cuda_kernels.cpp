// The CUDA twins of the codec kernels (src/kernels/kernels_cuda.h) against the CPU reference, with named
// tolerances. They skip without a GPU, or in a build without the kernels; the switch tests run everywhere.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gradiveq/casq.h"
#include "gradiveq/pca_compressor.h"
#include "gradiveq/qsgd.h"
#include "kernel_switch_guard.h"
#include "kernels/kernels_cuda.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;
using testing::KernelSwitchGuard;
using testing::rel_error;

// Float32 products of K terms summed in another order (and with fused multiply-adds) than the CPU kernel:
// relative error of the whole output against the CPU reference.
constexpr double kProjectionTolerance = 1e-5;
// The same when the output is rounded to bfloat16 / float16 (8 / 11 significant bits) by both.
constexpr double kBFloat16OutTolerance = 8e-3;
constexpr double kFloat16OutTolerance = 1e-3;
// Float64 sums of exact float32 products, in another order than the CPU.
constexpr double kMomentsTolerance = 1e-12;

#define SKIP_WITHOUT_GPU()                                                               \
  do {                                                                                   \
    if (!detail::cuda_kernels_built()) GTEST_SKIP() << "built without the CUDA kernels"; \
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";                                \
  } while (0)

at::Device gpu() { return at::Device(at::kCUDA, 0); }

// A fitted compressor for slices of length k keeping d components, in `dtype`.
PcaCompressor fitted(int64_t k, int64_t d, at::ScalarType dtype, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  FitOptions fit;
  fit.target_ratio = double(k) / double(d);  // d (ceil of K / ratio), capped at d against rounding up
  fit.min_ratio = 0.0;
  fit.max_components = d;
  const at::Tensor samples = at::randn({std::max<int64_t>(2 * d, 4), k}, gen);
  return PcaCompressor::fit(samples, fit).with_basis_dtype(dtype);
}

TEST(CudaKernelSwitch, IsOffUnlessAskedAndRefusesABuildWithoutKernels) {
  KernelSwitchGuard guard;
  if (std::getenv("GRADIVEQ_CUDA_KERNELS") == nullptr) EXPECT_FALSE(detail::cuda_kernels_enabled());
  if (detail::cuda_kernels_built()) {
    detail::set_cuda_kernels_enabled(true);
    EXPECT_TRUE(detail::cuda_kernels_enabled());
  } else {
    expect_invalid([] { detail::set_cuda_kernels_enabled(true); }, {"enabled", "no CUDA kernels"});
  }
  detail::set_cuda_kernels_enabled(false);
  EXPECT_FALSE(detail::cuda_kernels_enabled());
}

TEST(CudaKernelSwitch, CpuTensorsNeverTakeTheCudaPath) {
  KernelSwitchGuard guard;
  if (detail::cuda_kernels_built()) detail::set_cuda_kernels_enabled(true);
  const PcaCompressor pca = fitted(36, 9, at::kFloat, 1);
  const at::Tensor g = at::randn({5, 36}, at::detail::createCPUGenerator(2));
  detail::set_cuda_kernels_enabled(false);
  const at::Tensor reference = pca.compress(g, 2);
  if (detail::cuda_kernels_built()) detail::set_cuda_kernels_enabled(true);
  EXPECT_TRUE(at::equal(pca.compress(g, 2), reference));
}

#ifdef GRADIVEQ_WITH_CUDA_KERNELS

struct Shape {
  int64_t rows, k, d;
};
// Kernel-row slices (K = 9 C) with row counts that leave partial tiles, a Linear-like layer, and the short,
// long products of kernel-position slices (S = 9 of a 3x3 conv, S = 1 of a 1x1 conv; K = C_in C_out), whose
// inner dimension is split over several blocks.
const std::vector<Shape> kShapes = {{16, 144, 36}, {33, 288, 72},  {70, 576, 144},
                                    {5, 100, 3},   {9, 4096, 256}, {1, 2048, 128}};

double out_tolerance(at::ScalarType out) {
  return out == at::kBFloat16 ? kBFloat16OutTolerance
         : out == at::kHalf   ? kFloat16OutTolerance
                              : kProjectionTolerance;
}

class CudaProjection : public ::testing::TestWithParam<std::tuple<at::ScalarType, at::ScalarType>> {};

TEST_P(CudaProjection, GroupedCompressAndDecompressMatchTheCpuKernels) {
  SKIP_WITHOUT_GPU();
  const auto [basis_dtype, out_dtype] = GetParam();
  std::vector<PcaCompressor> cpu, dev;
  std::vector<at::Tensor> slices, coeffs;
  std::vector<detail::ProjectionTask> compress, decompress;
  constexpr int64_t kWorld = 3;
  auto gen = at::detail::createCPUGenerator(7);
  for (size_t i = 0; i < kShapes.size(); ++i) {
    const Shape s = kShapes[i];
    cpu.push_back(fitted(s.k, s.d, basis_dtype, 10 + i));
    dev.push_back(cpu.back().to(gpu()));
    slices.push_back(at::randn({s.rows, s.k}, gen));
    coeffs.push_back(at::randn({s.rows, s.d}, gen));
    const PcaCompressor& p = dev.back();
    compress.push_back({slices.back().to(gpu()), p.basis(),
                        p.compress(at::zeros({1, s.k}, gpu()), kWorld).view(-1),
                        at::empty({s.rows, s.d}, at::TensorOptions().dtype(out_dtype).device(gpu())), 1.0f});
    // Decompress into every other column of a wider buffer: the strided rows of a gradient view.
    at::Tensor wide = at::zeros({s.rows, 2 * s.k}, at::TensorOptions().dtype(out_dtype).device(gpu()));
    decompress.push_back(
        {coeffs.back().to(gpu()), p.basis(), p.mean(), wide.narrow(1, 0, s.k), 1.0f / kWorld});
  }
  detail::cuda_compress_grouped(compress);
  detail::cuda_decompress_grouped(decompress);
  for (size_t i = 0; i < kShapes.size(); ++i) {
    const at::Tensor want_c = cpu[i].compress(slices[i], kWorld);
    const at::Tensor want_g = cpu[i].decompress(coeffs[i]) / double(kWorld);
    EXPECT_LT(rel_error(compress[i].out.cpu().to(at::kFloat), want_c), out_tolerance(out_dtype))
        << "layer " << i;
    EXPECT_LT(rel_error(decompress[i].out.cpu().to(at::kFloat), want_g), out_tolerance(out_dtype))
        << "layer " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaProjection,
                         ::testing::Combine(::testing::Values(at::kFloat, at::kBFloat16, at::kHalf),
                                            ::testing::Values(at::kFloat, at::kBFloat16, at::kHalf)));

TEST(CudaProjection, MoreTasksThanOneLaunchHoldsStillMatch) {
  SKIP_WITHOUT_GPU();
  const PcaCompressor cpu = fitted(64, 16, at::kFloat, 3), dev = cpu.to(gpu());
  auto gen = at::detail::createCPUGenerator(4);
  std::vector<at::Tensor> slices;
  std::vector<detail::ProjectionTask> tasks;
  for (int64_t i = 0; i < detail::kMaxGroupedTasks + 5; ++i) {
    slices.push_back(at::randn({3, 64}, gen));
    tasks.push_back({slices.back().to(gpu()), dev.basis(),
                     dev.compress(at::zeros({1, 64}, gpu()), 1).view(-1),
                     at::empty({3, 16}, at::TensorOptions().device(gpu())), 1.0f});
  }
  detail::cuda_compress_grouped(tasks);
  for (size_t i = 0; i < tasks.size(); ++i) {
    EXPECT_LT(rel_error(tasks[i].out.cpu(), cpu.compress(slices[i], 1)), kProjectionTolerance)
        << "task " << i;
  }
}

TEST(CudaProjection, PcaCompressorUsesTheKernelsWhenSwitchedOn) {
  SKIP_WITHOUT_GPU();
  KernelSwitchGuard guard;
  detail::set_cuda_kernels_enabled(true);
  const PcaCompressor cpu = fitted(288, 72, at::kBFloat16, 5), dev = cpu.to(gpu());
  const at::Tensor g = at::randn({40, 288}, at::detail::createCPUGenerator(6));
  const at::Tensor c = dev.compress(g.to(gpu()), 2);
  EXPECT_LT(rel_error(c.cpu(), cpu.compress(g, 2)), kProjectionTolerance);
  EXPECT_LT(rel_error(dev.decompress(c).cpu(), cpu.decompress(cpu.compress(g, 2))), kProjectionTolerance);
}

TEST(CudaProjection, RejectsTasksOnTheWrongDeviceOrOfMixedDtypes) {
  SKIP_WITHOUT_GPU();
  const PcaCompressor dev = fitted(36, 9, at::kFloat, 8).to(gpu());
  detail::ProjectionTask good{at::randn({4, 36}, gpu()), dev.basis(), at::zeros({9}, gpu()),
                              at::empty({4, 9}, gpu()), 1.0f};
  detail::ProjectionTask cpu_input = good;
  cpu_input.input = good.input.cpu();
  expect_invalid([&] { detail::cuda_compress_grouped({good, cpu_input}); }, {"input", "CUDA"});
  detail::ProjectionTask half_out = good;
  half_out.out = good.out.to(at::kHalf);
  expect_invalid([&] { detail::cuda_compress_grouped({good, half_out}); }, {"tasks", "out dtype"});
  detail::ProjectionTask short_bias = good;
  short_bias.bias = at::zeros({8}, gpu());
  expect_invalid([&] { detail::cuda_compress_grouped({short_bias}); }, {"bias", "9 values"});
}

TEST(CudaMoments, GramAndCovarianceMatchFloat64OnTheCpu) {
  SKIP_WITHOUT_GPU();
  const at::Tensor x = at::randn({37, 150}, at::detail::createCPUGenerator(9));
  const at::Tensor xd = x.to(at::kDouble);
  for (const bool transposed : {false, true}) {
    const int64_t side = transposed ? 150 : 37;
    at::Tensor moments = at::ones({side, side}, at::TensorOptions().dtype(at::kDouble).device(gpu()));
    detail::cuda_accumulate_moments(x.to(gpu()), moments, transposed);
    const at::Tensor want = (transposed ? xd.t().mm(xd) : xd.mm(xd.t())) + 1.0;  // it accumulates
    EXPECT_LT(rel_error(moments.cpu(), want), kMomentsTolerance) << (transposed ? "covariance" : "gram");
  }
}

// Values with a zero bucket, a bucket holding inf and a partial last bucket.
at::Tensor quantizer_input(int64_t bucket) {
  at::Tensor v = at::randn({5 * bucket + 7}, at::detail::createCPUGenerator(11));
  v.narrow(0, bucket, bucket).zero_();
  v[3 * bucket + 2] = std::numeric_limits<float>::infinity();
  return v;
}

class CudaQsgd : public ::testing::TestWithParam<std::tuple<int64_t, QsgdNorm>> {};

TEST_P(CudaQsgd, EncodesAndDecodesBitForBitLikeTheCpuCodec) {
  SKIP_WITHOUT_GPU();
  const auto [levels, norm] = GetParam();
  QsgdOptions o;
  o.levels = levels;
  o.bucket_size = 64;
  o.norm = norm;
  const QsgdCodec codec(o);
  const at::Tensor v = quantizer_input(o.bucket_size);
  const at::Tensor want = codec.encode(v, 1234);
  const at::Tensor got =
      detail::cuda_qsgd_encode(v.to(gpu()), levels, o.bucket_size, norm == QsgdNorm::kL2, 1234);
  ASSERT_EQ(got.numel(), want.numel());
  EXPECT_TRUE(at::equal(got.cpu(), want)) << "levels " << levels;
  at::Tensor want_sum = at::ones({v.numel()});
  codec.decode_add(want, want_sum);
  at::Tensor got_sum = at::ones({v.numel()}, gpu());
  detail::cuda_qsgd_decode_add(want.to(gpu()), levels, o.bucket_size, got_sum);
  EXPECT_TRUE(at::allclose(got_sum.cpu(), want_sum, 0, 0, /*equal_nan=*/true));
}

INSTANTIATE_TEST_SUITE_P(Levels, CudaQsgd,
                         ::testing::Combine(::testing::Values(int64_t(1), int64_t(7), int64_t(255)),
                                            ::testing::Values(QsgdNorm::kMax, QsgdNorm::kL2)));

TEST(CudaCasq, RoundsAndPacksBitForBitLikeTheCpuCodecGivenItsCodebooks) {
  SKIP_WITHOUT_GPU();
  for (const int64_t bits : {2, 3}) {
    CasqOptions o;
    o.bits = bits;
    o.clusters = 2;
    o.bucket_size = 64;
    const CasqCodec codec(o);
    const at::Tensor v = quantizer_input(o.bucket_size);
    const at::Tensor want = codec.encode(v, 99);
    const int64_t levels = int64_t(1) << bits, buckets = (v.numel() + 63) / 64;
    const at::Tensor books = want.narrow(0, 0, 4 * levels * buckets).clone().view(at::kFloat);
    const at::Tensor got = detail::cuda_casq_encode(v.to(gpu()), books.to(gpu()), bits, o.bucket_size, 99);
    EXPECT_TRUE(at::equal(got.cpu(), want)) << "bits " << bits;
    at::Tensor want_sum = at::zeros({v.numel()});
    codec.decode_add(want, want_sum);
    at::Tensor got_sum = at::zeros({v.numel()}, gpu());
    detail::cuda_casq_decode_add(want.to(gpu()), bits, o.bucket_size, got_sum);
    EXPECT_TRUE(at::allclose(got_sum.cpu(), want_sum, 0, 0, /*equal_nan=*/true)) << "bits " << bits;
  }
}

TEST(CudaQsgd, TheCodecPacksAndUnpacksCudaValuesOnTheDeviceWhenSwitchedOn) {
  SKIP_WITHOUT_GPU();
  KernelSwitchGuard guard;
  const QsgdCodec codec(QsgdOptions{});
  const at::Tensor v = quantizer_input(512);
  detail::set_cuda_kernels_enabled(true);
  const at::Tensor got = codec.encode(v.to(gpu()), 77);
  EXPECT_TRUE(got.is_cuda());  // the message stays on the device for the gather pipeline
  const at::Tensor want = codec.encode(v, 77);
  EXPECT_TRUE(at::equal(got.cpu(), want));
  at::Tensor got_sum = at::ones({v.numel()}, gpu()), want_sum = at::ones({v.numel()});
  codec.decode_add(got, got_sum);
  codec.decode_add(want, want_sum);
  EXPECT_TRUE(at::allclose(got_sum.cpu(), want_sum, 0, 0, /*equal_nan=*/true));
}

TEST(CudaQsgd, RejectsAMessageOfTheWrongLength) {
  SKIP_WITHOUT_GPU();
  at::Tensor out = at::zeros({100}, gpu());
  expect_invalid(
      [&] {
        detail::cuda_qsgd_decode_add(at::zeros({3}, at::TensorOptions().dtype(at::kByte).device(gpu())), 7,
                                     64, out);
      },
      {"packed", "expected"});
}

#else

TEST(CudaKernels, AreNotInThisBuild) {
  GTEST_SKIP() << "built without the CUDA kernels (GRADIVEQ_ENABLE_CUDA off)";
}

#endif  // GRADIVEQ_WITH_CUDA_KERNELS

}  // namespace
}  // namespace gradiveq
