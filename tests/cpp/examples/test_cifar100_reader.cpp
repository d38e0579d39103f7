// Tests of the C++ example's CIFAR-100 reader (examples/cpp/cifar100.h) on files the test writes.
#include "examples/cpp/cifar100.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

namespace {

std::string write_file(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = "/tmp/gradiveq_cifar_" + std::to_string(getpid()) + "_" + name;
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return path;
}

std::vector<uint8_t> records(int n) {
  std::vector<uint8_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(uint8_t(i % 20));         // coarse
    out.push_back(uint8_t((7 * i) % 100));  // fine
    for (int p = 0; p < 3072; ++p) out.push_back(uint8_t((i * 31 + p) % 256));
  }
  return out;
}

void expect_error(const std::string& path, const std::string& needle) {
  try {
    cifar100::read_split(path);
    ADD_FAILURE() << "no error for " << path;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Cifar100Reader, ParsesGeneratedRecordsExactly) {
  const std::string path = write_file("ok.bin", records(5));
  auto s = cifar100::read_split(path);
  ASSERT_EQ(s.images.sizes(), (std::vector<int64_t>{5, 3, 32, 32}));
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(s.coarse[i].item<int64_t>(), i % 20);
    EXPECT_EQ(s.fine[i].item<int64_t>(), (7 * i) % 100);
    EXPECT_EQ(s.images[i][1][2][3].item<uint8_t>(), uint8_t((i * 31 + 1024 + 2 * 32 + 3) % 256));
  }
  std::remove(path.c_str());
}

TEST(Cifar100Reader, RejectsTruncatedMalformedAndMissingFiles) {
  auto bytes = records(2);
  bytes.pop_back();
  const std::string truncated = write_file("trunc.bin", bytes);
  const std::string empty = write_file("empty.bin", {});
  auto bad = records(1);
  bad[1] = 200;  // fine label out of range
  const std::string bad_labels = write_file("labels.bin", bad);
  expect_error(truncated, "not a positive multiple of the 3074-byte record");
  expect_error(empty, "has 0 bytes");
  expect_error(bad_labels, "labels out of range");
  for (const auto& path : {truncated, empty, bad_labels}) std::remove(path.c_str());
  expect_error("/nonexistent/train.bin", "cannot open");
  try {
    cifar100::read_dir("/tmp");
    ADD_FAILURE() << "no error for a directory without the files";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("has no train.bin"), std::string::npos) << e.what();
  }
}

}  // namespace
