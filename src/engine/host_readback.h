// Private: a few values of a device tensor on the host, without making the host wait for the device's queue.
//
// `.item()` or a copy into pageable memory waits until the device has run everything queued before it,
// including the next step's forward and backward that the host has queued meanwhile: every such read on the
// per-step path serialises host and device. HostReadback instead copies into pinned memory asynchronously on
// the current stream and records an event behind the copy; reading waits for that event only. CPU tensors
// are copied at once.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Event.h>

#include <optional>

namespace gradiveq::detail {

class HostReadback {
 public:
  /// Starts copying `values` (any device) to the host.
  explicit HostReadback(const at::Tensor& values);

  /// Whether the values have reached the host (never waits).
  bool ready() const;
  /// The values as a CPU tensor, waiting for the copy to finish when it has not.
  const at::Tensor& wait() const;

 private:
  at::Tensor host_;
  std::optional<c10::Event> copied_;  // set for device tensors
};

}  // namespace gradiveq::detail
