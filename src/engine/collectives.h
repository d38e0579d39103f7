// Private: small helpers around c10d collectives shared by the aggregators.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <vector>

namespace gradiveq::detail {

/// A future that completes when all of `futures` (at least one, all of one value type) have; errors
/// propagate.
inline c10::intrusive_ptr<c10::ivalue::Future> when_all(
    const std::vector<c10::intrusive_ptr<c10::ivalue::Future>>& futures) {
  if (futures.size() == 1) return futures[0];
  c10::List<c10::intrusive_ptr<c10::ivalue::Future>> list(c10::FutureType::create(futures[0]->elementType()));
  for (const auto& f : futures) list.push_back(f);
  return c10::collectAll(list);
}

/// The dtype a bucket's uncompressed values travel in: a half-precision bucket's own (DDP's default
/// all-reduce sends no more), else float32.
inline at::ScalarType raw_dtype(const at::Tensor& buffer) {
  const auto t = buffer.scalar_type();
  return t == at::kHalf || t == at::kBFloat16 ? t : at::kFloat;
}

/// Bytes one rank sends in a ring all-reduce of `bytes` over `world_size` ranks: 2 (N - 1) / N of them.
inline int64_t ring_allreduce_bytes(int64_t bytes, int64_t world_size) {
  return int64_t(2.0 * double(world_size - 1) / double(world_size) * double(bytes));
}

}  // namespace gradiveq::detail
