// QSGD (Alistarh et al. 2017) with real bit-packing: the byte count reported is the byte count sent.
//
// Values are cut into buckets of `bucket_size` consecutive elements. Each bucket has one float32 scale
// (its max |v| or its L2 norm) and each value becomes a sign bit plus a level in [0, levels] chosen by
// seeded stochastic rounding, so decode(encode(v)) is unbiased: E[decode] = v.
//
// Packed layout (little-endian, `packed_bytes(n)` bytes in all):
//   [ceil(n / bucket_size) float32 scales][n codes of `bits_per_value()` bits, LSB first, no padding between]
// where a code is (level << 1) | sign. "4-bit QSGD" is levels = 7: 1 sign bit + 3 level bits, the fixed-width
// baseline at ratio ~8 used by the GradiVeQ paper.
//
// Non-finite input: a bucket holding NaN or inf gets a NaN scale, and decodes to NaN, so an overflow stays
// visible to AMP's GradScaler after aggregation.
#pragma once

#include "gradiveq/message_codec.h"
#include "gradiveq/options.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace gradiveq {

class QsgdCodec {
 public:
  explicit QsgdCodec(const QsgdOptions& options = {});

  const QsgdOptions& options() const { return options_; }
  /// 1 sign bit + ceil(log2(levels + 1)) level bits.
  int64_t bits_per_value() const { return bits_; }
  /// Exact size of encode()'s output for `numel` values: 4 * ceil(numel / bucket) + ceil(numel * bits / 8).
  int64_t packed_bytes(int64_t numel) const;

  /// 1-D float32 tensor -> uint8 tensor of packed_bytes(numel) bytes. The same (values, seed) always gives
  /// the same bytes. CUDA values with the CUDA kernels switched on are packed on the device and the message
  /// stays there; any other values are packed on the CPU, into a CPU message.
  at::Tensor encode(const at::Tensor& values, uint64_t seed) const;
  /// Packed bytes of `numel` values -> float32 CPU tensor of numel values.
  at::Tensor decode(const at::Tensor& packed, int64_t numel) const;
  /// out += decode(packed, out.numel()); `out` is a contiguous 1-D float32 tensor, on the CPU, or on the
  /// message's CUDA device with the kernels switched on (unpacked there).
  void decode_add(const at::Tensor& packed, at::Tensor& out) const;
  /// Whether encode() keeps messages of values on `device` there (and decode_add unpacks them there).
  static bool packs_on(const at::Device& device);

 private:
  at::Tensor encode_on_device(const at::Tensor& values, uint64_t seed) const;
  QsgdOptions options_;
  int64_t bits_ = 0;
};

/// QSGD as a message codec for the gather pipeline (gather_aggregator.h). Stateless: seeded unbiased rounding.
/// Its message sizes follow from the shapes, so payloads carry no length table. The quantisation error is not
/// measured (encode() reports residual_sq = -1): it would cost a decode per message.
class QsgdMessageCodec : public MessageCodec {
 public:
  explicit QsgdMessageCodec(const QsgdOptions& options = {});

  std::string name() const override { return "qsgd"; }
  int64_t fixed_message_bytes(int64_t numel) const override { return codec_.packed_bytes(numel); }
  bool length_table() const override { return false; }
  EncodedMessage encode(const at::Tensor& values, int64_t slot, uint64_t seed) override;
  void decode_add(const at::Tensor& packed, at::Tensor& out) const override;
  bool keeps_messages_on(const at::Device& device) const override { return QsgdCodec::packs_on(device); }
  const QsgdCodec& codec() const { return codec_; }

 private:
  QsgdCodec codec_;
};

}  // namespace gradiveq
