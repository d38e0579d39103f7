// Gloo construction lives in this one translation unit: torch's wheel ships ProcessGroupGloo.hpp but no gloo
// headers, so it compiles against Debian's libgloo-dev headers. That is safe because only torch's exported
// functions are called here: the Debian headers merely declare the types ProcessGroupGloo.hpp names, and no
// gloo code of Debian's is linked (torch's own gloo stays inside libtorch_cpu).
#include "gradiveq/process_group.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <csignal>
#include <stdexcept>

#include "gradiveq/errors.h"

namespace gradiveq {

namespace {
void check_rank(int rank, int world_size, const char* where) {
  GVQ_CHECK_ARG(world_size >= 1, where, "world_size", "must be >= 1, got ", world_size);
  GVQ_CHECK_ARG(rank >= 0 && rank < world_size, where, "rank", "must lie in [0, ", world_size, "), got ", rank);
}

// Gloo's TCP pairs and the TCPStore client write to sockets without MSG_NOSIGNAL. When a peer dies, the next
// write to it raises SIGPIPE, whose default action kills this rank silently instead of letting the write fail
// and the collective raise "connection closed by peer". Python ignores SIGPIPE at start-up; a C++ program
// usually has not, so a C++ rank would die where a Python one raises. A handler the program installed itself
// is left alone.
void ignore_sigpipe_unless_handled() {
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
    std::signal(SIGPIPE, SIG_IGN);
  }
}
}  // namespace

c10::intrusive_ptr<c10d::Store> connect_store(const StoreAddress& address, int rank, int world_size,
                                              std::chrono::milliseconds timeout) {
  constexpr const char* kWhere = "connect_store";
  check_rank(rank, world_size, kWhere);
  GVQ_CHECK_ARG(timeout.count() > 0, kWhere, "timeout", "must be positive, got ", timeout.count(), " ms");
  ignore_sigpipe_unless_handled();
  if (!address.file.empty()) {
    return c10::make_intrusive<c10d::FileStore>(address.file, world_size);
  }
  GVQ_CHECK_ARG(!address.host.empty(), kWhere, "address.host", "is empty");
  c10d::TCPStoreOptions opts;
  opts.port = address.port;
  opts.isServer = rank == 0;
  opts.numWorkers = static_cast<size_t>(world_size);
  opts.waitWorkers = false;  // rank 0 must not block here: the other ranks may still be starting
  opts.timeout = timeout;
  try {
    return c10::make_intrusive<c10d::TCPStore>(address.host, opts);
  } catch (const std::exception& e) {
    throw std::runtime_error(detail::concat("gradiveq.connect_store: rank ", rank, " of ", world_size,
                                            " could not ", rank == 0 ? "host" : "reach", " the TCPStore at ",
                                            address.host, ":", address.port, " within ", timeout.count(),
                                            " ms: ", e.what()));
  }
}

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_process_group(const c10::intrusive_ptr<c10d::Store>& store,
                                                               int rank, int world_size,
                                                               std::chrono::milliseconds timeout,
                                                               const std::string& interface_host) {
  constexpr const char* kWhere = "make_gloo_process_group";
  check_rank(rank, world_size, kWhere);
  GVQ_CHECK_ARG(store, kWhere, "store", "is null");
  ignore_sigpipe_unless_handled();
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(interface_host));
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gradiveq/gloo", store);
  c10::intrusive_ptr<c10d::Backend> gloo;
  try {
    gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world_size, options);
  } catch (const std::exception& e) {
    throw std::runtime_error(detail::concat("gradiveq.make_gloo_process_group: rank ", rank, " of ", world_size,
                                            " could not connect to its peers within ", timeout.count(),
                                            " ms: ", e.what()));
  }
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(prefixed, rank, world_size);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  return pg;
}

}  // namespace gradiveq
