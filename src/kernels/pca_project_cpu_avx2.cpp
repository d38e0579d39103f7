// The codec tiles for AVX2 with FMA: a pair of 8-float registers per Lanes16, lanes 0-7 and 8-15, so the
// sums round exactly as in the AVX-512 build. Compiled with -mavx2 -mfma and only ever called after the
// dispatcher has checked that the CPU has both.
#include <immintrin.h>

#include "kernels/cpu_isa.h"

namespace gradiveq::detail::avx2_isa {

namespace {

struct Lanes16 {
  __m256 lo, hi;
};
constexpr int kCompressVectors = 2;  // 3 slices x 2 pairs: 12 accumulators of the 16 registers

GVQ_INLINE Lanes16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
GVQ_INLINE Lanes16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
GVQ_INLINE __m256 widen8(const uint16_t* p) {  // bfloat16 bits: zero-extend, shift into the top half
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
GVQ_INLINE Lanes16 load16(const uint16_t* p) { return {widen8(p), widen8(p + 8)}; }
GVQ_INLINE void store16(float* p, Lanes16 x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
GVQ_INLINE Lanes16 broadcast16(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
GVQ_INLINE Lanes16 fma16(Lanes16 a, Lanes16 b, Lanes16 acc) {
  return {_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)};
}
// All-ones in lanes [0, n) of an 8-lane half whose first lane is lane `first` of the 16.
GVQ_INLINE __m256i first_lanes(int n, int first) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - first), lane);
}
GVQ_INLINE Lanes16 load16_first(const float* p, int n) {
  return {_mm256_maskload_ps(p, first_lanes(n, 0)), _mm256_maskload_ps(p + 8, first_lanes(n, 8))};
}
GVQ_INLINE void store16_first(float* p, Lanes16 x, int n) {
  _mm256_maskstore_ps(p, first_lanes(n, 0), x.lo);
  _mm256_maskstore_ps(p + 8, first_lanes(n, 8), x.hi);
}
GVQ_INLINE Lanes16 fma16_first(Lanes16 a, Lanes16 b, Lanes16 acc, int n) {
  const Lanes16 all = fma16(a, b, acc);
  return {_mm256_blendv_ps(acc.lo, all.lo, _mm256_castsi256_ps(first_lanes(n, 0))),
          _mm256_blendv_ps(acc.hi, all.hi, _mm256_castsi256_ps(first_lanes(n, 8)))};
}
// Neighbours, then pairs, then the two 128-bit halves: lanes 0-7 summed as the first half of the 16-lane
// tree.
GVQ_INLINE float reduce8(__m256 v) {
  v = _mm256_add_ps(v, _mm256_permute_ps(v, 0xB1));
  v = _mm256_add_ps(v, _mm256_permute_ps(v, 0x4E));
  v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 0x01));
  return _mm256_cvtss_f32(v);
}
GVQ_INLINE float reduce16(Lanes16 x) { return reduce8(x.lo) + reduce8(x.hi); }

}  // namespace

// The tiles and the two entry points cpu_isa.h declares.
#include "kernels/pca_project_cpu_tiles.h"

}  // namespace gradiveq::detail::avx2_isa
