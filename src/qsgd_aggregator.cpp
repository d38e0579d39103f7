#include "gradiveq/qsgd_aggregator.h"

#include <c10/core/GradMode.h>

#include "gradiveq/errors.h"
#include "collectives.h"
#include "step_recorder.h"

namespace gradiveq {

using detail::Clock;
using detail::ms_since;

std::shared_ptr<QsgdAggregator> QsgdAggregator::create(c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                                                       QsgdAggregatorOptions options) {
  return std::shared_ptr<QsgdAggregator>(new QsgdAggregator(std::move(process_group), std::move(options)));
}

QsgdAggregator::QsgdAggregator(c10::intrusive_ptr<c10d::ProcessGroup> process_group, QsgdAggregatorOptions options)
    : pg_(std::move(process_group)), options_(std::move(options)), codec_(options_.codec) {
  GVQ_CHECK_ARG(pg_, "QsgdAggregator", "process_group", "is null");
  GVQ_CHECK_ARG(options_.min_numel >= 0, "QsgdAggregator", "min_numel", "must be >= 0, got ", options_.min_numel);
  rank_ = pg_->getRank();
  world_size_ = pg_->getSize();
  steps_ = std::make_unique<detail::StepRecorder>();
}

QsgdAggregator::~QsgdAggregator() = default;

StepStats QsgdAggregator::step_stats() const { return steps_->last(); }

c10::intrusive_ptr<c10::ivalue::Future> QsgdAggregator::aggregate_bucket(const at::Tensor& buffer,
                                                                         const std::vector<at::Tensor>& gradients,
                                                                         const std::vector<at::Tensor>& parameters,
                                                                         int64_t index, bool is_last) {
  GVQ_CHECK_ARG(gradients.size() == parameters.size(), "QsgdAggregator.aggregate_bucket", "gradients", "has ",
                gradients.size(), " tensors but parameters has ", parameters.size());
  c10::NoGradGuard no_grad;
  const auto start = Clock::now();
  if (index == 0) steps_->begin(iteration_, "qsgd", "");
  struct Part {
    at::Tensor grad;
    bool quantized;
    int64_t offset, len;  // in the raw float32 tensor or in the byte payload
  };
  auto parts = std::make_shared<std::vector<Part>>();
  int64_t raw_len = 0, q_len = 0, uncompressed = 0;
  for (const auto& g : gradients) {
    const bool quantized = g.numel() >= options_.min_numel;
    const int64_t len = quantized ? codec_.packed_bytes(g.numel()) : g.numel();
    parts->push_back({g, quantized, quantized ? q_len : raw_len, len});
    (quantized ? q_len : raw_len) += len;
    uncompressed += g.numel() * 4;
  }
  const int64_t n = world_size_;
  at::Tensor raw = at::empty({raw_len}, buffer.options().dtype(at::kFloat));
  at::Tensor payload = at::empty({q_len}, at::kByte);
  for (size_t i = 0; i < parts->size(); ++i) {
    const Part& p = (*parts)[i];
    if (!p.quantized) {
      raw.narrow(0, p.offset, p.len).copy_(p.grad.reshape({-1}));
      continue;
    }
    uint64_t seed = options_.seed ^ (0x9E3779B97F4A7C15ull * uint64_t(iteration_ + 1));
    seed ^= (uint64_t(rank_) << 48) ^ (uint64_t(index) << 32) ^ uint64_t(i);
    at::Tensor flat = p.grad.reshape({-1}).to(at::kCPU, at::kFloat).contiguous();
    payload.narrow(0, p.offset, p.len).copy_(codec_.encode(flat, seed));
  }
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  auto gathered = std::make_shared<std::vector<at::Tensor>>();
  int64_t sent = 0, wire = 0;
  if (raw_len > 0) {
    std::vector<at::Tensor> t{raw};
    futures.push_back(pg_->allreduce(t)->getFuture());
    sent += raw.nbytes();
    wire += detail::ring_allreduce_bytes(raw.nbytes(), n);
  }
  if (q_len > 0) {
    at::Tensor local = payload.to(buffer.device());
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int64_t r = 0; r < n; ++r) outputs[0].push_back(at::empty({q_len}, local.options()));
    std::vector<at::Tensor> inputs{local};
    futures.push_back(pg_->allgather(outputs, inputs)->getFuture());
    *gathered = outputs[0];
    sent += q_len;
    wire += (n - 1) * q_len;
  }
  steps_->issued(int64_t(futures.size()), sent, wire, uncompressed, ms_since(start), is_last);
  if (is_last) ++iteration_;

  c10::intrusive_ptr<c10::ivalue::Future> all = detail::when_all(futures);
  // As in Aggregator: the closure lets go of the aggregator before it returns (see aggregator.cpp).
  return all->then(
      [owner = std::make_shared<std::shared_ptr<QsgdAggregator>>(shared_from_this()), parts, raw, gathered, buffer,
       start, n](c10::ivalue::Future& f) {
        auto self = std::move(*owner);
        f.value();  // rethrows a failed collective
        c10::NoGradGuard no_grad;
        const auto t0 = Clock::now();
        std::vector<at::Tensor> host;
        for (const auto& g : *gathered) host.push_back(g.to(at::kCPU).contiguous());
        for (const Part& p : *parts) {
          if (!p.quantized) {
            p.grad.copy_(raw.narrow(0, p.offset, p.len).view(p.grad.sizes())).div_(double(n));
            continue;
          }
          at::Tensor sum = at::zeros({p.grad.numel()}, at::kFloat);
          for (const auto& h : host) self->codec_.decode_add(h.narrow(0, p.offset, p.len), sum);
          p.grad.copy_(sum.view(p.grad.sizes()).div_(double(n)));
        }
        self->steps_->finished(ms_since(t0), start);
        return c10::IValue(buffer);
      },
      c10::TensorType::get());
}

}  // namespace gradiveq
