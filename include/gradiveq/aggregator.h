// Aggregator: the GradiVeQ engine behind the DDP communication hook and the LibTorch API.
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
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/conv_layout.h"
#include "gradiveq/pca_compressor.h"
#include "gradiveq/qsgd.h"
#include "gradiveq/schedule.h"

namespace gradiveq {

namespace detail {
class StepRecorder;
}

/// How the sampling window is aggregated.
enum class SampleQuantizer {
  kQsgd4,  ///< 4-bit QSGD (7 levels, bucket 512, max norm), as in the paper; all-gather based
  kNone,   ///< uncompressed, in the all-reduce
};

/// Which slices of a layer's aggregated gradient become PCA samples.
enum class FitSamples {
  kFirstSlice,  ///< the paper (s = infinity): the first slice of every sampled iteration
  kAllSlices,   ///< every slice of every sampled iteration (more samples, higher rank)
};

/// How a layer is cut into slices.
enum class SliceLayoutKind {
  kKernelRow,       ///< K = W*D*F, the paper's default
  kKernelPosition,  ///< K = D*F
};

/// Which parameters are compressed. A parameter is compressible when it is 4-D (a conv weight), has at least
/// min_numel values, matches one of `include` (if any is given) and none of `exclude`. Patterns are globs on
/// the parameter's name (`*` any run of characters, `?` one character), e.g. "layers.*.conv2.weight".
struct LayerPolicy {
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  int64_t min_numel = 1000;
};

// The defaults are chosen by measurement (benchmarks/accuracy.py, README "Accuracy on real data"): every slice
// of every sampled gradient is a PCA sample, one kernel position per slice (K = D*F), energy 0.995 with d capped
// at K/8, the sampling windows travel uncompressed and the coefficients in float16. On Fashion-MNIST they keep test accuracy far closer to
// plain all-reduce than the paper's choices (AggregatorOptions::paper()), at a conv-layer ratio of at least 8.
struct AggregatorOptions {
  FitOptions fit = default_fit();
  ScheduleOptions schedule;
  SampleQuantizer sample_quantizer = SampleQuantizer::kNone;
  FitSamples fit_on = FitSamples::kAllSlices;
  SliceLayoutKind slice_layout = SliceLayoutKind::kKernelPosition;
  /// dtype the compressed coefficients travel in: float16 (default: half the bytes of float32; on Fashion-MNIST
  /// the same test accuracy as float32, benchmarks/results/accuracy_fashion_mnist_cnn.md), bfloat16, or float32
  /// (one all-reduce for the whole bucket; the paper's). Half-precision coefficients take a second all-reduce of
  /// their own dtype, while uncompressed values stay float32. A float16 coefficient beyond 65504 (loss scaling
  /// too high) becomes inf on every rank alike, which GradScaler detects and skips, as with torch's fp16 hook.
  at::ScalarType coeff_dtype = at::kHalf;
  /// dtype the bases are stored in: float32, or bfloat16 / float16 (half the basis memory and half the bytes
  /// the codec streams per step; products still accumulate in float32). The fitting rank rounds before the
  /// broadcast, so every rank holds the same basis.
  at::ScalarType basis_dtype = at::kFloat;
  LayerPolicy policy;
  bool verify_bases = true;
  uint64_t seed = 0;  ///< seeds QSGD's stochastic rounding (mixed with iteration, rank and layer)
  /// The paper's adaptive window (eq. 7); 0 disables it, otherwise it must be > 1. Each rank measures its local
  /// loss over the layers it compresses in a step, E = sqrt(sum ||x - U U^T x||^2 / sum ||g||^2) with
  /// x = g - mu/N. When E exceeds restart_error_growth times the window's baseline E on
  /// any rank, every rank leaves the compressed window after that step and starts a new sampling window (the
  /// baseline is the mean E of the window's first 3 compressed steps, which never vote). The
  /// ranks agree through one float carried in the step's last all-reduce, so the decision is identical on all.
  double restart_error_growth = 0.0;
  /// Compressed steps: the compressed layers of a bucket are cut into up to this many groups of about equal size,
  /// each with its own all-reduce, so the codec of one group overlaps the transfer of another. 1 = one all-reduce
  /// per bucket. Must be >= 1.
  int64_t pipeline_chunks = 1;

  /// Throws InvalidArgument naming the first bad option.
  void validate() const;

  /// The paper's method exactly (Yu et al. 2018): first-slice fit, K = one kernel row, energy 0.99, 4-bit QSGD
  /// sampling, schedule 2500 / 100 / 400, no adaptive window. The defaults above differ where measurements on
  /// real data showed the paper's choices to cost accuracy (README, "Accuracy on real data").
  static AggregatorOptions paper();

