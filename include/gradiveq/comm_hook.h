// The DDP front end: a c10d::CommHookInterface that hands every bucket to any BucketAggregator (the GradiVeQ
// engine, or the gather engine with QSGD, CO3 or CASQ).
//
// Register it on `ddp_model.reducer` (Python: gradiveq.register_hook). DDP then calls runHook once per bucket,
// in bucket order, on the autograd thread, and copies the returned tensor back into the parameters' .grad.
#pragma once

#include <torch/csrc/distributed/c10d/comm.hpp>

#include <memory>

#include "gradiveq/bucket_aggregator.h"

namespace gradiveq {

/// Runs one DDP bucket through `aggregator`: the shared body of the C++ hook and the Python-callable hook.
c10::intrusive_ptr<c10::ivalue::Future> run_bucket(BucketAggregator& aggregator, c10d::GradBucket& bucket);

class AggregatorCommHook : public c10d::CommHookInterface {
 public:
  explicit AggregatorCommHook(std::shared_ptr<BucketAggregator> aggregator);

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  /// The future holds the bucket buffer (a Tensor); lists are accepted too.
  at::Tensor parseHookResult(const c10::IValue& result) override;

 private:
  std::shared_ptr<BucketAggregator> aggregator_;
};

/// Deprecated name (0.1): the hook serves every engine, not only GradiVeQ. Removed in the next release.
using GradiVeQCommHook [[deprecated("use gradiveq::AggregatorCommHook")]] = AggregatorCommHook;

}  // namespace gradiveq
