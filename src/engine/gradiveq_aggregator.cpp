#include "gradiveq/gradiveq_aggregator.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <unordered_set>
#include <utility>

#include "engine/adaptive_window.h"
#include "engine/basis_sync.h"
#include "engine/bucket_plan.h"
#include "engine/collectives.h"
#include "engine/engine_layer.h"
#include "engine/engine_state.h"
#include "engine/step_recorder.h"
#include "gradiveq/errors.h"

namespace gradiveq {

using detail::BucketPlan;
using detail::Clock;
using detail::EngineLayer;
using detail::Entry;
using detail::Mode;
using detail::ms_since;
using detail::route_of;

// --- options -----------------------------------------------------------------------------------------------

namespace {

bool lossless_fit(const GradiVeQOptions& o) {
  return o.fit.energy == 1.0 && o.fit.max_components == 0 && o.fit.target_ratio == 0.0 &&
         o.fit.min_ratio == 0.0 && o.error_budget == 0.0;
}

// Why the error-feedback memory would stay empty or never be sent under `o`, or nullptr when it can work:
// what kAuto turns off and kOn refuses.
const char* why_error_feedback_does_nothing(const GradiVeQOptions& o) {
  if (o.schedule.compress_iters == 0) {
    return "does nothing with compress_iters = 0 (nothing is ever compressed, so nothing is lost)";
  }
  if (o.refit_threshold >= 1.0) {
    return "cannot work with refit_threshold = 1 (the first basis is kept for good, so the residual, "
           "orthogonal to it, would never be sent); lower refit_threshold";
  }
  if (lossless_fit(o)) {
    return "does nothing with energy = 1 and no cap on d (min_ratio, target_ratio, max_components all 0): "
           "the basis keeps every direction, nothing is lost";
  }
  return nullptr;
}

}  // namespace

void GradiVeQOptions::validate() const {
  constexpr const char* kWhere = "AggregatorOptions";
  fit.validate(kWhere);
  GVQ_CHECK_ARG(restart_error_growth == 0.0 || restart_error_growth > 1.0, kWhere, "restart_error_growth",
                "must be > 1 or 0 (off), got ", restart_error_growth);
  Schedule{schedule};  // validates the schedule
  GVQ_CHECK_ARG(detail::is_float_like(coeff_dtype), kWhere, "coeff_dtype",
                "must be float32, float16 or bfloat16, got ", coeff_dtype);
  GVQ_CHECK_ARG(detail::is_float_like(basis_dtype), kWhere, "basis_dtype",
                "must be float32, float16 or bfloat16, got ", basis_dtype);
  GVQ_CHECK_ARG(detail::is_float_like(uncompressed_dtype), kWhere, "uncompressed_dtype",
                "must be float32, float16 or bfloat16, got ", uncompressed_dtype);
  GVQ_CHECK_ARG(policy.min_numel >= 0, kWhere, "min_numel", "must be >= 0, got ", policy.min_numel);
  GVQ_CHECK_ARG(pipeline_chunks >= 1, kWhere, "pipeline_chunks", "must be >= 1, got ", pipeline_chunks);
  GVQ_CHECK_ARG(error_budget == 0.0 || (error_budget > 0.0 && error_budget < 1.0), kWhere, "error_budget",
                "must lie in (0, 1), or be 0 (off), got ", error_budget);
  GVQ_CHECK_ARG(refit_threshold >= 0.0 && refit_threshold <= 1.0, kWhere, "refit_threshold",
                "must lie in [0, 1], got ", refit_threshold);
  GVQ_CHECK_ARG(fit_delay_iters >= 0, kWhere, "fit_delay_iters", "must be >= 0, got ", fit_delay_iters);
  GVQ_CHECK_ARG(fit_delay_iters == 0 || fit_delay_iters < schedule.compress_iters, kWhere, "fit_delay_iters",
                "must be smaller than compress_iters (", schedule.compress_iters, ") so that the bases are ",
                "installed within the compressed window, got ", fit_delay_iters);
  // Replicated fits need the same samples on every rank, and the check that would catch a rank whose fit
  // differs.
  GVQ_CHECK_ARG(basis_sync != BasisSync::kReplicated || sample_source == SampleSource::kAggregated, kWhere,
                "basis_sync",
                "= replicated needs sample_source = aggregated: local samples differ from rank to "
                "rank, so only their fitting rank can fit them (use basis_sync = broadcast)");
  GVQ_CHECK_ARG(
      basis_sync != BasisSync::kReplicated || verify_bases, kWhere, "basis_sync",
      "= replicated needs verify_bases: it is what makes every rank raise should one rank's fit ever "
      "differ (use basis_sync = broadcast to turn verification off)");
  const char* why_not = why_error_feedback_does_nothing(*this);
  GVQ_CHECK_ARG(error_feedback != ErrorFeedback::kOn || why_not == nullptr, kWhere, "error_feedback", "= on ",
                why_not, "; use auto or off");
}

bool GradiVeQOptions::effective_error_feedback() const {
  if (error_feedback != ErrorFeedback::kAuto) return error_feedback == ErrorFeedback::kOn;
  // The adaptive window's error (eq. 7) would measure the growing memory as drift and restart for it.
  return why_error_feedback_does_nothing(*this) == nullptr && restart_error_growth == 0.0;
}

bool GradiVeQOptions::state_is_per_rank() const {
  return effective_error_feedback() || sample_source == SampleSource::kLocal;
}

BasisSync GradiVeQOptions::effective_basis_sync() const {
  if (basis_sync != BasisSync::kAuto) return basis_sync;
  return sample_source == SampleSource::kAggregated && verify_bases ? BasisSync::kReplicated
                                                                    : BasisSync::kBroadcast;
}

GradiVeQOptions GradiVeQOptions::paper() {
  GradiVeQOptions o;
  o.fit = FitOptions{};
  o.fit.energy = 0.99;
  o.schedule = ScheduleOptions{2500, 100, 400};
  o.sample_quantizer = SampleQuantizer::kQsgd4;
  o.fit_on = FitSamples::kFirstSlice;
  o.slice_layout = SliceLayoutKind::kKernelRow;
  o.restart_error_growth = 0.0;
  o.coeff_dtype = at::kFloat;
  o.uncompressed_dtype = at::kFloat;
  o.basis_sync = BasisSync::kBroadcast;  // one rank fits each layer and broadcasts it
  o.error_feedback = ErrorFeedback::kOff;
  return o;
}

// --- construction ------------------------------------------------------------------------------------------

namespace {

// With local samples the first window is the warm-up's last sample_iters steps (uncompressed anyway), so the
// first basis is ready when the warm-up ends and every later step is compressed.
ScheduleOptions effective_schedule(const GradiVeQOptions& options) {
  ScheduleOptions s = options.schedule;
  if (options.sample_source == SampleSource::kLocal) {
    s.warmup_iters = std::max<int64_t>(0, s.warmup_iters - s.sample_iters);
  }
  return s;
}

}  // namespace

std::shared_ptr<GradiVeQAggregator> GradiVeQAggregator::create(
    c10::intrusive_ptr<c10d::ProcessGroup> process_group, std::vector<NamedParameter> parameters,
    GradiVeQOptions options) {
  return std::shared_ptr<GradiVeQAggregator>(
      new GradiVeQAggregator(std::move(process_group), std::move(parameters), std::move(options)));
}

GradiVeQAggregator::GradiVeQAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                       std::vector<NamedParameter> parameters, GradiVeQOptions options)
    : pg_(std::move(process_group)),
      options_(std::move(options)),
      schedule_((options_.validate(), effective_schedule(options_))),
      sampling_codec_(QsgdOptions{7, 512, QsgdNorm::kMax}) {
  constexpr const char* kWhere = "Aggregator";
  GVQ_CHECK_ARG(pg_, kWhere, "process_group", "is null");
  GVQ_CHECK_ARG(!parameters.empty(), kWhere, "parameters", "is empty: nothing to aggregate");
  rank_ = pg_->getRank();
  world_size_ = pg_->getSize();
  std::unordered_set<std::string> names;
  int64_t fittable = 0;
  const at::Device device = parameters.front().tensor.device();
  for (auto& p : parameters) {
    GVQ_CHECK_ARG(p.tensor.defined(), kWhere, "parameters", "holds an undefined tensor named '", p.name, "'");
    GVQ_CHECK_ARG(names.insert(p.name).second, kWhere, "parameters", "holds the name '", p.name, "' twice");
    GVQ_CHECK_ARG(p.tensor.device() == device, kWhere, "parameters", "are on mixed devices: '",
                  parameters.front().name, "' on ", device, ", '", p.name, "' on ", p.tensor.device());
    auto layer = std::make_unique<EngineLayer>(detail::make_layer(p, int64_t(layers_.size()), options_));
    if (layer->compressible) layer->fit_owner = detail::fitting_rank(fittable++, world_size_);
    by_impl_[p.tensor.unsafeGetTensorImpl()] = layer.get();
    layers_.push_back(std::move(layer));
  }
  configuration_code_ = detail::configuration_code(layers_, options_);
  for (const auto& w : detail::configuration_warnings(layers_, options_)) {
    warning_ += (warning_.empty() ? "" : "; ") + w;
  }
  window_ = std::make_unique<detail::AdaptiveWindow>(options_.restart_error_growth);
  steps_ = std::make_unique<detail::StepRecorder>();
}

