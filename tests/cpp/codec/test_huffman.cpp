// Unit tests for include/gradiveq/huffman.h
#include <cmath>
#include <random>

#include "gradiveq/huffman.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;

at::Tensor to_tensor(const std::vector<uint8_t>& v) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::kByte);
  std::copy(v.begin(), v.end(), t.data_ptr<uint8_t>());
  return t;
}

// The stated size: ceil(A / 2) table bytes + ceil(sum count * length / 8) payload bytes.
int64_t stated_bytes(const std::vector<uint8_t>& symbols, int64_t alphabet, int max_length) {
  const auto counts = count_symbols(symbols.data(), int64_t(symbols.size()), alphabet);
  const auto code = HuffmanCode::from_counts(counts, max_length);
  return (alphabet + 1) / 2 + (code.encoded_bits(counts) + 7) / 8;
}

void expect_round_trip(const std::vector<uint8_t>& symbols, int64_t alphabet,
                       int max_length = HuffmanCode::kMaxLength) {
  at::Tensor s = to_tensor(symbols);
  at::Tensor packed = huffman_encode(s, alphabet, max_length);
  EXPECT_EQ(packed.numel(), stated_bytes(symbols, alphabet, max_length));
  EXPECT_TRUE(at::equal(huffman_decode(packed, alphabet, s.numel()), s));
}

// Geometric-like source: P(s) proportional to r^s.
std::vector<uint8_t> skewed_stream(int64_t n, int alphabet, double r, uint32_t seed) {
  std::vector<double> weights(static_cast<size_t>(alphabet));
  for (int s = 0; s < alphabet; ++s) weights[size_t(s)] = std::pow(r, s);
  std::mt19937 gen(seed);
  std::discrete_distribution<int> dist(weights.begin(), weights.end());
  std::vector<uint8_t> out(static_cast<size_t>(n));
  for (auto& s : out) s = uint8_t(dist(gen));
  return out;
}

TEST(Huffman, RoundTripsRandomStreams) {
  std::mt19937 gen(7);
  for (int alphabet : {1, 2, 3, 11, 100, 247, 256}) {
    for (int64_t n : {1, 2, 17, 1000, 20000}) {
      std::uniform_int_distribution<int> dist(0, alphabet - 1);
      std::vector<uint8_t> symbols(static_cast<size_t>(n));
      for (auto& s : symbols) s = uint8_t(dist(gen));
      SCOPED_TRACE(::testing::Message() << "alphabet " << alphabet << " n " << n);
      expect_round_trip(symbols, alphabet);
    }
  }
}

TEST(Huffman, OneSymbolGetsAOneBitCode) {
  std::vector<uint8_t> symbols(1001, 5);
  const auto counts = count_symbols(symbols.data(), 1001, 11);
  const auto code = HuffmanCode::from_counts(counts);
  EXPECT_EQ(code.lengths()[5], 1);
  EXPECT_EQ(code.longest(), 1);
  EXPECT_EQ(huffman_encode(to_tensor(symbols), 11).numel(), 6 + (1001 + 7) / 8);
  expect_round_trip(symbols, 11);
  expect_round_trip({0}, 1);  // alphabet of one
}

TEST(Huffman, EmptyStreamIsAZeroTableAndNoPayload) {
  at::Tensor packed = huffman_encode(at::empty({0}, at::kByte), 11);
  ASSERT_EQ(packed.numel(), 6);
  EXPECT_EQ(packed.sum().item<int64_t>(), 0);
  EXPECT_EQ(huffman_decode(packed, 11, 0).numel(), 0);
  // An empty table cannot decode symbols.
  expect_invalid([&] { huffman_decode(packed, 11, 1); }, {"packed", "empty code table"});
}

