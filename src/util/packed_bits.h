// Private: the fixed-width, LSB-first bit packing shared by the QSGD and CASQ codecs, and the argument checks
// of their packed messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "gradiveq/errors.h"

namespace gradiveq::detail {

/// Appends codes of `bits` (<= 56) bits, least significant bit first, with no padding between codes.
class LsbBitWriter {
 public:
  explicit LsbBitWriter(uint8_t* out) : out_(out) {}
  void put(uint64_t code, int bits) {
    acc_ |= code << acc_bits_;
    acc_bits_ += bits;
    while (acc_bits_ >= 8) {
      out_[bytes_++] = uint8_t(acc_ & 0xFF);
      acc_ >>= 8;
      acc_bits_ -= 8;
    }
  }
  /// Flushes a partial last byte; returns the bytes written.
  int64_t finish() {
    if (acc_bits_ > 0) out_[bytes_++] = uint8_t(acc_ & 0xFF);
    acc_ = 0;
    acc_bits_ = 0;
    return bytes_;
  }

 private:
  uint8_t* out_;
  uint64_t acc_ = 0;  // bit accumulator, flushed byte by byte
  int acc_bits_ = 0;
  int64_t bytes_ = 0;
};

/// Reads LsbBitWriter's codes back, in order.
class LsbBitReader {
 public:
  explicit LsbBitReader(const uint8_t* in) : in_(in) {}
  uint64_t get(int bits) {
    while (acc_bits_ < bits) {
      acc_ |= uint64_t(in_[byte_++]) << acc_bits_;
      acc_bits_ += 8;
    }
    const uint64_t code = acc_ & ((uint64_t(1) << bits) - 1);
    acc_ >>= bits;
    acc_bits_ -= bits;
    return code;
  }

 private:
  const uint8_t* in_;
  uint64_t acc_ = 0;
  int acc_bits_ = 0;
  int64_t byte_ = 0;
};

/// A message of exactly `expected` bytes: a contiguous 1-D uint8 CPU tensor.
inline void check_packed(const at::Tensor& packed, int64_t expected, const char* where) {
  GVQ_CHECK_ARG(packed.defined() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                    packed.device().is_cpu() && packed.is_contiguous(),
                where, "packed", "must be a contiguous 1-D uint8 CPU tensor");
  GVQ_CHECK_ARG(packed.numel() == expected, where, "packed", "has ", packed.numel(), " bytes, expected ",
                expected);
}

/// decode_add's accumulator: a contiguous 1-D float32 CPU tensor.
inline void check_decode_out(const at::Tensor& out, const char* where) {
  GVQ_CHECK_ARG(out.defined() && out.scalar_type() == at::kFloat && out.dim() == 1 && out.is_contiguous() &&
                    out.device().is_cpu(),
                where, "out", "must be a contiguous 1-D float32 CPU tensor");
}

}  // namespace gradiveq::detail