GradiVeQAggregator::~GradiVeQAggregator() = default;

Phase GradiVeQAggregator::phase() const { return phase_at(iteration_); }

Phase GradiVeQAggregator::phase_at(int64_t iter) const { return window_->phase_at(schedule_, iter); }

int64_t GradiVeQAggregator::window_restarts() const { return window_->restarts(); }

EngineLayer* GradiVeQAggregator::find_layer(const at::Tensor& parameter) {
  auto it = by_impl_.find(parameter.unsafeGetTensorImpl());
  return it == by_impl_.end() ? nullptr : it->second;
}

detail::PlanContext GradiVeQAggregator::plan_context(const BucketPlan& plan) {
  return {world_size_,
          rank_,
          options_.seed,
          options_.coeff_dtype,
          int64_t(c10::elementSize(detail::raw_dtype(plan.buffer, options_.uncompressed_dtype))),
          options_.fit_on,
          options_.effective_error_feedback(),
          &stats_mutex_};
}

// --- one step ----------------------------------------------------------------------------------------------

void GradiVeQAggregator::check_pending_verification() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  if (unchecked_) unchecked_->check(rank_);  // a failed check stays pending: every later step raises too
}

void GradiVeQAggregator::begin_iteration() {
  check_pending_verification();
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    unchecked_.reset();
    for (auto& l : layers_) l->settle_samples(/*wait=*/false);  // keeps few samples in pinned memory
  }
  window_->begin_step(schedule_, iteration_);
  steps_->begin(iteration_, phase_name(phase_at(iteration_)),
                detail::samples_as_qsgd(options_.sample_quantizer, options_.sample_source)
                    ? "all-gather of 4-bit QSGD (not summable)"
                    : "all-reduce (uncompressed)");
  steps_->set_window_restarts(window_->restarts());
  if (!warning_.empty()) steps_->set_warning(warning_);
  if (pending_fit_) start_window_fits();
  // A deferred fit lands at its step, or before a new window samples (an adaptive-window restart), so that a
  // window's samples never mix with the next one's.
  if (deferred_fit_ &&
      (iteration_ >= deferred_fit_->install_at() || phase_at(iteration_) != Phase::kCompressed)) {
    install_deferred_fit();
  }
}

