// Private: the one gather pipeline. Encode this rank's messages, frame them into one payload, all-gather
// every rank's payload, decode and sum per message. GatherAggregator (QSGD, CO3, CASQ) and the GradiVeQ
// engine's QSGD-coded sampling windows both aggregate through it.
//
// Payload framing (docs/algorithms.md, "Gather framing"):
//   with a length table   [int64 length of each message, in order][message 0][message 1]...
//   without (QSGD)        [message 0][message 1]...   sizes follow from the shapes: fixed_message_bytes
// When a codec's sizes depend on the data (CO3), every rank's payload size is all-gathered first (one int64
// per rank) and waited for in issue(): that host sync keeps the payload all-gather in the hook call, in
// bucket order. Payloads are all-gathered padded to the largest one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <vector>

#include "engine/collectives.h"
#include "gradiveq/message_codec.h"

namespace gradiveq::detail {

class GatherPipeline {
 public:
  /// `codec` must outlive the pipeline (its owner keeps both alive until the callback has run).
  explicit GatherPipeline(MessageCodec& codec) : codec_(&codec) {}

  /// Encodes `values` (contiguous 1-D float32, on the CPU or on a device the codec keeps messages on) as this
  /// rank's next message.
  const EncodedMessage& add(const at::Tensor& values, int64_t slot, uint64_t seed);
  int64_t num_messages() const { return int64_t(numels_.size()); }
  /// Whether values on `device` are encoded, gathered and decoded there (else they go to the CPU first).
  bool stays_on(const at::Device& device) const { return codec_->keeps_messages_on(device); }

  /// Frames the messages and all-gathers every rank's payload on `device`; returns that collective's future,
  /// or none when there is no message. Adds what it sent to `bytes`.
  c10::intrusive_ptr<c10::ivalue::Future> issue(c10d::ProcessGroup& pg, const at::Device& device,
                                                CollectiveBytes& bytes);

  /// Once issue()'s future has completed: for each message, the sum over ranks of its decoded values
  /// (float32, the message's size, on the messages' device), ranks added in rank order.
  std::vector<at::Tensor> decoded_sums() const;

 private:
  at::Tensor frame() const;
  void decode_on_device(std::vector<at::Tensor>& sums) const;
  /// Bytes of the length table at the start of every rank's payload (0 for codecs without one).
  int64_t table_bytes() const { return codec_->length_table() ? 8 * num_messages() : 0; }
  int64_t message_bytes(const uint8_t* payload, int64_t k) const;

  MessageCodec* codec_;
  std::vector<EncodedMessage> messages_;  // until framed
  std::vector<int64_t> numels_;
  bool fixed_sizes_ = true;
  std::vector<int64_t> sizes_;        // every rank's payload bytes (without padding)
  std::vector<at::Tensor> gathered_;  // every rank's padded payload, after the all-gather
  bool device_messages_ = false;      // the payloads were framed on the device (stays_on): decoded there
};

}  // namespace gradiveq::detail
