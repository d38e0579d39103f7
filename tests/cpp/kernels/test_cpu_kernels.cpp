// Unit tests for src/kernels/kernels.h: the register-tiled CPU kernels against plain loops that sum in the
// order the header documents. The tiled kernels may only reorder which outputs are computed together, never
// the additions inside one output, so the tolerance is zero: every output must match the reference's bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kernels/kernels.h"

namespace gradiveq {
namespace {

template <typename B>
float widened(B value) {
  return static_cast<float>(value);
}

// out[s][j] = (0 + g[s][0] b[0][j] + g[s][1] b[1][j] + ...) + offset[j]: one product and one sum at a time.
template <typename B>
std::vector<float> reference_compress(const std::vector<float>& g, const std::vector<B>& basis,
                                      const std::vector<float>& offset, int64_t S, int64_t K, int64_t d) {
  std::vector<float> out(size_t(S * d));
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < d; ++j) {
      volatile float acc =
          0.0f;  // volatile: one rounding per step, whatever the compiler's contraction rules
      for (int64_t k = 0; k < K; ++k) {
        volatile float product = g[s * K + k] * widened(basis[k * d + j]);
        acc = acc + product;
      }
      out[s * d + j] = acc + offset[j];
    }
  }
  return out;
}

// out[s][k] = mean[k] + (tree over eight lanes + tail), lane l summing c[s][i] b[k][i] for i = l mod 8.
template <typename B>
std::vector<float> reference_decompress(const std::vector<float>& c, const std::vector<B>& basis,
                                        const std::vector<float>& mean, int64_t S, int64_t K, int64_t d) {
  std::vector<float> out(size_t(S * K));
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t k = 0; k < K; ++k) {
      volatile float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      volatile float tail = 0.0f;
      const int64_t full = d / 8 * 8;
      for (int64_t i = 0; i < full; ++i) {
        volatile float product = c[s * d + i] * widened(basis[k * d + i]);
        lanes[i % 8] = lanes[i % 8] + product;
      }
      for (int64_t i = full; i < d; ++i) {
        volatile float product = c[s * d + i] * widened(basis[k * d + i]);
        tail = tail + product;
      }
      volatile float left = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
      volatile float right = (lanes[4] + lanes[5]) + (lanes[6] + lanes[7]);
      volatile float dot = left + right;
      dot = dot + tail;
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

// Slice counts that hit every slice-group size, K below, at and above a 64-row block and a two-row step, and
// widths around every vector chunk (8, 16, 32 columns) with every tail.
struct Shape {
  int64_t S, K, d;
};
const Shape kShapes[] = {{1, 1, 1},     {1, 7, 3},    {2, 64, 8},   {3, 65, 16},  {4, 129, 31},
                         {5, 63, 33},   {6, 200, 47}, {7, 97, 64},  {8, 256, 26}, {9, 300, 41},
                         {9, 130, 100}, {10, 33, 7},  {11, 77, 57}, {13, 50, 129}};

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

TEST(CpuKernels, Float32MatchesThePlainLoopsBitForBit) { expect_kernels_match_reference<float>(100); }
TEST(CpuKernels, BFloat16MatchesThePlainLoopsBitForBit) {
  expect_kernels_match_reference<c10::BFloat16>(200);
}
TEST(CpuKernels, Float16MatchesThePlainLoopsBitForBit) { expect_kernels_match_reference<c10::Half>(300); }

TEST(CpuKernels, ThreadsSplittingTheWorkChangeNoBit) {
  const int threads_before = at::get_num_threads();
  for (int threads : {2, 3}) {
    at::set_num_threads(threads);
    expect_kernels_match_reference<float>(400);
  }
  at::set_num_threads(threads_before);
}

}  // namespace
}  // namespace gradiveq
