// Deferred fits (GradiVeQOptions::fit_delay_iters): a window's fits run on a worker thread while the steps go
// on with the current bases, and every rank installs the new ones at the same step. On real Gloo ranks
// (threads of this process).
#include <map>

#include "gradiveq/gradient_synchronizer.h"
#include "gradiveq/gradiveq_aggregator.h"
#include "engine/adaptive_window.h"
#include "rank_threads.h"
#include "resume_check.h"
#include "test_helpers.h"
#include "tiny_net.h"

namespace gradiveq {
namespace {

using testing::batch;
using testing::expect_invalid;
using testing::rel_error;
using testing::run_ranks;
using testing::TinyNet;

// What one step left in the engine: its stats and each layer's.
struct StepRecord {
  StepStats step;
  std::vector<LayerStats> layers;
};

// Gradients that depend only on (rank, step), never on the bases in use: a deferred run then samples its
// first window exactly as a synchronous one does. Two conv-shaped layers of K = 128 (kernel positions).
std::vector<StepRecord> run_engine(int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                   const GradiVeQOptions& o, int steps) {
  std::vector<NamedParameter> params{{"a", at::zeros({16, 8, 3, 3})}, {"b", at::zeros({16, 8, 3, 3})}};
  std::vector<at::Tensor> tensors{params[0].tensor, params[1].tensor};
  auto engine = GradiVeQAggregator::create(pg, params, o);
  const at::Tensor directions = at::randn({4, 128}, at::detail::createCPUGenerator(3));
  std::vector<StepRecord> out;
  for (int step = 0; step < steps; ++step) {
    auto gen = at::detail::createCPUGenerator(101 * rank + step + 1);
    at::Tensor low = at::randn({18, 4}, gen).matmul(directions) + 0.05 * at::randn({18, 128}, gen);
    at::Tensor buffer = low.flatten().clone();
    std::vector<at::Tensor> views{buffer.narrow(0, 0, 1152).view({16, 8, 3, 3}),
                                  buffer.narrow(0, 1152, 1152).view({16, 8, 3, 3})};
    engine->aggregate_bucket(buffer, views, tensors, 0, true)->waitAndThrow();
    out.push_back({engine->step_stats(), engine->layer_stats()});
  }
  return out;
}

GradiVeQOptions engine_options(BasisSync sync, int64_t delay) {
  GradiVeQOptions o;
  o.schedule = {2, 6, 8};  // sampling steps 2-7; compressed 8-15; the next window's fit after step 21
  o.sample_quantizer = SampleQuantizer::kNone;
  o.policy.min_numel = 100;
  o.fit.min_ratio = 4.0;
  o.basis_sync = sync;
  o.fit_delay_iters = delay;
  return o;
}

// The worker fits what the synchronous path would have fitted, and the bases land at step 8 + delay on every
// rank: until then the layers go uncompressed (they have no basis yet), from then on compressed with exactly
// the synchronous run's bases; the installing step reports the worker's time.
TEST(DeferredFit, InstallsTheSynchronousBasesAtTheNamedStepOnEveryRank) {
  const int world = 2, steps = 14, first_compressed = 8, delay = 3;
  for (BasisSync sync : {BasisSync::kReplicated, BasisSync::kBroadcast}) {
    SCOPED_TRACE(sync == BasisSync::kReplicated ? "replicated" : "broadcast");
    std::vector<std::vector<StepRecord>> at_once(world), deferred(world);
    run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      at_once[rank] = run_engine(rank, pg, engine_options(sync, 0), steps);
    });
    run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      deferred[rank] = run_engine(rank, pg, engine_options(sync, delay), steps);
    });
    const uint64_t expected = at_once[0][first_compressed].layers[0].basis_checksum;
    ASSERT_NE(expected, 0u) << at_once[0][first_compressed].layers[0].fit_status;
    for (int r = 0; r < world; ++r) {
      for (int step = first_compressed; step < steps; ++step) {
        const StepRecord& s = deferred[r][step];
        const bool installed = step >= first_compressed + delay;
        for (const LayerStats& l : s.layers) {
          EXPECT_EQ(l.phase, installed ? "compressed" : "uncompressed") << l.name << " step " << step;
          EXPECT_EQ(l.fits, installed ? 1 : 0) << l.name << " step " << step;
          if (installed) {
            EXPECT_EQ(l.basis_checksum,
                      at_once[r][first_compressed].layers[&l - s.layers.data()].basis_checksum)
                << l.name << " rank " << r;
          }
        }
        EXPECT_EQ(s.step.fit_background_ms > 0.0, step == first_compressed + delay) << "step " << step;
      }
      EXPECT_EQ(deferred[r][first_compressed + delay].layers[0].basis_checksum, expected) << "rank " << r;
      EXPECT_EQ(at_once[r][first_compressed].step.fit_background_ms, 0.0);
    }
  }
}

SynchronizerOptions training_options(BasisSync sync) {
  SynchronizerOptions o;
  o.gradiveq.schedule = {4, 3, 6};  // windows end after steps 6, 15, 24: fits start at 7, 16, 25
  o.gradiveq.policy.min_numel = 100;
  o.gradiveq.fit.energy = 0.9;
  o.gradiveq.basis_sync = sync;
  o.gradiveq.fit_delay_iters = 3;
  return o;
}

