// Private: the small integer hashes the library shares (splitmix64's finaliser and what is built on it).
#pragma once

#include <cstdint>
#include <string>

// The counter-based generator runs in the CUDA kernels too (cuda/), with the same results.
#if defined(__CUDACC__)
#define GVQ_HOST_DEVICE __host__ __device__
#else
#define GVQ_HOST_DEVICE
#endif

namespace gradiveq::detail {

/// splitmix64's finaliser: a bijection of 64-bit words; every input bit moves about half the output bits.
GVQ_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Folds one more value into a seed, so nearby (iteration, rank, position) tuples give unrelated streams.
inline uint64_t mix(uint64_t h, uint64_t v) {
  return splitmix64(h ^ (v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2)));
}

/// Counter-based uniform in [0, 1): splitmix64 of (seed, index). Stateless, so any element can be rounded
/// independently (and in parallel, on any device) with the same result.
GVQ_HOST_DEVICE inline double uniform01(uint64_t seed, uint64_t index) {
  return double(splitmix64(seed + 0x9E3779B97F4A7C15ull * (index + 1)) >> 11) * 0x1.0p-53;
}

/// FNV-1a of a string: stable across processes and platforms (std::hash is not), for names in seeds and checksums.
inline uint64_t hash_string(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gradiveq::detail
