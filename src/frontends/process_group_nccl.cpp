// NCCL construction in a translation unit of its own: ProcessGroupNCCL.hpp needs nccl.h (the CUDA toolkit's,
// at the NCCL version torch's wheel ships), which a build without the toolkit does not have.
#include <ATen/Context.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#if defined(GRADIVEQ_WITH_NCCL) && defined(USE_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "gradiveq/errors.h"
#include "gradiveq/process_group.h"

namespace gradiveq {

c10::intrusive_ptr<c10d::ProcessGroup> make_nccl_process_group(const c10::intrusive_ptr<c10d::Store>& store,
                                                               int rank, int world_size,
                                                               std::chrono::milliseconds timeout) {
  constexpr const char* kWhere = "make_nccl_process_group";
  GVQ_CHECK_ARG(world_size >= 1, kWhere, "world_size", "must be >= 1, got ", world_size);
  GVQ_CHECK_ARG(rank >= 0 && rank < world_size, kWhere, "rank", "must lie in [0, ", world_size, "), got ",
                rank);
  GVQ_CHECK_ARG(store, kWhere, "store", "is null");
  GVQ_CHECK_ARG(timeout.count() > 0, kWhere, "timeout", "must be positive, got ", timeout.count(), " ms");
#if defined(GRADIVEQ_WITH_NCCL) && defined(USE_C10D_NCCL)
  GVQ_CHECK_ARG(at::hasCUDA(), kWhere, "world_size",
                "asks for NCCL ranks, but this machine has no CUDA device "
                "(use make_gloo_process_group)");
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gradiveq/nccl", store);
  auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world_size, options);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(prefixed, rank, world_size);
  pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
  return pg;
#else
  GVQ_CHECK_ARG(false, kWhere, "store",
                "cannot be used: this build of gradiveq has no NCCL (configure with the "
                "CUDA toolkit, whose nccl.h matches torch's NCCL)");
  return {};
#endif
}

}  // namespace gradiveq