// Real training through three windows on 3 ranks: the deferred fits of each window differ (the model moved),
// each rank's worker finishes when it does, and still every rank holds the same bases and parameters after
// every step (verify_bases would raise at the first step they disagreed).
TEST(DeferredFit, RanksStayBitIdenticalThroughDeferredFits) {
  const int world = 3, steps = 30;
  for (BasisSync sync : {BasisSync::kReplicated, BasisSync::kBroadcast}) {
    SCOPED_TRACE(sync == BasisSync::kReplicated ? "replicated" : "broadcast");
    std::vector<std::vector<uint64_t>> checksums(world);
    std::vector<std::vector<at::Tensor>> params(world);
    std::vector<int64_t> fits(world);
    run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      TinyNet net(7);
      GradientSynchronizer synchronizer(pg, net.params, training_options(sync));
      for (int step = 0; step < steps; ++step) {
        auto [x, y] = batch(rank, step);
        net.zero_grad();
        net.loss(x, y).backward();
        synchronizer.synchronize();
        net.sgd(0.05);
        for (const auto& l : synchronizer.aggregator().layer_stats()) {
          if (l.compressible) checksums[rank].push_back(l.basis_checksum);
        }
      }
      for (auto& np : net.params) params[rank].push_back(np.tensor.detach().clone());
      fits[rank] = synchronizer.aggregator().layer_stats()[1].fits;
    });
    EXPECT_EQ(fits[0], 3);  // installed at steps 10, 19 and 28
    for (int r = 1; r < world; ++r) {
      EXPECT_EQ(checksums[r], checksums[0]) << "rank " << r;
      for (size_t i = 0; i < params[0].size(); ++i) {
        EXPECT_TRUE(at::equal(params[r][i], params[0][i])) << "rank " << r << " param " << i;
      }
    }
  }
}

// A state saved while a fit is pending or in flight resumes bit for bit: the window's samples and the
// install step are in the image, so the loaded engine fits the same samples and installs them at the same
// step.
TEST(DeferredFit, AFitInFlightRoundTripsThroughACheckpoint) {
  for (int cut : {7, 8, 9}) {  // 7: the window just ended (fit pending); 8, 9: the worker's fit in flight
    SCOPED_TRACE("cut after step " + std::to_string(cut - 1));
    testing::expect_resumed_run_matches(3, 14, cut, training_options(BasisSync::kReplicated), 0.05);
  }
  testing::expect_resumed_run_matches(2, 14, 8, training_options(BasisSync::kBroadcast), 0.05);
}

// Energy 1.0 with no cap on d is still an exact all-reduce when the bases arrive late.
TEST(DeferredFit, FullRankDeferredFitsEqualPlainAllReduce) {
  run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(8);
    SynchronizerOptions o = training_options(BasisSync::kReplicated);
    o.overlap_with_backward = false;
    o.gradiveq.fit.energy = 1.0;
    o.gradiveq.fit.min_ratio = 0.0;
    o.gradiveq.fit.max_components = 0;
    o.gradiveq.coeff_dtype = o.gradiveq.uncompressed_dtype = at::kFloat;
    o.gradiveq.sample_quantizer = SampleQuantizer::kNone;
    GradientSynchronizer sync(pg, net.params, o);
    for (int step = 0; step < 13; ++step) {  // the last 3 compressed with the bases installed at step 10
      auto [x, y] = batch(rank, step);
      net.zero_grad();
      net.loss(x, y).backward();
      std::vector<at::Tensor> local;
      for (auto& np : net.params) local.push_back(np.tensor.grad().clone());
      sync.synchronize();
      for (size_t i = 0; i < local.size(); ++i) {
        std::vector<at::Tensor> t{local[i]};
        pg->allreduce(t)->wait();
        EXPECT_LT(rel_error(net.p(i).grad(), t[0] / 2.0), 1e-5) << net.params[i].name << " step " << step;
      }
    }
    EXPECT_EQ(sync.aggregator().layer_stats()[1].phase, "compressed");
    EXPECT_EQ(sync.aggregator().layer_stats()[1].fits, 1);
  });
}

TEST(DeferredFit, RejectsADelayOutsideTheCompressedWindow) {
  GradiVeQOptions o;
  o.fit_delay_iters = -1;
  expect_invalid([&] { o.validate(); }, {"fit_delay_iters", ">= 0"});
  o.fit_delay_iters = o.schedule.compress_iters;
  expect_invalid([&] { o.validate(); }, {"fit_delay_iters", "compress_iters"});
  o.fit_delay_iters = o.schedule.compress_iters - 1;
  o.validate();
}


// Installing deferred bases restarts the adaptive window's error baseline (GradiVeQAggregator::
// install_deferred_fit calls reset_baseline): a baseline taken on the old bases would judge the new ones
// against a stale scale. Here the old bases' error was 0.1; after the reset, 0.3 becomes the new scale and
// votes no restart, where against the old baseline it would.
TEST(DeferredFit, NewBasesStartANewErrorBaseline) {
  const auto vote_after = [](bool reset) {
    detail::AdaptiveWindow window(1.5);
    at::Tensor slot = at::zeros({1});
    const auto step = [&](double error, bool first) {
      window.add_terms(at::scalar_tensor(error * error, at::kDouble), at::scalar_tensor(1.0, at::kDouble));
      window.write_vote(slot, first);
      window.begin_step(Schedule(), 0);  // clears the step's terms (no vote received: no restart)
    };
    for (int i = 0; i < 4; ++i) step(0.1, i == 0);
    if (reset) window.reset_baseline();
    step(0.3, false);
    return slot.item<float>();
  };
  EXPECT_EQ(vote_after(false), 1.0f);
  EXPECT_EQ(vote_after(true), 0.0f);
}
}  // namespace
}  // namespace gradiveq
