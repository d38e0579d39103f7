// Unit tests for src/kernels/kernels.h: the register-tiled CPU kernels, in every build this CPU runs
// (portable, AVX2, AVX-512), against plain loops of std::fma in the order pca_project_cpu_tiles.h documents.
// The tiles may only reorder which outputs are computed together, never the operations inside one output, so
// the tolerance is zero: every output must match the reference's bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace gradiveq {
namespace {

template <typename B>
float widened(B value) {
  return static_cast<float>(value);
}

// out[s][j] = fma(g[s][K-1], b[K-1][j], ... fma(g[s][0], b[0][j], 0)) + offset[j].
template <typename B>
std::vector<float> reference_compress(const std::vector<float>& g, const std::vector<B>& basis,
                                      const std::vector<float>& offset, int64_t S, int64_t K, int64_t d) {
  std::vector<float> out(size_t(S * d));
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < d; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(g[s * K + k], widened(basis[k * d + j]), acc);
      volatile float sum = acc + offset[j];  // volatile: rounded on its own, whatever the contraction rules
      out[s * d + j] = sum;
    }
  }
  return out;
}

// out[s][k] = mean[k] + tree over sixteen lanes, lane l the fma chain of c[s][i] b[k][i] over the i < d with
// i = l mod 16.
template <typename B>
std::vector<float> reference_decompress(const std::vector<float>& c, const std::vector<B>& basis,
                                        const std::vector<float>& mean, int64_t S, int64_t K, int64_t d) {
  std::vector<float> out(size_t(S * K));
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t k = 0; k < K; ++k) {
      float lanes[16] = {};
      for (int64_t i = 0; i < d; ++i) {
        lanes[i % 16] = std::fma(c[s * d + i], widened(basis[k * d + i]), lanes[i % 16]);
      }
      volatile float quarters[4];
      for (int q = 0; q < 4; ++q) {
        volatile float left = lanes[4 * q] + lanes[4 * q + 1];
        volatile float right = lanes[4 * q + 2] + lanes[4 * q + 3];
        quarters[q] = left + right;
      }
      volatile float left = quarters[0] + quarters[1];
      volatile float right = quarters[2] + quarters[3];
      volatile float dot = left + right;
      out[s * K + k] = mean[k] + dot;
    }
  }
  return out;
}

std::vector<float> random_floats(int64_t n, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  at::Tensor t = at::randn({n}, gen);
  return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + n);
}

template <typename B>
std::vector<B> random_basis(int64_t n, uint64_t seed) {
  const std::vector<float> values = random_floats(n, seed);
  return std::vector<B>(values.begin(), values.end());
}

int64_t count_mismatches(const std::vector<float>& got, const std::vector<float>& want) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) bad += std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
  return bad;
}

// Slice counts that hit every slice-group size, K below, at and above a 64-row block, and widths around every
// vector chunk (16, 32, 64 columns) with every tail.
struct Shape {
  int64_t S, K, d;
};
const Shape kShapes[] = {{1, 1, 1},     {1, 7, 3},    {2, 64, 8},   {3, 65, 16},   {4, 129, 31},
                         {5, 63, 33},   {6, 200, 47}, {7, 97, 64},  {8, 256, 26},  {9, 300, 41},
                         {9, 130, 100}, {10, 33, 7},  {11, 77, 57}, {13, 50, 129}, {3, 70, 64},
                         {9, 64, 80},   {2, 40, 112}, {4, 20, 193}};

