// CASQ, cluster-aware quantization (Ge, Zhang, Fu, Lai, Deng, Li; Sci. China Inf. Sci. 2023 / IEEE CLUSTER
// 2021), as the reproduction design in docs/algorithms.md, "CASQ": only the abstracts were found, so
// the clustering, the allocation and the message format below are that document's ASSUMPTION, made concrete.
//
// Values are cut into buckets of `bucket_size` consecutive elements. In each bucket:
//   1. Cluster. 1-D k-means into K = min(clusters, bucket length) clusters on the sorted values: the initial
//      centroids are the (k + 0.5) / K quantiles, then `kmeans_iterations` Lloyd steps (fewer once the
//      assignment stops changing). In 1-D every cluster is a run of the sorted values; a value on a decision
//      threshold joins the lower cluster. Empty clusters (repeated values) are dropped.
//   2. Allocate. B = 2^bits levels go to the clusters by Neyman allocation: each cluster gets one level, and
//      the rest go one at a time to the cluster furthest below its share B * n_c sigma_c / sum(n sigma) (ties
//      to the lower cluster). A cluster whose values are all equal (sigma = 0) keeps its single level.
//   3. Place levels. A cluster with B_c >= 2 levels gets B_c evenly spaced levels from its min to its max. A
//      cluster with one level gets it at its mean, except the lowest cluster (at its min) and the highest (at
//      its max): the bucket's min and max are then always levels, which stochastic rounding needs.
//   4. Round. Each value rounds to one of the two adjacent levels of the bucket's sorted codebook that
//   bracket
//      it, up with probability (x - lo) / (hi - lo): E[decode] = x exactly (with the float32 levels sent).
//      The uniform draw is a counter-based hash of (seed, element index), as in QSGD, so the same
//      (values, seed) always gives the same bytes.
// With one level per cluster, a value between two clusters' levels rounds across the gap; with two or more a
// cluster's own grid covers its values. clusters > 2^bits is rejected: every cluster needs a level.
//
// When clustering pays (measured on 2^20 values, bucket 512, relative error ||q - v|| / ||v||, bits 2 / 3):
//   skewed bimodal (90% N(-1, 0.1), 10% N(3, 0.3)): clusters = 4: 0.40 / 0.10, clusters = 1 (a uniform grid
//   on [min, max]): 0.48 / 0.25; Gaussian: 0.84 / 0.54 against 0.84 / 0.36. On a unimodal bucket the clusters
//   abut, so each one's end levels sit next to its neighbour's and are partly wasted.
//
// Packed layout (little-endian, `packed_bytes(n)` bytes in all):
//   [ceil(n / bucket_size) codebooks of B float32 levels, ascending][n indices of `bits` bits, LSB first]
// so bits per element = (32 B ceil(n / bucket_size) + 8 ceil(n bits / 8)) / n, about bits + 32 B /
// bucket_size: 2.25 at bits = 2 and 3.5 at bits = 3 for the default bucket of 512. Decoding is a codebook
// lookup, so the cluster boundaries of that design's message are not needed and not sent (that saves 32 C /
// bucket_size bits). Unused levels (a bucket with fewer distinct values than B) repeat the bucket's max.
//
// Non-finite input: a bucket holding NaN or inf gets an all-NaN codebook and decodes to NaN, so an overflow
// stays visible to AMP's GradScaler after aggregation.
#pragma once

#include "gradiveq/message_codec.h"
#include "gradiveq/options.h"

#include <ATen/ATen.h>

#include <cstdint>

namespace gradiveq {

class CasqCodec {
 public:
  explicit CasqCodec(const CasqOptions& options = {});

  const CasqOptions& options() const { return options_; }
  /// B = 2^bits levels per bucket.
  int64_t levels() const { return int64_t(1) << options_.bits; }
  /// Exact size of encode()'s output: 4 B ceil(numel / bucket_size) + ceil(numel bits / 8).
  int64_t packed_bytes(int64_t numel) const;
  /// 8 packed_bytes(numel) / numel.
  double bits_per_element(int64_t numel) const;

  /// 1-D float32 tensor -> uint8 tensor of packed_bytes(numel) bytes. The same (values, seed) always gives
  /// the same bytes.
  at::Tensor encode(const at::Tensor& values, uint64_t seed) const;
  /// Packed bytes of `numel` values -> float32 tensor of numel values.
  at::Tensor decode(const at::Tensor& packed, int64_t numel) const;
  /// out += decode(packed, out.numel()); `out` is a contiguous 1-D float32 CPU tensor.
  void decode_add(const at::Tensor& packed, at::Tensor& out) const;

 private:
  CasqOptions options_;
};

/// CASQ as a message codec for the gather pipeline. Stateless: seeded unbiased stochastic rounding, so no error
/// feedback is needed for unbiasedness. encode() measures the quantisation error (a codebook lookup).
class CasqMessageCodec : public MessageCodec {
 public:
  explicit CasqMessageCodec(const CasqOptions& options);

  std::string name() const override { return "casq"; }
  int64_t fixed_message_bytes(int64_t numel) const override { return codec_.packed_bytes(numel); }
  EncodedMessage encode(const at::Tensor& values, int64_t slot, uint64_t seed) override;
  void decode_add(const at::Tensor& packed, at::Tensor& out) const override;
  const CasqCodec& codec() const { return codec_; }

 private:
  CasqCodec codec_;
};

/// Deprecated name (0.1); removed in the next release.
using CasqGatherCodec [[deprecated("use gradiveq::CasqMessageCodec")]] = CasqMessageCodec;

}  // namespace gradiveq
