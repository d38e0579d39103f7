#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/kernels.h"

// Runtime dispatch to AVX2 / AVX-512 versions where the compiler supports target_clones (GCC, Clang on
// x86-64): the portable SSE2 build alone is ~2x slower on these shapes. The register tiles below are sized
// for AVX2's 16 vector registers, so they fit every clone.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define GVQ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef GVQ_VECTOR_CLONES
#define GVQ_VECTOR_CLONES
#endif
// The tile helpers are templates inlined into the cloned drivers, so each clone gets its own vector code.
#define GVQ_INLINE inline __attribute__((always_inline))

namespace gradiveq::detail {

namespace {

// Rows of the basis per block: 64 rows of up to d = 512 floats (128 KiB) stay in L2 while every slice uses
// them.
constexpr int64_t kBasisRowBlock = 64;
// Slices per register tile. Compress: up to 3 slices x 32 columns (twelve 8-lane accumulators, of AVX2's 16
// registers); decompress: up to 4 slices of one basis row. Enough independent sums to hide the adder's
// latency, few enough that none spills.
constexpr int64_t kCompressSlicesPerTile = 3;
constexpr int64_t kDecompressSlicesPerTile = 4;

// Eight float lanes as one value (GCC / Clang vector extension): element-wise arithmetic, rounded exactly
// like the scalar lanes, on any vector width (SSE2 splits it in two). Not 16 lanes: GCC keeps 64-byte vectors
// on the stack on AVX2 (measured: the compress 20x slower).
typedef float Lanes8 __attribute__((vector_size(32)));

template <typename V>
GVQ_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
GVQ_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

GVQ_INLINE float reduce8(Lanes8 x) {
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

// Half-precision basis elements widened to float32. bfloat16 is the top half of a float32. Both widenings are
// exact, so the widened basis is the same on every rank.
GVQ_VECTOR_CLONES void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}
// float16 with integer ops and one exact power-of-two multiply (vectorisable, unlike a per-value call): the
// exponent and mantissa bits move into float32 position and 2^112 rebiases the exponent; subnormal halves
// become float32 subnormals that the multiply scales exactly (unless denormals are flushed to zero: torch's
// default leaves them alone). inf / NaN get the all-ones exponent back.
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

// ---- compress: out[s][j] = (sum over k, in increasing order, of g[s][k] b[k][j]) + offset[j] ----

// One tile: SL slices x NV vectors of V columns, held in registers over basis rows [k0, k1). Each accumulator
// takes its products in increasing k, so the sums round exactly as one scalar loop over k would.
// One tile: SL slices x NV vectors of 8 columns, held in registers over basis rows [k0, k1). Each accumulator
// takes its products in increasing k, so the sums round exactly as one scalar loop over k would. The constant
// loops are unrolled so that the accumulator array becomes registers.
template <int SL, int NV>
GVQ_INLINE void compress_tile(const float* g, int64_t K, const float* rows, int64_t ld, float* out, int64_t d,
                              int64_t k0, int64_t k1) {
  Lanes8 acc[SL][NV];
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[s][v] = load<Lanes8>(out + s * d + v * 8);
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = rows + (k - k0) * ld;
#pragma GCC unroll 16
    for (int s = 0; s < SL; ++s) {
      const float a = g[s * K + k];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[s][v] += a * load<Lanes8>(row + v * 8);
    }
  }
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store(out + s * d + v * 8, acc[s][v]);
}

// Columns [j, j + 8 NV) of every slice, in slice groups of nearly equal size (9 slices: 3 + 3 + 3):
// the tile's basis rows (64 x 32 floats: 8 KiB) stay in L1 while every group goes through them.
template <int NV>
GVQ_INLINE void compress_column_tile(const float* g, const float* rows, int64_t ld, float* out, int64_t S,
                                     int64_t K, int64_t d, int64_t k0, int64_t k1) {
  const int64_t groups = (S + kCompressSlicesPerTile - 1) / kCompressSlicesPerTile;
  for (int64_t group = 0, s = 0; group < groups; ++group) {
    const int64_t count = (S - s) / (groups - group);
    const float* gs = g + s * K;
    float* os = out + s * d;
    switch (count) {
      case 1:
        compress_tile<1, NV>(gs, K, rows, ld, os, d, k0, k1);
        break;
      case 2:
        compress_tile<2, NV>(gs, K, rows, ld, os, d, k0, k1);
        break;
      default:
        compress_tile<3, NV>(gs, K, rows, ld, os, d, k0, k1);
        break;
    }
    s += count;
  }
}

// Basis rows [k0, k1) (float32, `rows` at row k0 and the first column, row stride ld) applied to every slice:
// 32-column tiles, then 16, then 8, then the last columns one at a time.
GVQ_VECTOR_CLONES void compress_block(const float* g, const float* rows, int64_t ld, float* out, int64_t S,
                                      int64_t K, int64_t d, int64_t width, int64_t k0, int64_t k1) {
  int64_t j = 0;
  for (; j + 32 <= width; j += 32) compress_column_tile<4>(g, rows + j, ld, out + j, S, K, d, k0, k1);
  for (; j + 16 <= width; j += 16) compress_column_tile<2>(g, rows + j, ld, out + j, S, K, d, k0, k1);
  for (; j + 8 <= width; j += 8) compress_column_tile<1>(g, rows + j, ld, out + j, S, K, d, k0, k1);
  for (; j < width; ++j) {
    for (int64_t s = 0; s < S; ++s) {
      float acc = out[s * d + j];
      for (int64_t k = k0; k < k1; ++k) acc += g[s * K + k] * rows[(k - k0) * ld + j];
      out[s * d + j] = acc;
    }
  }
}

template <typename B>
void compress_columns(const float* g, const B* basis, const float* offset, float* out, int64_t S, int64_t K,
                      int64_t d, int64_t j0, int64_t j1) {
  const int64_t width = j1 - j0;
  for (int64_t s = 0; s < S; ++s) std::fill(out + s * d + j0, out + s * d + j1, 0.0f);
  // Every block is first copied (widened if need be) into `block`, rows of `width` floats: one sequential
  // pass over the basis that the hardware prefetches, where the tiles' walk down 64 rows of d floats is not
  // (measured on ResNet-32's K = 4096 layers: the packed block makes the compress ~15% faster, not slower).
  std::vector<float> block(size_t(kBasisRowBlock * width));
  for (int64_t k0 = 0; k0 < K; k0 += kBasisRowBlock) {
    const int64_t k1 = std::min(K, k0 + kBasisRowBlock);
    for (int64_t k = k0; k < k1; ++k) {
      float* row = block.data() + (k - k0) * width;
      if constexpr (std::is_same_v<B, float>) {
        std::memcpy(row, basis + k * d + j0, size_t(width) * sizeof(float));
      } else {
        widen(basis + k * d + j0, row, width);
      }
    }
    compress_block(g, block.data(), width, out + j0, S, K, d, width, k0, k1);
  }
  for (int64_t s = 0; s < S; ++s) {
    float* __restrict acc = out + s * d + j0;
    for (int64_t j = 0; j < width; ++j) acc[j] += offset[j0 + j];
  }
}

// ---- decompress: out[s][k] = mean[k] + dot(c[s], b[k]), the dot in a fixed order: eight lanes, lane l
// summing the products i = l mod 8 in increasing i, then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)),
// then the scalar tail past the last multiple of 8 (summed in increasing i) ----

// One tile: SL slices through basis row k (float32, d values), SL independent dots in registers (one dot
// alone waits on its single accumulator every step). Measured against two and three rows per tile: one row
// with up to four slices is the fastest on ResNet-32's shapes.
template <int SL>
GVQ_INLINE void decompress_tile(const float* c, const float* row, float mean_k, float* out,
                                int64_t out_row_stride, int64_t d, int64_t k) {
  Lanes8 acc[SL] = {};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const Lanes8 b = load<Lanes8>(row + i);
#pragma GCC unroll 16
    for (int s = 0; s < SL; ++s) acc[s] += load<Lanes8>(c + s * d + i) * b;
  }
  float tail[SL] = {};
  for (; i < d; ++i)
#pragma GCC unroll 16
    for (int s = 0; s < SL; ++s) tail[s] += c[s * d + i] * row[i];
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s) out[s * out_row_stride + k] = mean_k + (reduce8(acc[s]) + tail[s]);
}

