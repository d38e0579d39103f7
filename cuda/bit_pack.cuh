// Device side of util/packed_bits.h: fixed-width codes, LSB first, no padding between codes. Writers OR each
// code into zeroed 32-bit words (little-endian, so the words' bytes are the CPU writer's byte stream);
// readers assemble a code from the bytes it spans.
#pragma once

#include <cstdint>

namespace gradiveq::detail::cuda {

/// Code `index` of `bits` (<= 25) bits into the stream at `words`.
__device__ __forceinline__ void or_code(uint32_t* words, int64_t index, int bits, uint32_t code) {
  const int64_t bit = index * bits;
  const int64_t word = bit / 32;
  const int shift = int(bit % 32);
  atomicOr(words + word, code << shift);
  if (shift + bits > 32) atomicOr(words + word + 1, code >> (32 - shift));
}

/// Code `index` of `bits` (<= 25) bits from a stream of `stream_bytes` bytes.
__device__ __forceinline__ uint32_t read_code(const uint8_t* stream, int64_t stream_bytes, int64_t index,
                                              int bits) {
  const int64_t bit = index * bits;
  const int64_t byte = bit / 8;
  const int shift = int(bit % 8);
  uint32_t v = 0;
  for (int b = 0; b * 8 < shift + bits; ++b) {
    if (byte + b < stream_bytes) v |= uint32_t(stream[byte + b]) << (8 * b);
  }
  return (v >> shift) & ((1u << bits) - 1u);
}

/// A float32 read byte by byte: a message may sit at any offset of a buffer.
__device__ __forceinline__ float read_float(const uint8_t* p) {
  const uint32_t u = uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
  return __uint_as_float(u);
}

}  // namespace gradiveq::detail::cuda
