#include "gradiveq/gather_aggregator.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "engine/collectives.h"
#include "engine/gather_pipeline.h"
#include "engine/step_recorder.h"
#include "gradiveq/errors.h"
#include "util/hash_mix.h"

namespace gradiveq {

using detail::Clock;
using detail::ms_since;

using detail::mix;

// --- aggregator ----------------------------------------------------------------------------------------

std::shared_ptr<GatherAggregator> GatherAggregator::create(
    c10::intrusive_ptr<c10d::ProcessGroup> process_group, std::vector<NamedParameter> parameters,
    std::unique_ptr<MessageCodec> codec, GatherAggregatorOptions options) {
  return std::shared_ptr<GatherAggregator>(
      new GatherAggregator(std::move(process_group), std::move(parameters), std::move(codec), options));
}

GatherAggregator::GatherAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                   std::vector<NamedParameter> parameters,
                                   std::unique_ptr<MessageCodec> codec, GatherAggregatorOptions options)
    : pg_(std::move(process_group)), options_(options), codec_(std::move(codec)) {
  constexpr const char* kWhere = "GatherAggregator";
  GVQ_CHECK_ARG(pg_, kWhere, "process_group", "is null");
  GVQ_CHECK_ARG(codec_, kWhere, "codec", "is null");
  GVQ_CHECK_ARG(options_.min_numel >= 0, kWhere, "min_numel", "must be >= 0, got ", options_.min_numel);
  GVQ_CHECK_ARG(!parameters.empty(), kWhere, "parameters", "is empty: nothing to aggregate");
  std::unordered_set<std::string> seen;
  for (const auto& p : parameters) {
    GVQ_CHECK_ARG(p.tensor.defined(), kWhere, "parameters", "holds an undefined tensor named '", p.name, "'");
    GVQ_CHECK_ARG(seen.insert(p.name).second, kWhere, "parameters", "holds the name '", p.name, "' twice");
    slot_by_impl_[p.tensor.unsafeGetTensorImpl()] = int64_t(names_.size());
    names_.push_back(p.name);
    numels_.push_back(p.tensor.numel());
  }
  rank_ = pg_->getRank();
  world_size_ = pg_->getSize();
  steps_ = std::make_unique<detail::StepRecorder>();
}

GatherAggregator::~GatherAggregator() = default;

StepStats GatherAggregator::step_stats() const { return steps_->last(); }

int64_t GatherAggregator::slot_of(const at::Tensor& parameter) const {
  auto it = slot_by_impl_.find(parameter.unsafeGetTensorImpl());
  GVQ_CHECK_ARG(it != slot_by_impl_.end(), "GatherAggregator.aggregate_bucket", "parameters",
                "holds a parameter of shape ", parameter.sizes(),
                " that was not registered with this aggregator (a different model?)");
  return it->second;
}

// One bucket in flight: its raw (small) parameters in one all-reduce (the bucket's dtype if half precision,
// else float32), the rest through the pipeline.
struct GatherAggregator::Bucket {
  struct Part {
    at::Tensor grad;
    bool encoded;
    int64_t offset;  // raw parts: offset in the raw all-reduce tensor
  };
  explicit Bucket(MessageCodec& codec) : pipeline(codec) {}
  at::Tensor buffer;
  std::vector<Part> parts;
  at::Tensor raw;
  detail::GatherPipeline pipeline;
  detail::CollectiveBytes bytes;
  Clock::time_point start;
  std::shared_ptr<GatherAggregator> owner;  // keeps the aggregator (and its codec) alive until the callback
};

void GatherAggregator::encode_bucket(Bucket& b, const std::vector<at::Tensor>& parameters, int64_t index) {
  int64_t raw_len = 0;
  for (size_t i = 0; i < b.parts.size(); ++i) {
    auto& part = b.parts[i];
    if (!part.encoded) {
      part.offset = raw_len;
      raw_len += part.grad.numel();
      continue;
    }
    const int64_t slot = slot_of(parameters[i]);
    const uint64_t seed =
        mix(mix(mix(mix(options_.seed, uint64_t(iteration_)), uint64_t(rank_)), uint64_t(index)), i);
    at::Tensor flat = part.grad.reshape({-1}).to(at::kCPU, at::kFloat).contiguous();
    const EncodedMessage& m = b.pipeline.add(flat, slot, seed);
    steps_->add_encoded(part.grad.numel(), m.packed.numel());
    if (m.residual_sq >= 0.0) steps_->add_error_terms(m.residual_sq, m.signal_sq);
  }
  if (raw_len > 0) {
    b.raw = at::empty({raw_len}, b.buffer.options().dtype(detail::raw_dtype(b.buffer)));
    for (const auto& part : b.parts) {
      if (!part.encoded) b.raw.narrow(0, part.offset, part.grad.numel()).copy_(part.grad.reshape({-1}));
    }
  }
}

