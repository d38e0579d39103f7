// GradiVeQAggregator: the GradiVeQ engine behind the DDP communication hook and the LibTorch API.
//
// It owns one PcaCompressor per compressible layer, follows the Schedule, and aggregates one bucket of
// gradients at a time over a c10d process group (Gloo or NCCL):
//
//   warm-up      every value travels uncompressed in one all-reduce;
//   sampling     compressible layers are aggregated with 4-bit QSGD (all-gather, since QSGD codes cannot be
//                summed) or uncompressed, and their aggregated gradients are kept as PCA samples;
//   compressed   compressible layers are compressed with their basis (coefficients U^T (g - mu/N)), packed
//                with every other value of the bucket into ONE all-reduce, summed, decompressed once.
//
// The result is the average over ranks, written back into the bucket (a hook must average: DDP does not
// divide once a hook is registered). At the first bucket after each sampling window, every layer's basis is
// fitted by one rank (layers are spread round-robin over ranks) and broadcast, so all ranks hold
// bit-identical bases; with verify_bases, the first bucket of every step also carries a checksum of the
// iteration counter and all bases through the same all-reduce, and every rank raises if any rank differs.
//
// Every collective is issued from aggregate_bucket itself, in bucket order, never from a future's callback:
// on Gloo, callbacks of different buckets run in different orders on different ranks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <unordered_map>
#include <vector>

#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/conv_layout.h"
#include "gradiveq/options.h"
#include "gradiveq/pca_compressor.h"
#include "gradiveq/qsgd.h"
#include "gradiveq/schedule.h"
#include "gradiveq/types.h"

namespace gradiveq {

namespace detail {
class StepRecorder;
struct PendingVerification;
class AdaptiveWindow;
class DeferredFit;
struct BucketPlan;
struct EngineLayer;
struct PlanContext;
struct Segments;
}  // namespace detail

class GradiVeQAggregator : public BucketAggregator, public std::enable_shared_from_this<GradiVeQAggregator> {
 public:
  /// `parameters`: every parameter that may appear in a bucket, with unique names. They are recognised in
  /// buckets by tensor identity, so bucket rebuilds and any bucket order work.
  static std::shared_ptr<GradiVeQAggregator> create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                                    std::vector<NamedParameter> parameters,
                                                    GradiVeQOptions options);
  ~GradiVeQAggregator() override;

  /// See BucketAggregator::aggregate_bucket.
  c10::intrusive_ptr<c10::ivalue::Future> aggregate_bucket(const at::Tensor& buffer,
                                                           const std::vector<at::Tensor>& gradients,
                                                           const std::vector<at::Tensor>& parameters,
                                                           int64_t index, bool is_last) override;

  const GradiVeQOptions& options() const { return options_; }
  int64_t iteration() const override { return iteration_; }
  Phase phase() const;
  /// Compressed windows left early by the adaptive window so far.
  int64_t window_restarts() const;
  int64_t world_size() const { return world_size_; }
  int64_t rank() const { return rank_; }

  std::vector<LayerStats> layer_stats() const;
  /// What this configuration leaves undone over the model's parameters ("" when nothing), as
  /// StepStats::warning repeats every step: no parameter passes the layer policy, an include pattern matches
  /// none, or the schedule never compresses.
  const std::string& configuration_warning() const { return warning_; }
  StepStats step_stats() const override;

  /// Versioned binary image of the state: iteration, pending fit, per-layer bases (identical on all ranks),
  /// the current window's samples and the error-feedback memory, keyed by parameter name. With error feedback
  /// on or local samples (options().state_is_per_rank()) the image is this rank's own, and only this rank
  /// loads it; otherwise it is identical on all ranks.
  at::Tensor save_state() const;
  /// Restores save_state()'s image. Raises InvalidArgument, leaving this object untouched, when the image is
  /// truncated, corrupted or of another version, was saved at another world size or (a per-rank image) on
  /// another rank, or names other parameters, shapes or slice lengths than this model has.
  void load_state(const at::Tensor& image);

