// The codec tiles for AVX-512F with FMA: one 16-float register per Lanes16. Compiled with -mavx512f -mfma
// and only ever called after the dispatcher has checked that the CPU has both.
#include <immintrin.h>

#include "kernels/cpu_isa.h"

namespace gradiveq::detail::avx512_isa {

namespace {

struct Lanes16 {
  __m512 v;
};
constexpr int kCompressVectors = 4;  // 3 slices x 4 vectors: 12 accumulators of the 32 registers

GVQ_INLINE Lanes16 zero16() { return {_mm512_setzero_ps()}; }
GVQ_INLINE Lanes16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
GVQ_INLINE Lanes16 load16(const uint16_t* p) {  // bfloat16 bits: zero-extend, shift into the top half
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16))};
}
GVQ_INLINE void store16(float* p, Lanes16 x) { _mm512_storeu_ps(p, x.v); }
GVQ_INLINE Lanes16 broadcast16(float a) { return {_mm512_set1_ps(a)}; }
GVQ_INLINE Lanes16 fma16(Lanes16 a, Lanes16 b, Lanes16 acc) { return {_mm512_fmadd_ps(a.v, b.v, acc.v)}; }
GVQ_INLINE __mmask16 first_lanes(int n) { return __mmask16((1u << n) - 1u); }
GVQ_INLINE Lanes16 load16_first(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_lanes(n), p)}; }
GVQ_INLINE void store16_first(float* p, Lanes16 x, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), x.v); }
GVQ_INLINE Lanes16 fma16_first(Lanes16 a, Lanes16 b, Lanes16 acc, int n) {
  return {_mm512_mask3_fmadd_ps(a.v, b.v, acc.v, first_lanes(n))};
}
// Neighbours, then pairs, then 128-bit quarters, then halves: the tree the tiles header names (an addition's
// two operands may swap without changing a bit).
GVQ_INLINE float reduce16(Lanes16 x) {
  __m512 v = x.v;
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
  return _mm512_cvtss_f32(v);
}

}  // namespace

// The tiles and the two entry points cpu_isa.h declares.
#include "kernels/pca_project_cpu_tiles.h"

}  // namespace gradiveq::detail::avx512_isa