TEST(Huffman, EquallyLikelySymbolsGetEqualLengths) {
  for (int alphabet : {2, 4, 16, 256}) {
    std::vector<uint8_t> symbols;
    for (int rep = 0; rep < 3; ++rep) {
      for (int s = 0; s < alphabet; ++s) symbols.push_back(uint8_t(s));
    }
    const auto code =
        HuffmanCode::from_counts(count_symbols(symbols.data(), int64_t(symbols.size()), alphabet));
    const int bits = int(std::round(std::log2(alphabet)));
    for (int s = 0; s < alphabet; ++s) ASSERT_EQ(code.lengths()[size_t(s)], bits) << "symbol " << s;
    expect_round_trip(symbols, alphabet);
  }
  // A power-of-two-free alphabet: lengths differ by at most one, and the code is complete.
  std::vector<uint8_t> symbols;
  for (int s = 0; s < 11; ++s) symbols.push_back(uint8_t(s));
  const auto code = HuffmanCode::from_counts(count_symbols(symbols.data(), 11, 11));
  double kraft = 0.0;
  for (int s = 0; s < 11; ++s) {
    EXPECT_GE(code.lengths()[size_t(s)], 3);
    EXPECT_LE(code.lengths()[size_t(s)], 4);
    kraft += std::ldexp(1.0, -code.lengths()[size_t(s)]);
  }
  EXPECT_DOUBLE_EQ(kraft, 1.0);
}

TEST(Huffman, LengthLimitHoldsOnHighlySkewedStreams) {
  // Fibonacci counts are the worst case: unlimited Huffman would give the two rarest of these 30 symbols
  // 29-bit codes, so even the format's own 15-bit limit binds.
  std::vector<uint64_t> counts(30);
  counts[0] = counts[1] = 1;
  for (size_t s = 2; s < counts.size(); ++s) counts[s] = counts[s - 1] + counts[s - 2];
  EXPECT_EQ(HuffmanCode::from_counts(counts).longest(), HuffmanCode::kMaxLength);
  for (int limit : {5, 8, 15}) {
    const auto code = HuffmanCode::from_counts(counts, limit);
    EXPECT_LE(code.longest(), limit);
    double kraft = 0.0;
    for (uint8_t l : code.lengths()) kraft += l > 0 ? std::ldexp(1.0, -l) : 0.0;
    EXPECT_LE(kraft, 1.0);
    // Limiting costs bits, but a tighter limit never beats a looser one (package-merge is optimal).
    if (limit < 15)
      EXPECT_GE(code.encoded_bits(counts), HuffmanCode::from_counts(counts, 15).encoded_bits(counts));
  }
  // A stream drawn from that source round-trips under each limit.
  std::vector<uint8_t> symbols;
  for (size_t s = 0; s < 20; ++s) symbols.insert(symbols.end(), size_t(counts[s]), uint8_t(s));
  std::shuffle(symbols.begin(), symbols.end(), std::mt19937(3));
  for (int limit : {5, 8, 15}) expect_round_trip(symbols, 20, limit);
  // 2^limit symbols is the most a limit can serve.
  expect_invalid([] { HuffmanCode::from_counts(std::vector<uint64_t>(33, 1), 5); },
                 {"max_length", "33 symbols"});
}

TEST(Huffman, PackageMergeMatchesBruteForceOptimumOnSmallAlphabets) {
  // Exhaustive check for 5 symbols and a 3-bit limit: the cheapest Kraft-feasible assignment of lengths 1..3.
  // Counts spread over 10 octaves, so unlimited Huffman often wants a 4-bit code and the limit binds.
  std::mt19937 gen(11);
  std::uniform_real_distribution<double> octaves(0.0, 10.0);
  int limit_bound = 0;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<uint64_t> counts(5);
    for (auto& c : counts) c = uint64_t(std::exp2(octaves(gen)));
    int64_t best = INT64_MAX;
    for (int combo = 0; combo < 243; ++combo) {  // 3^5 assignments
      double kraft = 0.0;
      int64_t bits = 0;
      for (int s = 0, rest = combo; s < 5; ++s, rest /= 3) {
        kraft += std::ldexp(1.0, -(1 + rest % 3));
        bits += int64_t(counts[size_t(s)]) * (1 + rest % 3);
      }
      if (kraft <= 1.0) best = std::min(best, bits);
    }
    ASSERT_EQ(HuffmanCode::from_counts(counts, 3).encoded_bits(counts), best) << "trial " << trial;
    limit_bound += HuffmanCode::from_counts(counts).longest() > 3;
  }
  EXPECT_GT(limit_bound, 10);  // the limit did bind in a fair share of the trials
}

