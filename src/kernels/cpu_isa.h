// The per-instruction-set builds of the CPU codec tiles (pca_project_cpu_tiles.h), for the dispatcher in
// pca_project_cpu.cpp only (internal header). Each namespace is one translation unit compiled for that
// instruction set; all three give the same bits.
#pragma once

#include <cstdint>

#define GVQ_INLINE inline __attribute__((always_inline))

namespace gradiveq::detail {

#define GVQ_DECLARE_CODEC_TILES                                                                        \
  void compress_block(const float* g, const float* rows, int64_t ld, float* out, int64_t S, int64_t K, \
                      int64_t d, int64_t width, int64_t k0, int64_t k1, const void* next,              \
                      int64_t next_bytes);                                                             \
  void decompress_rows(const float* c, const float* rows, const float* mean, float* out,               \
                       int64_t out_row_stride, int64_t S, int64_t d, int64_t k0, int64_t k1);          \
  void decompress_rows_bf16(const float* c, const uint16_t* rows, const float* mean, float* out,       \
                            int64_t out_row_stride, int64_t S, int64_t d, int64_t k0, int64_t k1);

namespace portable_isa {
GVQ_DECLARE_CODEC_TILES
}
#if defined(__x86_64__)
#define GVQ_HAVE_X86_TILES 1
namespace avx2_isa {
GVQ_DECLARE_CODEC_TILES
}
namespace avx512_isa {
GVQ_DECLARE_CODEC_TILES
}
#endif
#undef GVQ_DECLARE_CODEC_TILES

}  // namespace gradiveq::detail
