// Value types shared by the engines and the front ends: the parameters an engine is built over and the
// statistics it reports. No header needs an engine for them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradiveq {

/// A parameter an engine may see in a bucket; engines recognise it by tensor identity and key their state
/// (bases, error memory, checkpoints) by `name`.
struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

/// Statistics of the last completed step (all buckets of one iteration), summed over its buckets.
struct StepStats {
  int64_t iteration = -1;
  std::string phase;
  int64_t buckets = 0;
  int64_t collectives = 0;
  int64_t bytes_uncompressed = 0;  ///< bytes of all gradients aggregated, in their own dtype
  int64_t bytes_payload = 0;       ///< bytes this rank contributed to collectives
  int64_t bytes_wire =
      0;  ///< bytes this rank sends on a ring: 2(N-1)/N per all-reduce byte, N-1 per all-gather byte
  double aggregation_ms = 0.0;  ///< sum over buckets of (bucket handed over -> its future completed)
  double compress_ms = 0.0;     ///< packing and compressing, in the hook call
  double decompress_ms = 0.0;   ///< unpacking and decompressing, in the callbacks
  /// Fitting and distributing bases, as the step waited for them (only on steps that fit or, with
  /// fit_delay_iters, install deferred fits: then the wait for the worker and the install).
  double fit_ms = 0.0;
  /// With fit_delay_iters, on the step that installs them: how long the worker took to fit them (wall clock,
  /// at idle priority, behind the steps in between); 0 otherwise.
  double fit_background_ms = 0.0;
  /// Bytes of the basis images (and their size tables) this rank broadcast as a fitting rank, only on steps
  /// that fit; not part of bytes_payload. Each is received by the N - 1 other ranks.
  int64_t bytes_bases = 0;
  std::string sampling_aggregation;
  /// This rank's local loss (eq. 7) over the layers it compressed in the step, sqrt(sum of squared residuals
  /// / sum of squared gradients); -1 when nothing was compressed.
  double relative_error = -1.0;
  int64_t window_restarts = 0;  ///< compressed windows left early by the adaptive window, so far
  /// Codecs with per-parameter messages (GatherAggregator): values this rank encoded, and the bytes of their
  /// messages (without the length table and padding), so 8 * bytes_encoded / values_encoded is bits per
  /// value.
  int64_t values_encoded = 0;
  int64_t bytes_encoded = 0;
  /// A configuration that does less than asked, said on every step (empty: none). GradiVeQ: no parameter
  /// passes the layer policy, an include pattern matches no parameter, or compress_iters is 0.
  std::string warning;
};

/// Per-layer statistics of the GradiVeQ engine, as of the last step that aggregated the layer.
struct LayerStats {
  std::string name;
  std::vector<int64_t> shape;
  bool compressible = false;
  /// Why the layer policy does not compress it ("" when it does), e.g. "a 2-D parameter: only 4-D (Conv2d)
  /// weights are compressed".
  std::string not_compressed_because;
  /// How the layer last travelled: "uncompressed", "sampling", "compressed", or "" (never).
  std::string phase;
  int64_t slice_len = 0, num_slices = 0, tail_len = 0;
  int64_t num_components = 0;       ///< d of the current basis (0: none yet)
  double compression_ratio = 0.0;   ///< K / d
  double explained_variance = 0.0;  ///< of the fitting window
  double relative_error = -1.0;  ///< ||g_n - (U c_n + mu/N)|| / ||g_n|| of this rank's gradient (eq. 7), last
                                 ///< compressed step; -1 before
  int64_t bytes_in = 0;          ///< bytes of the layer's gradient in its own dtype
  int64_t bytes_out = 0;         ///< bytes the layer put into collectives in its last step
  int64_t window_samples = 0;    ///< samples collected in the current window
  int64_t skipped_samples = 0;   ///< sampled iterations dropped because the aggregate was not finite
  int64_t fits = 0;              ///< bases fitted so far
  int64_t bases_kept = 0;        ///< refits whose basis moved too little to be sent (refit_threshold)
  std::string fit_status;        ///< outcome of the last fit ("ok", or why it was skipped)
  uint64_t basis_checksum = 0;
  int64_t basis_bytes = 0;  ///< memory of U and mu
};

}  // namespace gradiveq
