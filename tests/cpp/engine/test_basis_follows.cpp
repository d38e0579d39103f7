// The options that let the basis follow the gradients (options.h: sample_source, error_feedback,
// error_budget, refit_threshold, linear_weights) and the fit that needs no broadcast (basis_sync), on 2 real
// Gloo ranks (threads of this process).
#include <cstring>
#include <functional>
#include <map>
#include <mutex>

#include "gradiveq/gradient_synchronizer.h"
#include "gradiveq/gradiveq_aggregator.h"
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

// `image` (version 7) rewritten as version 6 wrote it: no rank fields after the world size.
at::Tensor as_version_6(const at::Tensor& image) {
  constexpr int64_t kHeader = 4 + 4 + 8, kRankFields = 8 + 1, kChecksum = 8;
  at::Tensor body =
      at::cat({image.narrow(0, 0, kHeader),
               image.narrow(0, kHeader + kRankFields, image.numel() - kHeader - kRankFields - kChecksum)});
  const uint32_t version = 6;
  std::memcpy(body.data_ptr<uint8_t>() + 4, &version, sizeof(version));
  const uint64_t checksum = checksum_bytes(body);
  at::Tensor trailer = at::empty({kChecksum}, at::kByte);
  std::memcpy(trailer.data_ptr<uint8_t>(), &checksum, kChecksum);
  return at::cat({body, trailer});
}

SynchronizerOptions following_options() {
  SynchronizerOptions o;
  o.gradiveq.schedule = {4, 3, 5};
  o.gradiveq.sample_source = SampleSource::kLocal;
  o.gradiveq.error_feedback = ErrorFeedback::kOn;
  o.gradiveq.policy.linear_weights = true;
  o.gradiveq.policy.min_numel = 100;
  o.gradiveq.fit.energy = 0.9;
  o.gradiveq.fit.min_ratio = 4.0;
  o.gradiveq.coeff_dtype = o.gradiveq.uncompressed_dtype = at::kFloat;
  return o;
}

// A rank's gradients of one step, and their plain all-reduce average.
std::vector<at::Tensor> local_gradients(TinyNet& net, int rank, int step) {
  auto [x, y] = batch(rank, step);
  net.zero_grad();
  net.loss(x, y).backward();
  std::vector<at::Tensor> out;
  for (auto& np : net.params) out.push_back(np.tensor.grad().clone());
  return out;
}

at::Tensor plain_average(const at::Tensor& g, c10d::ProcessGroup& pg) {
  std::vector<at::Tensor> t{g.clone()};
  pg.allreduce(t)->wait();
  return t[0] / double(pg.getSize());
}

// Local samples: after the warm-up every compressible layer (the convs and, with linear_weights, the linear
// weight) travels compressed in every step, sampling windows included, and its bases are refitted after each
// window; the bytes handed to the collectives stay far below the uncompressed ones.
TEST(BasisFollows, LocalSamplingSendsNoUncompressedConvValuesAfterWarmup) {
  const int world = 2, steps = 22;
  std::vector<std::map<std::string, uint64_t>> checksums(world);
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(3);
    SynchronizerOptions o = following_options();
    GradientSynchronizer sync(pg, net.params, o);
    const int64_t warmup = o.gradiveq.schedule.warmup_iters;
    for (int step = 0; step < steps; ++step) {
      local_gradients(net, rank, step);
      sync.synchronize();
      net.sgd(0.05);
      const auto layers = sync.aggregator().layer_stats();
      const StepStats st = sync.aggregator().step_stats();
      int64_t compressible_in = 0, compressible_out = 0;
      for (const auto& l : layers) {
        if (!l.compressible) continue;
        compressible_in += l.bytes_in;
        compressible_out += l.bytes_out;
        if (step >= warmup) {
          EXPECT_EQ(l.phase, "compressed") << l.name << " step " << step;
          EXPECT_LE(l.bytes_out * 3, l.bytes_in) << l.name << " step " << step;
        }
      }
      if (step >= warmup) {
        // Everything else the step sent: the uncompressible parameters and a few control values.
        EXPECT_LT(st.bytes_payload, st.bytes_uncompressed - compressible_in + compressible_out + 64) << step;
      }
    }
    const auto layers = sync.aggregator().layer_stats();
    EXPECT_TRUE(layers[3].compressible) << layers[3].not_compressed_because;  // fc.weight
    EXPECT_EQ(layers[3].slice_len, 16);                                       // one output row per slice
    EXPECT_EQ(layers[1].fits, 3);  // after warm-up (its last 3 steps), and after each later window
    for (const auto& l : layers) {
      if (l.compressible) checksums[rank][l.name] = l.basis_checksum;
    }
  });
  EXPECT_EQ(checksums[0], checksums[1]);  // bit-identical bases through every refit
}

