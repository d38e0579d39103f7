// The register tiles of the CPU codec kernels, written once over a 16-float vector type (internal).
//
// Included by exactly one translation unit per instruction set (pca_project_cpu_avx512.cpp,
// pca_project_cpu_avx2.cpp, and the portable one in pca_project_cpu.cpp), each of which first defines, in an
// anonymous namespace inside its own namespace:
//   Lanes16 zero16(); Lanes16 load16(const float*); void store16(float*, Lanes16);
//   Lanes16 broadcast16(float); Lanes16 fma16(Lanes16 a, Lanes16 b, Lanes16 acc);  // a b + acc, one rounding
//   float reduce16(Lanes16);   //
//   ((((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)))+(((l8+l9)+(l10+l11))+((l12+l13)+(l14+l15)))) Lanes16
//   load16_first(const float* p, int n);            // lanes [0, n) from p, the rest 0 void
//   store16_first(float* p, Lanes16 x, int n);          // lanes [0, n) to p Lanes16 fma16_first(Lanes16 a,
//   Lanes16 b, Lanes16 acc, int n);  // fma16 in lanes [0, n), acc elsewhere constexpr int kCompressVectors;
//   // 16-float column vectors per compress tile that fit the register file
// and then includes this file inside that namespace: the two drivers at the bottom, compress_block and
// decompress_rows, are the entry points cpu_isa.h declares for it.
// Every output is one chain of fused multiply-adds in a fixed order, identical in every instruction set (an
// IEEE fused multiply-add rounds once, whichever unit computes it), so the three builds give the same bits.
// Nothing here calls the standard library: a template the AVX-512 unit instantiated out of line could
// otherwise be picked by the linker for the portable one.

// bfloat16 basis bits (the top half of a float32) widened in registers, so that a bfloat16 row streams half
// the bytes of a float32 one and the products see exactly its float32 widening. The last 1-15 go through a
// zeroed copy (a masked 16-bit load needs more than each instruction set guarantees).
GVQ_INLINE Lanes16 load16_first(const uint16_t* p, int n) {
  uint16_t copy[16] = {};
  for (int l = 0; l < n; ++l) copy[l] = p[l];
  return load16(copy);
}

// ---- compress: out[s][j] = fma chain over k increasing of g[s][k] b[k][j], from out's value ----

// One tile: SL slices x NV vectors of 16 columns in registers over basis rows [k0, k1) (`rows` at row k0).
// With `last` < 16 the last vector holds only that many columns: the loads past them read zeros, and only
// those columns are stored, so a partial tile computes its columns exactly as a full one.
template <int SL, int NV>
GVQ_INLINE void compress_tile(const float* g, int64_t K, const float* rows, int64_t ld, float* out, int64_t d,
                              int64_t k0, int64_t k1, int last = 16) {
  Lanes16 acc[SL][NV];
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s) {
#pragma GCC unroll 16
    for (int v = 0; v + 1 < NV; ++v) acc[s][v] = load16(out + s * d + v * 16);
    acc[s][NV - 1] = load16_first(out + s * d + (NV - 1) * 16, last);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = rows + (k - k0) * ld;
    Lanes16 b[NV];
#pragma GCC unroll 16
    for (int v = 0; v + 1 < NV; ++v) b[v] = load16(row + v * 16);
    b[NV - 1] = load16_first(row + (NV - 1) * 16, last);
#pragma GCC unroll 16
    for (int s = 0; s < SL; ++s) {
      const Lanes16 a = broadcast16(g[s * K + k]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[s][v] = fma16(a, b[v], acc[s][v]);
    }
  }
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s) {
#pragma GCC unroll 16
    for (int v = 0; v + 1 < NV; ++v) store16(out + s * d + v * 16, acc[s][v]);
    store16_first(out + s * d + (NV - 1) * 16, acc[s][NV - 1], last);
  }
}

// Columns [j, j + 16 NV) of every slice, in groups of at most 3 slices of nearly equal size (9 = 3 + 3 + 3):
// the tile's basis rows stay in L1 while every group goes through them.
constexpr int64_t kCompressSlicesPerTile = 3;
constexpr int64_t kCacheLine = 64;

// Asks for the next `lines` cache lines of a prefetch stream, so that they arrive while the tiles compute.
GVQ_INLINE void prefetch_lines(const char*& next, const char* end, int64_t lines) {
  for (int64_t i = 0; i < lines && next < end; ++i, next += kCacheLine) __builtin_prefetch(next, 0, 2);
}

template <int NV>
GVQ_INLINE void compress_column_tile(const float* g, const float* rows, int64_t ld, float* out, int64_t S,
                                     int64_t K, int64_t d, int64_t k0, int64_t k1, const char*& prefetch,
                                     const char* prefetch_end, int64_t lines_per_group, int last = 16) {
  const int64_t groups = (S + kCompressSlicesPerTile - 1) / kCompressSlicesPerTile;
  for (int64_t group = 0, s = 0; group < groups; ++group) {
    prefetch_lines(prefetch, prefetch_end, lines_per_group);
    const int64_t count = (S - s) / (groups - group);
    const float* gs = g + s * K;
    float* os = out + s * d;
    if (count == 1) {
      compress_tile<1, NV>(gs, K, rows, ld, os, d, k0, k1, last);
    } else if (count == 2) {
      compress_tile<2, NV>(gs, K, rows, ld, os, d, k0, k1, last);
    } else {
      compress_tile<3, NV>(gs, K, rows, ld, os, d, k0, k1, last);
    }
    s += count;
  }
}

