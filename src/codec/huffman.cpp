#include "gradiveq/huffman.h"

#include <algorithm>
#include <numeric>

#include "gradiveq/errors.h"

namespace gradiveq {

namespace {

constexpr uint16_t kNoSymbol = 0xFFFF;

// One item of a package-merge list: a leaf (symbol >= 0) or a package of items first and first + 1 of the
// list one level deeper.
struct Item {
  uint64_t weight;
  int32_t symbol;
  int32_t first;
};

// Package-merge: list 0 holds the leaves, sorted by weight; list k + 1 merges the leaves with the pairs
// (packages) of adjacent items of list k. The 2n - 2 lightest items of list max_length - 1 are the optimal
// choice, and a symbol's code length is how many times its leaf occurs in them once packages are expanded.
// Every item of a list is in at most one package, so the expansion visits each item once: O(max_length * n).
std::vector<uint8_t> package_merge(const std::vector<uint64_t>& counts, int max_length) {
  std::vector<uint8_t> lengths(counts.size(), 0);
  std::vector<Item> leaves;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (counts[s] > 0) leaves.push_back({counts[s], int32_t(s), -1});
  }
  // Stable: equal counts keep symbol order, so the lengths (and bytes) never depend on the sort's whims.
  std::stable_sort(leaves.begin(), leaves.end(),
                   [](const Item& a, const Item& b) { return a.weight < b.weight; });
  const size_t n = leaves.size();
  if (n == 0) return lengths;
  if (n == 1) {
    lengths[size_t(leaves[0].symbol)] = 1;
    return lengths;
  }
  std::vector<std::vector<Item>> lists(static_cast<size_t>(max_length));
  lists[0] = leaves;
  for (size_t level = 1; level < size_t(max_length); ++level) {
    const std::vector<Item>& deeper = lists[level - 1];
    std::vector<Item>& list = lists[level];
    list.reserve(n + deeper.size() / 2);
    size_t leaf = 0, pair = 0;
    while (leaf < n || pair + 1 < deeper.size()) {
      const bool have_pair = pair + 1 < deeper.size();
      const uint64_t pair_weight = have_pair ? deeper[pair].weight + deeper[pair + 1].weight : 0;
      // On equal weights the leaf goes first: fewer long codes among equal-cost choices.
      if (leaf < n && (!have_pair || leaves[leaf].weight <= pair_weight)) {
        list.push_back(leaves[leaf++]);
      } else {
        list.push_back({pair_weight, -1, int32_t(pair)});
        pair += 2;
      }
    }
  }
  std::vector<std::pair<size_t, int32_t>> stack;  // (level, index) still to expand
  const size_t top = size_t(max_length) - 1;
  GVQ_ASSERT(lists[top].size() >= 2 * n - 2);
  for (size_t i = 0; i < 2 * n - 2; ++i) stack.push_back({top, int32_t(i)});
  while (!stack.empty()) {
    const auto [level, index] = stack.back();
    stack.pop_back();
    const Item& item = lists[level][size_t(index)];
    if (item.symbol >= 0) {
      ++lengths[size_t(item.symbol)];
    } else {
      stack.push_back({level - 1, item.first});
      stack.push_back({level - 1, item.first + 1});
    }
  }
  return lengths;
}

}  // namespace

std::vector<uint64_t> count_symbols(const uint8_t* symbols, int64_t n, int64_t alphabet_size) {
  GVQ_CHECK_ARG(alphabet_size >= 1 && alphabet_size <= 256, "count_symbols", "alphabet_size",
                "must lie in [1, 256], got ", alphabet_size);
  std::vector<uint64_t> counts(256, 0);
  for (int64_t i = 0; i < n; ++i) ++counts[symbols[i]];
  for (int64_t s = alphabet_size; s < 256; ++s) {
    GVQ_CHECK_ARG(counts[size_t(s)] == 0, "count_symbols", "symbols", "holds symbol ", s,
                  ", outside the alphabet of ", alphabet_size);
  }
  counts.resize(size_t(alphabet_size));
  return counts;
}

HuffmanCode HuffmanCode::from_counts(const std::vector<uint64_t>& counts, int max_length) {
  GVQ_CHECK_ARG(!counts.empty() && counts.size() <= 256, "HuffmanCode.from_counts", "counts",
                "must have 1..256 entries (the alphabet), got ", counts.size());
  GVQ_CHECK_ARG(max_length >= 1 && max_length <= kMaxLength, "HuffmanCode.from_counts", "max_length",
                "must lie in [1, ", kMaxLength, "], got ", max_length);
  const auto used = std::count_if(counts.begin(), counts.end(), [](uint64_t c) { return c > 0; });
  GVQ_CHECK_ARG(used <= (int64_t(1) << max_length), "HuffmanCode.from_counts", "max_length", "of ",
                max_length, " bits cannot give codes to ", used, " symbols");
  HuffmanCode code;
  code.lengths_ = package_merge(counts, max_length);
  code.assign_canonical_codes();
  return code;
}

