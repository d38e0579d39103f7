// Private: how every rank comes to hold the same bases, and how the engine checks that they do.
//
// Fit and broadcast: after each sampling window, compressible layer j is fitted by rank j % N from the
// samples of the window (aggregated gradients, identical on every rank, or that rank's own local ones) and
// its serialized basis, rounded to basis_dtype first, is broadcast by that rank; everyone deserializes the
// same bytes. A basis that moved no more than refit_threshold is not sent: a marker says "keep yours".
// With basis_sync = replicated every rank fits every layer from the aggregated samples, identical on all
// ranks, and installs its own images: the fit and its decisions (error_budget's d, refit_threshold's keep)
// run in Eigen, single-threaded, so they come out bit-identical, and the verification below checks that
// they did.
//
// Deferred fits (fit_delay_iters): the window's samples and current bases are copied out (FitWindow) and
// fitted on a worker thread while the steps go on; the results are shared and installed as above, at the
// start of a step every rank reaches at the same iteration. The worker reads nothing the steps write.
//
// Verification (verify_bases): a 64-bit code of the iteration, the schedule, the energy, the adaptive
// window's shift, the configuration (layer policy, wire dtypes: configuration_code) and all bases rides in
// the first bucket's all-reduce of every step, cut into chunks small enough that N of them sum exactly in
// float32 (< 2^24). After the all-reduce every rank checks that each summed chunk is N times its own: any
// rank that differs makes every rank raise (CPU sums in that step; device sums at the start of the next step
// or at save_state).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <utility>
#include <vector>

#include "engine/engine_layer.h"
#include "engine/host_readback.h"
#include "gradiveq/options.h"

namespace gradiveq::detail {

/// The rank that fits compressible layer number `fittable_index` (in registration order).
inline int64_t fitting_rank(int64_t fittable_index, int64_t world_size) { return fittable_index % world_size; }

/// One window's samples and current bases, copied out of the compressible layers (tensor handles: a settled
/// sample is never written again, and a basis is replaced, never changed in place), so that a fit can run
/// on another thread while the steps go on with the layers.
struct FitWindow {
  struct Layer {
    std::vector<at::Tensor> samples;  ///< (rows, K) float32 CPU blocks, finite
    PcaCompressor current;            ///< the layer's basis when the window ended (refit_threshold compares)
    int64_t owner = -1;               ///< its fitting rank
  };
  std::vector<Layer> layers;  ///< the compressible layers, in registration order
};

/// What a window's fits decided, per compressible layer: the serialized image of a new basis, why a fit was
/// skipped, or that the current basis stays (`kept`).
struct FitResults {
  std::vector<at::Tensor> images;
  std::vector<std::string> failures;
  std::vector<char> kept;
};

/// The window of `layers` (samples settled; the caller holds the stats mutex).
FitWindow snapshot_window(const std::vector<std::unique_ptr<EngineLayer>>& layers);

/// Fits the layers `rank` owns (with basis_sync = replicated: every layer). Touches no layer, so it may run
/// on any thread; the fits are Eigen, single-threaded, so the result does not depend on which.
FitResults fit_window(const FitWindow& window, const GradiVeQOptions& options, int64_t rank);

/// Broadcasts every fitted basis from its owner (replicated: nothing travels, each rank installs its own
/// images), then installs them: every layer's basis, checksum and fit stats are updated (under `mutex`) and
/// the window's samples dropped. Returns the bytes this rank broadcast as a root (size tables and images).
int64_t share_and_install(c10d::ProcessGroup& pg, const std::vector<std::unique_ptr<EngineLayer>>& layers,
                          const FitResults& results, const GradiVeQOptions& options, std::mutex& mutex);

/// The window's fits at once, on this thread: fit_window, then share_and_install.
int64_t fit_and_broadcast(c10d::ProcessGroup& pg, const std::vector<std::unique_ptr<EngineLayer>>& layers,
                          const GradiVeQOptions& options, std::mutex& mutex);

/// A window's fits on a worker thread of idle priority (GradiVeQOptions::fit_delay_iters): the steps go on
/// with the current bases while it runs, in the time the rank would otherwise idle (waiting for its
/// collectives), and every rank installs the results at the start of the same iteration, install_at(), so
/// the ranks stay bit-identical however long each took. wait() blocks only if the fits are not done by then.
class DeferredFit {
 public:
  DeferredFit(FitWindow window, const GradiVeQOptions& options, int64_t rank, int64_t install_at);
  ~DeferredFit();  // waits for the worker
  DeferredFit(const DeferredFit&) = delete;
  DeferredFit& operator=(const DeferredFit&) = delete;