void GradiVeQAggregator::start_window_fits() {
  pending_fit_ = false;
  const int64_t restored_install_at = std::exchange(restored_install_at_, -1);
  if (options_.schedule.compress_iters > 0 && options_.fit_delay_iters > 0) {
    start_deferred_fit(restored_install_at >= 0 ? restored_install_at
                                                : iteration_ + options_.fit_delay_iters);
  } else if (options_.schedule.compress_iters > 0) {
    refit_and_broadcast();
  } else {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    for (auto& l : layers_) {
      l->settle_samples();  // counts the window's non-finite samples
      l->clear_samples();
    }
  }
}

void GradiVeQAggregator::refit_and_broadcast() {
  const auto start = Clock::now();
  settle_samples();
  const int64_t broadcast = detail::fit_and_broadcast(*pg_, layers_, options_, stats_mutex_);
  steps_->add_fit(ms_since(start), broadcast);
  update_bases_checksum();
}

void GradiVeQAggregator::start_deferred_fit(int64_t install_at) {
  if (deferred_fit_) install_deferred_fit();  // not reached by the schedule; keeps windows apart regardless
  settle_samples();
  detail::FitWindow window;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    window = detail::snapshot_window(layers_);  // the layers keep their samples until the install
  }
  deferred_fit_ = std::make_unique<detail::DeferredFit>(std::move(window), options_, rank_, install_at);
}

