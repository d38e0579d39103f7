// Private: the paper's adaptive window (eq. 7; GradiVeQOptions::restart_error_growth). Each rank sums its
// local loss terms over the layers it compresses in a step; the step's last all-reduce carries one float,
// this rank's vote to restart; the summed vote, read at the start of the next step, is identical on every
// rank, so every rank shifts the schedule at the same iteration. The summed vote travels to the host while
// the next step runs (HostReadback): the host waits for it only if it reaches the next step before the
// device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "engine/host_readback.h"
#include "gradiveq/schedule.h"

namespace gradiveq::detail {

class AdaptiveWindow {
 public:
  explicit AdaptiveWindow(double restart_error_growth) : growth_(restart_error_growth) {}

  bool enabled() const { return growth_ > 0.0; }
  /// Phase of `iter` under `schedule`, shifted by the restarts so far.
  Phase phase_at(const Schedule& schedule, int64_t iter) const { return schedule.phase(iter - shift_); }
  /// Whether `iter` is the first compressed iteration of a window.
  bool first_compressed_at(const Schedule& schedule, int64_t iter) const;

  /// At the start of step `iteration`: applies the last step's all-reduced vote (a restart makes `iteration`
  /// the first sampling iteration of a new window) and clears this step's loss terms.
  void begin_step(const Schedule& schedule, int64_t iteration);
  /// One compressed layer's local loss terms (0-dim tensors), in bucket order.
  void add_terms(const at::Tensor& residual_sq, const at::Tensor& signal_sq);
  /// Writes this rank's vote into `slot` (a 1-element view of the step's last all-reduce).
  void write_vote(at::Tensor slot, bool first_compressed);
  /// Once that all-reduce has completed: starts reading the summed vote, which the next step applies.
  void receive_vote(const at::Tensor& summed_slot);

  int64_t shift() const { return shift_; }
  int64_t restarts() const { return restarts_; }
  /// Whether the last completed step voted to restart (read at a step boundary: its collective has
  /// completed).
  bool pending_vote() const;
  /// New bases took over mid-window (a deferred fit's install): the error baseline, measured on the old
  /// bases, no longer says what the new ones should reach, so the next compressed steps set it again.
  void reset_baseline() {
    baseline_ = at::Tensor();
    baseline_steps_ = 0;
  }
  /// Restores the checkpointed fields; the error baseline is per rank and set again by the next steps.
  void restore(int64_t shift, int64_t restarts, bool pending_vote);

 private:
  static constexpr int64_t kBaselineSteps = 3;

  double growth_;
  int64_t shift_ = 0;                   // iterations the schedule is shifted by
  int64_t restarts_ = 0;                // restarts so far
  at::Tensor residual_sq_, signal_sq_;  // this step's summed loss terms
  at::Tensor baseline_;  // sum of E over the window's first compressed steps (up to kBaselineSteps)
  int64_t baseline_steps_ = 0;
  std::optional<HostReadback> vote_;  // the all-reduced vote of the last step, on its way to the host
};

}  // namespace gradiveq::detail
