// GradientSynchronizer: the LibTorch front end (LibTorch has no DistributedDataParallel): buckets a model's
// gradients and runs them through any BucketAggregator, the GradiVeQ engine or the gather engine (QSGD, CO3,
// CASQ).
//
//   auto pg = gradiveq::make_gloo_process_group(gradiveq::connect_store(addr, rank, world), rank, world);
//   std::vector<gradiveq::NamedParameter> params;
//   for (auto& p : model->named_parameters()) params.push_back({p.key(), p.value()});
//   gradiveq::GradientSynchronizer sync(pg, params, options);   // the GradiVeQ engine, or any engine:
//   // gradiveq::GradientSynchronizer sync(gradiveq::GatherAggregator::create(pg, params,
//   //     std::make_unique<gradiveq::QsgdMessageCodec>()), params);
//   for (...) {
//     optimizer.zero_grad();
//     loss.backward();        // buckets go on the wire as soon as all their gradients exist
//     sync.synchronize();     // waits for the rest; every .grad now holds the average over ranks
//     optimizer.step();
//   }
//
// It drives the same engines as the DDP hook: same schedule, fitting, broadcast and checksum of bases, stats and
// state. Parameters are packed into buckets (in reverse order, as gradients usually arrive) of at most
// bucket_cap_bytes; each bucket is one call of BucketAggregator::aggregate_bucket, issued in bucket order on
// every rank.
//
// With overlap_with_backward (default), a hook on each parameter copies its gradient into the bucket as
// backward produces it, and a full bucket is launched at once, while backward goes on. That assumes one
// backward per step after zero_grad(); for gradient accumulation over several backward calls, turn it off:
// synchronize() then averages the accumulated .grad.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <mutex>
#include <vector>

#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/gradiveq_aggregator.h"
#include "gradiveq/options.h"
#include "gradiveq/types.h"

namespace gradiveq {

class GradientSynchronizer {
 public:
  /// `parameters`: every trainable parameter of the model, with unique names, on one device. Every rank
  /// must pass the same names in the same order.
  /// Runs the GradiVeQ engine, built from options.gradiveq.
  GradientSynchronizer(c10::intrusive_ptr<c10d::ProcessGroup> process_group, std::vector<NamedParameter> parameters,
                       SynchronizerOptions options = {});
  /// Runs `engine` (not null), which must have been created over the same `parameters`; options.gradiveq is
  /// not used.
  GradientSynchronizer(std::shared_ptr<BucketAggregator> engine, std::vector<NamedParameter> parameters,
                       SynchronizerOptions options = {});
  ~GradientSynchronizer();
  GradientSynchronizer(const GradientSynchronizer&) = delete;
  GradientSynchronizer& operator=(const GradientSynchronizer&) = delete;

  /// begin() then wait(): after it, every parameter's .grad is the average over ranks of this step's gradient.
  void synchronize();
  /// Launches every bucket that backward has not launched yet, from the parameters' .grad (zeros when undefined).
  void begin();
  /// Waits for every bucket and writes the averages into .grad. Rethrows a failed collective (e.g. a dead peer
  /// after the process group's timeout) or a verification failure.
  void wait();

  /// The engine, whatever it is.
  BucketAggregator& engine() { return *engine_; }
  const BucketAggregator& engine() const { return *engine_; }
  /// The GradiVeQ engine; raises InvalidArgument when this synchronizer runs another engine.
  GradiVeQAggregator& aggregator();
  const GradiVeQAggregator& aggregator() const;
  int64_t num_buckets() const { return int64_t(buckets_.size()); }
  /// Buckets launched during the last backward, before synchronize() was called (the overlap achieved).
  int64_t buckets_launched_in_backward() const { return launched_in_backward_; }

 private:
  struct Bucket;
  void on_gradient(size_t index, const at::Tensor& grad);
  void launch_ready_buckets();  // caller holds mutex_
  void launch(size_t bucket);   // caller holds mutex_
  void reset_step();            // caller holds mutex_

  std::shared_ptr<BucketAggregator> engine_;
  SynchronizerOptions options_;
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::vector<size_t> bucket_of_, slot_of_;
  std::vector<char> ready_;
  std::vector<unsigned> hook_handles_;
  size_t next_bucket_ = 0;
  int64_t launched_in_backward_ = 0;
  std::mutex mutex_;
};

}  // namespace gradiveq
