#include "kernels/kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

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

// Eight float lanes as one value (GCC / Clang vector extension): element-wise arithmetic, rounded exactly like
// the eight scalar lanes of fixed_order_dot, on any vector width (SSE2 splits it in two).
typedef float Lanes8 __attribute__((vector_size(32)));

inline Lanes8 load8(const float* p) {
  Lanes8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float reduce8(Lanes8 x) { return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])); }

// Half-precision basis elements widened to float32. bfloat16 is the top half of a float32. Both widenings are
// exact, so the widened basis is the same on every rank.
GVQ_VECTOR_CLONES void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}
// float16 with integer ops and one exact power-of-two multiply (vectorisable, unlike a per-value call): the
// exponent and mantissa bits move into float32 position and 2^112 rebiases the exponent; subnormal halves become
// float32 subnormals that the multiply scales exactly (unless denormals are flushed to zero: torch's default
// leaves them alone). inf / NaN get the all-ones exponent back.
GVQ_VECTOR_CLONES void widen(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i].x;
    const uint32_t magnitude = h & 0x7fffu;
    const uint32_t shifted = magnitude << 13;
    float f;
    std::memcpy(&f, &shifted, sizeof(f));
    f *= 0x1.0p112f;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    bits |= (magnitude >= 0x7c00u ? 0x7f800000u : 0u) | ((h & 0x8000u) << 16);
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Columns [j0, j1) of the compress product over basis rows [k0, k1), added into out. out[s][j] accumulates over
// k in increasing order; the inner loops run along basis rows, so vectorising them never reorders a sum. Four
// rows are applied to a vector of outputs before it is stored again (a quarter of the loads and stores of the
// accumulator; the additions happen in the same order). `basis` points at row k0, column j0, row stride `ld`.
GVQ_VECTOR_CLONES void compress_block(const float* g, const float* basis, int64_t ld, float* out, int64_t S,
                                      int64_t K, int64_t d, int64_t j0, int64_t width, int64_t k0, int64_t k1) {
  for (int64_t s = 0; s < S; ++s) {
    float* acc = out + s * d + j0;
    const float* gs = g + s * K;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      const float a0 = gs[k], a1 = gs[k + 1], a2 = gs[k + 2], a3 = gs[k + 3];
      const float* r0 = basis + (k - k0) * ld;
      const float* r1 = r0 + ld;
      const float* r2 = r1 + ld;
      const float* r3 = r2 + ld;
      int64_t j = 0;
      for (; j + 8 <= width; j += 8) {
        Lanes8 v = load8(acc + j);
        v += a0 * load8(r0 + j);
        v += a1 * load8(r1 + j);
        v += a2 * load8(r2 + j);
        v += a3 * load8(r3 + j);
        std::memcpy(acc + j, &v, sizeof(v));
      }
      for (; j < width; ++j) {
        float v = acc[j];
        v += a0 * r0[j];
        v += a1 * r1[j];
        v += a2 * r2[j];
        v += a3 * r3[j];
        acc[j] = v;
      }
    }
    for (; k < k1; ++k) {
      const float a = gs[k];
      const float* row = basis + (k - k0) * ld;
      for (int64_t j = 0; j < width; ++j) acc[j] += a * row[j];
    }
  }
}

