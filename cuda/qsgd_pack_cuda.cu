// CUDA twin of QsgdCodec's encode and decode_add (src/codec/qsgd.cpp): the same message, bit for bit. The
// float64 arithmetic goes through the _rn intrinsics so nvcc cannot fuse a multiply into an add, which would
// round differently from the CPU codec; a bucket's scale is summed by one thread in the CPU's order.
#include <cmath>

#include "bit_pack.cuh"
#include "launch.h"
#include "util/hash_mix.h"

namespace gradiveq::detail::cuda {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return int((n + kThreads - 1) / kThreads); }

// One thread per bucket: its max |v| or L2 norm, NaN when the bucket holds a non-finite value.
__global__ void qsgd_scales(const float* x, int64_t n, int64_t bucket_size, bool l2_norm, float* scales,
                            double* bucket_scales, int64_t num_buckets) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_buckets) return;
  const int64_t begin = b * bucket_size, end = min(n, begin + bucket_size);
  double scale = 0.0;
  bool finite = true;
  for (int64_t i = begin; i < end; ++i) {
    const double a = fabs(double(x[i]));
    finite &= bool(isfinite(a));
    scale = l2_norm ? __dadd_rn(scale, __dmul_rn(a, a)) : fmax(scale, a);
  }
  if (l2_norm) scale = sqrt(scale);
  scales[b] = finite ? float(scale) : __int_as_float(0x7fc00000);
  bucket_scales[b] = finite ? scale : __longlong_as_double(0x7ff8000000000000LL);
}

// One thread per value: sign bit plus a stochastically rounded level, as QsgdCodec::encode.
__global__ void qsgd_codes(const float* x, int64_t n, int64_t levels, int64_t bucket_size, uint64_t seed,
                           int bits, const double* bucket_scales, uint32_t* code_words) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double scale = bucket_scales[i / bucket_size];
  uint32_t code = 0;
  if (!isnan(scale) && scale > 0.0) {
    const double r = __dmul_rn(__ddiv_rn(fabs(double(x[i])), scale), double(levels));  // in [0, levels]
    double level = floor(r);
    if (uniform01(seed, uint64_t(i)) < __dsub_rn(r, level)) level += 1.0;
    level = fmin(level, double(levels));
    code = (uint32_t(level) << 1) | (x[i] < 0.0f ? 1u : 0u);
  }
  if (code != 0) or_code(code_words, i, bits, code);
}

__global__ void qsgd_decode_add(const uint8_t* packed, int64_t n, int64_t levels, int64_t bucket_size,
                                int bits, int64_t num_buckets, float* y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t* codes = packed + 4 * num_buckets;
  const int64_t code_bytes = (n * bits + 7) / 8;
  const uint32_t code = read_code(codes, code_bytes, i, bits);
  const double level = double(code >> 1);
  const float scale = read_float(packed + 4 * (i / bucket_size));
  double magnitude;
  if (level > double(levels)) {
    magnitude =
        __longlong_as_double(0x7ff8000000000000LL);  // a corrupted message: visible, not silently wrong
  } else if (isfinite(scale)) {
    magnitude = __dmul_rn(__dmul_rn(double(scale), level), __drcp_rn(double(levels)));
  } else {
    magnitude = double(scale);
  }
  y[i] = __fadd_rn(y[i], float((code & 1u) ? -magnitude : magnitude));
}

}  // namespace

void launch_qsgd_encode(const float* values, int64_t n, int64_t levels, int64_t bucket_size, bool l2_norm,
                        uint64_t seed, int bits, float* scales, double* bucket_scales, uint32_t* code_words,
                        cudaStream_t stream) {
  if (n == 0) return;
  const int64_t num_buckets = (n + bucket_size - 1) / bucket_size;
  qsgd_scales<<<blocks_for(num_buckets), kThreads, 0, stream>>>(values, n, bucket_size, l2_norm, scales,
                                                                bucket_scales, num_buckets);
  check_launch("qsgd scales");
  qsgd_codes<<<blocks_for(n), kThreads, 0, stream>>>(values, n, levels, bucket_size, seed, bits,
                                                     bucket_scales, code_words);
  check_launch("qsgd codes");
}

void launch_qsgd_decode_add(const uint8_t* packed, int64_t n, int64_t levels, int64_t bucket_size, int bits,
                            float* out, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t num_buckets = (n + bucket_size - 1) / bucket_size;
  qsgd_decode_add<<<blocks_for(n), kThreads, 0, stream>>>(packed, n, levels, bucket_size, bits, num_buckets,
                                                          out);
  check_launch("qsgd decode");
}

}  // namespace gradiveq::detail::cuda
