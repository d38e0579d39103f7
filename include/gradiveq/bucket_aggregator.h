// BucketAggregator: what a DDP communication hook (or the LibTorch synchronizer) hands each bucket to.
//
// Implementations: gradiveq::GradiVeQAggregator (the summable GradiVeQ engine) and gradiveq::GatherAggregator
// (all-gather, decode, sum for any message codec: QSGD, CO3, CASQ). Front ends: AggregatorCommHook (DDP) and
// GradientSynchronizer (LibTorch) run any of them. They issue every collective from aggregate_bucket itself, in bucket
// order, and return a future that completes with the bucket buffer holding the average over ranks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gradiveq/types.h"

namespace gradiveq {

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
