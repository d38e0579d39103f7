#include "gradiveq/comm_hook.h"

#include "gradiveq/errors.h"

namespace gradiveq {

c10::intrusive_ptr<c10::ivalue::Future> run_bucket(BucketAggregator& aggregator, c10d::GradBucket& bucket) {
  return aggregator.aggregate_bucket(bucket.getBufferRef(), bucket.getGradients(), bucket.getParameters(),
                                     int64_t(bucket.getIndex()), bucket.isLast());
}

AggregatorCommHook::AggregatorCommHook(std::shared_ptr<BucketAggregator> aggregator) : aggregator_(std::move(aggregator)) {
  GVQ_CHECK_ARG(aggregator_ != nullptr, "AggregatorCommHook", "aggregator", "is null");
}

c10::intrusive_ptr<c10::ivalue::Future> AggregatorCommHook::runHook(c10d::GradBucket& bucket) {
  return run_bucket(*aggregator_, bucket);
}

at::Tensor AggregatorCommHook::parseHookResult(const c10::IValue& result) {
  if (result.isTensor()) return result.toTensor();
  GVQ_ASSERT(result.isTensorList(), "unexpected hook result ", result.tagKind());
  return result.toTensorVector()[0];
}

}  // namespace gradiveq