TEST(Huffman, MeanCodeLengthIsWithinOneBitOfEntropy) {
  const int64_t n = 200000;
  for (double r : {0.3, 0.6, 0.85}) {
    const auto symbols = skewed_stream(n, 16, r, 5);
    const auto counts = count_symbols(symbols.data(), n, 16);
    double entropy = 0.0;
    for (uint64_t c : counts) {
      if (c > 0) entropy -= double(c) / double(n) * std::log2(double(c) / double(n));
    }
    const double mean_length = double(HuffmanCode::from_counts(counts).encoded_bits(counts)) / double(n);
    EXPECT_GE(mean_length, entropy) << "r " << r;
    EXPECT_LT(mean_length, entropy + 1.0) << "r " << r;
    expect_round_trip(symbols, 16);
  }
}

TEST(Huffman, CanonicalCodesArePrefixFreeAndOrdered) {
  const auto symbols = skewed_stream(5000, 40, 0.8, 9);
  const auto code = HuffmanCode::from_counts(count_symbols(symbols.data(), 5000, 40));
  // Canonical: sorted by (length, symbol), codes increase, and no code is a prefix of another.
  for (size_t a = 0; a < 40; ++a) {
    for (size_t b = 0; b < 40; ++b) {
      const int la = code.lengths()[a], lb = code.lengths()[b];
      if (a == b || la == 0 || lb == 0 || la > lb) continue;
      EXPECT_NE(code.codes()[b] >> (lb - la), code.codes()[a]) << a << " is a prefix of " << b;
      if (la == lb && a < b) EXPECT_LT(code.codes()[a], code.codes()[b]);
    }
  }
  // The table alone rebuilds the same code.
  std::vector<uint8_t> table(static_cast<size_t>(HuffmanCode::table_bytes(40)));
  code.write_table(table.data());
  const auto again = HuffmanCode::read_table(table.data(), 40, "test", "table");
  EXPECT_EQ(again.codes(), code.codes());
  EXPECT_EQ(again.lengths(), code.lengths());
}

TEST(Huffman, RejectsCorruptedOrBadInput) {
  const auto symbols = skewed_stream(3000, 11, 0.5, 2);
  at::Tensor packed = huffman_encode(to_tensor(symbols), 11);
  expect_invalid([&] { huffman_decode(packed.narrow(0, 0, packed.numel() - 1).contiguous(), 11, 3000); },
                 {"packed", "truncated"});
  expect_invalid(
      [&] {
        huffman_decode(at::cat({packed, at::zeros({1}, at::kByte)}), 11, 3000);
      },
      {"packed", "after the last"});
  // Too few symbols leaves bytes over (one fewer may not: its bits can look like zero padding).
  expect_invalid([&] { huffman_decode(packed, 11, 2000); }, {"packed", "after the last"});
  at::Tensor bad_table = packed.clone();
  bad_table[0] = 0x11;  // two 1-bit codes plus the rest: Kraft sum > 1
  expect_invalid([&] { huffman_decode(bad_table, 11, 3000); }, {"packed", "Kraft"});
  at::Tensor odd_nibble = packed.clone();
  odd_nibble[5] = odd_nibble[5].item<uint8_t>() | 0x10;  // the unused nibble after symbol 10
  expect_invalid([&] { huffman_decode(odd_nibble, 11, 3000); }, {"packed", "unused nibble"});
  expect_invalid([&] { huffman_encode(to_tensor({0, 11}), 11); }, {"symbols", "symbol 11"});
  expect_invalid([&] { huffman_encode(to_tensor({0}), 0); }, {"alphabet_size", "got 0"});
  expect_invalid([&] { huffman_encode(to_tensor({0}), 257); }, {"alphabet_size", "got 257"});
  expect_invalid([&] { huffman_encode(to_tensor({0}), 4, 16); }, {"max_length", "got 16"});
  expect_invalid([&] { huffman_encode(at::zeros({3}, at::kInt), 4); }, {"symbols", "uint8"});
  expect_invalid([&] { huffman_decode(packed, 11, -1); }, {"count", "got -1"});
  // A one-symbol code leaves half the bit patterns unused: a set bit there is corruption.
  at::Tensor one = huffman_encode(to_tensor(std::vector<uint8_t>(8, 3)), 4);
  ASSERT_EQ(one.numel(), 2 + 1);
  one[2] = 0x80;
  expect_invalid([&] { huffman_decode(one, 4, 8); }, {"packed", "no code"});
}

}  // namespace
}  // namespace gradiveq