// Error feedback: out_t = mean_n(x_n,t - e_n,t) with x = g + e_{t-1}, so over any run the sum of the outputs
// plus the ranks' mean memory equals the sum of the plain averages, through refits and windows alike.
// Without the memory the difference would be the compression error of every step, which never cancels.
TEST(BasisFollows, ErrorFeedbackDeliversWhatCompressionLostLater) {
  const int world = 2, steps = 20;
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(4);
    SynchronizerOptions o = following_options();
    o.overlap_with_backward = false;
    GradientSynchronizer sync(pg, net.params, o);
    std::vector<at::Tensor> sum_out, sum_plain;
    double lost = 0.0;
    for (int step = 0; step < steps; ++step) {
      std::vector<at::Tensor> g = local_gradients(net, rank, step);
      sync.synchronize();
      for (size_t i = 0; i < g.size(); ++i) {
        at::Tensor plain = plain_average(g[i], *pg);
        if (step >= 4) lost += (net.p(i).grad() - plain).norm().item<double>();
        if (sum_out.size() <= i) {
          sum_out.push_back(at::zeros_like(plain));
          sum_plain.push_back(at::zeros_like(plain));
        }
        sum_out[i] += net.p(i).grad();
        sum_plain[i] += plain;
      }
    }
    EXPECT_GT(lost, 1e-3);  // compression did lose something in single steps
    for (size_t i = 0; i < net.params.size(); ++i) {
      at::Tensor owed = plain_average(sync.aggregator().error_memory(net.params[i].name), *pg);
      EXPECT_LT(rel_error(sum_out[i] + owed, sum_plain[i]), 1e-4) << net.params[i].name;
    }
    EXPECT_GT(sync.aggregator().error_memory("conv2.weight").norm().item<double>(), 0.0);
  });
}

// The memory (and the local samples) are part of the checkpoint: a run resumed from a state saved mid-window
// continues bit for bit.
TEST(BasisFollows, ErrorFeedbackMemoryRoundTripsThroughACheckpoint) {
  const int world = 2, steps = 16, cut = 10;  // inside the second window: memory and local samples are saved
  std::vector<at::Tensor> saved_memory(world);
  testing::expect_resumed_run_matches(
      world, steps, cut, following_options(), 0.05,
      [&](int rank, GradientSynchronizer& sync) {
        saved_memory[rank] = sync.aggregator().error_memory("conv2.weight");
      },
      [&](int rank, GradientSynchronizer& sync) {
        EXPECT_TRUE(at::equal(sync.aggregator().error_memory("conv2.weight"), saved_memory[rank]));
        EXPECT_GT(saved_memory[rank].norm().item<double>(), 0.0);
      });
}

// Error feedback's memory is per rank, so a rank refuses another rank's image rather than adding that rank's
// residual a second time; a version 6 image (before images recorded their rank) still loads.
TEST(BasisFollows, ErrorFeedbackImageLoadsOnlyOnTheRankThatSavedIt) {
  const int world = 2;
  const std::vector<at::Tensor> images =
      testing::expect_resumed_run_matches(world, 12, 10, following_options(), 0.05);
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(5);
    GradientSynchronizer sync(pg, net.params, following_options());
    const int other = 1 - rank;
    expect_invalid([&] { sync.aggregator().load_state(images[other]); },
                   {"saved on rank " + std::to_string(other), "this is rank " + std::to_string(rank)});
    EXPECT_EQ(sync.aggregator().iteration(), 0);
    sync.aggregator().load_state(as_version_6(images[rank]));
    EXPECT_EQ(sync.aggregator().iteration(), 10);
    // Nothing above is collective: without this a fast rank could close its connections before a slow one
    // (the sanitizer build) has finished connecting.
    std::vector<at::Tensor> done{at::ones({1})};
    pg->allreduce(done)->wait();
  });
}

