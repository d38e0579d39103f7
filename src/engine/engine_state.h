// Private: the GradiVeQ engine's checkpoint image (GradiVeQAggregator::save_state / load_state).
//
// Layout, little-endian (version 8):
//   "GVQS" [uint32 version] [int64 world size] [int64 rank] [uint8 per rank] [int64 iteration]
//   [uint8 pending fit] [int64 fit install step] [int64 schedule shift]
//   [int64 restarts] [uint8 pending restart vote] [int64 layers], then per layer:
//   [string name] [int64 ndim] [int64 shape...] [uint8 compressible], and for a compressible layer:
//   [int64 K] [int64 fits] [uint8 has basis] ([bytes basis image]) [int64 sample blocks] ([int64
//   rows][bytes])... [uint8 error-memory parts] ([bytes E (S, K)] [bytes P (S, d)] [bytes C (S, d)], float32,
//   as many as the parts say: error_memory.h), and last a checksum of everything before it (8 bytes), so a
//   damaged file is refused.
// Version 2 added the adaptive window's fields, version 3 the trailing checksum, version 4 a stronger one,
// version 5 the error-feedback memory, 6 the install step of a deferred fit, 7 the rank, 8 the memory's
// coefficients (6 and 7 are still read: their memory is E alone).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/engine_layer.h"

namespace gradiveq::detail {

/// The engine-wide fields of the image.
struct EngineCounters {
  int64_t world_size = 1;
  int64_t iteration = 0;
  bool pending_fit = false;
  int64_t schedule_shift = 0;
  int64_t window_restarts = 0;
  bool pending_vote = false;
  /// A deferred fit (fit_delay_iters) in flight: the step that installs it, else -1.
  int64_t fit_install_at = -1;
  /// The saving rank, and whether the image holds that rank's own data (error-feedback memory, local
  /// samples), which only that rank may load. Version 6 images carry neither (rank -1, not checked).
  int64_t rank = -1;
  bool per_rank = false;
};

/// One layer's part of a read image.
struct LoadedLayer {
  PcaCompressor pca;
  uint64_t checksum = 0;
  int64_t fits = 0;
  std::vector<at::Tensor> samples;
  ErrorMemory::Image error;  ///< error-feedback memory (its tensors undefined when the layer had none)
};

struct LoadedState {
  EngineCounters counters;
  std::vector<LoadedLayer> layers;  // one per engine layer, in order
};

at::Tensor write_state_image(const EngineCounters& counters,
                             const std::vector<std::unique_ptr<EngineLayer>>& layers);

/// Parses and checks an image against this engine's rank, world size and layers, changing nothing. Raises
/// InvalidArgument naming what does not match; a basis of another dtype is converted to `basis_dtype`.
LoadedState read_state_image(const at::Tensor& image, int64_t rank, int64_t world_size,
                             const std::vector<std::unique_ptr<EngineLayer>>& layers,
                             at::ScalarType basis_dtype);

}  // namespace gradiveq::detail
