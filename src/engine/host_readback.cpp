#include "engine/host_readback.h"

#include <c10/core/impl/VirtualGuardImpl.h>

namespace gradiveq::detail {

HostReadback::HostReadback(const at::Tensor& values) {
  if (values.device().is_cpu()) {
    host_ = values.clone();
    return;
  }
  const c10::impl::VirtualGuardImpl device(values.device().type());
  const c10::Stream stream = device.getStream(values.device());
  host_ = at::empty(values.sizes(), values.options().device(at::kCPU).pinned_memory(true));
  host_.copy_(values, /*non_blocking=*/true);
  // The source may be freed before the copy has run, and it may have been allocated on another stream: the
  // caching allocator must not hand its memory out again before this stream is past the copy.
  if (values.is_cuda()) values.record_stream(stream);
  copied_.emplace(values.device().type());
  copied_->record(stream);
}

bool HostReadback::ready() const { return !copied_ || copied_->query(); }

const at::Tensor& HostReadback::wait() const {
  if (copied_) copied_->synchronize();
  return host_;
}

}  // namespace gradiveq::detail
