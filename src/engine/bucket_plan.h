// Private: how the parameters of one bucket (or one pipelining group of it) travel in a step.
//
// Each parameter takes one of four routes, and everything a route does lives in one place (bucket_plan.cpp):
//   raw            uncompressed, in the raw all-reduce
//   compressed     coefficients U^T (g - mu/N) (float32 in the all-reduce, or their own all-reduce in
//                  coeff_dtype) plus the slices' tail in the raw all-reduce; decompressed once
//   sampled raw    uncompressed in paper order; the aggregated gradient becomes a PCA sample
//   sampled QSGD   4-bit QSGD through the gather pipeline; the decoded sum becomes a PCA sample
// A float32 bucket's all-reduce is [raw values | float32 coefficients | verification code | restart vote]; a
// half-precision bucket's raw values travel in its own dtype and the rest in a second, float32 all-reduce.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "engine/basis_sync.h"
#include "engine/engine_layer.h"
#include "engine/gather_pipeline.h"
#include "engine/step_recorder.h"
#include "gradiveq/schedule.h"

namespace gradiveq {
class GradiVeQAggregator;
}

namespace gradiveq::detail {

enum class Mode { kRaw, kCompressed, kSampledRaw, kSampledQsgd };

/// Which route `layer` takes in `phase`: a layer that has a basis stays compressed through its sampling
/// windows when the samples are local.
Mode mode_for(const EngineLayer& layer, Phase phase, SampleQuantizer sample_quantizer, SampleSource source);

/// Whether a layer without a basis travels QSGD-coded in a sampling window. With local samples that window is
/// the first one, the warm-up's last steps, and it travels uncompressed like the warm-up.
inline bool samples_as_qsgd(SampleQuantizer sample_quantizer, SampleSource source) {
  return sample_quantizer == SampleQuantizer::kQsgd4 && source != SampleSource::kLocal;
}

struct Entry {
  EngineLayer* layer = nullptr;
  Mode mode = Mode::kRaw;
  at::Tensor grad;                          // view into the bucket buffer, parameter-shaped
  int64_t raw_offset = 0, raw_len = 0;      // in the raw all-reduce (paper order for sampled layers)
  int64_t coeff_offset = 0, coeff_len = 0;  // in the coefficient segment
  int64_t message = -1, message_bytes = 0;  // sampled QSGD: index and size of its message in the pipeline
  at::Tensor residual_sq, signal_sq;        // eq. 7 local loss terms (0-dim), compressed entries only
  bool local_sample = false;  // compressed: this rank fits the layer and keeps its local slices as samples
};

/// What the routes need from the engine.
struct PlanContext {
  int64_t world_size = 1;
  int64_t rank = 0;
  uint64_t seed = 0;
  at::ScalarType coeff_dtype = at::kFloat;
  int64_t raw_element_size = 4;  // bytes per raw value on the wire (raw_dtype)
  FitSamples fit_on = FitSamples::kAllSlices;
  bool error_feedback = false;
  std::mutex* samples_mutex = nullptr;  // guards layers' samples and stats
};

struct BucketPlan {
  at::Tensor buffer;
  std::vector<Entry> entries;
  int64_t iter = 0;
  bool in_place = false;  // plain all-reduce of `buffer` itself
  // The raw all-reduce [raw values | coefficients of the same dtype], in the raw dtype (raw_dtype of the
  // bucket and uncompressed_dtype); also the control values when they share that dtype.
  at::Tensor packed;
  // [float32 coefficients | verification code | vote] in control_dtype (exact integer sums): a view of
  // `packed` when that is the raw dtype, else its own float32 all-reduce.
  at::Tensor control;
  at::Tensor coeffs;  // coefficients: a view of `packed` or `control`, or their own tensor of coeff_dtype
  bool coeffs_own_all_reduce = false;  // `coeffs` is its own tensor (a third dtype) and all-reduced alone
  std::unique_ptr<GatherPipeline> sampling;  // sampled QSGD layers' messages
  std::vector<at::Tensor> sampled_sums;      // their decoded sums over ranks, once gathered
  std::optional<VerificationCode> verify;
  int64_t verify_offset = -1;
  bool vote = false;
  int64_t vote_offset = -1;
  bool is_last = false;
  bool whole_bucket = true;  // false: one of several pipelining groups of a bucket
  bool first_group = true;
  Clock::time_point start;
  CollectiveBytes bytes;
  std::shared_ptr<GradiVeQAggregator> owner;  // keeps the engine alive until the callback runs
};

/// Segment lengths of a plan, filled in as entries reserve their space.
struct Segments {
  int64_t raw = 0;
  int64_t coeff = 0;
};

/// Everything one route does.
struct Route {
  const char* phase;  // LayerStats::phase
  /// Reserves the entry's space in the plan's segments (sets its offsets).
  void (*reserve)(Entry& e, Segments& segments);
  /// Writes this rank's values of the entry into the plan.
  void (*pack)(Entry& e, BucketPlan& plan, const PlanContext& ctx);
  /// Writes the average over ranks back into the entry's gradient (sampled routes also keep the sample).
  void (*unpack)(Entry& e, BucketPlan& plan, const PlanContext& ctx);
  /// Updates the layer's stats after the step (caller holds the samples mutex).
  void (*record)(const Entry& e, const PlanContext& ctx, LayerStats& stats, StepRecorder& steps);
};

const Route& route_of(Mode mode);

/// Whether the plan's compressed entries go through the CUDA kernels, all in one launch (a CUDA bucket with
/// the kernels switched on); pack_plan and finish_plan then skip those entries' own pack and unpack.
bool groups_on_cuda(const BucketPlan& plan);
/// The compressed route's pack / unpack for all compressed entries of the plan at once.
void pack_compressed_grouped(BucketPlan& plan, const PlanContext& ctx);
void unpack_compressed_grouped(BucketPlan& plan, const PlanContext& ctx);

/// Cuts a bucket's entries into up to `pipeline_chunks` groups of about equal compressed size, in bucket
/// order; only non-empty groups are returned.
std::vector<std::vector<Entry>> split_into_groups(std::vector<Entry> entries, int64_t pipeline_chunks);

}  // namespace gradiveq::detail