c10::intrusive_ptr<c10::ivalue::Future> GatherAggregator::aggregate_bucket(
    const at::Tensor& buffer, const std::vector<at::Tensor>& gradients,
    const std::vector<at::Tensor>& parameters, int64_t index, bool is_last) {
  GVQ_CHECK_ARG(gradients.size() == parameters.size(), "GatherAggregator.aggregate_bucket", "gradients",
                "has ", gradients.size(), " tensors but parameters has ", parameters.size());
  c10::NoGradGuard no_grad;
  auto bucket = std::make_shared<Bucket>(*codec_);
  bucket->start = Clock::now();
  bucket->buffer = buffer;
  if (index == 0) steps_->begin(iteration_, codec_->name(), "");
  int64_t uncompressed = 0;
  for (const auto& g : gradients) {
    uncompressed += g.numel() * int64_t(g.element_size());
    bucket->parts.push_back({g, g.numel() >= options_.min_numel, 0});
  }
  encode_bucket(*bucket, parameters, index);

  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  if (bucket->raw.defined()) futures.push_back(detail::issue_all_reduce(*pg_, bucket->raw, bucket->bytes));
  if (auto gathered = bucket->pipeline.issue(*pg_, buffer.device(), bucket->bytes))
    futures.push_back(gathered);
  const auto& sent = bucket->bytes;
  steps_->issued(sent.collectives, sent.payload, sent.wire, uncompressed, ms_since(bucket->start), is_last);
  if (is_last) ++iteration_;

  if (futures.empty()) {  // an empty bucket: nothing to aggregate
    auto done = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
    steps_->finished(0.0, bucket->start);
    done->markCompleted(c10::IValue(buffer));
    return done;
  }
  // The callback keeps the aggregator alive while it runs and lets go of it before it returns (see
  // GradiVeQAggregator::issue_plan: ~ProcessGroupGloo must not run on its own communication thread).
  bucket->owner = shared_from_this();
  return detail::when_all(futures)->then(
      [bucket](c10::ivalue::Future& f) {
        auto self = std::move(bucket->owner);
        f.value();  // rethrows a failed collective
        c10::NoGradGuard no_grad;
        const auto t0 = Clock::now();
        finish_bucket(*bucket, self->world_size_);
        self->steps_->finished(ms_since(t0), bucket->start);
        return c10::IValue(bucket->buffer);
      },
      c10::TensorType::get());
}

void GatherAggregator::finish_bucket(Bucket& b, int64_t world_size) {
  std::vector<at::Tensor> sums = b.pipeline.decoded_sums();
  size_t k = 0;
  for (const auto& part : b.parts) {
    if (part.encoded) {
      part.grad.copy_(sums[k++].view(part.grad.sizes()).div_(double(world_size)));
    } else {
      part.grad.copy_(b.raw.narrow(0, part.offset, part.grad.numel()).view(part.grad.sizes()))
          .div_(double(world_size));
    }
  }
}

std::vector<std::pair<std::string, at::Tensor>> GatherAggregator::save_slot_states() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (int64_t s = 0; s < int64_t(names_.size()); ++s) {
    at::Tensor t = codec_->slot_state(s);
    if (t.defined()) out.emplace_back(names_[s], t);
  }
  return out;
}

void GatherAggregator::load_slot_states(const std::vector<std::pair<std::string, at::Tensor>>& states,
                                        int64_t iteration) {
  constexpr const char* kWhere = "GatherAggregator.load_slot_states";
  GVQ_CHECK_ARG(iteration >= 0, kWhere, "iteration", "must be >= 0, got ", iteration);
  std::vector<at::Tensor> by_slot(names_.size());
  for (const auto& [name, tensor] : states) {
    auto it = std::find(names_.begin(), names_.end(), name);
    GVQ_CHECK_ARG(it != names_.end(), kWhere, "states", "names '", name,
                  "', which is not a parameter of this model");
    const int64_t s = it - names_.begin();
    GVQ_CHECK_ARG(!by_slot[s].defined(), kWhere, "states", "names '", name, "' twice");
    GVQ_CHECK_ARG(tensor.defined() && tensor.scalar_type() == at::kFloat && tensor.dim() == 1 &&
                      tensor.numel() == numels_[s],
                  kWhere, "states", "holds a tensor for '", name, "' that is not a 1-D float32 tensor of ",
                  numels_[s], " values");
    GVQ_CHECK_ARG(codec_->keeps_slot_state(), kWhere, "states", "holds state for '", name, "' but the ",
                  codec_->name(), " codec keeps none");
    by_slot[s] = tensor;
  }
  // Everything was checked above, so a refused image has changed nothing.
  for (int64_t s = 0; s < int64_t(names_.size()); ++s) codec_->set_slot_state(s, by_slot[s]);
  iteration_ = iteration;
}

}  // namespace gradiveq
