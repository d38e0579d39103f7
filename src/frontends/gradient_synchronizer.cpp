#include "gradiveq/gradient_synchronizer.h"

#include <c10/core/GradMode.h>

#include "gradiveq/errors.h"

namespace gradiveq {

struct GradientSynchronizer::Bucket {
  at::Tensor buffer;                // flat, the parameters' dtype and device
  std::vector<size_t> params;       // indices into params_
  std::vector<at::Tensor> views;    // parameter-shaped views of buffer
  std::vector<at::Tensor> tensors;  // the parameters themselves (their identity maps them to layers)
  size_t ready = 0;
  bool launched = false;
  c10::intrusive_ptr<c10::ivalue::Future> future;
};

namespace {

constexpr const char* kWhere = "GradientSynchronizer";

const std::vector<NamedParameter>& checked(const std::vector<NamedParameter>& parameters,
                                           const SynchronizerOptions& options) {
  GVQ_CHECK_ARG(options.bucket_cap_bytes > 0, kWhere, "bucket_cap_bytes", "must be positive, got ",
                options.bucket_cap_bytes);
  for (const auto& p : parameters) {
    GVQ_CHECK_ARG(p.tensor.defined() && p.tensor.requires_grad(), kWhere, "parameters", "'", p.name,
                  "' must be a defined tensor that requires grad");
  }
  return parameters;
}

}  // namespace

GradientSynchronizer::GradientSynchronizer(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                           std::vector<NamedParameter> parameters, SynchronizerOptions options)
    : GradientSynchronizer(GradiVeQAggregator::create(std::move(process_group), checked(parameters, options),
                                                      options.gradiveq),  // validates the rest
                           parameters, options) {}

GradientSynchronizer::GradientSynchronizer(std::shared_ptr<BucketAggregator> engine,
                                           std::vector<NamedParameter> parameters, SynchronizerOptions options)
    : engine_(std::move(engine)), options_(std::move(options)) {
  GVQ_CHECK_ARG(engine_ != nullptr, kWhere, "engine", "is null");
  checked(parameters, options_);

  // Buckets in reverse registration order, split by size and dtype.
  const size_t n = parameters.size();
  bucket_of_.resize(n);
  slot_of_.resize(n);
  ready_.assign(n, 0);
  for (auto& p : parameters) {
    params_.push_back(p.tensor);
    names_.push_back(p.name);
  }
  std::vector<std::vector<size_t>> groups;
  int64_t bytes = 0;
  for (size_t k = n; k-- > 0;) {
    const at::Tensor& t = params_[k];
    const int64_t size = t.numel() * int64_t(t.element_size());
    const bool new_group = groups.empty() || bytes + size > options_.bucket_cap_bytes ||
                           params_[groups.back().front()].scalar_type() != t.scalar_type();
    if (new_group) {
      groups.emplace_back();
      bytes = 0;
    }
    groups.back().push_back(k);
    bytes += size;
  }
  for (size_t b = 0; b < groups.size(); ++b) {
    auto bucket = std::make_unique<Bucket>();
    int64_t total = 0;
    for (size_t k : groups[b]) total += params_[k].numel();
    bucket->buffer = at::zeros({total}, params_[groups[b].front()].options().requires_grad(false));
    int64_t offset = 0;
    for (size_t k : groups[b]) {
      bucket_of_[k] = b;
      slot_of_[k] = bucket->params.size();
      bucket->params.push_back(k);
      bucket->views.push_back(bucket->buffer.narrow(0, offset, params_[k].numel()).view(params_[k].sizes()));
      bucket->tensors.push_back(params_[k]);
      offset += params_[k].numel();
    }
    buckets_.push_back(std::move(bucket));
  }
  if (options_.overlap_with_backward) {
    for (size_t k = 0; k < n; ++k) {
      hook_handles_.push_back(params_[k].register_hook([this, k](const at::Tensor& grad) { on_gradient(k, grad); }));
    }
  }
}

GradiVeQAggregator& GradientSynchronizer::aggregator() {
  auto* gradiveq = dynamic_cast<GradiVeQAggregator*>(engine_.get());
  GVQ_CHECK_ARG(gradiveq != nullptr, "GradientSynchronizer.aggregator", "engine",
                "is not the GradiVeQ engine; use engine() for any engine");
  return *gradiveq;
}

const GradiVeQAggregator& GradientSynchronizer::aggregator() const {
  return const_cast<GradientSynchronizer*>(this)->aggregator();
}

GradientSynchronizer::~GradientSynchronizer() {
  for (size_t k = 0; k < hook_handles_.size(); ++k) {
    try {
      params_[k].remove_hook(hook_handles_[k]);
    } catch (...) {  // the parameter's autograd meta may already be gone; nothing to undo then
    }
  }
  for (auto& b : buckets_) {
    if (b->launched && b->future) b->future->wait();  // never free buffers a collective still writes
  }
}

void GradientSynchronizer::on_gradient(size_t index, const at::Tensor& grad) {
  std::lock_guard<std::mutex> lock(mutex_);
  Bucket& b = *buckets_[bucket_of_[index]];
  GVQ_CHECK_ARG(!ready_[index] && !b.launched, "GradientSynchronizer", "overlap_with_backward",
                "is on, but parameter '", names_[index], "' received a second gradient before synchronize() "
                "(several backward calls per step): construct the synchronizer with overlap_with_backward = "
                "false for gradient accumulation");
  c10::NoGradGuard no_grad;
  b.views[slot_of_[index]].copy_(grad);
  ready_[index] = 1;
  b.ready += 1;
  const size_t before = next_bucket_;
  launch_ready_buckets();
  launched_in_backward_ += int64_t(next_bucket_ - before);
}

void GradientSynchronizer::launch_ready_buckets() {
  // Strictly in bucket order, so every rank issues the same collectives in the same order.
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_]->ready == buckets_[next_bucket_]->params.size()) {
    launch(next_bucket_++);
  }
}

