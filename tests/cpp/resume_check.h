// Shared by the multi-rank checkpoint tests: a run cut, saved, and resumed in a new process group must match
// the straight run bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <vector>

#include "gradiveq/gradient_synchronizer.h"
#include "rank_threads.h"
#include "tiny_net.h"

namespace gradiveq::testing {

using SyncProbe = std::function<void(int rank, GradientSynchronizer& sync)>;

// Trains TinyNet(5) with SGD at `lr` for `steps` steps, once straight and once to `cut`, where each rank
// saves its state; then new objects in a new process group load it, train to `steps`, and every parameter
// must equal the straight run's. `at_cut` sees each rank's synchronizer before it saves, `after_load` after
// it loads. Returns each rank's saved state.
inline std::vector<at::Tensor> expect_resumed_run_matches(int world, int steps, int cut,
                                                          const SynchronizerOptions& o, double lr,
                                                          const SyncProbe& at_cut = {},
                                                          const SyncProbe& after_load = {}) {
  auto train = [&](TinyNet& net, GradientSynchronizer& sync, int rank, int from, int to) {
    for (int step = from; step < to; ++step) {
      auto [x, y] = batch(rank, step);
      net.zero_grad();
      net.loss(x, y).backward();
      sync.synchronize();
      net.sgd(lr);
    }
  };
  std::vector<std::vector<at::Tensor>> straight(world), resumed(world), saved_params(world);
  std::vector<at::Tensor> saved_state(world);
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(5);
    GradientSynchronizer sync(pg, net.params, o);
    train(net, sync, rank, 0, steps);
    for (auto& np : net.params) straight[rank].push_back(np.tensor.detach().clone());
  });
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(5);
    GradientSynchronizer sync(pg, net.params, o);
    train(net, sync, rank, 0, cut);
    for (auto& np : net.params) saved_params[rank].push_back(np.tensor.detach().clone());
    if (at_cut) at_cut(rank, sync);
    saved_state[rank] = sync.aggregator().save_state();
  });
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {  // a new group, new objects
    TinyNet net(99);
    {
      c10::NoGradGuard g;
      for (size_t i = 0; i < net.params.size(); ++i) net.p(i).copy_(saved_params[rank][i]);
    }
    GradientSynchronizer sync(pg, net.params, o);
    sync.aggregator().load_state(saved_state[rank]);
    if (after_load) after_load(rank, sync);
    train(net, sync, rank, cut, steps);
    for (auto& np : net.params) resumed[rank].push_back(np.tensor.detach().clone());
  });
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < straight[r].size(); ++i) {
      EXPECT_TRUE(at::equal(straight[r][i], resumed[r][i])) << "rank " << r << " param " << i;
    }
  }
  return saved_state;
}

}  // namespace gradiveq::testing
