#include "cpu_codec_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

// Runtime dispatch to AVX2 / AVX-512 versions where the compiler supports target_clones (GCC, Clang on x86-64):
// the portable SSE2 build alone is ~2x slower than MKL on these memory-bound shapes.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define GVQ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef GVQ_VECTOR_CLONES
#define GVQ_VECTOR_CLONES
#endif

namespace gradiveq::detail {

namespace {

// Rows of the basis per block: 64 rows of up to d = 512 floats (128 KiB) stay in L2 while every slice uses them.
constexpr int64_t kBasisRowBlock = 64;

// Columns [j0, j1) of the compress product. out[s][j] accumulates over k in increasing order; the inner loop runs
// along a basis row, so vectorising it never reorders a sum.
GVQ_VECTOR_CLONES void compress_columns(const float* g, const float* basis, const float* offset, float* out,
                                        int64_t S, int64_t K, int64_t d, int64_t j0, int64_t j1) {
  const int64_t width = j1 - j0;
  for (int64_t s = 0; s < S; ++s) std::fill(out + s * d + j0, out + s * d + j1, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kBasisRowBlock) {
    const int64_t k1 = std::min(K, k0 + kBasisRowBlock);
    for (int64_t s = 0; s < S; ++s) {
      float* __restrict acc = out + s * d + j0;
      const float* gs = g + s * K;
      for (int64_t k = k0; k < k1; ++k) {
        const float a = gs[k];
        const float* __restrict row = basis + k * d + j0;
        for (int64_t j = 0; j < width; ++j) acc[j] += a * row[j];
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    float* __restrict acc = out + s * d + j0;
    for (int64_t j = 0; j < width; ++j) acc[j] += offset[j0 + j];
  }
}

// Dot product with eight fixed partial sums: vectorisable without -ffast-math, the same order on every call.
inline float fixed_order_dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l] * y[i + l];
  }
  float tail = 0;
  for (; i < n; ++i) tail += x[i] * y[i];
  return (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))) + tail;
}

// Elements [k0, k1) of every decompressed row: one fixed-order dot each.
GVQ_VECTOR_CLONES void decompress_rows(const float* c, const float* basis, const float* mean, float* out,
                                       int64_t out_row_stride, int64_t S, int64_t d, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = basis + k * d;
    for (int64_t s = 0; s < S; ++s) out[s * out_row_stride + k] = mean[k] + fixed_order_dot(c + s * d, row, d);
  }
}

}  // namespace

void cpu_compress(const float* g, const float* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d) {
  at::parallel_for(0, d, 64, [&](int64_t j0, int64_t j1) { compress_columns(g, basis, offset, out, S, K, d, j0, j1); });
}

void cpu_decompress(const float* c, const float* basis, const float* mean, float* out, int64_t out_row_stride,
                    int64_t S, int64_t K, int64_t d) {
  at::parallel_for(0, K, 256,
                   [&](int64_t k0, int64_t k1) { decompress_rows(c, basis, mean, out, out_row_stride, S, d, k0, k1); });
}

}  // namespace gradiveq::detail