 private:
  static FitOptions default_fit() {
    FitOptions f;
    f.energy = 0.995;
    f.min_ratio = 8.0;
    return f;
  }
};

struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

/// Per-layer statistics, as of the last step that aggregated the layer.
struct LayerStats {
  std::string name;
  std::vector<int64_t> shape;
  bool compressible = false;
  std::string phase;  ///< how the layer last travelled: "uncompressed", "sampling", "compressed", or "" (never)
  int64_t slice_len = 0, num_slices = 0, tail_len = 0;
  int64_t num_components = 0;        ///< d of the current basis (0: none yet)
  double compression_ratio = 0.0;    ///< K / d
  double explained_variance = 0.0;   ///< of the fitting window
  double relative_error = -1.0;      ///< ||g_n - (U c_n + mu/N)|| / ||g_n|| of this rank's gradient (eq. 7), last compressed step; -1 before
  int64_t bytes_in = 0;              ///< float32 bytes of the layer's gradient
  int64_t bytes_out = 0;             ///< bytes the layer put into collectives in its last step
  int64_t window_samples = 0;        ///< samples collected in the current window
  int64_t skipped_samples = 0;       ///< sampled iterations dropped because the aggregate was not finite
  int64_t fits = 0;                  ///< bases fitted so far
  std::string fit_status;            ///< outcome of the last fit ("ok", or why it was skipped)
  uint64_t basis_checksum = 0;
  int64_t basis_bytes = 0;           ///< memory of U and mu
};

class Aggregator : public BucketAggregator, public std::enable_shared_from_this<Aggregator> {
 public:
  /// `parameters`: every parameter that may appear in a bucket, with unique names. They are recognised in
  /// buckets by tensor identity, so bucket rebuilds and any bucket order work.
  static std::shared_ptr<Aggregator> create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                            std::vector<NamedParameter> parameters, AggregatorOptions options);
  ~Aggregator();

  /// See BucketAggregator::aggregate_bucket.
  c10::intrusive_ptr<c10::ivalue::Future> aggregate_bucket(const at::Tensor& buffer,
                                                           const std::vector<at::Tensor>& gradients,
                                                           const std::vector<at::Tensor>& parameters,
                                                           int64_t index, bool is_last) override;

  const AggregatorOptions& options() const { return options_; }
  int64_t iteration() const override { return iteration_; }
  Phase phase() const { return phase_at(iteration_); }
  /// Compressed windows left early by the adaptive window so far.
  int64_t window_restarts() const { return window_restarts_; }
  int64_t world_size() const { return world_size_; }
  int64_t rank() const { return rank_; }

  std::vector<LayerStats> layer_stats() const;
  StepStats step_stats() const override;

  /// Versioned binary image of the state: iteration, pending fit, per-layer bases (identical on all ranks)
  /// and the current window's samples, keyed by parameter name.
  at::Tensor save_state() const;
  /// Restores save_state()'s image. Raises InvalidArgument, leaving this object untouched, when the image is
  /// truncated, corrupted or of another version, was saved at another world size, or names other parameters,
  /// shapes or slice lengths than this model has.
  void load_state(const at::Tensor& image);

  /// Copy of the current basis of layer `name` (unfitted if none yet).
  PcaCompressor basis(const std::string& name) const;
  /// Replaces one layer's basis on this rank only. For tests that corrupt a rank's basis on purpose.
  void set_basis(const std::string& name, const PcaCompressor& pca);

 private:
  struct Layer;
  struct Entry;
  struct BucketPlan;

  Aggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group, std::vector<NamedParameter> parameters,
             AggregatorOptions options);
  void begin_iteration();
  /// Phase of `iter` under the schedule, shifted by the adaptive window's restarts.
  Phase phase_at(int64_t iter) const { return schedule_.phase(iter - schedule_shift_); }
  bool first_compressed_at(int64_t iter) const;
  void refit_and_broadcast();
  uint64_t verification_code(int64_t iter) const;
  void update_bases_checksum();
  /// Packs and compresses one plan (a bucket, or one pipelining group of it), issues its collectives and returns
  /// a future that completes once they have and the plan's gradients are written back.
  c10::intrusive_ptr<c10::ivalue::Future> issue_plan(const std::shared_ptr<BucketPlan>& plan, bool verify,
                                                     bool vote);
  void finish_bucket(BucketPlan& plan, const std::vector<at::Tensor>& gathered);
  Layer* find_layer(const at::Tensor& parameter);
  Layer& layer_named(const std::string& name, const char* where) const;

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  AggregatorOptions options_;
  Schedule schedule_;
  QsgdCodec qsgd_;
  int64_t rank_ = 0, world_size_ = 1;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::unordered_map<const void*, Layer*> by_impl_;

  int64_t iteration_ = 0;
  bool pending_fit_ = false;
  // Adaptive window: iterations the schedule is shifted by (a restart at iteration t makes t the first sampling
  // iteration of a new window), restarts so far, this step's summed loss terms, the window's first E, and the
  // all-reduced restart vote of the last step (read at the next step, when its collective has completed).
  int64_t schedule_shift_ = 0;
  int64_t window_restarts_ = 0;
  at::Tensor step_residual_sq_, step_signal_sq_;
  static constexpr int64_t kBaselineSteps = 3;
  at::Tensor window_error_baseline_;  // sum of E over the window's first compressed steps (up to kBaselineSteps)
  int64_t window_baseline_steps_ = 0;
  at::Tensor restart_vote_;
  uint64_t bases_checksum_ = 0;  // combined over all layers, updated whenever a basis changes

  mutable std::mutex stats_mutex_;  // guards layer stats and samples, written from Gloo/NCCL callback threads
  std::unique_ptr<detail::StepRecorder> steps_;
};

}  // namespace gradiveq