void GradientSynchronizer::launch(size_t index) {
  Bucket& b = *buckets_[index];
  b.launched = true;
  b.future = engine_->aggregate_bucket(b.buffer, b.views, b.tensors, int64_t(index), index + 1 == buckets_.size());
}

void GradientSynchronizer::begin() {
  std::lock_guard<std::mutex> lock(mutex_);
  c10::NoGradGuard no_grad;
  for (size_t bi = next_bucket_; bi < buckets_.size(); ++bi) {
    Bucket& b = *buckets_[bi];
    for (size_t s = 0; s < b.params.size(); ++s) {
      const size_t k = b.params[s];
      if (ready_[k]) continue;
      const at::Tensor& g = params_[k].grad();
      if (g.defined()) {
        b.views[s].copy_(g);
      } else {
        b.views[s].zero_();
      }
      ready_[k] = 1;
      b.ready += 1;
    }
  }
  launch_ready_buckets();
}

void GradientSynchronizer::wait() {
  std::lock_guard<std::mutex> lock(mutex_);
  c10::NoGradGuard no_grad;
  try {
    GVQ_CHECK_ARG(next_bucket_ == buckets_.size(), "GradientSynchronizer.wait", "self",
                  "has buckets that were never launched: call begin() (or synchronize()) first");
    // waitAndThrow, not wait: c10::ivalue::Future::wait() returns quietly on an error, which left .grad holding
    // this rank's own unaveraged gradient when a collective or the verification failed.
    for (auto& b : buckets_) b->future->waitAndThrow();
    for (auto& b : buckets_) {
      for (size_t s = 0; s < b->params.size(); ++s) {
        at::Tensor& param = params_[b->params[s]];
        at::Tensor& grad = param.mutable_grad();
        if (grad.defined()) {
          grad.copy_(b->views[s]);
        } else {
          grad = b->views[s].clone();
        }
      }
    }
  } catch (...) {
    reset_step();
    throw;
  }
  reset_step();
}

void GradientSynchronizer::reset_step() {
  for (auto& b : buckets_) {
    if (b->launched && b->future && !b->future->completed()) b->future->wait();
    b->ready = 0;
    b->launched = false;
    b->future.reset();
  }
  std::fill(ready_.begin(), ready_.end(), 0);
  next_bucket_ = 0;
}

void GradientSynchronizer::synchronize() {
  begin();
  wait();
}

}  // namespace gradiveq
