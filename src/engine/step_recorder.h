// Private: per-step statistics shared by the aggregators. Buckets are issued on the hook thread and finish on
// communication threads in any order; a step's stats become visible once its last bucket was issued and every
// issued bucket has finished.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <string>

#include "gradiveq/types.h"

namespace gradiveq::detail {

using Clock = std::chrono::steady_clock;

/// Eq. 7's relative error from its summed terms: sqrt(||residual||^2 / ||gradient||^2), 0 for a zero
/// gradient.
inline double relative_error_of(double residual_sq, double signal_sq) {
  return signal_sq > 0 ? std::sqrt(std::max(0.0, residual_sq) / signal_sq) : 0.0;
}

inline double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

class StepRecorder {
 public:
  void begin(int64_t iteration, const std::string& phase, const std::string& sampling_aggregation) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_ = StepStats{};
    current_.iteration = iteration;
    current_.phase = phase;
    current_.sampling_aggregation = sampling_aggregation;
    finished_ = 0;
    last_issued_ = false;
    terms_ = ErrorTerms{};
  }
  void add_fit(double ms, int64_t bytes_broadcast) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_.fit_ms += ms;
    current_.bytes_bases += bytes_broadcast;
  }
  void add_background_fit(double ms) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_.fit_background_ms += ms;
  }
  /// A bucket's collectives (or one pipelining group's: new_bucket false for all groups but the first) went out.
  void issued(int64_t collectives, int64_t payload, int64_t wire, int64_t uncompressed, double compress_ms,
              bool is_last, bool new_bucket = true) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (new_bucket) current_.buckets += 1;
    current_.collectives += collectives;
    current_.bytes_payload += payload;
    current_.bytes_wire += wire;
    current_.bytes_uncompressed += uncompressed;
    current_.compress_ms += compress_ms;
    last_issued_ = last_issued_ || is_last;
  }
  void set_warning(const std::string& warning) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_.warning = warning;
  }
  void set_window_restarts(int64_t restarts) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_.window_restarts = restarts;
  }
  /// Adds one compressed layer's eq. 7 loss terms (squared residual and squared gradient norms).
  void add_error_terms(double residual_sq, double signal_sq) {
    std::lock_guard<std::mutex> lock(mutex_);
    terms_.host_residual_sq += residual_sq;
    terms_.host_signal_sq += signal_sq;
    terms_.any = true;
  }
  /// The same as 0-dim tensors on the layer's device: summed there, and read on the host only when the step's
  /// stats are (last()), so that recording a CUDA step never waits for the device.
  void add_error_terms(const at::Tensor& residual_sq, const at::Tensor& signal_sq) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto add = [](at::Tensor& sum, const at::Tensor& term) {
      sum = sum.defined() ? sum + term : term.to(at::kDouble);  // double, as the host sums
    };
    add(terms_.residual_sq, residual_sq);
    add(terms_.signal_sq, signal_sq);
    terms_.any = true;
  }
  /// A message of `bytes` bytes carrying `values` values went out.
  void add_encoded(int64_t values, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_.values_encoded += values;
    current_.bytes_encoded += bytes;
  }
  /// Decompression of a bucket (or of one of its pipelining groups: bucket_done false) finished; the bucket
  /// counts as finished, with its aggregation time, when bucket_done.
  void finished(double decompress_ms, Clock::time_point bucket_start, bool bucket_done = true) {
    std::lock_guard<std::mutex> lock(mutex_);
    current_.decompress_ms += decompress_ms;
    if (!bucket_done) return;
    current_.aggregation_ms += ms_since(bucket_start);
    ++finished_;
    if (last_issued_ && finished_ == current_.buckets) {
      last_ = current_;
      last_terms_ = terms_;
    }
  }
  /// The last completed step (its relative_error read from the device here).
  StepStats last() const {
    std::lock_guard<std::mutex> lock(mutex_);
    StepStats out = last_;
    if (last_terms_.any) out.relative_error = last_terms_.relative_error();
    return out;
  }

 private:
  // A step's eq. 7 loss terms: host sums (codecs that run on the CPU) plus device sums.
  struct ErrorTerms {
    double host_residual_sq = 0.0, host_signal_sq = 0.0;
    at::Tensor residual_sq, signal_sq;  // undefined until a device term arrives
    bool any = false;

    double relative_error() const {
      const double residual = host_residual_sq + (residual_sq.defined() ? residual_sq.item<double>() : 0.0);
      const double signal = host_signal_sq + (signal_sq.defined() ? signal_sq.item<double>() : 0.0);
      return relative_error_of(residual, signal);
    }
  };

  mutable std::mutex mutex_;
  StepStats current_, last_;
  ErrorTerms terms_, last_terms_;
  int64_t finished_ = 0;
  bool last_issued_ = false;
};

}  // namespace gradiveq::detail
