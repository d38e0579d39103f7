// Deterministic CPU kernels for the codec's two products (internal header).
//
// Why not at::addmm: DDP needs every rank to apply bit-identical gradients, and a checkpoint resumed in a new
// process must reproduce the run. MKL (torch's CPU BLAS) picks kernels by memory alignment and thread count
// unless MKL_CBWR is set, so two processes multiplying the same matrices may round differently (measured:
// ~1e-9 differences between ranks after a decompress, enough to make replicas drift apart). Here every output
// element is summed by one thread in a fixed order, so identical inputs give identical bits in every process,
// whatever the thread count or alignment, and on every x86-64 CPU: the file is built with -ffp-contract=off and
// its wider-vector clones (AVX2, AVX-512) only vectorise across independent outputs, so they round exactly like
// the SSE2 baseline (checked: byte-identical outputs).
//
// The basis may be stored in float32, bfloat16 or float16 (half the memory and half the bytes streamed per
// product). Half-precision rows are widened to float32 block by block into a small buffer and then go through
// the very same float32 loops, so a half-precision basis gives exactly the result of its float32 widening.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace gradiveq::detail {

/// out (S x d, contiguous) = g (S x K, contiguous) * basis (K x d, contiguous) + offset (d). Threads split d.
void cpu_compress(const float* g, const float* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d);
void cpu_compress(const float* g, const c10::BFloat16* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d);
void cpu_compress(const float* g, const c10::Half* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d);

/// out (S x K, row stride out_row_stride) = c (S x d, contiguous) * basis^T + mean (K). Threads split K.
void cpu_decompress(const float* c, const float* basis, const float* mean, float* out, int64_t out_row_stride,
                    int64_t S, int64_t K, int64_t d);
void cpu_decompress(const float* c, const c10::BFloat16* basis, const float* mean, float* out,
                    int64_t out_row_stride, int64_t S, int64_t K, int64_t d);
void cpu_decompress(const float* c, const c10::Half* basis, const float* mean, float* out, int64_t out_row_stride,
                    int64_t S, int64_t K, int64_t d);

}  // namespace gradiveq::detail
