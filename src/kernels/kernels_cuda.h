// CUDA twins of the codec kernels (internal header), built into the library when GRADIVEQ_ENABLE_CUDA is on
// (cuda/*.cu, one twin per CPU kernel) and used for CUDA tensors only when switched on
// (cuda_kernels_enabled): until a device check on a real GPU has passed, CUDA tensors go through ATen's
// operators by default.
//
// Every entry point takes CUDA tensors, launches on the current CUDA stream of their device and returns
// without synchronising the host. Each output element is computed by one thread in a fixed order, so a
// kernel gives the same bits on every GPU of one architecture (the ranks of a DDP job), like the CPU kernels
// do on every x86-64 CPU; against the CPU reference they agree to float rounding (tests/cpp/kernels/).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace gradiveq::detail {

/// Whether this library was built with the CUDA kernels (GRADIVEQ_ENABLE_CUDA).
bool cuda_kernels_built();
/// Whether CUDA tensors go through the kernels: built, and switched on by the environment variable
/// GRADIVEQ_CUDA_KERNELS=1 (read once, at the first call) or by set_cuda_kernels_enabled(true).
bool cuda_kernels_enabled();
/// Switches the kernels on or off for this process; switching on a build without them throws InvalidArgument.
void set_cuda_kernels_enabled(bool enabled);

/// One layer of a grouped projection. compress: out (S, d) = (slices (S, K) * basis (K, d) + bias (d)) *
/// scale. decompress: out (S, K) = (coeffs (S, d) * basis^T + bias (K)) * scale. `input` is float32 with unit
/// column stride (rows may be strided); `basis` (K, d) contiguous float32, bfloat16 or float16; `bias`
/// contiguous float32; `out` float32, bfloat16 or float16 with unit column stride (a strided view into a
/// gradient is fine).
struct ProjectionTask {
  at::Tensor input;
  at::Tensor basis;
  at::Tensor bias;
  at::Tensor out;
  float scale = 1.0f;
};

/// Every task in one kernel launch (a grouped GEMM: each thread block finds its layer in a tile table), for
/// all compressed layers of a bucket at once. All tasks share one device, one basis dtype and one out dtype;
/// more than kMaxGroupedTasks tasks take several launches.
void cuda_compress_grouped(const std::vector<ProjectionTask>& tasks);
void cuda_decompress_grouped(const std::vector<ProjectionTask>& tasks);
constexpr int64_t kMaxGroupedTasks = 128;

/// Accumulates the sample moments a fit needs, in float64: gram (n, n) += x x^T when transposed is false,
/// covariance (K, K) += x^T x when true, for x (n, K) float32 contiguous (already mean-subtracted).
void cuda_accumulate_moments(const at::Tensor& x, at::Tensor& moments, bool transposed);

/// QSGD's quantise-and-pack and unpack-and-add (format in gradiveq/qsgd.h), bit for bit the CPU codec's
/// output for the same seed: the same counter-based random numbers, the same float64 arithmetic (no fused
/// multiply-adds). A level above `levels` in a corrupted message decodes to NaN (the CPU codec throws; a
/// kernel cannot without synchronising).
at::Tensor cuda_qsgd_encode(const at::Tensor& values, int64_t levels, int64_t bucket_size, bool l2_norm,
                            uint64_t seed);
void cuda_qsgd_decode_add(const at::Tensor& packed, int64_t levels, int64_t bucket_size, at::Tensor& out);

/// CASQ's rounding and packing against given codebooks (levels float32 per bucket, ascending; the CPU codec's
/// clustering builds them), and its unpack-and-add: bit for bit the CPU codec's for the same seed and
/// codebooks. `codebooks` is (num_buckets, levels) float32 on the values' device; the packed message is
/// [codebooks][codes], as CasqCodec writes it.
at::Tensor cuda_casq_encode(const at::Tensor& values, const at::Tensor& codebooks, int64_t bits,
                            int64_t bucket_size, uint64_t seed);
void cuda_casq_decode_add(const at::Tensor& packed, int64_t bits, int64_t bucket_size, at::Tensor& out);

}  // namespace gradiveq::detail