// Element k of every decompressed slice, in slice groups of nearly equal size.
GVQ_VECTOR_CLONES void decompress_row(const float* c, const float* row, float mean_k, float* out,
                                      int64_t out_row_stride, int64_t S, int64_t d, int64_t k) {
  const int64_t groups = (S + kDecompressSlicesPerTile - 1) / kDecompressSlicesPerTile;
  for (int64_t group = 0, s = 0; group < groups; ++group) {
    const int64_t count = (S - s) / (groups - group);
    const float* cs = c + s * d;
    float* os = out + s * out_row_stride;
    switch (count) {
      case 1:
        decompress_tile<1>(cs, row, mean_k, os, out_row_stride, d, k);
        break;
      case 2:
        decompress_tile<2>(cs, row, mean_k, os, out_row_stride, d, k);
        break;
      case 3:
        decompress_tile<3>(cs, row, mean_k, os, out_row_stride, d, k);
        break;
      default:
        decompress_tile<4>(cs, row, mean_k, os, out_row_stride, d, k);
        break;
    }
    s += count;
  }
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
void compress_impl(const float* g, const B* basis, const float* offset, float* out, int64_t S, int64_t K,
                   int64_t d) {
  at::parallel_for(0, d, 64,
                   [&](int64_t j0, int64_t j1) { compress_columns(g, basis, offset, out, S, K, d, j0, j1); });
}

template <typename B>
void decompress_impl(const float* c, const B* basis, const float* mean, float* out, int64_t out_row_stride,
                     int64_t S, int64_t K, int64_t d) {
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    decompress_rows(c, basis, mean, out, out_row_stride, S, d, k0, k1);
  });
}

}  // namespace

void cpu_compress(const float* g, const float* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d) {
  compress_impl(g, basis, offset, out, S, K, d);
}
void cpu_compress(const float* g, const c10::BFloat16* basis, const float* offset, float* out, int64_t S,
                  int64_t K, int64_t d) {
  compress_impl(g, basis, offset, out, S, K, d);
}
void cpu_compress(const float* g, const c10::Half* basis, const float* offset, float* out, int64_t S,
                  int64_t K, int64_t d) {
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
void cpu_decompress(const float* c, const c10::Half* basis, const float* mean, float* out,
                    int64_t out_row_stride, int64_t S, int64_t K, int64_t d) {
  decompress_impl(c, basis, mean, out, out_row_stride, S, K, d);
}

}  // namespace gradiveq::detail
