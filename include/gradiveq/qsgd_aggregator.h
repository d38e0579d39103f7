// Deprecated (0.1): the QSGD baseline is now a message codec (QsgdMessageCodec, qsgd.h) behind the one gather
// pipeline of GatherAggregator. This header keeps the old names for one release.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "gradiveq/gather_aggregator.h"
#include "gradiveq/qsgd.h"

namespace gradiveq {

struct [[deprecated("use GatherAggregatorOptions and QsgdOptions")]] QsgdAggregatorOptions {
  QsgdOptions codec;
  int64_t min_numel = 1000;
  uint64_t seed = 0;
};

/// The old entry point, now over GatherAggregator. It takes the model's parameters, as every gather engine
/// does (they key the codec's per-parameter state).
struct [[deprecated("use GatherAggregator::create with a QsgdMessageCodec")]] QsgdAggregator{
    template <typename Options> static std::shared_ptr<GatherAggregator> create(
        c10::intrusive_ptr<c10d::ProcessGroup> process_group, std::vector<NamedParameter> parameters,
        const Options& options){return GatherAggregator::create(
        std::move(process_group), std::move(parameters), std::make_unique<QsgdMessageCodec>(options.codec),
        GatherAggregatorOptions{options.min_numel, options.seed});
}  // namespace gradiveq
}
;

}  // namespace gradiveq