HuffmanCode HuffmanCode::from_lengths(const std::vector<uint8_t>& lengths, const char* where,
                                      const char* arg) {
  GVQ_CHECK_ARG(!lengths.empty() && lengths.size() <= 256, where, arg, "must have 1..256 entries, got ",
                lengths.size());
  uint64_t kraft = 0;  // sum of 2^(kMaxLength - length): a prefix code needs <= 2^kMaxLength
  for (size_t s = 0; s < lengths.size(); ++s) {
    GVQ_CHECK_ARG(lengths[s] <= kMaxLength, where, arg, "gives symbol ", s, " a ", int(lengths[s]),
                  "-bit code, above the ", kMaxLength, "-bit limit (corrupted table)");
    if (lengths[s] > 0) kraft += uint64_t(1) << (kMaxLength - lengths[s]);
  }
  GVQ_CHECK_ARG(kraft <= (uint64_t(1) << kMaxLength), where, arg,
                "holds code lengths that no prefix code has (Kraft sum > 1; corrupted table)");
  HuffmanCode code;
  code.lengths_ = lengths;
  code.assign_canonical_codes();
  return code;
}

void HuffmanCode::assign_canonical_codes() {
  codes_.assign(lengths_.size(), 0);
  std::vector<int> order(lengths_.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return lengths_[a] < lengths_[b]; });
  uint32_t next = 0;
  int prev_length = 0;
  longest_ = 0;
  for (int s : order) {
    const int length = lengths_[size_t(s)];
    if (length == 0) continue;
    if (prev_length > 0) next = (next + 1) << (length - prev_length);
    codes_[size_t(s)] = next;
    prev_length = length;
    longest_ = length;
  }
}

int64_t HuffmanCode::encoded_bits(const std::vector<uint64_t>& counts) const {
  GVQ_CHECK_ARG(counts.size() == lengths_.size(), "HuffmanCode.encoded_bits", "counts", "has ", counts.size(),
                " entries, expected the alphabet size ", lengths_.size());
  int64_t bits = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    GVQ_CHECK_ARG(counts[s] == 0 || lengths_[s] > 0, "HuffmanCode.encoded_bits", "counts", "counts symbol ",
                  s, ", which has no code");
    bits += int64_t(counts[s]) * lengths_[s];
  }
  return bits;
}

void HuffmanCode::write_table(uint8_t* out) const {
  const int64_t bytes = table_bytes(alphabet_size());
  for (int64_t k = 0; k < bytes; ++k) {
    const uint8_t lo = lengths_[size_t(2 * k)];
    const uint8_t hi = 2 * k + 1 < alphabet_size() ? lengths_[size_t(2 * k + 1)] : 0;
    out[k] = uint8_t(lo | (hi << 4));
  }
}

HuffmanCode HuffmanCode::read_table(const uint8_t* in, int64_t alphabet_size, const char* where,
                                    const char* arg) {
  GVQ_CHECK_ARG(alphabet_size >= 1 && alphabet_size <= 256, where, "alphabet_size",
                "must lie in [1, 256], got ", alphabet_size);
  std::vector<uint8_t> lengths(static_cast<size_t>(alphabet_size));
  for (int64_t s = 0; s < alphabet_size; ++s) lengths[size_t(s)] = (in[s / 2] >> (4 * (s % 2))) & 0xF;
  if (alphabet_size % 2 == 1) {
    GVQ_CHECK_ARG((in[alphabet_size / 2] >> 4) == 0, where, arg,
                  "has a non-zero unused nibble in its code table (corrupted data)");
  }
  return from_lengths(lengths, where, arg);
}

int64_t HuffmanCode::encode(const uint8_t* symbols, int64_t n, uint8_t* out, int64_t out_bytes) const {
  constexpr const char* kWhere = "HuffmanCode.encode";
  const size_t alphabet = lengths_.size();
  uint64_t acc = 0;  // the low acc_bits bits are pending, most significant first
  int acc_bits = 0;
  int64_t byte = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t s = symbols[i];
    GVQ_CHECK_ARG(s < alphabet && lengths_[s] > 0, kWhere, "symbols", "holds symbol ", int(s),
                  ", which has no code");
    acc = (acc << lengths_[s]) | codes_[s];
    acc_bits += lengths_[s];
    while (acc_bits >= 8) {
      GVQ_CHECK_ARG(byte < out_bytes, kWhere, "out_bytes", "of ", out_bytes, " is too small");
      out[byte++] = uint8_t(acc >> (acc_bits - 8));
      acc_bits -= 8;
    }
  }
  if (acc_bits > 0) {
    GVQ_CHECK_ARG(byte < out_bytes, kWhere, "out_bytes", "of ", out_bytes, " is too small");
    out[byte++] = uint8_t(acc << (8 - acc_bits));
  }
  GVQ_CHECK_ARG(byte == out_bytes, kWhere, "out_bytes", "is ", out_bytes, " but the codes took ", byte);
  return 8 * (byte - (acc_bits > 0 ? 1 : 0)) + acc_bits;
}