// Basis rows [k0, k1) (float32, `rows` at row k0 and the block's first column, row stride ld) applied to the
// block's `width` columns of every slice: the widest tiles first, then 32 and 16 columns, then a partial tile
// for the last 1-15 (a scalar chain per column would wait on the adder's latency at every step). Meanwhile
// the `next_bytes` bytes at `next` (the basis rows of the following block) are prefetched a little before
// each slice group, so that fetching them overlaps this block's arithmetic instead of following it.
void compress_block(const float* g, const float* rows, int64_t ld, float* out, int64_t S, int64_t K,
                    int64_t d, int64_t width, int64_t k0, int64_t k1, const void* next, int64_t next_bytes) {
  const char* prefetch = static_cast<const char*>(next);
  const char* const prefetch_end = prefetch + next_bytes;
  const int64_t tiles = (width + 16 * kCompressVectors - 1) / (16 * kCompressVectors) + 2;
  const int64_t groups = (S + kCompressSlicesPerTile - 1) / kCompressSlicesPerTile;
  const int64_t lines = (next_bytes + kCacheLine - 1) / kCacheLine / (tiles * groups) + 1;
  int64_t j = 0;
  if constexpr (kCompressVectors >= 4) {
    for (; j + 64 <= width; j += 64) {
      compress_column_tile<4>(g, rows + j, ld, out + j, S, K, d, k0, k1, prefetch, prefetch_end, lines);
    }
  }
  for (; j + 32 <= width; j += 32) {
    compress_column_tile<2>(g, rows + j, ld, out + j, S, K, d, k0, k1, prefetch, prefetch_end, lines);
  }
  for (; j + 16 <= width; j += 16) {
    compress_column_tile<1>(g, rows + j, ld, out + j, S, K, d, k0, k1, prefetch, prefetch_end, lines);
  }
  if (j < width) {
    compress_column_tile<1>(g, rows + j, ld, out + j, S, K, d, k0, k1, prefetch, prefetch_end, lines,
                            int(width - j));
  }
}

// ---- decompress: out[s][k] = mean[k] + reduce16(lanes), lane l the fma chain over the i < d with
// i = l mod 16, in increasing i, of c[s][i] b[k][i] ----

// One tile: SL slices through basis row k (d values, float32 or bfloat16 bits), SL independent dots in
// registers. The last 1-15 values go through the lanes that hold them only.
template <int SL, typename B>
GVQ_INLINE void decompress_tile(const float* c, const B* row, float mean_k, float* out,
                                int64_t out_row_stride, int64_t d, int64_t k) {
  Lanes16 acc[SL];
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s) acc[s] = zero16();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const Lanes16 b = load16(row + i);
#pragma GCC unroll 16
    for (int s = 0; s < SL; ++s) acc[s] = fma16(load16(c + s * d + i), b, acc[s]);
  }
  if (i < d) {
    const int rest = int(d - i);
    const Lanes16 b = load16_first(row + i, rest);
#pragma GCC unroll 16
    for (int s = 0; s < SL; ++s) acc[s] = fma16_first(load16_first(c + s * d + i, rest), b, acc[s], rest);
  }
#pragma GCC unroll 16
  for (int s = 0; s < SL; ++s) out[s * out_row_stride + k] = mean_k + reduce16(acc[s]);
}

// Elements [k0, k1) of every decompressed slice from basis rows of type B (`rows` at row k0, row stride d),
// in slice groups of at most 4 of nearly equal size. The row kPrefetchRows ahead is prefetched while a row
// computes.
template <typename B>
GVQ_INLINE void decompress_rows_of(const float* c, const B* rows, const float* mean, float* out,
                                   int64_t out_row_stride, int64_t S, int64_t d, int64_t k0, int64_t k1) {
  constexpr int64_t kSlicesPerTile = 4;
  constexpr int64_t kPrefetchRows = 6;
  const int64_t groups = (S + kSlicesPerTile - 1) / kSlicesPerTile;
  const char* const rows_end = reinterpret_cast<const char*>(rows + (k1 - k0) * d);
  const int64_t lines_per_row = (d * int64_t(sizeof(B)) + kCacheLine - 1) / kCacheLine;
  for (int64_t k = k0; k < k1; ++k) {
    const B* row = rows + (k - k0) * d;
    const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * d);
    prefetch_lines(ahead, rows_end, lines_per_row);
    for (int64_t group = 0, s = 0; group < groups; ++group) {
      const int64_t count = (S - s) / (groups - group);
      const float* cs = c + s * d;
      float* os = out + s * out_row_stride;
      if (count == 1) {
        decompress_tile<1>(cs, row, mean[k], os, out_row_stride, d, k);
      } else if (count == 2) {
        decompress_tile<2>(cs, row, mean[k], os, out_row_stride, d, k);
      } else if (count == 3) {
        decompress_tile<3>(cs, row, mean[k], os, out_row_stride, d, k);
      } else {
        decompress_tile<4>(cs, row, mean[k], os, out_row_stride, d, k);
      }
      s += count;
    }
  }
}

void decompress_rows(const float* c, const float* rows, const float* mean, float* out, int64_t out_row_stride,
                     int64_t S, int64_t d, int64_t k0, int64_t k1) {
  decompress_rows_of(c, rows, mean, out, out_row_stride, S, d, k0, k1);
}
void decompress_rows_bf16(const float* c, const uint16_t* rows, const float* mean, float* out,
                          int64_t out_row_stride, int64_t S, int64_t d, int64_t k0, int64_t k1) {
  decompress_rows_of(c, rows, mean, out, out_row_stride, S, d, k0, k1);
}