// Planted gradients, straight into the engine: layer "low" gets slices in a fixed 2-D subspace (plus a little
// noise), layer "full" isotropic noise. With an error budget, "low" gets d = 2 and "full" the cap; with a
// refit threshold, the refit of "low" (same subspace) is not broadcast again, while "full" moves and is.
struct Planted {
  at::Tensor low_dirs;  // (2, K)
  explicit Planted(int64_t k)
      : low_dirs(std::get<0>(at::linalg_qr(at::randn({k, 2}, at::detail::createCPUGenerator(9))))
                     .t()
                     .contiguous()) {}
  std::vector<at::Tensor> gradients(int rank, int step, const std::vector<at::Tensor>& params) {
    auto gen = at::detail::createCPUGenerator(77 * rank + step + 1);
    const auto& shape = params[0].sizes();  // (F, D, 3, 3): kernel-position slices of K = D*F, 9 of them
    at::Tensor coeffs = at::randn({9, 2}, gen) * 3.0;
    at::Tensor slices = coeffs.matmul(low_dirs) + 0.01 * at::randn({9, low_dirs.size(1)}, gen);
    // Paper order (H, W, D, F) back to (F, D, H, W).
    at::Tensor low = slices.view({3, 3, shape[1], shape[0]}).permute({3, 2, 0, 1}).contiguous();
    return {low, at::randn(params[1].sizes(), gen)};
  }
};

void run_planted(int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg, const GradiVeQOptions& o, int steps,
                 std::vector<LayerStats>& out, int64_t* bases_bytes = nullptr) {
  std::vector<NamedParameter> params{{"low", at::zeros({16, 8, 3, 3})}, {"full", at::zeros({16, 8, 3, 3})}};
  std::vector<at::Tensor> tensors{params[0].tensor, params[1].tensor};
  auto engine = GradiVeQAggregator::create(pg, params, o);
  Planted planted(16 * 8);
  for (int step = 0; step < steps; ++step) {
    std::vector<at::Tensor> g = planted.gradients(rank, step, tensors);
    at::Tensor buffer = at::cat({g[0].flatten(), g[1].flatten()});
    std::vector<at::Tensor> views{buffer.narrow(0, 0, g[0].numel()).view(g[0].sizes()),
                                  buffer.narrow(0, g[0].numel(), g[1].numel()).view(g[1].sizes())};
    engine->aggregate_bucket(buffer, views, tensors, 0, true)->waitAndThrow();
    if (bases_bytes) *bases_bytes += engine->step_stats().bytes_bases;
  }
  out = engine->layer_stats();
}

TEST(BasisFollows, ErrorBudgetChoosesDPerLayerAndUnmovedBasesAreNotResent) {
  GradiVeQOptions o;
  o.schedule = {2, 6, 4};  // fits at the start of steps 8 and 18
  o.sample_quantizer = SampleQuantizer::kNone;
  o.fit.min_ratio = 4.0;  // cap: K / 4 = 32
  o.error_budget = 0.05;
  o.refit_threshold = 0.01;
  o.policy.min_numel = 100;
  std::vector<std::vector<LayerStats>> stats(2);
  run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    run_planted(rank, pg, o, 20, stats[rank]);
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(stats[r][0].num_components, 2)
        << "rank " << r << ": " << stats[r][0].fit_status << " / " << stats[r][0].not_compressed_because;
    EXPECT_EQ(stats[r][1].num_components, 32) << "rank " << r;
    EXPECT_EQ(stats[r][0].bases_kept, 1) << "rank " << r;  // the second fit found the same subspace
    EXPECT_EQ(stats[r][1].bases_kept, 0) << "rank " << r;
    EXPECT_EQ(stats[r][0].fits, 1);
    EXPECT_EQ(stats[r][1].fits, 2);
  }
  EXPECT_EQ(stats[0][0].basis_checksum, stats[1][0].basis_checksum);
  EXPECT_EQ(stats[0][1].basis_checksum, stats[1][1].basis_checksum);
}