void HuffmanCode::decode(const uint8_t* in, int64_t in_bytes, int64_t n, uint8_t* symbols, const char* where,
                         const char* arg) const {
  if (n == 0) {
    GVQ_CHECK_ARG(in_bytes == 0, where, arg, "has ", in_bytes, " payload bytes for 0 symbols");
    return;
  }
  GVQ_CHECK_ARG(longest_ > 0, where, arg, "has an empty code table but ", n, " symbols to decode");
  // Lookup on the next `longest_` bits: every bit pattern that starts with a code maps to (symbol, length).
  const int peek = longest_;
  std::vector<uint16_t> table_symbol(size_t(1) << peek, kNoSymbol);
  std::vector<uint8_t> table_length(size_t(1) << peek, 0);
  for (size_t s = 0; s < lengths_.size(); ++s) {
    const int length = lengths_[s];
    if (length == 0) continue;
    const size_t first = size_t(codes_[s]) << (peek - length), count = size_t(1) << (peek - length);
    std::fill_n(table_symbol.begin() + int64_t(first), count, uint16_t(s));
    std::fill_n(table_length.begin() + int64_t(first), count, uint8_t(length));
  }
  uint64_t window = 0;  // the next bits_in bits of the stream, left-aligned; zeros past the end
  int bits_in = 0;
  int64_t byte = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (bits_in <= 56 && byte < in_bytes) {
      window |= uint64_t(in[byte++]) << (56 - bits_in);
      bits_in += 8;
    }
    const size_t index = size_t(window >> (64 - peek));
    const int length = table_length[index];
    GVQ_CHECK_ARG(length > 0, where, arg, "holds a bit pattern that is no code at symbol ", i,
                  " (corrupted data)");
    GVQ_CHECK_ARG(length <= bits_in, where, arg, "is truncated: it ends inside symbol ", i, " of ", n);
    symbols[i] = uint8_t(table_symbol[index]);
    window <<= length;
    bits_in -= length;
  }
  GVQ_CHECK_ARG(byte == in_bytes && bits_in < 8, where, arg, "has ", in_bytes - byte + bits_in / 8,
                " bytes after the last of its ", n, " symbols");
  GVQ_CHECK_ARG(bits_in == 0 || (window >> (64 - bits_in)) == 0, where, arg,
                "has non-zero padding bits (corrupted data)");
}

namespace {

void check_alphabet(int64_t alphabet_size, const char* where) {
  GVQ_CHECK_ARG(alphabet_size >= 1 && alphabet_size <= 256, where, "alphabet_size",
                "must lie in [1, 256], got ", alphabet_size);
}

}  // namespace

at::Tensor huffman_encode(const at::Tensor& symbols, int64_t alphabet_size, int max_length) {
  constexpr const char* kWhere = "huffman_encode";
  check_alphabet(alphabet_size, kWhere);
  GVQ_CHECK_ARG(symbols.defined() && symbols.scalar_type() == at::kByte && symbols.dim() == 1 &&
                    symbols.device().is_cpu(),
                kWhere, "symbols", "must be a 1-D uint8 CPU tensor");
  at::Tensor s = symbols.contiguous();
  const int64_t n = s.numel();
  const uint8_t* data = s.data_ptr<uint8_t>();
  const std::vector<uint64_t> counts = count_symbols(data, n, alphabet_size);
  const HuffmanCode code = HuffmanCode::from_counts(counts, max_length);
  const int64_t table = HuffmanCode::table_bytes(alphabet_size);
  const int64_t payload = (code.encoded_bits(counts) + 7) / 8;
  at::Tensor out = at::zeros({table + payload}, at::kByte);
  uint8_t* bytes = out.data_ptr<uint8_t>();
  code.write_table(bytes);
  code.encode(data, n, bytes + table, payload);
  return out;
}

at::Tensor huffman_decode(const at::Tensor& packed, int64_t alphabet_size, int64_t count) {
  constexpr const char* kWhere = "huffman_decode";
  check_alphabet(alphabet_size, kWhere);
  GVQ_CHECK_ARG(count >= 0, kWhere, "count", "must be >= 0, got ", count);
  GVQ_CHECK_ARG(packed.defined() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                    packed.device().is_cpu() && packed.is_contiguous(),
                kWhere, "packed", "must be a contiguous 1-D uint8 CPU tensor");
  const int64_t table = HuffmanCode::table_bytes(alphabet_size);
  GVQ_CHECK_ARG(packed.numel() >= table, kWhere, "packed", "has ", packed.numel(),
                " bytes, fewer than its code table of ", table);
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  const HuffmanCode code = HuffmanCode::read_table(bytes, alphabet_size, kWhere, "packed");
  at::Tensor out = at::empty({count}, at::kByte);
  code.decode(bytes + table, packed.numel() - table, count, out.data_ptr<uint8_t>(), kWhere, "packed");
  return out;
}

}  // namespace gradiveq
