// CUDA twin of CasqCodec's rounding, packing and decode_add (src/codec/casq.cpp), bit for bit, against
// codebooks the CPU codec's clustering built (sorting and 1-D k-means per bucket stay on the CPU reference).
#include "bit_pack.cuh"
#include "launch.h"
#include "util/hash_mix.h"

namespace gradiveq::detail::cuda {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return int((n + kThreads - 1) / kThreads); }

// One thread per value: the two levels around it in its bucket's ascending codebook, and a stochastic choice
// between them. A bucket with a non-finite value has an all-NaN codebook and sends code 0, as on the CPU.
__global__ void casq_codes(const float* x, int64_t n, const float* codebooks, int64_t levels,
                           int64_t bucket_size, uint64_t seed, int bits, uint32_t* code_words) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* codebook = codebooks + (i / bucket_size) * levels;
  if (isnan(codebook[0])) return;
  int64_t upper = 0;  // std::upper_bound: the first level above x
  while (upper < levels && !(x[i] < codebook[upper])) ++upper;
  const int64_t j = max(int64_t(0), min(upper - 1, levels - 2));
  const double lo = codebook[j], hi = codebook[j + 1];
  uint32_t code = uint32_t(j);
  if (hi > lo && uniform01(seed, uint64_t(i)) < __ddiv_rn(__dsub_rn(double(x[i]), lo), __dsub_rn(hi, lo)))
    code += 1;
  if (code != 0) or_code(code_words, i, bits, code);
}

__global__ void casq_decode_add(const uint8_t* packed, int64_t n, int64_t levels, int64_t bucket_size,
                                int bits, int64_t num_buckets, float* y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t* codes = packed + 4 * levels * num_buckets;
  const uint32_t code = read_code(codes, (n * bits + 7) / 8, i, bits);
  y[i] = __fadd_rn(y[i], read_float(packed + 4 * ((i / bucket_size) * levels + code)));
}

}  // namespace

void launch_casq_encode(const float* values, int64_t n, const float* codebooks, int64_t levels,
                        int64_t bucket_size, uint64_t seed, int bits, uint32_t* code_words,
                        cudaStream_t stream) {
  if (n == 0) return;
  casq_codes<<<blocks_for(n), kThreads, 0, stream>>>(values, n, codebooks, levels, bucket_size, seed, bits,
                                                     code_words);
  check_launch("casq codes");
}

void launch_casq_decode_add(const uint8_t* packed, int64_t n, int64_t levels, int64_t bucket_size, int bits,
                            float* out, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t num_buckets = (n + bucket_size - 1) / bucket_size;
  casq_decode_add<<<blocks_for(n), kThreads, 0, stream>>>(packed, n, levels, bucket_size, bits, num_buckets,
                                                          out);
  check_launch("casq decode");
}

}  // namespace gradiveq::detail::cuda
