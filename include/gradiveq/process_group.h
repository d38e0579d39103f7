// Creating a c10d process group from C++, so a LibTorch program needs no Python at all.
//
//   auto store = gradiveq::connect_store({"127.0.0.1", 29500}, rank, world_size, std::chrono::seconds(30));
//   auto pg = gradiveq::make_gloo_process_group(store, rank, world_size);
//
// On GPUs, make_nccl_process_group(store, rank, world_size) instead.
//
// Rank 0 hosts the TCPStore; the others connect to it. A store that cannot be reached raises within the
// timeout (never hangs). A FileStore (a fresh path shared by all ranks) works without any port.
//
// Both functions set SIGPIPE to "ignore" when it still has its default action (as Python does at start-up):
// otherwise a peer's death kills this rank by SIGPIPE on its next write, where it should raise an error.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <cstdint>
#include <string>

namespace gradiveq {

struct StoreAddress {
  std::string host = "127.0.0.1";  ///< TCPStore host (rank 0 listens there)
  uint16_t port = 29500;
  std::string file;                ///< when set, a FileStore at this path is used instead of a TCPStore
};

/// Connects to (rank 0: creates) the rendezvous store. Raises InvalidArgument for bad rank / world size and
/// std::runtime_error naming the address when the store cannot be reached within `timeout`.
c10::intrusive_ptr<c10d::Store> connect_store(const StoreAddress& address, int rank, int world_size,
                                              std::chrono::milliseconds timeout = std::chrono::seconds(60));

/// A process group whose CPU (and CUDA) collectives run on Gloo over `interface_host` (127.0.0.1 by default).
/// `timeout` bounds every collective: a dead peer turns into an error, not a hang.
c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_process_group(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
    std::chrono::milliseconds timeout = std::chrono::seconds(60), const std::string& interface_host = "127.0.0.1");

/// A process group whose collectives run on NCCL (CUDA tensors), for a rank whose CUDA device is already the
/// current one (c10::cuda::set_device(local_rank)). Raises InvalidArgument in a build without NCCL
/// (configured without the CUDA toolkit) or on a machine without a CUDA device.
c10::intrusive_ptr<c10d::ProcessGroup> make_nccl_process_group(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace gradiveq