void GradiVeQAggregator::install_deferred_fit() {
  const auto start = Clock::now();
  std::unique_ptr<detail::DeferredFit> fit = std::move(deferred_fit_);
  const detail::FitResults results = fit->wait();
  const int64_t broadcast = detail::share_and_install(*pg_, layers_, results, options_, stats_mutex_);
  steps_->add_fit(ms_since(start), broadcast);
  steps_->add_background_fit(fit->worker_ms());
  window_->reset_baseline();
  update_bases_checksum();
}

c10::intrusive_ptr<c10::ivalue::Future> GradiVeQAggregator::aggregate_bucket(
    const at::Tensor& buffer, const std::vector<at::Tensor>& gradients,
    const std::vector<at::Tensor>& parameters, int64_t index, bool is_last) {
  constexpr const char* kWhere = "Aggregator.aggregate_bucket";
  GVQ_CHECK_ARG(gradients.size() == parameters.size(), kWhere, "gradients", "has ", gradients.size(),
                " tensors but parameters has ", parameters.size());
  GVQ_CHECK_ARG(index >= 0, kWhere, "index", "must be >= 0, got ", index);
  c10::NoGradGuard no_grad;
  const auto start = Clock::now();
  if (index == 0) begin_iteration();
  std::vector<std::shared_ptr<BucketPlan>> plans = plan_bucket(buffer, gradients, parameters, index, is_last);
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  for (auto& plan : plans) {
    plan->start = start;
    futures.push_back(issue_plan(plan));
  }
  if (is_last) {
    if (schedule_.fits_after(iteration_ - window_->shift())) pending_fit_ = true;
    ++iteration_;
  }
  if (futures.size() == 1) return futures[0];
  // The bucket is done when all its groups are: only then does it count as finished in the step's stats.
  return detail::when_all(futures)->then(
      [buffer, start, owner = std::make_shared<std::shared_ptr<GradiVeQAggregator>>(shared_from_this())](
          c10::ivalue::Future& f) {
        auto self = std::move(*owner);  // let go before returning (see issue_plan)
        f.value();                      // rethrows the first failed group
        self->steps_->finished(0.0, start, /*bucket_done=*/true);
        return c10::IValue(buffer);
      },
      c10::TensorType::get());
}

