// Deprecated (0.1): the GradiVeQ engine is declared in gradiveq_aggregator.h as GradiVeQAggregator; this header
// and the name gradiveq::Aggregator stay for one release.
#pragma once

#include "gradiveq/gradiveq_aggregator.h"
