#include "engine/adaptive_window.h"

namespace gradiveq::detail {

bool AdaptiveWindow::first_compressed_at(const Schedule& schedule, int64_t iter) const {
  const auto& o = schedule.options();
  const int64_t shifted = iter - shift_;
  return shifted >= o.warmup_iters && (shifted - o.warmup_iters) % schedule.window_len() == o.sample_iters;
}

void AdaptiveWindow::begin_step(const Schedule& schedule, int64_t iteration) {
  if (vote_) {
    const bool restart = vote_->wait().item<float>() > 0.5f;
    vote_.reset();
    if (restart && phase_at(schedule, iteration) == Phase::kCompressed) {
      shift_ = iteration - schedule.options().warmup_iters;  // iteration starts a sampling window
      ++restarts_;
    }
  }
  residual_sq_ = signal_sq_ = at::Tensor();
}

void AdaptiveWindow::add_terms(const at::Tensor& residual_sq, const at::Tensor& signal_sq) {
  residual_sq_ = residual_sq_.defined() ? residual_sq_ + residual_sq : residual_sq;
  signal_sq_ = signal_sq_.defined() ? signal_sq_ + signal_sq : signal_sq;
}

void AdaptiveWindow::write_vote(at::Tensor slot, bool first_compressed) {
  // Device-side arithmetic: no host synchronisation on the per-step path.
  if (!residual_sq_.defined()) {
    slot.zero_();  // nothing compressed this step (no basis yet): no opinion
  } else {
    at::Tensor error = (residual_sq_.clamp_min(0.0) / signal_sq_.clamp_min(1e-30)).sqrt();
    if (first_compressed || !baseline_.defined()) {
      // A fresh basis: the window's first steps set its scale. One minibatch's E varies by about +-25% on
      // real data, so the baseline is a mean over kBaselineSteps steps.
      baseline_ = error.detach().clone();
      baseline_steps_ = 1;
      slot.zero_();
    } else if (baseline_steps_ < kBaselineSteps) {
      baseline_.add_(error);
      ++baseline_steps_;
      slot.zero_();
    } else {
      const double threshold = growth_ / double(baseline_steps_);
      slot.copy_((error > baseline_ * threshold).to(at::kFloat).view({1}));
    }
  }
}

void AdaptiveWindow::receive_vote(const at::Tensor& summed_slot) { vote_.emplace(summed_slot); }

bool AdaptiveWindow::pending_vote() const { return vote_ && vote_->wait().item<float>() > 0.5f; }

void AdaptiveWindow::restore(int64_t shift, int64_t restarts, bool pending_vote) {
  shift_ = shift;
  restarts_ = restarts;
  vote_.reset();
  if (pending_vote) vote_.emplace(at::ones({1}, at::kFloat));
  baseline_ = at::Tensor();
  baseline_steps_ = 0;
}

}  // namespace gradiveq::detail
