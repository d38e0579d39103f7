#include "gradiveq/schedule.h"

#include "gradiveq/errors.h"

namespace gradiveq {

std::string phase_name(Phase phase) {
  switch (phase) {
    case Phase::kWarmup:
      return "warmup";
    case Phase::kSampling:
      return "sampling";
    case Phase::kCompressed:
      return "compressed";
  }
  return "unknown";
}

Schedule::Schedule(const ScheduleOptions& options) : options_(options) {
  GVQ_CHECK_ARG(options.warmup_iters >= 0, "Schedule", "warmup_iters", "must be >= 0, got ",
                options.warmup_iters);
  GVQ_CHECK_ARG(options.sample_iters >= 1, "Schedule", "sample_iters",
                "must be >= 1 (the bases are fitted from sampled iterations), got ", options.sample_iters);
  GVQ_CHECK_ARG(options.compress_iters >= 0, "Schedule", "compress_iters", "must be >= 0, got ",
                options.compress_iters);
}

Phase Schedule::phase(int64_t iter) const {
  GVQ_CHECK_ARG(iter >= 0, "Schedule.phase", "iter", "must be >= 0, got ", iter);
  if (iter < options_.warmup_iters) return Phase::kWarmup;
  const int64_t pos = (iter - options_.warmup_iters) % window_len();
  return pos < options_.sample_iters ? Phase::kSampling : Phase::kCompressed;
}

bool Schedule::fits_after(int64_t iter) const {
  if (phase(iter) != Phase::kSampling) return false;
  return (iter - options_.warmup_iters) % window_len() == options_.sample_iters - 1;
}

int64_t Schedule::window_index(int64_t iter) const {
  GVQ_CHECK_ARG(iter >= 0, "Schedule.window_index", "iter", "must be >= 0, got ", iter);
  if (iter < options_.warmup_iters) return -1;
  return (iter - options_.warmup_iters) / window_len();
}

}  // namespace gradiveq
