// Shared by the multi-rank C++ tests: W ranks as threads of this process, each with its own FileStore client
// and Gloo process group on 127.0.0.1.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "gradiveq/process_group.h"

namespace gradiveq::testing {

inline std::string fresh_store_path() {
  static int counter = 0;
  char name[256];
  std::snprintf(name, sizeof(name), "/tmp/gradiveq_test_store_%d_%d_%lld", int(getpid()), counter++,
                (long long)std::chrono::steady_clock::now().time_since_epoch().count());
  std::remove(name);
  return name;
}

// torch 2.11's c10d flight recorder (one per process) inserts each new process group into a std::map before it
// takes its mutex (FlightRecorder::record), so process groups of several thread-ranks enqueuing their first
// collective at once can corrupt that map: seen as a SEGV in _Rb_tree_insert_and_rebalance under ASan. Real
// training runs one process group per process; these tests run several per process, so they turn the recorder
// off (a buffer of 0 entries disables it) before the first process group exists, unless the caller set it.
inline void disable_flight_recorder_for_thread_ranks() {
  static const bool done = [] { return setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/0) == 0; }();
  (void)done;
}

// Runs fn(rank, pg) on `world` threads joined by one FileStore; rethrows the first rank's failure.
inline void run_ranks(int world, const std::function<void(int, c10::intrusive_ptr<c10d::ProcessGroup>)>& fn,
                      std::string store_path = "") {
  disable_flight_recorder_for_thread_ranks();
  if (store_path.empty()) store_path = fresh_store_path();
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto store = connect_store({"", 0, store_path}, r, world);
        fn(r, make_gloo_process_group(store, r, world, std::chrono::seconds(30)));
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  std::remove(store_path.c_str());
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace gradiveq::testing
