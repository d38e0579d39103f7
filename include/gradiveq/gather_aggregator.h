// GatherAggregator: bucket aggregation for codecs whose messages cannot be summed (CO3, CASQ).
//
// CO3 rounds to a non-uniform grid with a per-message scale and Huffman-codes the result; CASQ sends
// per-bucket codebooks. Neither commutes with summation, so every rank all-gathers every other rank's
// messages, decodes them, sums and divides by the world size (algorithms.md §4.4, §5.2: "all-gather followed
// by decode and sum").
//
// Per bucket, all issued from aggregate_bucket itself, in bucket order (design.md §3.4: a collective issued
// from a future's callback runs in a different order on different ranks under Gloo and aborts it):
//   1. parameters with fewer than `min_numel` values (biases, BatchNorm) travel uncompressed in one float32
//      all-reduce, as in QsgdAggregator;
//   2. the others are encoded (one message per parameter) into this rank's payload
//        [int64 message length, one per encoded parameter in bucket order][message 0][message 1]...
//      the length table lets a receiver split any rank's payload;
//   3. when the codec's message sizes depend on the data (CO3's Huffman stage), each rank's payload size is
//      all-gathered first (one int64 per rank) and waited for in the hook call: that host sync is the price
//      of variable-size messages. When they do not (CASQ: fixed by the shapes), every rank already knows them
//      and this collective is skipped;
//   4. the payloads are all-gathered, each padded to the largest one.
// The future's callback decodes every rank's messages, sums them and writes the average into the bucket.
//
// Per-parameter state (CO3's error memory) is keyed by parameter identity (the TensorImpl of each registered
// parameter, as Aggregator does), not by position in a bucket: DDP rebuilds its buckets after the first
// iteration, which moves parameters between buckets and positions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <unordered_map>
#include <utility>
#include <vector>

#include "gradiveq/aggregator.h"
#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/casq.h"
#include "gradiveq/co3.h"

namespace gradiveq {

namespace detail {
class StepRecorder;
}

/// One encoded parameter of this rank.
struct GatherMessage {
  at::Tensor packed;  ///< uint8 message
  double residual_sq =
      -1.0;                ///< ||decode(packed) - v||^2 of the values v encoded; -1: non-finite (not counted)
  double signal_sq = 0.0;  ///< ||v||^2
};

/// What GatherAggregator needs of a codec. encode() runs on the hook thread only; decode_add() may run on
/// several communication threads at once and must not touch mutable state.
class GatherCodec {
 public:
  virtual ~GatherCodec() = default;
  /// Short name: the phase GatherAggregator reports ("co3", "casq").
  virtual std::string name() const = 0;
  /// The exact message size for `numel` values when it does not depend on the data, else -1.
  virtual int64_t fixed_message_bytes(int64_t numel) const = 0;
  /// Encodes this rank's gradient of the parameter in `slot` (its registration index: the key of
  /// per-parameter state). `seed` differs between iterations, ranks and parameters. `gradient`: contiguous
  /// 1-D float32 CPU.
  virtual GatherMessage encode(const at::Tensor& gradient, int64_t slot, uint64_t seed) = 0;
  /// out += decode(packed); `out` is a contiguous 1-D float32 CPU tensor of the parameter's size.
  virtual void decode_add(const at::Tensor& packed, at::Tensor& out) const = 0;
  /// Whether the codec keeps per-parameter state that a checkpoint must hold.
  virtual bool keeps_slot_state() const { return false; }
  /// Per-parameter state to checkpoint (undefined: none, or the codec keeps none).
  virtual at::Tensor slot_state(int64_t /*slot*/) const { return {}; }
  /// Restores slot_state(); an undefined tensor resets the slot. Stateless codecs accept only undefined.
  virtual void set_slot_state(int64_t slot, const at::Tensor& state);
};

/// CO3 with its error correction (v = g + gamma e, e <- v - Q(v)): one error memory per parameter and rank.
/// The scale alpha is fitted on every message (it travels in the message, 4 bytes).
class Co3GatherCodec : public GatherCodec {
 public:
  Co3GatherCodec(const Co3Options& options, double gamma);

  std::string name() const override { return "co3"; }
  int64_t fixed_message_bytes(int64_t) const override { return -1; }
  GatherMessage encode(const at::Tensor& gradient, int64_t slot, uint64_t seed) override;
  void decode_add(const at::Tensor& packed, at::Tensor& out) const override;
  bool keeps_slot_state() const override { return true; }
  at::Tensor slot_state(int64_t slot) const override;
  void set_slot_state(int64_t slot, const at::Tensor& state) override;
  const Co3Codec& codec() const { return codec_; }
  double gamma() const { return gamma_; }

 private:
  Co3ErrorCorrection& correction(int64_t slot);

  Co3Codec codec_;
  double gamma_;
  std::vector<Co3ErrorCorrection> corrections_;  // by slot, grown on first use
};

/// CASQ, stateless: seeded unbiased stochastic rounding, so no error feedback is needed for unbiasedness.
class CasqGatherCodec : public GatherCodec {
 public:
  explicit CasqGatherCodec(const CasqOptions& options);

  std::string name() const override { return "casq"; }
  int64_t fixed_message_bytes(int64_t numel) const override { return codec_.packed_bytes(numel); }
  GatherMessage encode(const at::Tensor& gradient, int64_t slot, uint64_t seed) override;
  void decode_add(const at::Tensor& packed, at::Tensor& out) const override;
  const CasqCodec& codec() const { return codec_; }

 private:
  CasqCodec codec_;
};

struct GatherAggregatorOptions {
  int64_t min_numel = 1000;  ///< smaller parameters travel uncompressed
  uint64_t seed = 0;         ///< mixed with iteration, rank and position into each message's seed
};

class GatherAggregator : public BucketAggregator, public std::enable_shared_from_this<GatherAggregator> {
 public:
  /// `parameters`: every parameter DDP may hand over (names key the checkpoint); `codec`: not null.
  static std::shared_ptr<GatherAggregator> create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                                  std::vector<NamedParameter> parameters,
                                                  std::unique_ptr<GatherCodec> codec,
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
  const GatherCodec& codec() const { return *codec_; }

  /// This rank's per-parameter codec state (CO3: error memory), by parameter name; parameters without state
  /// are left out. Copies.
  std::vector<std::pair<std::string, at::Tensor>> save_slot_states() const;
  /// Restores save_slot_states() and the iteration counter (which seeds the rounding). Validates everything
  /// before changing anything: unknown names or mismatched sizes raise InvalidArgument and leave this object
  /// untouched. Parameters not named get no state (CO3: zero error memory).
  void load_slot_states(const std::vector<std::pair<std::string, at::Tensor>>& states, int64_t iteration);

 private:
  GatherAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                   std::vector<NamedParameter> parameters, std::unique_ptr<GatherCodec> codec,
                   GatherAggregatorOptions options);
  int64_t slot_of(const at::Tensor& parameter) const;

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  GatherAggregatorOptions options_;
  std::unique_ptr<GatherCodec> codec_;
  std::vector<std::string> names_;
  std::vector<int64_t> numels_;
  std::unordered_map<const void*, int64_t> slot_by_impl_;
  int64_t rank_ = 0, world_size_ = 1;
  int64_t iteration_ = 0;
  std::unique_ptr<detail::StepRecorder> steps_;
};

}  // namespace gradiveq
