// GatherAggregator: bucket aggregation for any codec whose messages cannot be summed (message_codec.h: QSGD,
// CO3, CASQ). Every rank all-gathers every other rank's messages, decodes them, sums and divides by the world
// size ("all-gather followed by decode and sum").
//
// Per bucket, all issued from aggregate_bucket itself, in bucket order (a collective issued from a future's
// callback runs in a different order on different ranks under Gloo and aborts it; docs/design.md):
//   1. parameters with fewer than `min_numel` values (biases, BatchNorm) travel uncompressed in one float32
//      all-reduce;
//   2. the others are encoded (one message per parameter) and go through the one gather pipeline: framed into
//      this rank's payload, sizes all-gathered first when they depend on the data (CO3), payloads
//      all-gathered padded to the largest (docs/algorithms.md, "Gather framing").
// The future's callback decodes every rank's messages, sums them and writes the average into the bucket.
//
// Per-parameter codec state (CO3's error memory) is keyed by parameter identity (the TensorImpl of each
// registered parameter), not by position in a bucket: DDP rebuilds its buckets after the first iteration.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <unordered_map>
#include <utility>
#include <vector>

#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/message_codec.h"
#include "gradiveq/options.h"
#include "gradiveq/types.h"

namespace gradiveq {

namespace detail {
class StepRecorder;
}

class GatherAggregator : public BucketAggregator, public std::enable_shared_from_this<GatherAggregator> {
 public:
  /// `parameters`: every parameter DDP may hand over (names key the checkpoint); `codec`: not null.
  static std::shared_ptr<GatherAggregator> create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                                  std::vector<NamedParameter> parameters,
                                                  std::unique_ptr<MessageCodec> codec,
                                                  GatherAggregatorOptions options = {});
  ~GatherAggregator() override;

  c10::intrusive_ptr<c10::ivalue::Future> aggregate_bucket(const at::Tensor& buffer,
                                                           const std::vector<at::Tensor>& gradients,
                                                           const std::vector<at::Tensor>& parameters,
                                                           int64_t index, bool is_last) override;
  int64_t iteration() const override { return iteration_; }
  StepStats step_stats() const override;
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_size_; }
  const MessageCodec& codec() const { return *codec_; }

  /// This rank's per-parameter codec state (CO3: error memory), by parameter name; parameters without state
  /// are left out. Copies.
  std::vector<std::pair<std::string, at::Tensor>> save_slot_states() const;
  /// Restores save_slot_states() and the iteration counter (which seeds the rounding). Validates everything
  /// before changing anything: unknown names or mismatched sizes raise InvalidArgument and leave this object
  /// untouched. Parameters not named get no state (CO3: zero error memory).
  void load_slot_states(const std::vector<std::pair<std::string, at::Tensor>>& states, int64_t iteration);

 private:
  struct Bucket;

  GatherAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                   std::vector<NamedParameter> parameters, std::unique_ptr<MessageCodec> codec,
                   GatherAggregatorOptions options);
  int64_t slot_of(const at::Tensor& parameter) const;
  void encode_bucket(Bucket& bucket, const std::vector<at::Tensor>& parameters, int64_t index);
  static void finish_bucket(Bucket& bucket, int64_t world_size);

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  GatherAggregatorOptions options_;
  std::unique_ptr<MessageCodec> codec_;
  std::vector<std::string> names_;
  std::vector<int64_t> numels_;
  std::unordered_map<const void*, int64_t> slot_by_impl_;
  int64_t rank_ = 0, world_size_ = 1;
  int64_t iteration_ = 0;
  std::unique_ptr<detail::StepRecorder> steps_;
};

}  // namespace gradiveq