// Pipelining: the compressed layers are cut into up to pipeline_chunks groups, each with its own all-reduce
// issued as soon as it is packed, so that compressing group i + 1 overlaps the transfer of group i, and
// decompressing group i (in its callback) overlaps the transfer of group i + 1.
std::vector<std::shared_ptr<BucketPlan>> GradiVeQAggregator::plan_bucket(
    const at::Tensor& buffer, const std::vector<at::Tensor>& gradients,
    const std::vector<at::Tensor>& parameters, int64_t index, bool is_last) {
  const Phase phase = phase_at(iteration_);
  std::vector<Entry> entries;
  for (size_t i = 0; i < parameters.size(); ++i) {
    EngineLayer* layer = find_layer(parameters[i]);
    GVQ_CHECK_ARG(layer != nullptr, "Aggregator.aggregate_bucket", "parameters",
                  "holds a parameter of shape ", parameters[i].sizes(),
                  " that was not registered with this aggregator");
    Entry e;
    e.layer = layer;
    // A compressible layer is viewed in its layout's shape (EngineLayer::layout_shape); the view writes into
    // the bucket alike.
    e.grad = layer->compressible ? gradients[i].view(layer->layout_shape) : gradients[i];
    e.mode = detail::mode_for(*layer, phase, options_.sample_quantizer, options_.sample_source);
    e.local_sample = e.mode == Mode::kCompressed && phase == Phase::kSampling && layer->fit_owner == rank_;
    entries.push_back(std::move(e));
  }
  auto groups = detail::split_into_groups(std::move(entries), options_.pipeline_chunks);
  std::vector<std::shared_ptr<BucketPlan>> plans;
  for (size_t g = 0; g < groups.size(); ++g) {
    auto plan = std::make_shared<BucketPlan>();
    plan->iter = iteration_;
    plan->buffer = buffer;
    plan->entries = std::move(groups[g]);
    plan->is_last = is_last && g + 1 == groups.size();
    plan->whole_bucket = groups.size() == 1;
    plan->first_group = g == 0;
    if (options_.verify_bases && index == 0 && g == 0) {
      plan->verify.emplace(detail::VerificationCode::of_state(iteration_, options_, window_->shift(),
                                                              configuration_code_, bases_checksum_),
                           world_size_, control_dtype(buffer));
    }
    // The adaptive window's vote rides in the step's last all-reduce of every compressed step, after every
    // layer of the step has been compressed.
    plan->vote = window_->enabled() && plan->is_last && phase == Phase::kCompressed;
    plans.push_back(std::move(plan));
  }
  return plans;
}

// The dtype of a plan's control values (verification code, restart vote): the raw values' when they are half
// precision, the coefficients are not float32 and that dtype sums them exactly, so that they ride in the raw
// all-reduce; else float32.
at::ScalarType GradiVeQAggregator::control_dtype(const at::Tensor& buffer) const {
  const at::ScalarType raw = detail::raw_dtype(buffer, options_.uncompressed_dtype);
  if (raw == at::kFloat || options_.coeff_dtype == at::kFloat) return at::kFloat;
  return detail::VerificationCode::fits(world_size_, raw) ? raw : at::kFloat;
}

