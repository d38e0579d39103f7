// Raw launchers of the CUDA kernels (internal): device pointers, sizes and a stream; no ATen, so the .cu
// files compile with the CUDA headers alone. cuda_kernels.cpp checks the tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gradiveq::detail::cuda {

enum class Dtype : int32_t { kFloat32, kBFloat16, kFloat16, kFloat64 };

/// out (rows, cols) = (a (rows, inner) * op(b) + bias (cols)) * scale, or out += that when accumulate.
/// op(b) (inner, cols) is b itself (row-major, row stride cols) or, when the launch transposes b, b^T with b
/// stored (cols, inner) row-major. a is read as a^T (stored (inner, rows)) when the launch transposes a.
/// bias may be null. Strides count elements.
struct GemmJob {
  const void* a = nullptr;
  const void* b = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  int64_t rows = 0, inner = 0, cols = 0;
  int64_t a_stride = 0, out_stride = 0;
  float scale = 1.0f;
  bool accumulate = false;
  /// Split of the inner dimension over `splits` thread blocks per tile (>= 1): products with few rows and a
  /// long inner dimension (kernel-position slices: S = 9, or 1 for a 1x1 conv, K up to 2^20) would otherwise
  /// run on a handful of blocks. Partial sums go to `partials` (splits x rows x cols float32) and a second
  /// pass adds them in split order, so the result stays deterministic.
  int32_t splits = 1;
  float* partials = nullptr;
};

/// The split a projection job gets, and the partial sums it needs (floats).
int32_t inner_splits(const GemmJob& job);
int64_t partial_floats(const GemmJob& job);

/// Tiles of 64 x 64 outputs per thread block.
constexpr int64_t kTileRows = 64, kTileCols = 64;
/// Jobs per launch: the table travels as the kernel's parameter (CUDA 12.1+ on sm_70+ allows 32 KiB), so a
/// launch needs no host-to-device copy and no synchronisation.
constexpr int kMaxJobs = 128;

/// The projections (a float32, b float32 / bfloat16 / float16, float32 accumulation, out float32 / bfloat16 /
/// float16) of up to kMaxJobs jobs in one launch.
void launch_projection(const GemmJob* jobs, int count, bool transpose_b, Dtype b_dtype, Dtype out_dtype,
                       cudaStream_t stream);
/// Sample moments in float64 (a and b float32, out float64, accumulate): x x^T (transpose_b) or x^T x
/// (transpose_a), one job.
void launch_moments(const GemmJob& job, bool transpose_a, cudaStream_t stream);

/// QSGD: writes the float32 scales at `scales`, ORs the codes into the zeroed 32-bit words at `code_words`
/// (LSB first; the caller pads the buffer to whole words); `bucket_scales` is scratch of num_buckets float64.
void launch_qsgd_encode(const float* values, int64_t n, int64_t levels, int64_t bucket_size, bool l2_norm,
                        uint64_t seed, int bits, float* scales, double* bucket_scales, uint32_t* code_words,
                        cudaStream_t stream);
void launch_qsgd_decode_add(const uint8_t* packed, int64_t n, int64_t levels, int64_t bucket_size, int bits,
                            float* out, cudaStream_t stream);

/// CASQ: rounds to the given codebooks (num_buckets x levels float32) and ORs the codes into `code_words`.
void launch_casq_encode(const float* values, int64_t n, const float* codebooks, int64_t levels,
                        int64_t bucket_size, uint64_t seed, int bits, uint32_t* code_words,
                        cudaStream_t stream);
void launch_casq_decode_add(const uint8_t* packed, int64_t n, int64_t levels, int64_t bucket_size, int bits,
                            float* out, cudaStream_t stream);

/// Throws std::runtime_error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace gradiveq::detail::cuda
