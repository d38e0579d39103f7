// Canonical, length-limited Huffman coding of small-alphabet symbol streams (alphabet of 1..256 symbols),
// the lossless stage of CO3. The code table travels with the data, so the byte count reported is the byte
// count sent.
//
// Code lengths come from package-merge (Larmore & Hirschberg 1990), which gives the optimal prefix code among
// those whose longest code is at most `max_length` bits; with a limit the source never reaches it is plain
// Huffman. Codes are canonical (sorted by (length, symbol)), so the lengths alone define the code and are all
// the decoder needs.
//
// Packed message layout (`huffman_encode`, byte for byte; CO3 embeds the same two parts after its header):
//   [table: ceil(A / 2) bytes]   the code length of every symbol 0..A-1 in 4 bits (0 = the symbol is absent);
//                                symbol 2k in the low nibble of byte k, symbol 2k + 1 in the high nibble
//   [payload: ceil(sum_s count_s * length_s / 8) bytes]
//                                the codes back to back, most significant bit first within each byte; the
//                                last byte is zero-padded
// so the size is ceil(A / 2) + ceil(sum_s count_s * length_s / 8) bytes, for A the alphabet size. The 4-bit
// length field is why lengths are limited to 15 bits.
//
// Edge cases: an empty stream is an all-zero table and no payload; a stream of one distinct symbol gives that
// symbol a 1-bit code (a 0-bit code would not say how many symbols follow, and the count is the caller's).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace gradiveq {

class HuffmanCode {
 public:
  /// Longest code the table format can hold (4-bit length fields).
  static constexpr int kMaxLength = 15;

  /// The optimal code for these symbol counts (counts.size() = alphabet size, 1..256) whose codes are at most
  /// `max_length` bits long (package-merge). Symbols with count 0 get no code. Ties between equal counts go
  /// to the smaller symbol, so the result is deterministic.
  static HuffmanCode from_counts(const std::vector<uint64_t>& counts, int max_length = kMaxLength);
  /// The canonical code with these lengths (0 = no code). Checks that the lengths fit a prefix code (Kraft
  /// sum
  /// <= 1) and are <= kMaxLength; `where` and `arg` name the caller in the error.
  static HuffmanCode from_lengths(const std::vector<uint8_t>& lengths, const char* where = "HuffmanCode",
                                  const char* arg = "lengths");

  int64_t alphabet_size() const { return int64_t(lengths_.size()); }
  const std::vector<uint8_t>& lengths() const { return lengths_; }
  /// Canonical code of each symbol: its `lengths()[s]` low bits, sent most significant bit first.
  const std::vector<uint32_t>& codes() const { return codes_; }
  /// The longest code in use (0 when no symbol has a code).
  int longest() const { return longest_; }
  /// sum_s counts[s] * lengths[s]: the payload size in bits for a stream with these counts.
  int64_t encoded_bits(const std::vector<uint64_t>& counts) const;

  /// Bytes of the table for an alphabet of `alphabet_size` symbols: ceil(alphabet_size / 2).
  static int64_t table_bytes(int64_t alphabet_size) { return (alphabet_size + 1) / 2; }
  /// Writes table_bytes(alphabet_size()) bytes.
  void write_table(uint8_t* out) const;
  /// Reads a table written by write_table (validated like from_lengths).
  static HuffmanCode read_table(const uint8_t* in, int64_t alphabet_size, const char* where, const char* arg);

  /// Writes the codes of symbols[0..n) to `out`, which holds exactly ceil(bits / 8) bytes for the stream's
  /// encoded_bits; returns the number of bits written. A symbol without a code is an error.
  int64_t encode(const uint8_t* symbols, int64_t n, uint8_t* out, int64_t out_bytes) const;
  /// Reads n symbols from in[0..in_bytes). Throws InvalidArgument naming `where`/`arg` unless the bytes are
  /// exactly the ceil(bits / 8) bytes that encode() writes for those n symbols (no bit pattern without a
  /// code, no missing or extra bytes, zero padding).
  void decode(const uint8_t* in, int64_t in_bytes, int64_t n, uint8_t* symbols, const char* where,
              const char* arg) const;

 private:
  HuffmanCode() = default;
  void assign_canonical_codes();

  std::vector<uint8_t> lengths_;
  std::vector<uint32_t> codes_;
  int longest_ = 0;
};

/// Counts of each symbol 0..alphabet_size-1 in symbols[0..n); a symbol >= alphabet_size is an error.
std::vector<uint64_t> count_symbols(const uint8_t* symbols, int64_t n, int64_t alphabet_size);

/// 1-D uint8 CPU tensor of symbols < alphabet_size -> uint8 tensor [table][payload] (layout above).
at::Tensor huffman_encode(const at::Tensor& symbols, int64_t alphabet_size,
                          int max_length = HuffmanCode::kMaxLength);
/// The inverse: `count` symbols back as a uint8 tensor.
at::Tensor huffman_decode(const at::Tensor& packed, int64_t alphabet_size, int64_t count);

}  // namespace gradiveq