// basis_sync = replicated: every rank fits every layer from the QSGD-coded window it decoded, and gets the
// bases, the error budget's d and the refit threshold's verdicts the broadcast would have given it, bit for
// bit, without sending a basis byte (the verification code in every step checks the ranks agree).
TEST(BasisFollows, ReplicatedFitsGiveTheBroadcastBasesWithoutSendingThem) {
  for (SampleQuantizer quantizer : {SampleQuantizer::kQsgd4, SampleQuantizer::kNone}) {
    SCOPED_TRACE(quantizer == SampleQuantizer::kQsgd4 ? "QSGD-coded window" : "uncompressed window");
    GradiVeQOptions o;
    o.schedule = {2, 6, 4};  // fits at the start of steps 8 and 18
    o.sample_quantizer = quantizer;
    o.fit.min_ratio = 4.0;
    o.error_budget = 0.05;
    o.refit_threshold = 0.01;
    o.policy.min_numel = 100;
    std::map<BasisSync, std::vector<std::vector<LayerStats>>> stats;
    std::map<BasisSync, std::vector<int64_t>> bases_bytes;
    for (BasisSync sync : {BasisSync::kBroadcast, BasisSync::kReplicated}) {
      o.basis_sync = sync;
      stats[sync].resize(2);
      bases_bytes[sync].assign(2, 0);
      run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
        run_planted(rank, pg, o, 20, stats[sync][rank], &bases_bytes[sync][rank]);
      });
    }
    const auto& broadcast = stats[BasisSync::kBroadcast];
    const auto& replicated = stats[BasisSync::kReplicated];
    EXPECT_GT(bases_bytes[BasisSync::kBroadcast][0] + bases_bytes[BasisSync::kBroadcast][1], 0);
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(bases_bytes[BasisSync::kReplicated][r], 0) << "rank " << r;
      for (size_t j = 0; j < 2; ++j) {
        EXPECT_NE(replicated[r][j].basis_checksum, 0u) << replicated[r][j].fit_status;
        EXPECT_EQ(replicated[r][j].basis_checksum, broadcast[r][j].basis_checksum)
            << "rank " << r << " layer " << j;
        EXPECT_EQ(replicated[r][j].num_components, broadcast[r][j].num_components);
        EXPECT_EQ(replicated[r][j].bases_kept, broadcast[r][j].bases_kept);
        EXPECT_EQ(replicated[r][j].fits, broadcast[r][j].fits);
      }
    }
    if (quantizer == SampleQuantizer::kNone) {  // exact samples: the planted subspace, found and kept
      EXPECT_EQ(replicated[0][0].num_components, 2);
      EXPECT_EQ(replicated[0][0].bases_kept, 1);
    }
  }
}

// Auto (the default) replicates exactly where replication can work; the paper's method broadcasts.
TEST(BasisFollows, AutoBasisSyncReplicatesWhereItCanWork) {
  GradiVeQOptions o;
  EXPECT_EQ(o.effective_basis_sync(), BasisSync::kReplicated);
  o.sample_source = SampleSource::kLocal;
  EXPECT_EQ(o.effective_basis_sync(), BasisSync::kBroadcast);
  o = GradiVeQOptions();
  o.verify_bases = false;
  EXPECT_EQ(o.effective_basis_sync(), BasisSync::kBroadcast);
  o.validate();  // auto never asks for what it cannot have
  EXPECT_EQ(GradiVeQOptions::paper().effective_basis_sync(), BasisSync::kBroadcast);
}