// Lays out the raw all-reduce [raw values | coefficients of its dtype] and the control values [float32
// coefficients if the raw values are not float32 | verification code | vote] (one tensor when they share the
// raw values' dtype, two otherwise; coefficients of a third dtype get a tensor of their own), packs every
// entry into them (the sampled QSGD layers into the gather pipeline), then writes the verification code and
// the restart vote.
void GradiVeQAggregator::pack_plan(BucketPlan& plan, const detail::Segments& segments, bool any_qsgd) {
  const at::ScalarType raw = detail::raw_dtype(plan.buffer, options_.uncompressed_dtype);
  const bool coeffs_with_raw = options_.coeff_dtype == raw;
  const bool coeffs_in_control = !coeffs_with_raw && options_.coeff_dtype == at::kFloat;
  const int64_t raw_len = segments.raw + (coeffs_with_raw ? segments.coeff : 0);
  const int64_t verify_len = plan.verify ? plan.verify->length() : 0;
  const int64_t control_len = (coeffs_in_control ? segments.coeff : 0) + verify_len + (plan.vote ? 1 : 0);
  const auto fopts = plan.buffer.options().dtype(at::kFloat);
  int64_t control_base = 0;
  if (control_dtype(plan.buffer) == raw) {
    plan.packed = at::empty({raw_len + control_len}, fopts.dtype(raw));
    plan.control = plan.packed;
    control_base = raw_len;
  } else {
    plan.packed = at::empty({raw_len}, fopts.dtype(raw));
    plan.control = at::empty({control_len}, fopts);
  }
  if (coeffs_with_raw) {
    plan.coeffs = plan.packed.narrow(0, segments.raw, segments.coeff);
  } else if (coeffs_in_control) {
    plan.coeffs = plan.control.narrow(0, control_base, segments.coeff);
  } else {
    plan.coeffs = at::empty({segments.coeff}, fopts.dtype(options_.coeff_dtype));
    plan.coeffs_own_all_reduce = segments.coeff > 0;
  }
  plan.verify_offset = control_base + (coeffs_in_control ? segments.coeff : 0);
  plan.vote_offset = plan.verify_offset + verify_len;
  if (any_qsgd) plan.sampling = std::make_unique<detail::GatherPipeline>(sampling_codec_);
  const detail::PlanContext ctx = plan_context(plan);
  const bool grouped = detail::groups_on_cuda(plan);
  if (grouped) detail::pack_compressed_grouped(plan, ctx);
  for (auto& e : plan.entries) {
    if (!(grouped && e.mode == Mode::kCompressed)) route_of(e.mode).pack(e, plan, ctx);
    if (window_->enabled() && e.residual_sq.defined()) window_->add_terms(e.residual_sq, e.signal_sq);
  }
  if (plan.verify) plan.verify->write(plan.control.narrow(0, plan.verify_offset, verify_len));
  if (plan.vote) {
    window_->write_vote(plan.control.narrow(0, plan.vote_offset, 1),
                        window_->first_compressed_at(schedule_, plan.iter));
  }
}

c10::intrusive_ptr<c10::ivalue::Future> GradiVeQAggregator::issue_plan(
    const std::shared_ptr<BucketPlan>& plan) {
  // This plan's own packing time (plan->start is the bucket's hand-over, shared by its pipelining groups).
  const auto issue_start = plan->first_group ? plan->start : Clock::now();
  detail::Segments segments;
  bool all_raw = true, any_qsgd = false;
  for (auto& e : plan->entries) {
    route_of(e.mode).reserve(e, segments);
    all_raw &= e.mode == Mode::kRaw;
    any_qsgd |= e.mode == Mode::kSampledQsgd;
  }
  const at::Tensor& buffer = plan->buffer;
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  const auto all_reduce = [&](const at::Tensor& t) {
    futures.push_back(detail::issue_all_reduce(*pg_, t, plan->bytes));
  };
  const bool converts = detail::raw_dtype(buffer, options_.uncompressed_dtype) != buffer.scalar_type();
  if (all_raw && plan->whole_bucket && !plan->verify && !plan->vote && !converts) {
    // Nothing to compress: the bucket itself is all-reduced in place, exactly like DDP's default.
    plan->in_place = true;
    all_reduce(buffer);
  } else {
    pack_plan(*plan, segments, any_qsgd);
    if (plan->packed.numel() > 0) all_reduce(plan->packed);
    if (!plan->control.is_same(plan->packed) && plan->control.numel() > 0) all_reduce(plan->control);
    if (plan->coeffs_own_all_reduce) all_reduce(plan->coeffs);
    if (plan->sampling) futures.push_back(plan->sampling->issue(*pg_, buffer.device(), plan->bytes));
  }
  int64_t uncompressed = 0;
  for (const auto& e : plan->entries) uncompressed += e.grad.numel() * int64_t(e.grad.element_size());
  steps_->issued(plan->bytes.collectives, plan->bytes.payload, plan->bytes.wire, uncompressed,
                 plan->in_place ? 0.0 : ms_since(issue_start), plan->is_last,
                 /*new_bucket=*/plan->first_group);

  // The callback keeps the engine alive while it runs and lets go of it before it returns: were the closure
  // to hold the last reference when the communication thread destroys it, ~ProcessGroupGloo would join that
  // very thread. (Whoever owns the engine waits for the future, which completes only after the body.)
  plan->owner = shared_from_this();
  return detail::when_all(futures)->then(
      [plan](c10::ivalue::Future& f) {
        auto release = std::move(plan->owner);
        f.value();  // rethrows a failed collective
        c10::NoGradGuard no_grad;
        release->finish_plan(*plan);
        return c10::IValue(plan->buffer);
      },
      c10::TensorType::get());
}