template <typename B>
void compress_columns(const float* g, const B* basis, const float* offset, float* out, int64_t S, int64_t K,
                      int64_t d, int64_t j0, int64_t j1) {
  const int64_t width = j1 - j0;
  for (int64_t s = 0; s < S; ++s) std::fill(out + s * d + j0, out + s * d + j1, 0.0f);
  std::vector<float> block;
  if constexpr (!std::is_same_v<B, float>) block.resize(size_t(kBasisRowBlock * width));
  for (int64_t k0 = 0; k0 < K; k0 += kBasisRowBlock) {
    const int64_t k1 = std::min(K, k0 + kBasisRowBlock);
    if constexpr (std::is_same_v<B, float>) {
      compress_block(g, basis + k0 * d + j0, d, out, S, K, d, j0, width, k0, k1);
    } else {
      for (int64_t k = k0; k < k1; ++k) widen(basis + k * d + j0, block.data() + (k - k0) * width, width);
      compress_block(g, block.data(), width, out, S, K, d, j0, width, k0, k1);
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

// Element k of every decompressed row: one fixed-order dot each with basis row `row` (float32, d values). Four
// slices go through the row together: their four dots are independent chains, so the adder's latency is hidden
// (one dot alone waits on its single accumulator every step). Each dot still sums in fixed_order_dot's order.
GVQ_VECTOR_CLONES void decompress_row(const float* c, const float* row, float mean_k, float* out,
                                      int64_t out_row_stride, int64_t S, int64_t d, int64_t k) {
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    const float* c0 = c + s * d;
    const float* c1 = c0 + d;
    const float* c2 = c1 + d;
    const float* c3 = c2 + d;
    Lanes8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
      const Lanes8 r = load8(row + i);
      a0 += load8(c0 + i) * r;
      a1 += load8(c1 + i) * r;
      a2 += load8(c2 + i) * r;
      a3 += load8(c3 + i) * r;
    }
    float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (; i < d; ++i) {
      t0 += c0[i] * row[i];
      t1 += c1[i] * row[i];
      t2 += c2[i] * row[i];
      t3 += c3[i] * row[i];
    }
    out[(s + 0) * out_row_stride + k] = mean_k + (reduce8(a0) + t0);
    out[(s + 1) * out_row_stride + k] = mean_k + (reduce8(a1) + t1);
    out[(s + 2) * out_row_stride + k] = mean_k + (reduce8(a2) + t2);
    out[(s + 3) * out_row_stride + k] = mean_k + (reduce8(a3) + t3);
  }
  for (; s < S; ++s) out[s * out_row_stride + k] = mean_k + fixed_order_dot(c + s * d, row, d);
}

template <typename B>
void decompress_rows(const float* c, const B* basis, const float* mean, float* out, int64_t out_row_stride,
                     int64_t S, int64_t d, int64_t k0, int64_t k1) {
  std::vector<float> row;
  if constexpr (!std::is_same_v<B, float>) row.resize(size_t(d));
  for (int64_t k = k0; k < k1; ++k) {
    if constexpr (std::is_same_v<B, float>) {
      decompress_row(c, basis + k * d, mean[k], out, out_row_stride, S, d, k);
    } else {
      widen(basis + k * d, row.data(), d);
      decompress_row(c, row.data(), mean[k], out, out_row_stride, S, d, k);
    }
  }
}

template <typename B>
void compress_impl(const float* g, const B* basis, const float* offset, float* out, int64_t S, int64_t K, int64_t d) {
  at::parallel_for(0, d, 64, [&](int64_t j0, int64_t j1) { compress_columns(g, basis, offset, out, S, K, d, j0, j1); });
}

template <typename B>
void decompress_impl(const float* c, const B* basis, const float* mean, float* out, int64_t out_row_stride,
                     int64_t S, int64_t K, int64_t d) {
  at::parallel_for(0, K, 256,
                   [&](int64_t k0, int64_t k1) { decompress_rows(c, basis, mean, out, out_row_stride, S, d, k0, k1); });
}

}  // namespace

void cpu_compress(const float* g, const float* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d) {
  compress_impl(g, basis, offset, out, S, K, d);
}
void cpu_compress(const float* g, const c10::BFloat16* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d) {
  compress_impl(g, basis, offset, out, S, K, d);
}
void cpu_compress(const float* g, const c10::Half* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d) {
  compress_impl(g, basis, offset, out, S, K, d);
}

void cpu_decompress(const float* c, const float* basis, const float* mean, float* out, int64_t out_row_stride,
                    int64_t S, int64_t K, int64_t d) {
  decompress_impl(c, basis, mean, out, out_row_stride, S, K, d);
}
void cpu_decompress(const float* c, const c10::BFloat16* basis, const float* mean, float* out,
                    int64_t out_row_stride, int64_t S, int64_t K, int64_t d) {
  decompress_impl(c, basis, mean, out, out_row_stride, S, K, d);
}
void cpu_decompress(const float* c, const c10::Half* basis, const float* mean, float* out, int64_t out_row_stride,
                    int64_t S, int64_t K, int64_t d) {
  decompress_impl(c, basis, mean, out, out_row_stride, S, K, d);
}

}  // namespace gradiveq::detail
