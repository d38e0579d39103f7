#include "gradiveq/gather_aggregator.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "collectives.h"
#include "hash_mix.h"
#include "gradiveq/errors.h"
#include "step_recorder.h"

namespace gradiveq {

using detail::Clock;
using detail::ms_since;

namespace {

using detail::mix;

double sum_sq(const at::Tensor& x) {
  const float* p = x.data_ptr<float>();
  double s = 0.0;
  for (int64_t i = 0; i < x.numel(); ++i) s += double(p[i]) * double(p[i]);
  return s;
}

}  // namespace

// --- codecs --------------------------------------------------------------------------------------------

void GatherCodec::set_slot_state(int64_t, const at::Tensor& state) {
  GVQ_CHECK_ARG(!state.defined(), "GatherCodec.set_slot_state", "state", "must be undefined: the ", name(),
                " codec keeps no per-parameter state");
}

Co3GatherCodec::Co3GatherCodec(const Co3Options& options, double gamma) : codec_(options), gamma_(gamma) {
  GVQ_CHECK_ARG(gamma >= 0.0 && gamma <= 1.0, "Co3GatherCodec", "gamma", "must lie in [0, 1], got ", gamma);
}

Co3ErrorCorrection& Co3GatherCodec::correction(int64_t slot) {
  GVQ_ASSERT(slot >= 0);
  while (int64_t(corrections_.size()) <= slot) corrections_.emplace_back(gamma_);
  return corrections_[slot];
}

GatherMessage Co3GatherCodec::encode(const at::Tensor& gradient, int64_t slot, uint64_t) {
  Co3EncodeInfo info;
  GatherMessage m;
  m.packed = correction(slot).step(codec_, gradient, &info);
  m.residual_sq = info.residual_sq;
  m.signal_sq = info.signal_sq;
  return m;
}

void Co3GatherCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  codec_.decode_add(packed, out);
}

at::Tensor Co3GatherCodec::slot_state(int64_t slot) const {
  if (slot >= int64_t(corrections_.size()) || !corrections_[slot].error().defined()) return {};
  return corrections_[slot].error().clone();
}

void Co3GatherCodec::set_slot_state(int64_t slot, const at::Tensor& state) {
  correction(slot).set_error(state);
}

CasqGatherCodec::CasqGatherCodec(const CasqOptions& options) : codec_(options) {}

GatherMessage CasqGatherCodec::encode(const at::Tensor& gradient, int64_t, uint64_t seed) {
  GatherMessage m;
  m.packed = codec_.encode(gradient, seed);
  // The error statistic needs the decoded values; decoding is a codebook lookup, cheap next to the
  // clustering.
  at::Tensor q = codec_.decode(m.packed, gradient.numel());
  if (bool(at::isfinite(q).all().item<bool>())) {
    m.residual_sq = sum_sq(q.sub_(gradient));
    m.signal_sq = sum_sq(gradient);
  }
  return m;
}

void CasqGatherCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  codec_.decode_add(packed, out);
}

// --- aggregator ----------------------------------------------------------------------------------------

std::shared_ptr<GatherAggregator> GatherAggregator::create(
    c10::intrusive_ptr<c10d::ProcessGroup> process_group, std::vector<NamedParameter> parameters,
    std::unique_ptr<GatherCodec> codec, GatherAggregatorOptions options) {
  return std::shared_ptr<GatherAggregator>(
      new GatherAggregator(std::move(process_group), std::move(parameters), std::move(codec), options));
}

GatherAggregator::GatherAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                   std::vector<NamedParameter> parameters, std::unique_ptr<GatherCodec> codec,
                                   GatherAggregatorOptions options)
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

