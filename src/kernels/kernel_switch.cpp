// Whether CUDA tensors go through this library's kernels (kernels_cuda.h) or through ATen's operators.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "gradiveq/errors.h"
#include "kernels/kernels_cuda.h"

namespace gradiveq::detail {

namespace {

// Off by default until the device check (scripts/gpu_check.sh) has passed on a real GPU: see cuda/README.md.
bool enabled_by_environment() {
  const char* value = std::getenv("GRADIVEQ_CUDA_KERNELS");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{[] {
    const bool asked = enabled_by_environment();
    if (asked && !cuda_kernels_built()) {
      TORCH_WARN(
          "GRADIVEQ_CUDA_KERNELS=1 does nothing: this build of gradiveq has no CUDA kernels, so CUDA "
          "tensors go through ATen's operators");
    }
    return asked && cuda_kernels_built();
  }()};
  return flag;
}

}  // namespace

bool cuda_kernels_built() {
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

bool cuda_kernels_enabled() { return enabled_flag().load(std::memory_order_relaxed); }

void set_cuda_kernels_enabled(bool enabled) {
  GVQ_CHECK_ARG(!enabled || cuda_kernels_built(), "set_cuda_kernels_enabled", "enabled",
                "cannot be true: this build of gradiveq has no CUDA kernels (configure with "
                "-DGRADIVEQ_ENABLE_CUDA=ON and nvcc on the PATH)");
  enabled_flag().store(enabled, std::memory_order_relaxed);
}

}  // namespace gradiveq::detail
