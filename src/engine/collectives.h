// Private: small helpers around c10d collectives shared by the aggregators.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
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
/// all-reduce sends no more; a bfloat16 model keeps its range), else `requested` (uncompressed_dtype).
inline at::ScalarType raw_dtype(const at::Tensor& buffer, at::ScalarType requested = at::kFloat) {
  const auto t = buffer.scalar_type();
  if (t == at::kHalf || t == at::kBFloat16) return t;
  return requested == at::kHalf || requested == at::kBFloat16 ? requested : at::kFloat;
}

/// Bytes one rank sends in a ring all-reduce of `bytes` over `world_size` ranks: 2 (N - 1) / N of them.
inline int64_t ring_allreduce_bytes(int64_t bytes, int64_t world_size) {
  return int64_t(2.0 * double(world_size - 1) / double(world_size) * double(bytes));
}

/// What a plan's collectives carried, counted the same way for every engine: payload = bytes this rank put
/// into collectives; wire = bytes it sends on a ring (2(N-1)/N per all-reduce byte, N-1 per all-gather byte).
struct CollectiveBytes {
  int64_t collectives = 0;
  int64_t payload = 0;
  int64_t wire = 0;

  void all_reduce(int64_t bytes, int64_t world_size) {
    ++collectives;
    payload += bytes;
    wire += ring_allreduce_bytes(bytes, world_size);
  }
  void all_gather(int64_t bytes, int64_t world_size) {
    ++collectives;
    payload += bytes;
    wire += (world_size - 1) * bytes;
  }
};

/// Issues the (summing) all-reduce of `tensor` and counts it in `bytes`; returns its future.
inline c10::intrusive_ptr<c10::ivalue::Future> issue_all_reduce(c10d::ProcessGroup& pg,
                                                                const at::Tensor& tensor,
                                                                CollectiveBytes& bytes) {
  std::vector<at::Tensor> tensors{tensor};
  auto future = pg.allreduce(tensors)->getFuture();
  bytes.all_reduce(tensor.nbytes(), pg.getSize());
  return future;
}

}  // namespace gradiveq::detail