void GradiVeQAggregator::finish_plan(BucketPlan& plan) {
  const auto start = Clock::now();
  const detail::PlanContext ctx = plan_context(plan);
  if (plan.in_place) {
    plan.buffer.mul_(1.0 / double(world_size_));
  } else {
    if (plan.verify) {
      const at::Tensor sums = plan.control.narrow(0, plan.verify_offset, plan.verify->length());
      // CPU sums are checked here, in the step that disagreed; device sums always at the next step's start
      // (or save_state), whether or not they have arrived yet, so that every rank raises at the same point.
      if (sums.is_cpu()) {
        plan.verify->check(sums, plan.iter, rank_);
      } else {
        std::lock_guard<std::mutex> lock(stats_mutex_);
        unchecked_ = std::make_unique<detail::PendingVerification>(
            detail::PendingVerification{*plan.verify, detail::HostReadback(sums), plan.iter});
      }
    }
    if (plan.vote) window_->receive_vote(plan.control.narrow(0, plan.vote_offset, 1));
    if (plan.sampling) plan.sampled_sums = plan.sampling->decoded_sums();
    const bool grouped = detail::groups_on_cuda(plan);
    if (grouped) detail::unpack_compressed_grouped(plan, ctx);
    for (auto& e : plan.entries) {
      if (!(grouped && e.mode == Mode::kCompressed)) route_of(e.mode).unpack(e, plan, ctx);
    }
  }
  const double decompress_ms = ms_since(start);
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    for (const auto& e : plan.entries) {
      const detail::Route& route = route_of(e.mode);
      e.layer->stats.phase = route.phase;
      route.record(e, ctx, e.layer->stats, *steps_);
    }
  }
  steps_->finished(plan.in_place ? 0.0 : decompress_ms, plan.start, /*bucket_done=*/plan.whole_bucket);
}

// --- introspection and state -------------------------------------------------------------------------------

void GradiVeQAggregator::settle_samples() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  for (const auto& l : layers_) l->settle_samples();
}

std::vector<LayerStats> GradiVeQAggregator::layer_stats() const {
  settle_samples();
  std::lock_guard<std::mutex> lock(stats_mutex_);
  std::vector<LayerStats> out;
  for (const auto& l : layers_) {
    LayerStats st = l->stats;
    const auto& [residual_sq, signal_sq] = l->last_error_terms;
    if (residual_sq.defined()) {
      st.relative_error = detail::relative_error_of(residual_sq.item<double>(), signal_sq.item<double>());
    }
    st.window_samples = l->sample_rows();
    if (l->pca.is_fitted()) {
      st.num_components = l->pca.num_components();
      st.compression_ratio = l->pca.compression_ratio();
      st.explained_variance = l->pca.explained_variance();
      st.basis_checksum = l->checksum;
      st.basis_bytes = l->pca.basis().nbytes() + l->pca.mean().nbytes();
    }
    out.push_back(std::move(st));
  }
  return out;
}

StepStats GradiVeQAggregator::step_stats() const { return steps_->last(); }

