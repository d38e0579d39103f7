// BucketAggregator: what a DDP communication hook (or the LibTorch synchronizer) hands each bucket to.
//
// Implementations: gradiveq::Aggregator (GradiVeQ), gradiveq::QsgdAggregator (the QSGD baseline) and
// gradiveq::GatherAggregator (CO3, CASQ). They issue every collective from aggregate_bucket itself, in bucket
// order, and return a future that completes with the bucket buffer holding the average over ranks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradiveq {

/// Statistics of the last completed step (all buckets of one iteration), summed over its buckets.
struct StepStats {
  int64_t iteration = -1;
  std::string phase;
  int64_t buckets = 0;
  int64_t collectives = 0;
  int64_t bytes_uncompressed = 0;  ///< float32 bytes of all gradients aggregated
  int64_t bytes_payload = 0;       ///< bytes this rank contributed to collectives
  int64_t bytes_wire = 0;          ///< bytes this rank sends on a ring: 2(N-1)/N per all-reduce byte, N-1 per all-gather byte
  double aggregation_ms = 0.0;     ///< sum over buckets of (bucket handed over -> its future completed)
  double compress_ms = 0.0;        ///< packing and compressing, in the hook call
  double decompress_ms = 0.0;      ///< unpacking and decompressing, in the callbacks
  double fit_ms = 0.0;             ///< fitting and distributing bases (only on steps that fit)
  std::string sampling_aggregation;
  /// This rank's local loss (eq. 7) over the layers it compressed in the step, sqrt(sum of squared residuals /
  /// sum of squared gradients); -1 when nothing was compressed.
  double relative_error = -1.0;
  int64_t window_restarts = 0;  ///< compressed windows left early by the adaptive window, so far
  /// Codecs with per-parameter messages (GatherAggregator): values this rank encoded, and the bytes of their
  /// messages (without the length table and padding), so 8 * bytes_encoded / values_encoded is bits per value.
  int64_t values_encoded = 0;
  int64_t bytes_encoded = 0;
};

class BucketAggregator {
 public:
  virtual ~BucketAggregator() = default;

  /// Aggregates one bucket. `buffer` is the bucket's flat gradient buffer, `gradients` views of it (one per
  /// parameter, in `parameters` order), `index` the bucket's position in this step (0 first) and `is_last`
  /// whether it is the step's last bucket. Issues the bucket's collectives now and returns a future that
  /// completes with `buffer` holding the averaged gradients.
  virtual c10::intrusive_ptr<c10::ivalue::Future> aggregate_bucket(const at::Tensor& buffer,
                                                                   const std::vector<at::Tensor>& gradients,
                                                                   const std::vector<at::Tensor>& parameters,
                                                                   int64_t index, bool is_last) = 0;
  /// Synchronised steps aggregated so far.
  virtual int64_t iteration() const = 0;
  virtual StepStats step_stats() const = 0;
};

}  // namespace gradiveq
