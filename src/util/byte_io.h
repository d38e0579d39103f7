// Private: little helpers to write and read the library's versioned binary images (bases, engine state).
// Reads are bounds-checked: running past the end throws InvalidArgument naming the image as truncated.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "gradiveq/errors.h"

namespace gradiveq::detail {

class ByteWriter {
 public:
  template <typename T>
  void put(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    put_raw(&value, sizeof(T));
  }
  void put_raw(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    bytes_.insert(bytes_.end(), p, p + n);
  }
  void put_string(const std::string& s) {
    put<int64_t>(int64_t(s.size()));
    put_raw(s.data(), s.size());
  }
  /// Length-prefixed raw bytes of a tensor (moved to the CPU and made contiguous first).
  void put_tensor_bytes(const at::Tensor& t) {
    at::Tensor c = t.to(at::kCPU).contiguous();
    put<int64_t>(int64_t(c.nbytes()));
    put_raw(c.data_ptr(), c.nbytes());
  }
  size_t size() const { return bytes_.size(); }
  at::Tensor to_tensor() const {
    at::Tensor out = at::empty({int64_t(bytes_.size())}, at::kByte);
    if (!bytes_.empty()) std::memcpy(out.data_ptr<uint8_t>(), bytes_.data(), bytes_.size());
    return out;
  }

 private:
  std::vector<uint8_t> bytes_;
};

class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size, const char* where, const char* arg)
      : data_(data), size_(size), where_(where), arg_(arg) {}

  template <typename T>
  T get() {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    std::memcpy(&value, take(sizeof(T)), sizeof(T));
    return value;
  }
  std::string get_string() {
    const auto n = get<int64_t>();
    check_length(n);
    const auto* p = take(size_t(n));
    return std::string(reinterpret_cast<const char*>(p), size_t(n));
  }
  /// Length-prefixed bytes as a new uint8 tensor.
  at::Tensor get_tensor_bytes() {
    const auto n = get<int64_t>();
    check_length(n);
    at::Tensor out = at::empty({n}, at::kByte);
    if (n > 0) std::memcpy(out.data_ptr<uint8_t>(), take(size_t(n)), size_t(n));
    return out;
  }
  const uint8_t* take(size_t n) {
    GVQ_CHECK_ARG(n <= size_ - pos_, where_, arg_, "is truncated: needs ", n, " more bytes at offset ", pos_,
                  " of ", size_);
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  size_t remaining() const { return size_ - pos_; }

 private:
  void check_length(int64_t n) const {
    GVQ_CHECK_ARG(n >= 0 && size_t(n) <= size_ - pos_, where_, arg_, "is truncated or corrupted: a field of ", n,
                  " bytes at offset ", pos_, " exceeds the ", size_, "-byte image");
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const char* where_;
  const char* arg_;
};

}  // namespace gradiveq::detail
