#include "gradiveq/aggregator.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <unordered_set>

#include "byte_io.h"
#include "collectives.h"
#include "hash_mix.h"
#include "step_recorder.h"
#include "gradiveq/errors.h"

namespace gradiveq {

namespace {

using detail::Clock;
using detail::ms_since;

// Glob match: '*' any run of characters (also none), '?' exactly one.
bool glob_match(const char* pattern, const char* text) {
  const char* star = nullptr;
  const char* resume = nullptr;
  while (*text) {
    if (*pattern == '?' || *pattern == *text) {
      ++pattern;
      ++text;
    } else if (*pattern == '*') {
      star = pattern++;
      resume = text;
    } else if (star) {
      pattern = star + 1;
      text = ++resume;
    } else {
      return false;
    }
  }
  while (*pattern == '*') ++pattern;
  return *pattern == '\0';
}

bool any_match(const std::vector<std::string>& patterns, const std::string& name) {
  return std::any_of(patterns.begin(), patterns.end(),
                     [&](const std::string& p) { return glob_match(p.c_str(), name.c_str()); });
}

using detail::mix;

uint64_t hash_string(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

uint64_t double_bits(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

bool is_float_like(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

constexpr char kStateMagic[4] = {'G', 'V', 'Q', 'S'};
// Version 2 added the adaptive window's schedule shift, restart count and pending vote; version 3 a trailing
// checksum of the whole image, so a damaged file is refused instead of loading wrong samples or bases; version 4
// a stronger checksum (version 3's missed pairs of flipped top bits).
constexpr uint32_t kStateVersion = 4;
constexpr size_t kStateChecksumBytes = 8;

}  // namespace

void AggregatorOptions::validate() const {
  constexpr const char* kWhere = "AggregatorOptions";
  GVQ_CHECK_ARG(fit.energy > 0.0 && fit.energy <= 1.0, kWhere, "energy", "must lie in (0, 1], got ", fit.energy);
  GVQ_CHECK_ARG(fit.max_components >= 0, kWhere, "max_components", "must be >= 0 (0 = no cap), got ",
                fit.max_components);
  GVQ_CHECK_ARG(fit.target_ratio == 0.0 || fit.target_ratio >= 1.0, kWhere, "target_ratio",
                "must be >= 1 or 0 (off), got ", fit.target_ratio);
  GVQ_CHECK_ARG(fit.min_ratio == 0.0 || fit.min_ratio >= 1.0, kWhere, "min_ratio", "must be >= 1 or 0 (off), got ",
                fit.min_ratio);
  GVQ_CHECK_ARG(fit.energy < 1.0 || (fit.min_ratio == 0.0 && fit.target_ratio == 0.0), kWhere, "energy",
                "is 1.0 (keep all K components: lossless) but min_ratio = ", fit.min_ratio, " and target_ratio = ",
                fit.target_ratio, " limit d; set both to 0 (and coeff_dtype to float32) for a lossless run");
  GVQ_CHECK_ARG(restart_error_growth == 0.0 || restart_error_growth > 1.0, kWhere, "restart_error_growth",
                "must be > 1 or 0 (off), got ", restart_error_growth);
  Schedule{schedule};  // validates the schedule
  GVQ_CHECK_ARG(is_float_like(coeff_dtype), kWhere, "coeff_dtype", "must be float32, float16 or bfloat16, got ",
                coeff_dtype);
  GVQ_CHECK_ARG(is_float_like(basis_dtype), kWhere, "basis_dtype", "must be float32, float16 or bfloat16, got ",
                basis_dtype);
  GVQ_CHECK_ARG(policy.min_numel >= 0, kWhere, "min_numel", "must be >= 0, got ", policy.min_numel);
  GVQ_CHECK_ARG(pipeline_chunks >= 1, kWhere, "pipeline_chunks", "must be >= 1, got ", pipeline_chunks);
}

AggregatorOptions AggregatorOptions::paper() {
  AggregatorOptions o;
  o.fit = FitOptions{};
  o.fit.energy = 0.99;
  o.schedule = ScheduleOptions{2500, 100, 400};
  o.sample_quantizer = SampleQuantizer::kQsgd4;
  o.fit_on = FitSamples::kFirstSlice;
  o.slice_layout = SliceLayoutKind::kKernelRow;
  o.restart_error_growth = 0.0;
  o.coeff_dtype = at::kFloat;
  return o;
}

// One parameter the aggregator knows, with its compressor and sampling window.
struct Aggregator::Layer {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  bool compressible = false;
  ConvSliceLayout layout;
  at::Device device{at::kCPU};
  PcaCompressor pca;
  uint64_t checksum = 0;            // of pca's serialized image
  std::vector<at::Tensor> samples;  // aggregated slices of the current window, (rows, K) float32 CPU each
  LayerStats stats;

  int64_t sample_rows() const {
    int64_t rows = 0;
    for (const auto& s : samples) rows += s.size(0);
    return rows;
  }
};

// How one parameter of a bucket travels in this step.
enum class Mode { kRaw, kCompressed, kSampledRaw, kSampledQsgd };

struct Aggregator::Entry {
  Layer* layer = nullptr;
  Mode mode = Mode::kRaw;
  at::Tensor grad;  // view into the bucket buffer, parameter-shaped
  int64_t raw_offset = 0, raw_len = 0;      // in the float32 packed tensor (paper order for sampled layers)
  int64_t coeff_offset = 0, coeff_len = 0;  // in the coefficient segment
  int64_t q_offset = 0, q_len = 0;          // in the QSGD byte payload
  at::Tensor residual_sq, signal_sq;        // eq. 7 local loss terms (0-dim), compressed entries only
};

struct Aggregator::BucketPlan {
  at::Tensor buffer;
  std::vector<Entry> entries;
  int64_t iter = 0;
  Phase phase = Phase::kWarmup;
  bool in_place = false;       // plain all-reduce of `buffer` itself
  at::Tensor packed;           // float32 [raw values | coefficients if float32 | verification values]
  at::Tensor coeffs;           // coefficient segment: a view of `packed`, or its own tensor of coeff_dtype
  at::Tensor qsgd;             // this rank's QSGD payload (uint8)
  std::vector<at::Tensor> gathered;  // every rank's QSGD payload after the all-gather
  int64_t verify_offset = -1, verify_len = 0, verify_bits = 16;
  uint64_t verify_code = 0;
  bool is_last = false;
  bool whole_bucket = true;  // false: one of several pipelining groups of a bucket
  bool first_group = true;
  Clock::time_point start;
  std::shared_ptr<Aggregator> owner;  // keeps the aggregator alive until the callback runs
};

std::shared_ptr<Aggregator> Aggregator::create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                               std::vector<NamedParameter> parameters, AggregatorOptions options) {
  return std::shared_ptr<Aggregator>(new Aggregator(std::move(process_group), std::move(parameters),
                                                    std::move(options)));
}

Aggregator::Aggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                       std::vector<NamedParameter> parameters, AggregatorOptions options)
    : pg_(std::move(process_group)),
      options_(std::move(options)),
      schedule_((options_.validate(), options_.schedule)),
      qsgd_(QsgdOptions{7, 512, QsgdNorm::kMax}) {
  constexpr const char* kWhere = "Aggregator";
  GVQ_CHECK_ARG(pg_, kWhere, "process_group", "is null");
  GVQ_CHECK_ARG(!parameters.empty(), kWhere, "parameters", "is empty: nothing to aggregate");
  rank_ = pg_->getRank();
  world_size_ = pg_->getSize();
  std::unordered_set<std::string> names;
  const at::Device device = parameters.front().tensor.device();
  for (auto& p : parameters) {
    GVQ_CHECK_ARG(p.tensor.defined(), kWhere, "parameters", "holds an undefined tensor named '", p.name, "'");
    GVQ_CHECK_ARG(names.insert(p.name).second, kWhere, "parameters", "holds the name '", p.name, "' twice");
    GVQ_CHECK_ARG(p.tensor.device() == device, kWhere, "parameters", "are on mixed devices: '",
                  parameters.front().name, "' on ", device, ", '", p.name, "' on ", p.tensor.device());
    auto layer = std::make_unique<Layer>();
    layer->name = p.name;
    layer->shape = p.tensor.sizes().vec();
    layer->numel = p.tensor.numel();
    layer->device = device;
    const auto& policy = options_.policy;
    layer->compressible = p.tensor.dim() == 4 && layer->numel >= policy.min_numel &&
                          is_float_like(p.tensor.scalar_type()) &&
                          (policy.include.empty() || any_match(policy.include, p.name)) &&
                          !any_match(policy.exclude, p.name);
    if (layer->compressible) {
      layer->layout = options_.slice_layout == SliceLayoutKind::kKernelRow
                          ? ConvSliceLayout::for_weight(p.tensor.sizes())
                          : ConvSliceLayout::kernel_position(p.tensor.sizes());
    }
    auto& st = layer->stats;
    st.name = p.name;
    st.shape = layer->shape;
    st.compressible = layer->compressible;
    st.bytes_in = layer->numel * 4;
    if (layer->compressible) {
      st.slice_len = layer->layout.slice_len;
      st.num_slices = layer->layout.num_slices();
      st.tail_len = layer->layout.tail_len();
    }
    by_impl_[p.tensor.unsafeGetTensorImpl()] = layer.get();
    layers_.push_back(std::move(layer));
  }
  steps_ = std::make_unique<detail::StepRecorder>();
  bases_checksum_ = 0;
}

Aggregator::~Aggregator() = default;

Aggregator::Layer* Aggregator::find_layer(const at::Tensor& parameter) {
  auto it = by_impl_.find(parameter.unsafeGetTensorImpl());
  return it == by_impl_.end() ? nullptr : it->second;
}

uint64_t Aggregator::verification_code(int64_t iter) const {
  uint64_t h = mix(0x6776715f73746174ull, uint64_t(iter));
  h = mix(h, uint64_t(options_.schedule.warmup_iters));
  h = mix(h, uint64_t(options_.schedule.sample_iters));
  h = mix(h, uint64_t(options_.schedule.compress_iters));
  h = mix(h, double_bits(options_.fit.energy));
  h = mix(h, uint64_t(schedule_shift_));
  return mix(h, bases_checksum_);
}

bool Aggregator::first_compressed_at(int64_t iter) const {
  const auto& o = options_.schedule;
  const int64_t shifted = iter - schedule_shift_;
  return shifted >= o.warmup_iters && (shifted - o.warmup_iters) % schedule_.window_len() == o.sample_iters;
}

void Aggregator::begin_iteration() {
  if (restart_vote_.defined()) {
    // The last step's all-reduced vote: identical on every rank, so every rank restarts at the same iteration.
    const bool restart = restart_vote_.item<float>() > 0.5f;
    restart_vote_ = at::Tensor();
    if (restart && phase_at(iteration_) == Phase::kCompressed) {
      schedule_shift_ = iteration_ - options_.schedule.warmup_iters;  // iteration_ starts a sampling window
      ++window_restarts_;
    }
  }
  step_residual_sq_ = step_signal_sq_ = at::Tensor();
  steps_->begin(iteration_, phase_name(phase_at(iteration_)),
                options_.sample_quantizer == SampleQuantizer::kQsgd4 ? "all-gather of 4-bit QSGD (not summable)"
                                                                      : "all-reduce (uncompressed)");
  steps_->set_window_restarts(window_restarts_);
  if (pending_fit_) {
    pending_fit_ = false;
    if (options_.schedule.compress_iters > 0) {
      refit_and_broadcast();
    } else {
      std::lock_guard<std::mutex> lock(stats_mutex_);
      for (auto& l : layers_) l->samples.clear();
    }
  }
}

void Aggregator::refit_and_broadcast() {
  const auto start = Clock::now();
  std::vector<Layer*> fittable;
  for (auto& l : layers_) {
    if (l->compressible) fittable.push_back(l.get());
  }
  // Layers are fitted round-robin: layer j by rank j % N, which broadcasts the serialized basis.
  std::vector<at::Tensor> images(fittable.size());
  std::vector<std::string> failures(fittable.size());
  for (size_t j = 0; j < fittable.size(); ++j) {
    if (int64_t(j) % world_size_ != rank_) continue;
    Layer* l = fittable[j];
    if (l->sample_rows() < 2) {
      failures[j] = "skipped: fewer than 2 finite samples in the window";
      continue;
    }
    try {
      // Rounded to basis_dtype before the broadcast: every rank then stores exactly the same basis.
      images[j] = PcaCompressor::fit(at::cat(l->samples), options_.fit).with_basis_dtype(options_.basis_dtype).serialize();
    } catch (const InvalidArgument& e) {
      failures[j] = std::string("skipped: ") + e.what();
    }
  }
  const at::TensorOptions comm = at::TensorOptions().device(layers_.front()->device);
  for (int64_t r = 0; r < world_size_; ++r) {
    std::vector<size_t> owned;
    for (size_t j = int64_t(r); j < fittable.size(); j += world_size_) owned.push_back(j);
    if (owned.empty()) continue;
    at::Tensor sizes = at::zeros({int64_t(owned.size())}, at::kLong);
    if (r == rank_) {
      for (size_t i = 0; i < owned.size(); ++i) {
        sizes[i] = images[owned[i]].defined() ? images[owned[i]].numel() : 0;
      }
    }
    c10d::BroadcastOptions opts;
    opts.rootRank = r;
    std::vector<at::Tensor> sizes_vec{sizes.to(comm.dtype(at::kLong))};
    pg_->broadcast(sizes_vec, opts)->wait();
    sizes = sizes_vec[0].to(at::kCPU);
    const int64_t total = sizes.sum().item<int64_t>();
    at::Tensor payload;
    if (total > 0) {
      std::vector<at::Tensor> payload_vec{at::empty({total}, comm.dtype(at::kByte))};
      if (r == rank_) {
        std::vector<at::Tensor> mine;
        for (size_t j : owned) {
          if (images[j].defined()) mine.push_back(images[j]);
        }
        payload_vec[0].copy_(at::cat(mine));
      }
      pg_->broadcast(payload_vec, opts)->wait();
      payload = payload_vec[0].to(at::kCPU);
    }
    int64_t offset = 0;
    std::lock_guard<std::mutex> lock(stats_mutex_);
    for (size_t i = 0; i < owned.size(); ++i) {
      Layer* l = fittable[owned[i]];
      const int64_t n = sizes[i].item<int64_t>();
      if (n == 0) {
        l->stats.fit_status = r == rank_ ? failures[owned[i]] : "skipped on the fitting rank (see its stats)";
        continue;
      }
      at::Tensor image = payload.narrow(0, offset, n).contiguous();
      offset += n;
      PcaCompressor pca = PcaCompressor::deserialize(image);
      GVQ_ASSERT(pca.slice_len() == l->layout.slice_len, "fitted basis has the wrong slice length");
      l->pca = pca.with_basis_dtype(options_.basis_dtype).to(l->device);
      l->checksum = checksum_bytes(image);
      l->stats.fits += 1;
      l->stats.fit_status = "ok";
    }
  }
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    for (auto& l : layers_) l->samples.clear();
  }
  steps_->add_fit_ms(ms_since(start));
  update_bases_checksum();
}

c10::intrusive_ptr<c10::ivalue::Future> Aggregator::aggregate_bucket(const at::Tensor& buffer,
                                                                     const std::vector<at::Tensor>& gradients,
                                                                     const std::vector<at::Tensor>& parameters,
                                                                     int64_t index, bool is_last) {
  constexpr const char* kWhere = "Aggregator.aggregate_bucket";
  GVQ_CHECK_ARG(gradients.size() == parameters.size(), kWhere, "gradients", "has ", gradients.size(),
                " tensors but parameters has ", parameters.size());
  GVQ_CHECK_ARG(index >= 0, kWhere, "index", "must be >= 0, got ", index);
  c10::NoGradGuard no_grad;
  const auto start = Clock::now();
  if (index == 0) begin_iteration();
  const Phase phase = phase_at(iteration_);
  std::vector<Entry> entries;
  int64_t compressed_numel = 0, compressed_layers = 0;
  for (size_t i = 0; i < parameters.size(); ++i) {
    Layer* layer = find_layer(parameters[i]);
    GVQ_CHECK_ARG(layer != nullptr, kWhere, "parameters", "holds a parameter of shape ", parameters[i].sizes(),
                  " that was not registered with this aggregator");
    Entry e;
    e.layer = layer;
    e.grad = gradients[i];
    if (layer->compressible && phase == Phase::kSampling) {
      e.mode = options_.sample_quantizer == SampleQuantizer::kQsgd4 ? Mode::kSampledQsgd : Mode::kSampledRaw;
    } else if (layer->compressible && phase == Phase::kCompressed && layer->pca.is_fitted()) {
      e.mode = Mode::kCompressed;
      compressed_numel += layer->numel;
      ++compressed_layers;
    }
    entries.push_back(std::move(e));
  }
  // Pipelining: the compressed layers are cut into up to pipeline_chunks groups of about equal size, each with
  // its own all-reduce issued as soon as it is packed, so that compressing group i + 1 overlaps the transfer of
  // group i, and decompressing group i (in its callback) overlaps the transfer of group i + 1. Groups keep the
  // bucket's order, so every rank issues the same collectives in the same order.
  const int64_t groups = std::max<int64_t>(1, std::min(options_.pipeline_chunks, compressed_layers));
  std::vector<std::vector<Entry>> chunks(static_cast<size_t>(groups));
  int64_t done = 0;
  for (auto& e : entries) {
    const int64_t g = std::min<int64_t>(groups - 1, done * groups / std::max<int64_t>(compressed_numel, 1));
    if (e.mode == Mode::kCompressed) done += e.layer->numel;
    chunks[size_t(g)].push_back(std::move(e));
  }
  // A layer larger than a group's share leaves the next group empty: only non-empty groups go out.
  chunks.erase(std::remove_if(chunks.begin(), chunks.end(), [](const auto& c) { return c.empty(); }), chunks.end());
  const size_t used = chunks.size();
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  for (size_t g = 0; g < used; ++g) {
    auto plan = std::make_shared<BucketPlan>();
    plan->start = start;
    plan->iter = iteration_;
    plan->phase = phase;
    plan->buffer = buffer;
    plan->entries = std::move(chunks[g]);
    plan->is_last = is_last && g + 1 == used;
    plan->whole_bucket = used == 1;
    plan->first_group = g == 0;
    const bool verify = options_.verify_bases && index == 0 && g == 0;
    // The adaptive window's vote rides in the step's last all-reduce of every compressed step, after every
    // layer of the step has been compressed.
    const bool vote = options_.restart_error_growth > 0.0 && plan->is_last && phase == Phase::kCompressed;
    futures.push_back(issue_plan(plan, verify, vote));
  }
  if (is_last) {
    if (schedule_.fits_after(iteration_ - schedule_shift_)) pending_fit_ = true;
    ++iteration_;
  }
  if (futures.size() == 1) return futures[0];
  // The bucket is done when all its groups are: only then does it count as finished in the step's stats.
  return detail::when_all(futures)->then(
      [buffer, start, owner = std::make_shared<std::shared_ptr<Aggregator>>(shared_from_this())](
          c10::ivalue::Future& f) {
        auto self = std::move(*owner);  // let go before returning (see issue_plan)
        f.value();                      // rethrows the first failed group
        self->steps_->finished(0.0, start, /*bucket_done=*/true);
        return c10::IValue(buffer);
      },
      c10::TensorType::get());
}

c10::intrusive_ptr<c10::ivalue::Future> Aggregator::issue_plan(const std::shared_ptr<BucketPlan>& plan, bool verify,
                                                               bool vote) {
  // This plan's own packing time (plan->start is the bucket's hand-over, shared by its pipelining groups).
  const auto issue_start = plan->first_group ? plan->start : Clock::now();
  int64_t raw_len = 0, coeff_len = 0, q_len = 0;
  bool all_raw = true;
  for (auto& e : plan->entries) {
    Layer* layer = e.layer;
    switch (e.mode) {
      case Mode::kRaw:
      case Mode::kSampledRaw:
        e.raw_offset = raw_len;
        e.raw_len = layer->numel;
        break;
      case Mode::kCompressed:
        e.coeff_offset = coeff_len;
        e.coeff_len = layer->layout.num_slices() * layer->pca.num_components();
        e.raw_offset = raw_len;
        e.raw_len = layer->layout.tail_len();
        break;
      case Mode::kSampledQsgd:
        e.q_offset = q_len;
        e.q_len = qsgd_.packed_bytes(layer->numel);
        break;
    }
    raw_len += e.raw_len;
    coeff_len += e.coeff_len;
    q_len += e.q_len;
    all_raw &= e.mode == Mode::kRaw;
  }
  const at::Tensor& buffer = plan->buffer;
  const int64_t n = world_size_;
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  int64_t payload = 0, wire = 0;

  if (all_raw && plan->whole_bucket && !verify && !vote) {
    // Nothing to compress: the bucket itself is all-reduced in place, exactly like DDP's default.
    plan->in_place = true;
    std::vector<at::Tensor> tensors{buffer};
    futures.push_back(pg_->allreduce(tensors)->getFuture());
    payload += buffer.nbytes();
    wire += detail::ring_allreduce_bytes(buffer.nbytes(), n);
  } else {
    const bool separate_coeffs = options_.coeff_dtype != at::kFloat && coeff_len > 0;
    int64_t packed_len = raw_len + (separate_coeffs ? 0 : coeff_len);
    if (verify) {
      // 64-bit code in chunks small enough that N chunks sum exactly in float32 (< 2^24).
      plan->verify_bits = n <= 256 ? 16 : 8;
      plan->verify_len = 64 / plan->verify_bits;
      plan->verify_offset = packed_len;
      plan->verify_code = verification_code(plan->iter);
      packed_len += plan->verify_len;
    }
    const int64_t vote_offset = packed_len;
    if (vote) packed_len += 1;
    const auto fopts = buffer.options().dtype(at::kFloat);
    plan->packed = at::empty({packed_len}, fopts);
    plan->coeffs = separate_coeffs ? at::empty({coeff_len}, fopts.dtype(options_.coeff_dtype))
                                   : plan->packed.narrow(0, raw_len, coeff_len);
    if (q_len > 0) plan->qsgd = at::empty({q_len}, buffer.options().dtype(at::kByte));

    for (auto& e : plan->entries) {
      Layer* l = e.layer;
      switch (e.mode) {
        case Mode::kRaw:
          plan->packed.narrow(0, e.raw_offset, e.raw_len).view(e.grad.sizes()).copy_(e.grad);
          break;
        case Mode::kSampledRaw: {
          at::Tensor dst = plan->packed.narrow(0, e.raw_offset, e.raw_len);
          l->layout.to_paper_order_into(e.grad, dst);
          break;
        }
        case Mode::kCompressed: {
          at::Tensor flat = l->layout.to_paper_order(e.grad.to(at::kFloat));
          at::Tensor slices = l->layout.slices(flat);
          at::Tensor c = l->pca.compress(slices, n);
          plan->coeffs.narrow(0, e.coeff_offset, e.coeff_len).view(c.sizes()).copy_(c);
          plan->packed.narrow(0, e.raw_offset, e.raw_len).copy_(l->layout.tail(flat));
          // Local loss of eq. 7 without decompressing: U is orthonormal, so with x = g - mu/N,
          // ||x - U U^T x||^2 = ||x||^2 - ||U^T x||^2.
          e.residual_sq = (slices - l->pca.mean() / double(n)).pow(2).sum() - c.pow(2).sum();
          e.signal_sq = slices.pow(2).sum();
          if (options_.restart_error_growth > 0.0) {
            step_residual_sq_ = step_residual_sq_.defined() ? step_residual_sq_ + e.residual_sq : e.residual_sq;
            step_signal_sq_ = step_signal_sq_.defined() ? step_signal_sq_ + e.signal_sq : e.signal_sq;
          }
          break;
        }
        case Mode::kSampledQsgd: {
          at::Tensor flat = l->layout.to_paper_order(e.grad.to(at::kFloat)).to(at::kCPU);
          const uint64_t seed = mix(mix(mix(options_.seed, uint64_t(plan->iter)), uint64_t(rank_)),
                                    hash_string(l->name));
          plan->qsgd.narrow(0, e.q_offset, e.q_len).copy_(qsgd_.encode(flat, seed));
          break;
        }
      }
    }
    if (verify) {
      std::vector<float> chunks(plan->verify_len);
      const uint64_t mask = (uint64_t(1) << plan->verify_bits) - 1;
      for (int64_t j = 0; j < plan->verify_len; ++j) {
        chunks[j] = float((plan->verify_code >> (j * plan->verify_bits)) & mask);
      }
      plan->packed.narrow(0, plan->verify_offset, plan->verify_len)
          .copy_(at::tensor(chunks, at::kFloat));
    }
    if (vote) {
      // Device-side arithmetic: no host synchronisation on the per-step path.
      at::Tensor slot = plan->packed.narrow(0, vote_offset, 1);
      if (!step_residual_sq_.defined()) {
        slot.zero_();  // nothing compressed this step (no basis yet): no opinion
      } else {
        at::Tensor error = (step_residual_sq_.clamp_min(0.0) / step_signal_sq_.clamp_min(1e-30)).sqrt();
        if (first_compressed_at(plan->iter) || !window_error_baseline_.defined()) {
          // A fresh basis: the window's first steps set its scale. One minibatch's E varies by about +-25% on
          // real data, so the baseline is a mean over kBaselineSteps steps.
          window_error_baseline_ = error.detach().clone();
          window_baseline_steps_ = 1;
          slot.zero_();
        } else if (window_baseline_steps_ < kBaselineSteps) {
          window_error_baseline_.add_(error);
          ++window_baseline_steps_;
          slot.zero_();
        } else {
          const double threshold = options_.restart_error_growth / double(window_baseline_steps_);
          slot.copy_((error > window_error_baseline_ * threshold).to(at::kFloat).view({1}));
        }
      }
      restart_vote_ = slot;
    }
    if (packed_len > 0) {
      std::vector<at::Tensor> tensors{plan->packed};
      futures.push_back(pg_->allreduce(tensors)->getFuture());
      payload += plan->packed.nbytes();
      wire += detail::ring_allreduce_bytes(plan->packed.nbytes(), n);
    }
    if (separate_coeffs) {
      std::vector<at::Tensor> tensors{plan->coeffs};
      futures.push_back(pg_->allreduce(tensors)->getFuture());
      payload += plan->coeffs.nbytes();
      wire += detail::ring_allreduce_bytes(plan->coeffs.nbytes(), n);
    }
    if (q_len > 0) {
      for (int64_t r = 0; r < n; ++r) plan->gathered.push_back(at::empty({q_len}, plan->qsgd.options()));
      std::vector<std::vector<at::Tensor>> outputs{plan->gathered};
      std::vector<at::Tensor> inputs{plan->qsgd};
      futures.push_back(pg_->allgather(outputs, inputs)->getFuture());
      plan->gathered = outputs[0];
      payload += q_len;
      wire += (n - 1) * q_len;
    }
  }
  int64_t uncompressed = 0;
  for (const auto& e : plan->entries) uncompressed += e.layer->numel * 4;
  steps_->issued(int64_t(futures.size()), payload, wire, uncompressed, plan->in_place ? 0.0 : ms_since(issue_start),
                 plan->is_last, /*new_bucket=*/plan->first_group);

  c10::intrusive_ptr<c10::ivalue::Future> all = detail::when_all(futures);
  // The callback keeps the aggregator alive while it runs and lets go of it before it returns: were the closure
  // to hold the last reference when the communication thread destroys it, ~ProcessGroupGloo would join that
  // very thread. (Whoever owns the aggregator waits for the future, which completes only after the body.)
  plan->owner = shared_from_this();
  return all->then(
      [plan](c10::ivalue::Future& f) {
        auto release = std::move(plan->owner);
        f.value();  // rethrows a failed collective
        c10::NoGradGuard no_grad;
        release->finish_bucket(*plan, plan->gathered);
        return c10::IValue(plan->buffer);
      },
      c10::TensorType::get());
}

void Aggregator::finish_bucket(BucketPlan& plan, const std::vector<at::Tensor>& gathered) {
  const auto start = Clock::now();
  const int64_t n = world_size_;
  const double inv = 1.0 / double(n);
  if (plan.in_place) {
    plan.buffer.mul_(inv);
  } else {
    if (plan.verify_len > 0) {
      at::Tensor sums = plan.packed.narrow(0, plan.verify_offset, plan.verify_len).to(at::kCPU);
      const uint64_t mask = (uint64_t(1) << plan.verify_bits) - 1;
      for (int64_t j = 0; j < plan.verify_len; ++j) {
        const double own = double((plan.verify_code >> (j * plan.verify_bits)) & mask);
        if (sums[j].item<double>() != own * double(n)) {
          std::ostringstream msg;
          msg << "gradiveq: ranks disagree on GradiVeQ state at iteration " << plan.iter
              << " (verify_bases): the iteration counter, the schedule or the PCA bases differ between ranks "
              << "(this rank " << rank_ << " of " << n << ", state checksum " << std::hex << plan.verify_code
              << "). Typical causes: a checkpoint loaded on some ranks only, or a basis modified on one rank.";
          throw std::runtime_error(msg.str());
        }
      }
    }
    for (auto& e : plan.entries) {
      Layer* l = e.layer;
      switch (e.mode) {
        case Mode::kRaw:
          e.grad.copy_(plan.packed.narrow(0, e.raw_offset, e.raw_len).view(e.grad.sizes())).mul_(inv);
          break;
        case Mode::kCompressed: {
          at::Tensor flat = at::empty({l->numel}, plan.packed.options());
          l->pca.decompress_into(
              plan.coeffs.narrow(0, e.coeff_offset, e.coeff_len).view({l->layout.num_slices(), -1}),
              l->layout.slices(flat));
          l->layout.tail(flat).copy_(plan.packed.narrow(0, e.raw_offset, e.raw_len));
          l->layout.from_paper_order_into(flat.mul_(inv), e.grad);
          break;
        }
        case Mode::kSampledRaw:
        case Mode::kSampledQsgd: {
          at::Tensor sum;
          if (e.mode == Mode::kSampledRaw) {
            sum = plan.packed.narrow(0, e.raw_offset, e.raw_len);
          } else {
            sum = at::zeros({l->numel}, at::kFloat);
            for (int64_t r = 0; r < n; ++r) {
              qsgd_.decode_add(gathered[r].narrow(0, e.q_offset, e.q_len).to(at::kCPU).contiguous(), sum);
            }
          }
          // The aggregated (summed) gradient is the PCA sample; a non-finite one never enters a fit.
          const bool finite = at::isfinite(sum).all().item<bool>();
          if (finite) {
            at::Tensor slices = l->layout.slices(sum.to(at::kCPU));
            at::Tensor sample =
                options_.fit_on == FitSamples::kFirstSlice ? slices.narrow(0, 0, 1) : slices;
            std::lock_guard<std::mutex> lock(stats_mutex_);
            l->samples.push_back(sample.clone());
          } else {
            std::lock_guard<std::mutex> lock(stats_mutex_);
            l->stats.skipped_samples += 1;
          }
          l->layout.from_paper_order_into(sum.to(plan.buffer.device()).mul(inv), e.grad);
          break;
        }
      }
    }
  }
  const double decompress_ms = ms_since(start);
  {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  for (auto& e : plan.entries) {
    auto& st = e.layer->stats;
    switch (e.mode) {
      case Mode::kRaw:
        st.phase = "uncompressed";
        st.bytes_out = e.layer->numel * 4;
        break;
      case Mode::kSampledRaw:
        st.phase = "sampling";
        st.bytes_out = e.layer->numel * 4;
        break;
      case Mode::kSampledQsgd:
        st.phase = "sampling";
        st.bytes_out = e.q_len;
        break;
      case Mode::kCompressed: {
        st.phase = "compressed";
        st.bytes_out = e.coeff_len * int64_t(c10::elementSize(options_.coeff_dtype)) + e.raw_len * 4;
        const double signal = e.signal_sq.item<double>(), residual = e.residual_sq.item<double>();
        st.relative_error = signal > 0 ? std::sqrt(std::max(0.0, residual) / signal) : 0.0;
        steps_->add_error_terms(residual, signal);
        break;
      }
    }
  }
  }
  steps_->finished(plan.in_place ? 0.0 : decompress_ms, plan.start, /*bucket_done=*/plan.whole_bucket);
}

std::vector<LayerStats> Aggregator::layer_stats() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  std::vector<LayerStats> out;
  for (const auto& l : layers_) {
    LayerStats st = l->stats;
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

StepStats Aggregator::step_stats() const { return steps_->last(); }

at::Tensor Aggregator::save_state() const {
  std::lock_guard<std::mutex> lock(stats_mutex_);
  detail::ByteWriter w;
  w.put_raw(kStateMagic, 4);
  w.put(kStateVersion);
  w.put<int64_t>(world_size_);
  w.put<int64_t>(iteration_);
  w.put<uint8_t>(pending_fit_ ? 1 : 0);
  w.put<int64_t>(schedule_shift_);
  w.put<int64_t>(window_restarts_);
  // The last step's restart vote has completed by the time a step boundary is saved.
  w.put<uint8_t>(restart_vote_.defined() && restart_vote_.item<float>() > 0.5f ? 1 : 0);
  w.put<int64_t>(int64_t(layers_.size()));
  for (const auto& l : layers_) {
    w.put_string(l->name);
    w.put<int64_t>(int64_t(l->shape.size()));
    for (int64_t s : l->shape) w.put<int64_t>(s);
    w.put<uint8_t>(l->compressible ? 1 : 0);
    if (!l->compressible) continue;
    w.put<int64_t>(l->layout.slice_len);
    w.put<int64_t>(l->stats.fits);
    w.put<uint8_t>(l->pca.is_fitted() ? 1 : 0);
    if (l->pca.is_fitted()) w.put_tensor_bytes(l->pca.serialize());
    w.put<int64_t>(int64_t(l->samples.size()));
    for (const auto& s : l->samples) {
      w.put<int64_t>(s.size(0));
      w.put_tensor_bytes(s);
    }
  }
  at::Tensor body = w.to_tensor();
  const uint64_t checksum = checksum_bytes(body);
  at::Tensor trailer = at::empty({int64_t(kStateChecksumBytes)}, at::kByte);
  std::memcpy(trailer.data_ptr<uint8_t>(), &checksum, kStateChecksumBytes);
  return at::cat({body, trailer});
}

void Aggregator::load_state(const at::Tensor& image) {
  constexpr const char* kWhere = "Aggregator.load_state";
  GVQ_CHECK_ARG(image.defined() && image.scalar_type() == at::kByte && image.dim() == 1, kWhere, "state",
                "must be a 1-D uint8 tensor (from save_state)");
  at::Tensor image_bytes = image.to(at::kCPU).contiguous();
  const size_t total = size_t(image_bytes.numel());
  GVQ_CHECK_ARG(total >= 8 && std::memcmp(image_bytes.data_ptr<uint8_t>(), kStateMagic, 4) == 0, kWhere, "state",
                "is not a GradiVeQ state image (bad magic)");
  uint32_t version = 0;
  std::memcpy(&version, image_bytes.data_ptr<uint8_t>() + 4, sizeof(version));
  GVQ_CHECK_ARG(version == kStateVersion, kWhere, "state", "has format version ", version,
                ", this build reads version ", kStateVersion);
  GVQ_CHECK_ARG(total >= 8 + kStateChecksumBytes, kWhere, "state", "is truncated (", total, " bytes)");
  at::Tensor bytes = image_bytes.narrow(0, 0, int64_t(total - kStateChecksumBytes));
  uint64_t stored_checksum = 0;
  std::memcpy(&stored_checksum, image_bytes.data_ptr<uint8_t>() + total - kStateChecksumBytes, kStateChecksumBytes);
  GVQ_CHECK_ARG(checksum_bytes(bytes) == stored_checksum, kWhere, "state",
                "is corrupted: its checksum does not match its contents (a damaged, truncated or edited file)");
  detail::ByteReader in(bytes.data_ptr<uint8_t>(), size_t(bytes.numel()), kWhere, "state");
  in.take(8);  // magic and version, checked above
  const auto world = in.get<int64_t>();
  GVQ_CHECK_ARG(world == world_size_, kWhere, "state", "was saved with world size ", world,
                " but this process group has ", world_size_, " ranks");
  const auto iteration = in.get<int64_t>();
  const bool pending = in.get<uint8_t>() != 0;
  GVQ_CHECK_ARG(iteration >= 0, kWhere, "state", "holds a negative iteration ", iteration);
  const auto shift = in.get<int64_t>();
  const auto restarts = in.get<int64_t>();
  const bool vote = in.get<uint8_t>() != 0;
  GVQ_CHECK_ARG(shift >= 0 && shift <= iteration && restarts >= 0, kWhere, "state",
                "is corrupted: schedule shift ", shift, ", restarts ", restarts, " at iteration ", iteration);
  const auto count = in.get<int64_t>();
  GVQ_CHECK_ARG(count == int64_t(layers_.size()), kWhere, "state", "holds ", count,
                " parameters but this model has ", layers_.size(), " (a different model?)");
  struct Loaded {
    PcaCompressor pca;
    uint64_t checksum = 0;
    int64_t fits = 0;
    std::vector<at::Tensor> samples;
  };
  std::vector<Loaded> loaded(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = *layers_[i];
    const std::string name = in.get_string();
    GVQ_CHECK_ARG(name == l.name, kWhere, "state", "parameter ", i, " is '", name, "' but this model has '",
                  l.name, "' (a different model?)");
    const auto ndim = in.get<int64_t>();
    GVQ_CHECK_ARG(ndim >= 0 && ndim <= 8, kWhere, "state", "is corrupted: parameter '", name, "' has ", ndim,
                  " dimensions");
    std::vector<int64_t> shape(static_cast<size_t>(ndim));
    for (auto& s : shape) s = in.get<int64_t>();
    GVQ_CHECK_ARG(shape == l.shape, kWhere, "state", "parameter '", name, "' has shape ", at::IntArrayRef(shape),
                  " but this model's has ", at::IntArrayRef(l.shape));
    const bool compressible = in.get<uint8_t>() != 0;
    GVQ_CHECK_ARG(compressible == l.compressible, kWhere, "state", "parameter '", name, "' is ",
                  compressible ? "" : "not ", "compressible in the saved state but ",
                  l.compressible ? "is" : "is not", " here (different include / exclude / min_numel?)");
    if (!compressible) continue;
    const auto k = in.get<int64_t>();
    GVQ_CHECK_ARG(k == l.layout.slice_len, kWhere, "state", "parameter '", name, "' was saved with slice length ",
                  k, " but this layout has ", l.layout.slice_len, " (different slice_layout?)");
    loaded[i].fits = in.get<int64_t>();
    if (in.get<uint8_t>() != 0) {
      at::Tensor img = in.get_tensor_bytes();
      try {
        // A checkpoint of another basis_dtype is converted: the checksum below is of the basis in use.
        loaded[i].pca = PcaCompressor::deserialize(img).with_basis_dtype(options_.basis_dtype);
      } catch (const InvalidArgument& e) {  // say which state and layer, not only what deserialize saw
        GVQ_CHECK_ARG(false, kWhere, "state", "holds a corrupted basis for '", name, "': ", e.what());
      }
      GVQ_CHECK_ARG(loaded[i].pca.slice_len() == k, kWhere, "state", "basis of '", name, "' has K = ",
                    loaded[i].pca.slice_len(), " but the layer's slice length is ", k);
      loaded[i].checksum = loaded[i].pca.checksum();
    }
    const auto num_samples = in.get<int64_t>();
    GVQ_CHECK_ARG(num_samples >= 0 && num_samples <= int64_t(in.remaining()), kWhere, "state",
                  "is corrupted: ", num_samples, " sample blocks for '", name, "'");
    for (int64_t s = 0; s < num_samples; ++s) {
      const auto rows = in.get<int64_t>();
      at::Tensor raw = in.get_tensor_bytes();
      // Division, not rows * k * 4: a damaged count must not overflow.
      GVQ_CHECK_ARG(rows >= 1 && raw.numel() % (k * 4) == 0 && raw.numel() / (k * 4) == rows, kWhere, "state", "is corrupted: a sample block of '",
                    name, "' has ", raw.numel(), " bytes for ", rows, " rows of K = ", k);
      loaded[i].samples.push_back(raw.view(at::kFloat).view({rows, k}).clone());
    }
  }
  GVQ_CHECK_ARG(in.remaining() == 0, kWhere, "state", "has ", in.remaining(), " trailing bytes (corrupted)");

  // Everything parsed and checked: commit.
  std::lock_guard<std::mutex> lock(stats_mutex_);
  iteration_ = iteration;
  pending_fit_ = pending;
  schedule_shift_ = shift;
  window_restarts_ = restarts;
  restart_vote_ = vote ? at::ones({1}, at::kFloat) : at::Tensor();
  window_error_baseline_ = at::Tensor();  // per rank; the next compressed steps set it again
  window_baseline_steps_ = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = *layers_[i];
    if (!l.compressible) continue;
    l.pca = loaded[i].pca.is_fitted() ? loaded[i].pca.to(l.device) : PcaCompressor();
    l.checksum = loaded[i].checksum;
    l.samples = std::move(loaded[i].samples);
    l.stats.fits = loaded[i].fits;
    l.stats.fit_status = l.pca.is_fitted() ? "loaded" : "";
  }
  update_bases_checksum();
}

Aggregator::Layer& Aggregator::layer_named(const std::string& name, const char* where) const {
  auto it = std::find_if(layers_.begin(), layers_.end(), [&](const auto& l) { return l->name == name; });
  GVQ_CHECK_ARG(it != layers_.end(), where, "name", "'", name, "' is not a parameter of this aggregator");
  return **it;
}

PcaCompressor Aggregator::basis(const std::string& name) const {
  const Layer& l = layer_named(name, "Aggregator.basis");
  std::lock_guard<std::mutex> lock(stats_mutex_);
  return l.pca;
}

void Aggregator::set_basis(const std::string& name, const PcaCompressor& pca) {
  constexpr const char* kWhere = "Aggregator.set_basis";
  Layer& l = layer_named(name, kWhere);
  GVQ_CHECK_ARG(l.compressible, kWhere, "name", "'", name, "' is not a compressible layer");
  GVQ_CHECK_ARG(pca.is_fitted() && pca.slice_len() == l.layout.slice_len, kWhere, "pca",
                "must be fitted with K = ", l.layout.slice_len, " for '", name, "', got K = ", pca.slice_len());
  std::lock_guard<std::mutex> lock(stats_mutex_);
  l.pca = pca.to(l.device);
  l.checksum = l.pca.checksum();
  update_bases_checksum();
}

void Aggregator::update_bases_checksum() {
  uint64_t h = 0;
  for (const auto& l : layers_) h = mix(mix(h, hash_string(l->name)), l->pca.is_fitted() ? l->checksum : 0);
  bases_checksum_ = h;
}

}  // namespace gradiveq
