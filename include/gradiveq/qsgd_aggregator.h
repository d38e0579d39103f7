// QsgdAggregator: the QSGD baseline as a bucket aggregator (the GradiVeQ paper's comparison: 4-bit QSGD).
//
// QSGD codes cannot be summed (every rank has its own scales, and sums overflow the levels), so each bucket's
// quantised parameters are all-gathered, every rank's codes decoded and summed locally, then averaged.
// Parameters with fewer than `min_numel` values (biases, BatchNorm) travel uncompressed in one all-reduce,
// as in the QSGD paper's experiments (tensors under 10K values were not quantised).
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>

#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/qsgd.h"

namespace gradiveq {

namespace detail {
class StepRecorder;
}

struct QsgdAggregatorOptions {
  QsgdOptions codec;        ///< default: 7 levels (4 bits with the sign), bucket 512, max-norm scaling
  int64_t min_numel = 1000;
  uint64_t seed = 0;        ///< mixed with iteration, rank and position for the stochastic rounding
};

class QsgdAggregator : public BucketAggregator, public std::enable_shared_from_this<QsgdAggregator> {
 public:
  static std::shared_ptr<QsgdAggregator> create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                                QsgdAggregatorOptions options);
  ~QsgdAggregator() override;

  c10::intrusive_ptr<c10::ivalue::Future> aggregate_bucket(const at::Tensor& buffer,
                                                           const std::vector<at::Tensor>& gradients,
                                                           const std::vector<at::Tensor>& parameters,
                                                           int64_t index, bool is_last) override;
  int64_t iteration() const override { return iteration_; }
  StepStats step_stats() const override;
  const QsgdCodec& codec() const { return codec_; }

 private:
  QsgdAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group, QsgdAggregatorOptions options);

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  QsgdAggregatorOptions options_;
  QsgdCodec codec_;
  int64_t rank_ = 0, world_size_ = 1;
  int64_t iteration_ = 0;
  std::unique_ptr<detail::StepRecorder> steps_;
};

}  // namespace gradiveq