c10::intrusive_ptr<c10::ivalue::Future> GatherAggregator::aggregate_bucket(
    const at::Tensor& buffer, const std::vector<at::Tensor>& gradients,
    const std::vector<at::Tensor>& parameters, int64_t index, bool is_last) {
  GVQ_CHECK_ARG(gradients.size() == parameters.size(), "GatherAggregator.aggregate_bucket", "gradients",
                "has ", gradients.size(), " tensors but parameters has ", parameters.size());
  c10::NoGradGuard no_grad;
  const auto start = Clock::now();
  if (index == 0) steps_->begin(iteration_, codec_->name(), "");

  struct Part {
    at::Tensor grad;
    bool encoded;
    int64_t offset;  // raw parts: offset in the float32 all-reduce tensor
  };
  auto parts = std::make_shared<std::vector<Part>>();
  int64_t raw_len = 0, uncompressed = 0;
  std::vector<GatherMessage> messages;
  int64_t fixed_total = 0;  // sum of fixed message sizes, or -1 once one message is data-dependent
  for (size_t i = 0; i < gradients.size(); ++i) {
    const at::Tensor& g = gradients[i];
    uncompressed += g.numel() * 4;
    const bool encoded = g.numel() >= options_.min_numel;
    parts->push_back({g, encoded, encoded ? 0 : raw_len});
    if (!encoded) {
      raw_len += g.numel();
      continue;
    }
    const int64_t slot = slot_of(parameters[i]);
    uint64_t seed =
        mix(mix(mix(mix(options_.seed, uint64_t(iteration_)), uint64_t(rank_)), uint64_t(index)), i);
    at::Tensor flat = g.reshape({-1}).to(at::kCPU, at::kFloat).contiguous();
    messages.push_back(codec_->encode(flat, slot, seed));
    const GatherMessage& m = messages.back();
    steps_->add_encoded(g.numel(), m.packed.numel());
    if (m.residual_sq >= 0.0) steps_->add_error_terms(m.residual_sq, m.signal_sq);
    const int64_t fixed = codec_->fixed_message_bytes(g.numel());
    GVQ_ASSERT(fixed < 0 || fixed == m.packed.numel(), "codec ", codec_->name(), " promised ", fixed,
               " bytes and wrote ", m.packed.numel());
    fixed_total = (fixed < 0 || fixed_total < 0) ? -1 : fixed_total + fixed;
  }

  // This rank's payload: the length table, then the messages.
  const int64_t num_messages = int64_t(messages.size());
  const int64_t table_bytes = 8 * num_messages;
  int64_t payload_len = table_bytes;
  for (const auto& m : messages) payload_len += m.packed.numel();
  at::Tensor payload = at::empty({payload_len}, at::kByte);
  {
    uint8_t* out = payload.data_ptr<uint8_t>();
    int64_t at_byte = table_bytes;
    for (int64_t k = 0; k < num_messages; ++k) {
      const int64_t len = messages[k].packed.numel();
      std::memcpy(out + 8 * k, &len, 8);
      std::memcpy(out + at_byte, messages[k].packed.data_ptr<uint8_t>(), len);
      at_byte += len;
    }
  }
  messages.clear();

  const int64_t n = world_size_;
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  int64_t sent = 0, wire = 0;
  at::Tensor raw;
  if (raw_len > 0) {
    raw = at::empty({raw_len}, buffer.options().dtype(at::kFloat));
    for (const Part& p : *parts) {
      if (!p.encoded) raw.narrow(0, p.offset, p.grad.numel()).copy_(p.grad.reshape({-1}));
    }
    std::vector<at::Tensor> t{raw};
    futures.push_back(pg_->allreduce(t)->getFuture());
    sent += raw.nbytes();
    wire += detail::ring_allreduce_bytes(raw.nbytes(), n);
  }
  auto sizes = std::make_shared<std::vector<int64_t>>(n, payload_len);
  auto gathered = std::make_shared<std::vector<at::Tensor>>();
  if (num_messages > 0) {
    if (fixed_total < 0) {
      // Sizes differ by rank: learn them before sizing the padded all-gather. Waiting here (a host sync)
      // keeps the payload all-gather in the hook call, in bucket order.
      at::Tensor mine = at::full({1}, payload_len, at::TensorOptions(at::kLong)).to(buffer.device());
      std::vector<std::vector<at::Tensor>> outputs(1);
      for (int64_t r = 0; r < n; ++r) outputs[0].push_back(at::empty({1}, mine.options()));
      std::vector<at::Tensor> inputs{mine};
      pg_->allgather(outputs, inputs)->wait();
      for (int64_t r = 0; r < n; ++r) (*sizes)[r] = outputs[0][r].item<int64_t>();
      GVQ_ASSERT((*sizes)[rank_] == payload_len, "all-gathered size of this rank differs from its payload");
      sent += 8;
      wire += (n - 1) * 8;
    } else {
      GVQ_ASSERT(payload_len == table_bytes + fixed_total);
    }
    const int64_t padded = *std::max_element(sizes->begin(), sizes->end());
    at::Tensor local = at::zeros({padded}, at::kByte);
    local.narrow(0, 0, payload_len).copy_(payload);
    local = local.to(buffer.device());
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int64_t r = 0; r < n; ++r) outputs[0].push_back(at::empty({padded}, local.options()));
    std::vector<at::Tensor> inputs{local};
    futures.push_back(pg_->allgather(outputs, inputs)->getFuture());
    *gathered = outputs[0];
    sent += padded;
    wire += (n - 1) * padded;
  }
  const int64_t collectives = int64_t(futures.size()) + (num_messages > 0 && fixed_total < 0 ? 1 : 0);
  steps_->issued(collectives, sent, wire, uncompressed, ms_since(start), is_last);
  if (is_last) ++iteration_;

  if (futures.empty()) {  // an empty bucket: nothing to aggregate
    auto done = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
    steps_->finished(0.0, start);
    done->markCompleted(c10::IValue(buffer));
    return done;
  }
  c10::intrusive_ptr<c10::ivalue::Future> all = detail::when_all(futures);
  // As in Aggregator: the closure lets go of the aggregator before it returns (see aggregator.cpp).
  return all->then(
      [owner = std::make_shared<std::shared_ptr<GatherAggregator>>(shared_from_this()), parts, raw, gathered,
       sizes, num_messages, buffer, start, n](c10::ivalue::Future& f) {
        auto self = std::move(*owner);
        f.value();  // rethrows a failed collective
        c10::NoGradGuard no_grad;
        const auto t0 = Clock::now();
        std::vector<at::Tensor> sums;
        for (const Part& p : *parts) {
          if (p.encoded) sums.push_back(at::zeros({p.grad.numel()}, at::kFloat));
        }
        for (int64_t r = 0; r < int64_t(gathered->size()); ++r) {
          at::Tensor host = (*gathered)[r].to(at::kCPU).contiguous();
          const uint8_t* bytes = host.data_ptr<uint8_t>();
          const int64_t size = (*sizes)[r];
          GVQ_ASSERT(size >= 8 * num_messages && size <= host.numel(), "rank ", r, " sent ", size, " bytes");
          int64_t at_byte = 8 * num_messages;
          for (int64_t k = 0; k < num_messages; ++k) {
            int64_t len = 0;
            std::memcpy(&len, bytes + 8 * k, 8);
            GVQ_ASSERT(len >= 0 && at_byte + len <= size, "rank ", r, "'s message ", k,
                       " overruns its payload");
            self->codec_->decode_add(host.narrow(0, at_byte, len), sums[k]);
            at_byte += len;
          }
          GVQ_ASSERT(at_byte == size, "rank ", r, "'s payload holds ", size - at_byte, " unread bytes");
        }
        size_t k = 0;
        for (const Part& p : *parts) {
          if (p.encoded) {
            p.grad.copy_(sums[k++].view(p.grad.sizes()).div_(double(n)));
          } else {
            p.grad.copy_(raw.narrow(0, p.offset, p.grad.numel()).view(p.grad.sizes())).div_(double(n));
          }
        }
        self->steps_->finished(ms_since(t0), start);
        return c10::IValue(buffer);
      },
      c10::TensorType::get());
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