at::Tensor GradiVeQAggregator::save_state() const {
  check_pending_verification();  // a state the ranks disagree on is not saved
  settle_samples();
  std::lock_guard<std::mutex> lock(stats_mutex_);
  // The last step's restart vote has completed by the time a step boundary is saved.
  // A fit in flight is saved as its window (the layers keep their samples until the install) and its install
  // step: a loaded state fits the same samples again and installs them at the same step.
  detail::EngineCounters counters{world_size_,      iteration_,          pending_fit_ || deferred_fit_,
                                  window_->shift(), window_->restarts(), window_->pending_vote()};
  counters.fit_install_at = deferred_fit_ ? deferred_fit_->install_at() : restored_install_at_;
  counters.rank = rank_;
  counters.per_rank = options_.state_is_per_rank();
  return detail::write_state_image(counters, layers_);
}

void GradiVeQAggregator::load_state(const at::Tensor& image) {
  detail::LoadedState loaded =
      detail::read_state_image(image, rank_, world_size_, layers_, options_.basis_dtype);
  // Everything parsed and checked: commit (a fit in flight is dropped: the image has its own window, if any).
  deferred_fit_.reset();
  std::lock_guard<std::mutex> lock(stats_mutex_);
  const auto& c = loaded.counters;
  iteration_ = c.iteration;
  pending_fit_ = c.pending_fit;
  restored_install_at_ = c.fit_install_at;
  window_->restore(c.schedule_shift, c.window_restarts, c.pending_vote);
  unchecked_.reset();  // the loaded state is checked from the next step on
  for (size_t i = 0; i < layers_.size(); ++i) {
    EngineLayer& l = *layers_[i];
    if (!l.compressible) continue;
    detail::LoadedLayer& in = loaded.layers[i];
    l.pca = in.pca.is_fitted() ? in.pca.to(l.device) : PcaCompressor();
    l.checksum = in.checksum;
    l.settle_samples();  // counts the replaced window's non-finite samples
    l.clear_samples();
    l.samples = std::move(in.samples);
    l.error.restore(std::move(in.error), l.pca, l.device);
    l.stats.fits = in.fits;
    l.stats.fit_status = l.pca.is_fitted() ? "loaded" : "";
  }
  update_bases_checksum();
}

EngineLayer& GradiVeQAggregator::layer_named(const std::string& name, const char* where) const {
  auto it = std::find_if(layers_.begin(), layers_.end(), [&](const auto& l) { return l->name == name; });
  GVQ_CHECK_ARG(it != layers_.end(), where, "name", "'", name, "' is not a parameter of this aggregator");
  return **it;
}

PcaCompressor GradiVeQAggregator::basis(const std::string& name) const {
  const EngineLayer& l = layer_named(name, "Aggregator.basis");
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return l.pca;
}

at::Tensor GradiVeQAggregator::error_memory(const std::string& name) const {
  const EngineLayer& l = layer_named(name, "Aggregator.error_memory");
  std::lock_guard<std::mutex> lock(stats_mutex_);
  if (!l.compressible) return at::zeros(l.shape, at::TensorOptions().device(l.device));
  at::Tensor flat = at::zeros({l.numel}, at::TensorOptions().device(l.device));
  if (!l.error.empty()) l.layout.slices(flat).copy_(l.error.dense());
  at::Tensor out = at::empty(l.layout_shape, flat.options());
  l.layout.from_paper_order_into(flat, out);
  return out.view(l.shape);
}

void GradiVeQAggregator::set_basis(const std::string& name, const PcaCompressor& pca) {
  constexpr const char* kWhere = "Aggregator.set_basis";
  EngineLayer& l = layer_named(name, kWhere);
  GVQ_CHECK_ARG(l.compressible, kWhere, "name", "'", name, "' is not a compressible layer");
  GVQ_CHECK_ARG(pca.is_fitted() && pca.slice_len() == l.layout.slice_len, kWhere, "pca",
                "must be fitted with K = ", l.layout.slice_len, " for '", name,
                "', got K = ", pca.slice_len());
  std::lock_guard<std::mutex> lock(stats_mutex_);
  l.pca = pca.to(l.device);
  l.checksum = l.pca.checksum();
  update_bases_checksum();
}

void GradiVeQAggregator::update_bases_checksum() { bases_checksum_ = detail::bases_checksum(layers_); }

}  // namespace gradiveq
