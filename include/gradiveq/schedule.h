// The GradiVeQ training schedule (paper Sec. 3, Fig. 6): a warm-up of uncompressed iterations, then repeated
// windows of `sample_iters` sampling iterations (aggregated without PCA compression, their aggregated
// gradients collected) followed by `compress_iters` compressed iterations. The bases are re-fitted at the end
// of every sampling window, so the first compressed iteration of each window uses fresh bases.
//
// The phase of an iteration is a pure function of the iteration and the options: every rank computes the
// same phase with no communication.
#pragma once

#include "gradiveq/options.h"

#include <cstdint>
#include <string>

namespace gradiveq {

enum class Phase { kWarmup, kSampling, kCompressed };

std::string phase_name(Phase phase);

class Schedule {
 public:
  explicit Schedule(const ScheduleOptions& options = {});

  const ScheduleOptions& options() const { return options_; }
  int64_t window_len() const { return options_.sample_iters + options_.compress_iters; }

  /// Phase of iteration `iter` (0-based, >= 0).
  Phase phase(int64_t iter) const;
  /// True on the last sampling iteration of a window: after aggregating it, the bases are fitted.
  bool fits_after(int64_t iter) const;
  /// Index of the sampling/compressed window `iter` falls in; -1 during warm-up.
  int64_t window_index(int64_t iter) const;

 private:
  ScheduleOptions options_;
};

}  // namespace gradiveq
