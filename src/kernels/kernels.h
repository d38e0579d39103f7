// Deterministic CPU kernels for the codec's two products (internal header).
//
// Why not at::addmm: DDP needs every rank to apply bit-identical gradients, and a checkpoint resumed in a new
// process must reproduce the run. MKL (torch's CPU BLAS) picks kernels by memory alignment and thread count
// unless MKL_CBWR is set, so two processes multiplying the same matrices may round differently (measured:
// ~1e-9 differences between ranks after a decompress, enough to make replicas drift apart). Here every output
// element is one chain of fused multiply-adds in a fixed order (documented in pca_project_cpu_tiles.h),
// summed by one thread, so identical inputs give identical bits in every process, whatever the thread count
// or alignment, and on every CPU: the AVX-512 and AVX2 builds use the FMA units, and the portable build the C
// library's fmaf, which rounds once exactly as they do (checked: byte-identical outputs from all three). The
// portable build is the slow one (a software fmaf on CPUs without FMA); every x86-64 CPU since 2013 has AVX2
// and FMA.
//
// The basis may be stored in float32, bfloat16 or float16 (half the memory and half the bytes streamed per
// product). Half-precision values are widened to float32 (exactly) before they are multiplied: by the
// compress into its packed blocks, by the decompress in registers for bfloat16 and into a small buffer for
// float16. Both then go through the very same float32 multiply-adds, so a half-precision basis gives exactly
// the result of its float32 widening.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace gradiveq::detail {

/// The builds of the kernels' inner tiles. All give the same bits; they differ only in speed.
enum class CpuIsa { kPortable, kAvx2, kAvx512 };

/// Every build, for code that tries or names each in turn (tests, benchmarks).
inline constexpr CpuIsa kAllCpuIsas[] = {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512};

/// "portable", "avx2", "avx512".
const char* cpu_isa_name(CpuIsa isa);
/// Whether this CPU (and this build: the x86 tiles exist only on x86-64) can run `isa`.
bool cpu_supports(CpuIsa isa);
/// The build the kernels use by default: AVX2 with FMA where the CPU has it (measured faster than AVX-512 on
/// ResNet-32's shapes), else AVX-512F with FMA, else portable.
CpuIsa default_cpu_isa();
/// The build the kernels use now (default_cpu_isa() unless set_cpu_kernel_isa chose another).
CpuIsa cpu_kernel_isa();
/// Makes the kernels use `isa` (tests and benchmarks compare the builds); throws InvalidArgument naming `isa`
/// if the CPU lacks it. Not for use while a kernel runs on another thread.
void set_cpu_kernel_isa(CpuIsa isa);

/// out (S x d, contiguous) = g (S x K, contiguous) * basis (K x d, contiguous) + offset (d). Threads split d.
void cpu_compress(const float* g, const float* basis, const float* offset, float* out, int64_t S, int64_t K,
                  int64_t d);
void cpu_compress(const float* g, const c10::BFloat16* basis, const float* offset, float* out, int64_t S,
                  int64_t K, int64_t d);
void cpu_compress(const float* g, const c10::Half* basis, const float* offset, float* out, int64_t S,
                  int64_t K, int64_t d);

/// out (S x K, row stride out_row_stride) = c (S x d, contiguous) * basis^T + mean (K). Threads split K.
void cpu_decompress(const float* c, const float* basis, const float* mean, float* out, int64_t out_row_stride,
                    int64_t S, int64_t K, int64_t d);
void cpu_decompress(const float* c, const c10::BFloat16* basis, const float* mean, float* out,
                    int64_t out_row_stride, int64_t S, int64_t K, int64_t d);
void cpu_decompress(const float* c, const c10::Half* basis, const float* mean, float* out,
                    int64_t out_row_stride, int64_t S, int64_t K, int64_t d);

}  // namespace gradiveq::detail