  int64_t install_at() const { return install_at_; }
  /// The results (rethrows what the worker raised); call once.
  FitResults wait();
  /// Milliseconds the worker spent fitting (wall clock, at idle priority), once wait() returned.
  double worker_ms() const { return worker_ms_; }

 private:
  // The worker's priority, shared with it: once a step waits for the fit (wait(), the destructor), the worker
  // must not stay at idle priority, or busy cores (other ranks, spinning threads) could starve it and stall
  // that step for longer than a synchronous fit would.
  struct Priority;

  int64_t install_at_;
  double worker_ms_ = 0.0;
  std::shared_ptr<Priority> priority_;
  std::future<std::pair<FitResults, double>> results_;
};

/// A code of everything that decides the shape of a step's collectives and must match on every rank: each
/// layer's name, shape, policy verdict and slice length, the wire and basis dtypes, the sampling quantizer,
/// the fit samples, the pipelining and the adaptive window. A rank that differs in any of them would
/// otherwise send collectives of other sizes (Gloo's "collective mismatch", or a hang until the timeout).
uint64_t configuration_code(const std::vector<std::unique_ptr<EngineLayer>>& layers,
                            const GradiVeQOptions& options);

/// Combined checksum of every layer's basis (0 for a layer without one), by layer name.
uint64_t bases_checksum(const std::vector<std::unique_ptr<EngineLayer>>& layers);

/// The state code of one step, written into the all-reduce and checked from it, side by side.
class VerificationCode {
 public:
  /// Its values travel in `carrier`: each holds a chunk of the code narrow enough that the sum over
  /// world_size ranks is an exact integer in that dtype (float32: 16-bit chunks up to 256 ranks, else 8-bit).
  VerificationCode(uint64_t code, int64_t world_size, at::ScalarType carrier = at::kFloat);
  /// Whether half-precision `carrier` sums 1-bit chunks of world_size ranks exactly (float32 always does).
  static bool fits(int64_t world_size, at::ScalarType carrier);
  /// The code of the state the ranks must agree on at `iteration`.
  static uint64_t of_state(int64_t iteration, const GradiVeQOptions& options, int64_t schedule_shift,
                           uint64_t configuration_code, uint64_t bases_checksum);

  /// Values it takes in the all-reduce.
  int64_t length() const { return (64 + bits_ - 1) / bits_; }
  /// Writes the chunks into `slot` (length() values of the carrier dtype).
  void write(at::Tensor slot) const;
  /// Raises (every rank alike) unless each summed chunk in `summed` is world_size times this rank's own.
  void check(const at::Tensor& summed, int64_t iteration, int64_t rank) const;

 private:
  uint64_t chunk(int64_t j) const { return (code_ >> (j * bits_)) & ((uint64_t(1) << bits_) - 1); }

  uint64_t code_;
  int64_t world_size_;
  int64_t bits_;
};

/// A step's verification on device sums, on their way to the host, which the engine checks at the start of
/// the next step or when the state is saved: a CUDA step never waits for the device to check (a disagreement
/// in the very last step of a run that neither steps nor saves again goes unreported). CPU sums are checked
/// in their own step.
struct PendingVerification {
  VerificationCode code;
  HostReadback sums;
  int64_t iteration = 0;

  void check(int64_t rank) const { code.check(sums.wait(), iteration, rank); }
};

}  // namespace gradiveq::detail
