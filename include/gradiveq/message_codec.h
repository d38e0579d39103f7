// MessageCodec: what a codec whose messages cannot be summed (QSGD, CO3, CASQ) provides to the one gather
// pipeline (all-gather every rank's messages, decode, sum, average; gather_aggregator.h), which
// GatherAggregator and the GradiVeQ engine's QSGD-coded sampling windows share.
//
// A codec encodes one parameter's values into one message. Per-parameter state (CO3's error memory) lives in
// the codec, keyed by `slot`, the parameter's registration index: DDP rebuilds its buckets after the first
// iteration, so positions in a bucket are not stable keys.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace gradiveq {

/// One encoded parameter of this rank.
struct EncodedMessage {
  at::Tensor packed;  ///< uint8 message
  double residual_sq =
      -1.0;  ///< ||decode(packed) - v||^2 of the values v encoded; -1: not measured or non-finite
  double signal_sq = 0.0;  ///< ||v||^2
};

/// encode() runs on the hook thread only; decode_add() may run on several communication threads at once and
/// must not touch mutable state.
class MessageCodec {
 public:
  virtual ~MessageCodec() = default;
  /// Short name: the phase GatherAggregator reports ("qsgd", "co3", "casq").
  virtual std::string name() const = 0;
  /// The exact message size for `numel` values when it does not depend on the data, else -1.
  virtual int64_t fixed_message_bytes(int64_t numel) const = 0;
  /// Whether a rank's payload starts with a table of its message lengths ([int64 length] per message). Codecs
  /// with data-dependent sizes need it; QSGD's sizes follow from the shapes and it has never sent one. CASQ
  /// keeps the table it has always sent, so its bytes on the wire are unchanged.
  virtual bool length_table() const { return true; }
  /// Encodes this rank's values of the parameter in `slot`. `seed` differs between iterations, ranks and
  /// parameters. `values`: contiguous 1-D float32 CPU.
  virtual EncodedMessage encode(const at::Tensor& values, int64_t slot, uint64_t seed) = 0;
  /// out += decode(packed); `out` is a contiguous 1-D float32 tensor of the parameter's size, on the CPU or,
  /// for a codec that keeps_messages_on its device, there.
  virtual void decode_add(const at::Tensor& packed, at::Tensor& out) const = 0;
  /// Whether encode() of values on `device` returns a message on that device, which decode_add unpacks there
  /// (the gather pipeline then keeps the whole step on the device). Such a codec sends no length table.
  virtual bool keeps_messages_on(const at::Device& /*device*/) const { return false; }
  /// Whether the codec keeps per-parameter state that a checkpoint must hold.
  virtual bool keeps_slot_state() const { return false; }
  /// Per-parameter state to checkpoint (undefined: none, or the codec keeps none).
  virtual at::Tensor slot_state(int64_t /*slot*/) const { return {}; }
  /// Restores slot_state(); an undefined tensor resets the slot. Stateless codecs accept only undefined.
  virtual void set_slot_state(int64_t slot, const at::Tensor& state);
};

/// Deprecated names (0.1); removed in the next release.
using GatherCodec [[deprecated("use gradiveq::MessageCodec")]] = MessageCodec;
using GatherMessage [[deprecated("use gradiveq::EncodedMessage")]] = EncodedMessage;

}  // namespace gradiveq
