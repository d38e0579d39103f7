// The CPU codec kernels: the portable build of the tiles, the dispatcher that picks an instruction set once,
// and the blocking, widening and threading around the tiles (see kernels.h for the contract).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gradiveq/errors.h"
#include "kernels/cpu_isa.h"
#include "kernels/kernels.h"

// The widenings below are cloned for AVX2 / AVX-512 where the compiler supports target_clones (GCC, Clang on
// x86-64); the products themselves go through the per-instruction-set tiles (cpu_isa.h).
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define GVQ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef GVQ_VECTOR_CLONES
#define GVQ_VECTOR_CLONES
#endif

namespace gradiveq::detail {

// ---- the portable tiles: 16 scalar lanes and fmaf, which rounds once like the FMA units ----

namespace portable_isa {
namespace {

struct Lanes16 {
  float v[16];
};
constexpr int kCompressVectors = 2;

GVQ_INLINE Lanes16 zero16() { return {}; }
GVQ_INLINE Lanes16 load16(const float* p) {
  Lanes16 x;
  std::memcpy(x.v, p, sizeof(x.v));
  return x;
}
GVQ_INLINE Lanes16 load16(const uint16_t* p) {  // bfloat16 bits: the top half of a float32
  Lanes16 x;
  for (int l = 0; l < 16; ++l) {
    const uint32_t bits = uint32_t(p[l]) << 16;
    std::memcpy(&x.v[l], &bits, sizeof(float));
  }
  return x;
}
GVQ_INLINE void store16(float* p, Lanes16 x) { std::memcpy(p, x.v, sizeof(x.v)); }
GVQ_INLINE Lanes16 broadcast16(float a) {
  Lanes16 x;
  for (float& lane : x.v) lane = a;
  return x;
}
GVQ_INLINE Lanes16 fma16(Lanes16 a, Lanes16 b, Lanes16 acc) {
  for (int l = 0; l < 16; ++l) acc.v[l] = std::fma(a.v[l], b.v[l], acc.v[l]);
  return acc;
}
GVQ_INLINE Lanes16 load16_first(const float* p, int n) {
  Lanes16 x = {};
  std::memcpy(x.v, p, size_t(n) * sizeof(float));
  return x;
}
GVQ_INLINE void store16_first(float* p, Lanes16 x, int n) { std::memcpy(p, x.v, size_t(n) * sizeof(float)); }
GVQ_INLINE Lanes16 fma16_first(Lanes16 a, Lanes16 b, Lanes16 acc, int n) {
  for (int l = 0; l < n; ++l) acc.v[l] = std::fma(a.v[l], b.v[l], acc.v[l]);
  return acc;
}
GVQ_INLINE float reduce16(Lanes16 x) {
  const float* l = x.v;
  const float left = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  const float right = ((l[8] + l[9]) + (l[10] + l[11])) + ((l[12] + l[13]) + (l[14] + l[15]));
  return left + right;
}

}  // namespace

#include "kernels/pca_project_cpu_tiles.h"

}  // namespace portable_isa

// ---- which build runs ----

namespace {

struct Tiles {
  decltype(&portable_isa::compress_block) compress_block;
  decltype(&portable_isa::decompress_rows) decompress_rows;
  decltype(&portable_isa::decompress_rows_bf16) decompress_rows_bf16;
};

Tiles tiles_for(CpuIsa isa) {
  switch (isa) {
#ifdef GVQ_HAVE_X86_TILES
    case CpuIsa::kAvx512:
      return {avx512_isa::compress_block, avx512_isa::decompress_rows, avx512_isa::decompress_rows_bf16};
    case CpuIsa::kAvx2:
      return {avx2_isa::compress_block, avx2_isa::decompress_rows, avx2_isa::decompress_rows_bf16};
#endif
    default:
      return {portable_isa::compress_block, portable_isa::decompress_rows,
              portable_isa::decompress_rows_bf16};
  }
}

std::atomic<CpuIsa>& selected_isa() {
  static std::atomic<CpuIsa> isa{default_cpu_isa()};
  return isa;
}

Tiles current_tiles() { return tiles_for(selected_isa().load(std::memory_order_relaxed)); }

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

bool cpu_supports(CpuIsa isa) {
  if (isa == CpuIsa::kPortable) return true;
#ifdef GVQ_HAVE_X86_TILES
  __builtin_cpu_init();  // idempotent; needed should this run before libgcc's constructor has
  if (!__builtin_cpu_supports("fma")) return false;
  if (isa == CpuIsa::kAvx2) return __builtin_cpu_supports("avx2");
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// AVX2 first: on ResNet-32's shapes it was the faster of the two on an AVX-512 Xeon (interleaved A/B, one
// thread: the defaults' compressed step 0.74-0.78 of the old kernels' time with AVX2, 0.85-0.87 with AVX-512;
// docs/results.md 7k), which runs its one 512-bit FMA unit no faster than two 256-bit ones and clocks lower.
CpuIsa default_cpu_isa() {
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (cpu_supports(isa)) return isa;
  }
  return CpuIsa::kPortable;
}

CpuIsa cpu_kernel_isa() { return selected_isa().load(std::memory_order_relaxed); }

void set_cpu_kernel_isa(CpuIsa isa) {
  GVQ_CHECK_ARG(cpu_supports(isa), "set_cpu_kernel_isa", "isa", "cannot be ", cpu_isa_name(isa),
                ": this CPU (or this build) lacks it; its default is ", cpu_isa_name(default_cpu_isa()));
  selected_isa().store(isa, std::memory_order_relaxed);
}

// ---- blocking, widening and threads around the tiles ----

namespace {

// Rows of the basis per block: 64 rows of up to d = 512 floats (128 KiB) stay in L2 while every slice uses
// them.
constexpr int64_t kBasisRowBlock = 64;

// Half-precision basis elements widened to float32 (for the compress's packed blocks, and float16 rows of the
// decompress). bfloat16 is the top half of a float32. Both widenings are exact, so the widened basis is the
// same on every rank.
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

template <typename B>
void compress_columns(const Tiles& tiles, const float* g, const B* basis, const float* offset, float* out,
                      int64_t S, int64_t K, int64_t d, int64_t j0, int64_t j1) {
  const int64_t width = j1 - j0;
  for (int64_t s = 0; s < S; ++s) std::fill(out + s * d + j0, out + s * d + j1, 0.0f);
  // Every block is first copied (widened if need be) into `block`, rows of `width` floats: one sequential
  // pass over the basis that the hardware prefetches, where the tiles' walk down 64 rows of d floats is not
  // (measured on ResNet-32's K = 4096 layers: the packed block makes the compress ~15% faster, not slower).
  // Half-precision rows are widened here rather than in the tiles' registers: that was slower (the widening
  // then sits in the tiles' inner loop, beside the multiply-adds; docs/results.md 7n).
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
    // The next block's rows, prefetched while this one computes (widened later if need be: its source bytes).
    const int64_t next_rows = std::min(K, k1 + kBasisRowBlock) - k1;
    const void* next = basis + std::min(k1, K - 1) * d + j0;
    const int64_t next_bytes = next_rows > 0 ? ((next_rows - 1) * d + width) * int64_t(sizeof(B)) : 0;
    tiles.compress_block(g, block.data(), width, out + j0, S, K, d, width, k0, k1, next, next_bytes);
  }
  for (int64_t s = 0; s < S; ++s) {
    float* __restrict acc = out + s * d + j0;
    for (int64_t j = 0; j < width; ++j) acc[j] += offset[j0 + j];
  }
}

// Float32 and bfloat16 rows go to the tiles as they are (bfloat16 is widened in registers); float16 ones are
// widened a block of rows at a time.
template <typename B>
void decompress_rows(const Tiles& tiles, const float* c, const B* basis, const float* mean, float* out,
                     int64_t out_row_stride, int64_t S, int64_t d, int64_t k0, int64_t k1) {
  if constexpr (std::is_same_v<B, float>) {
    tiles.decompress_rows(c, basis + k0 * d, mean, out, out_row_stride, S, d, k0, k1);
  } else if constexpr (std::is_same_v<B, c10::BFloat16>) {
    static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t));
    tiles.decompress_rows_bf16(c, reinterpret_cast<const uint16_t*>(basis + k0 * d), mean, out,
                               out_row_stride, S, d, k0, k1);
  } else {
    std::vector<float> block(size_t(kBasisRowBlock * d));
    for (int64_t b0 = k0; b0 < k1; b0 += kBasisRowBlock) {
      const int64_t b1 = std::min(k1, b0 + kBasisRowBlock);
      widen(basis + b0 * d, block.data(), (b1 - b0) * d);
      tiles.decompress_rows(c, block.data(), mean, out, out_row_stride, S, d, b0, b1);
    }
  }
}

template <typename B>
void compress_impl(const float* g, const B* basis, const float* offset, float* out, int64_t S, int64_t K,
                   int64_t d) {
  const Tiles tiles = current_tiles();
  at::parallel_for(0, d, 64, [&](int64_t j0, int64_t j1) {
    compress_columns(tiles, g, basis, offset, out, S, K, d, j0, j1);
  });
}

template <typename B>
void decompress_impl(const float* c, const B* basis, const float* mean, float* out, int64_t out_row_stride,
                     int64_t S, int64_t K, int64_t d) {
  const Tiles tiles = current_tiles();
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    decompress_rows(tiles, c, basis, mean, out, out_row_stride, S, d, k0, k1);
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
