// The CUDA kernel switch in tests: restored after each test, whatever the test did with it.
#pragma once

#include "kernels/kernels_cuda.h"

namespace gradiveq::testing {

/// Restores the switch (detail::set_cuda_kernels_enabled) to its value at construction.
struct KernelSwitchGuard {
  bool was = detail::cuda_kernels_enabled();
  ~KernelSwitchGuard() { detail::set_cuda_kernels_enabled(was); }
};

}  // namespace gradiveq::testing
