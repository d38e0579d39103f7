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
// Verification (verify_bases): a 64-bit code of the iteration, the schedule, the energy, the adaptive
// window's shift, the configuration (layer policy, wire dtypes: configuration_code) and all bases rides in
// the first bucket's all-reduce of every step, cut into chunks small enough that N of them sum exactly in
// float32 (< 2^24). After the all-reduce every rank checks that each summed chunk is N times its own: any
// rank that differs makes every rank raise (CPU sums in that step; device sums at the start of the next step
// or at save_state).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <vector>

#include "engine/engine_layer.h"
#include "engine/host_readback.h"
#include "gradiveq/options.h"

namespace gradiveq::detail {

/// The rank that fits compressible layer number `fittable_index` (in registration order).
inline int64_t fitting_rank(int64_t fittable_index, int64_t world_size) { return fittable_index % world_size; }

/// Fits the layers this rank owns and broadcasts every fitted basis from its owner (replicated: fits every
/// layer and broadcasts nothing); every layer's basis,
/// checksum and fit stats are updated (under `mutex`) and the window's samples dropped. Returns the bytes
/// this rank broadcast as a root (size tables and images).
int64_t fit_and_broadcast(c10d::ProcessGroup& pg, const std::vector<std::unique_ptr<EngineLayer>>& layers,
                          const GradiVeQOptions& options, std::mutex& mutex);

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