  /// Copy of the current basis of layer `name` (unfitted if none yet).
  PcaCompressor basis(const std::string& name) const;
  /// Error-feedback memory of parameter `name` on this rank: what compression still owes its gradient, in the
  /// parameter's shape (zeros when error_feedback is off or nothing has been lost yet).
  at::Tensor error_memory(const std::string& name) const;
  /// Replaces one layer's basis on this rank only. For tests that corrupt a rank's basis on purpose.
  void set_basis(const std::string& name, const PcaCompressor& pca);

 private:
  GradiVeQAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                     std::vector<NamedParameter> parameters, GradiVeQOptions options);
  void begin_iteration();
  Phase phase_at(int64_t iter) const;
  void refit_and_broadcast();
  /// After a sampling window: its fits, at once or (fit_delay_iters) deferred.
  void start_window_fits();
  /// Starts the window's fits on a worker (DeferredFit), to be installed at the start of step `install_at`.
  void start_deferred_fit(int64_t install_at);
  /// Waits for the deferred fits, shares their bases (broadcast) and installs them.
  void install_deferred_fit();
  std::vector<std::shared_ptr<detail::BucketPlan>> plan_bucket(const at::Tensor& buffer,
                                                               const std::vector<at::Tensor>& gradients,
                                                               const std::vector<at::Tensor>& parameters,
                                                               int64_t index, bool is_last);
  /// Packs and compresses one plan (a bucket, or one pipelining group of it), issues its collectives and
  /// returns a future that completes once they have and the plan's gradients are written back.
  c10::intrusive_ptr<c10::ivalue::Future> issue_plan(const std::shared_ptr<detail::BucketPlan>& plan);
  void pack_plan(detail::BucketPlan& plan, const detail::Segments& segments, bool any_qsgd);
  at::ScalarType control_dtype(const at::Tensor& buffer) const;
  void finish_plan(detail::BucketPlan& plan);
  detail::PlanContext plan_context(const detail::BucketPlan& plan);
  detail::EngineLayer* find_layer(const at::Tensor& parameter);
  detail::EngineLayer& layer_named(const std::string& name, const char* where) const;
  void update_bases_checksum();
  /// Moves every layer's arriving samples into its window (EngineLayer::settle_samples).
  void settle_samples() const;
  /// Raises if the last step's verification, when its sums have not been checked yet, shows ranks
  /// disagreeing.
  void check_pending_verification() const;

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  GradiVeQOptions options_;
  Schedule schedule_;
  QsgdMessageCodec sampling_codec_;  // the paper's 4-bit QSGD for sampling windows
  int64_t rank_ = 0, world_size_ = 1;
  std::vector<std::unique_ptr<detail::EngineLayer>> layers_;
  std::unordered_map<const void*, detail::EngineLayer*> by_impl_;

  int64_t iteration_ = 0;
  bool pending_fit_ = false;
  std::unique_ptr<detail::DeferredFit> deferred_fit_;  // the window's fits in flight (fit_delay_iters)
  int64_t restored_install_at_ = -1;  // install step of a fit that was in flight when the state was saved
  std::unique_ptr<detail::AdaptiveWindow> window_;
  uint64_t bases_checksum_ = 0;      // combined over all layers, updated whenever a basis changes
  std::string warning_;              // what the configuration leaves undone (StepStats::warning)
  uint64_t configuration_code_ = 0;  // of the layer policy and wire options, verified with the state

  mutable std::mutex stats_mutex_;  // guards layer stats and samples, written from Gloo/NCCL callback threads
  std::unique_ptr<detail::StepRecorder> steps_;
  // The last step's verification while its sums travel to the host (guarded by stats_mutex_).
  std::unique_ptr<detail::PendingVerification> unchecked_;
};

/// Deprecated name (0.1); removed in the next release.
using Aggregator [[deprecated("use gradiveq::GradiVeQAggregator")]] = GradiVeQAggregator;

}  // namespace gradiveq