template <typename B>
void expect_kernels_match_reference(uint64_t seed) {
  for (const Shape& shape : kShapes) {
    const auto [S, K, d] = shape;
    const std::vector<B> basis = random_basis<B>(K * d, seed + 1);
    const std::vector<float> g = random_floats(S * K, seed + 2), offset = random_floats(d, seed + 3);
    const std::vector<float> c = random_floats(S * d, seed + 4), mean = random_floats(K, seed + 5);
    std::vector<float> got_c(size_t(S * d)), got_x(size_t(S * K));
    detail::cpu_compress(g.data(), basis.data(), offset.data(), got_c.data(), S, K, d);
    detail::cpu_decompress(c.data(), basis.data(), mean.data(), got_x.data(), K, S, K, d);
    EXPECT_EQ(count_mismatches(got_c, reference_compress(g, basis, offset, S, K, d)), 0)
        << "compress, S " << S << " K " << K << " d " << d;
    EXPECT_EQ(count_mismatches(got_x, reference_decompress(c, basis, mean, S, K, d)), 0)
        << "decompress, S " << S << " K " << K << " d " << d;
  }
}

// Runs `body` once under every build of the tiles this CPU has, then restores the one that was in use.
template <typename Body>
void for_every_isa(Body body) {
  const detail::CpuIsa before = detail::cpu_kernel_isa();
  for (detail::CpuIsa isa : detail::kAllCpuIsas) {
    if (!detail::cpu_supports(isa)) continue;
    SCOPED_TRACE(detail::cpu_isa_name(isa));
    detail::set_cpu_kernel_isa(isa);
    body();
  }
  detail::set_cpu_kernel_isa(before);
}

TEST(CpuKernels, Float32MatchesThePlainLoopsBitForBit) {
  for_every_isa([] { expect_kernels_match_reference<float>(100); });
}
TEST(CpuKernels, BFloat16MatchesThePlainLoopsBitForBit) {
  for_every_isa([] { expect_kernels_match_reference<c10::BFloat16>(200); });
}
TEST(CpuKernels, Float16MatchesThePlainLoopsBitForBit) {
  for_every_isa([] { expect_kernels_match_reference<c10::Half>(300); });
}

// A K = 4096 layer of ResNet-32 (9 slices, d = 409: 6 full 64-column tiles, a 16-column one and a 9-column
// partial one; 64 basis blocks, each prefetching the next): every build gives the reference's bits.
TEST(CpuKernels, AResNet32LayerMatchesThePlainLoopsInEveryBuild) {
  constexpr int64_t S = 9, K = 4096, d = 409;
  const std::vector<float> basis = random_floats(K * d, 501), g = random_floats(S * K, 502);
  const std::vector<float> offset = random_floats(d, 503), c = random_floats(S * d, 504);
  const std::vector<float> mean = random_floats(K, 505);
  const std::vector<float> want_c = reference_compress(g, basis, offset, S, K, d);
  const std::vector<float> want_x = reference_decompress(c, basis, mean, S, K, d);
  for_every_isa([&] {
    std::vector<float> got_c(size_t(S * d)), got_x(size_t(S * K));
    detail::cpu_compress(g.data(), basis.data(), offset.data(), got_c.data(), S, K, d);
    detail::cpu_decompress(c.data(), basis.data(), mean.data(), got_x.data(), K, S, K, d);
    EXPECT_EQ(count_mismatches(got_c, want_c), 0);
    EXPECT_EQ(count_mismatches(got_x, want_x), 0);
  });
}

TEST(CpuKernels, ThreadsSplittingTheWorkChangeNoBit) {
  const int threads_before = at::get_num_threads();
  for (int threads : {2, 3}) {
    at::set_num_threads(threads);
    for_every_isa([] { expect_kernels_match_reference<float>(400); });
  }
  at::set_num_threads(threads_before);
}

TEST(CpuKernels, TheDefaultBuildIsInUseAndUnsupportedOnesAreRefused) {
  EXPECT_EQ(detail::cpu_kernel_isa(), detail::default_cpu_isa());
  EXPECT_TRUE(detail::cpu_supports(detail::CpuIsa::kPortable));
  for (detail::CpuIsa isa : {detail::CpuIsa::kAvx2, detail::CpuIsa::kAvx512}) {
    if (detail::cpu_supports(isa)) continue;
    try {
      detail::set_cpu_kernel_isa(isa);
      ADD_FAILURE() << "set_cpu_kernel_isa accepted " << detail::cpu_isa_name(isa)
                    << ", which this CPU lacks";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("isa"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace gradiveq
