// CIFAR-100 binary-format reader (train.bin / test.bin of the "binary version"): each record is 1 coarse label
// byte, 1 fine label byte and 3072 pixel bytes (3 x 32 x 32, channel-major). Header-only, ATen only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cifar100 {

constexpr int64_t kRecordBytes = 1 + 1 + 3 * 32 * 32;

struct Split {
  at::Tensor images;  ///< uint8 [N, 3, 32, 32]
  at::Tensor fine;    ///< int64 [N], 0..99
  at::Tensor coarse;  ///< int64 [N], 0..19
};

/// Reads one split file. Throws std::runtime_error naming the file and the problem when it is missing, empty,
/// truncated (size not a multiple of the record) or holds labels out of range.
inline Split read_split(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cifar100::read_split: cannot open '" + path + "' (expected CIFAR-100 binary file)");
  const std::streamsize size = in.tellg();
  if (size <= 0 || size % kRecordBytes != 0) {
    throw std::runtime_error("cifar100::read_split: '" + path + "' has " + std::to_string(size) +
                             " bytes, not a positive multiple of the " + std::to_string(kRecordBytes) +
                             "-byte record: truncated or not CIFAR-100");
  }
  in.seekg(0);
  const int64_t n = size / kRecordBytes;
  std::vector<uint8_t> raw(static_cast<size_t>(size));
  if (!in.read(reinterpret_cast<char*>(raw.data()), size)) {
    throw std::runtime_error("cifar100::read_split: reading '" + path + "' failed");
  }
  at::Tensor records = at::from_blob(raw.data(), {n, kRecordBytes}, at::kByte).clone();
  Split s{records.narrow(1, 2, 3072).reshape({n, 3, 32, 32}).contiguous(), records.select(1, 1).to(at::kLong),
          records.select(1, 0).to(at::kLong)};
  if (s.fine.max().item<int64_t>() > 99 || s.coarse.max().item<int64_t>() > 19) {
    throw std::runtime_error("cifar100::read_split: '" + path + "' holds labels out of range (fine <= 99, coarse <= 19)");
  }
  return s;
}

/// Reads DIR/train.bin and DIR/test.bin; a directory without them is a clear error.
inline std::pair<Split, Split> read_dir(const std::string& dir) {
  for (const char* name : {"train.bin", "test.bin"}) {
    std::ifstream probe(dir + "/" + name);
    if (!probe) throw std::runtime_error("cifar100::read_dir: '" + dir + "' has no " + name + " (--data must hold the CIFAR-100 binary files train.bin and test.bin)");
  }
  return {read_split(dir + "/train.bin"), read_split(dir + "/test.bin")};
}

/// Images as float, normalised with CIFAR-100's channel means and standard deviations.
inline at::Tensor normalize(const at::Tensor& images) {
  at::Tensor mean = at::tensor({0.5071f, 0.4865f, 0.4409f}).view({1, 3, 1, 1});
  at::Tensor std = at::tensor({0.2673f, 0.2564f, 0.2762f}).view({1, 3, 1, 1});
  return (images.to(at::kFloat) / 255.0 - mean) / std;
}

}  // namespace cifar100