// Energy 1.0 with no cap on d stays an exact all-reduce with the new options on (local samples, linear
// weights; error feedback is refused there, see RejectsOptionsThatCannotWorkTogether).
TEST(BasisFollows, FullRankWithLocalSamplesEqualsPlainAllReduce) {
  run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(6);
    SynchronizerOptions o = following_options();
    o.gradiveq.error_feedback = ErrorFeedback::kOff;
    o.gradiveq.fit.energy = 1.0;
    o.gradiveq.fit.min_ratio = 0.0;
    o.gradiveq.fit.max_components = 0;
    GradientSynchronizer sync(pg, net.params, o);
    for (int step = 0; step < 14; ++step) {
      std::vector<at::Tensor> g = local_gradients(net, rank, step);
      sync.synchronize();
      for (size_t i = 0; i < g.size(); ++i) {
        EXPECT_LT(rel_error(net.p(i).grad(), plain_average(g[i], *pg)), 1e-5)
            << net.params[i].name << " step " << step;
      }
    }
    EXPECT_EQ(sync.aggregator().layer_stats()[1].phase, "compressed");
  });
}

// Auto (the default) turns error feedback on wherever compression can lose something and off where the memory
// would stay empty or never be sent, without raising; on raises there (RejectsOptionsThatCannotWorkTogether).
TEST(BasisFollows, ErrorFeedbackAutoIsOnWhereSomethingCanBeLost) {
  GradiVeQOptions o;
  EXPECT_EQ(o.error_feedback, ErrorFeedback::kAuto);
  EXPECT_TRUE(o.effective_error_feedback());
  EXPECT_TRUE(o.state_is_per_rank());
  const std::vector<std::function<void(GradiVeQOptions&)>> nothing_lost = {
      [](GradiVeQOptions& x) { x.schedule.compress_iters = 0; },
      [](GradiVeQOptions& x) { x.refit_threshold = 1.0; },
      [](GradiVeQOptions& x) {
        x.fit.energy = 1.0;
        x.fit.min_ratio = 0.0;
      },
  };
  for (const auto& change : nothing_lost) {
    o = GradiVeQOptions();
    change(o);
    o.validate();
    EXPECT_FALSE(o.effective_error_feedback());
    EXPECT_FALSE(o.state_is_per_rank());
    o.sample_source = SampleSource::kLocal;
    EXPECT_TRUE(o.state_is_per_rank());  // the fitting rank's own samples
  }
  o = GradiVeQOptions();
  o.restart_error_growth = 2.0;  // the adaptive window would restart for the memory's growth
  EXPECT_FALSE(o.effective_error_feedback());
  o.error_feedback = ErrorFeedback::kOn;  // but one may ask for both
  o.validate();
  EXPECT_TRUE(o.effective_error_feedback());
  o = GradiVeQOptions();
  o.error_feedback = ErrorFeedback::kOff;
  EXPECT_FALSE(o.effective_error_feedback());
  EXPECT_FALSE(GradiVeQOptions::paper().effective_error_feedback());  // the paper drops what it loses
}

TEST(BasisFollows, RejectsOptionsThatCannotWorkTogether) {
  GradiVeQOptions o;
  o.error_budget = 1.5;
  expect_invalid([&] { o.validate(); }, {"error_budget", "(0, 1)"});
  o = GradiVeQOptions();
  o.error_feedback = ErrorFeedback::kOn;
  o.refit_threshold = 1.0;
  expect_invalid([&] { o.validate(); }, {"error_feedback", "refit_threshold"});
  o = GradiVeQOptions();
  o.refit_threshold = -0.5;
  expect_invalid([&] { o.validate(); }, {"refit_threshold"});
  o = GradiVeQOptions();
  o.error_feedback = ErrorFeedback::kOn;
  o.schedule.compress_iters = 0;
  expect_invalid([&] { o.validate(); }, {"error_feedback", "compress_iters"});
  o = GradiVeQOptions();
  o.error_feedback = ErrorFeedback::kOn;
  o.fit.energy = 1.0;
  o.fit.min_ratio = 0.0;
  o.fit.max_components = 0;
  expect_invalid([&] { o.validate(); }, {"error_feedback", "energy"});
  o = GradiVeQOptions();
  o.basis_sync = BasisSync::kReplicated;
  o.sample_source = SampleSource::kLocal;
  expect_invalid([&] { o.validate(); }, {"basis_sync", "sample_source"});
  o = GradiVeQOptions();
  o.basis_sync = BasisSync::kReplicated;
  o.verify_bases = false;
  expect_invalid([&] { o.validate(); }, {"basis_sync", "verify_bases"});
}

}  // namespace
}  // namespace gradiveq
