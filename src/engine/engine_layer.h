// Private: one parameter the GradiVeQ engine knows, with its layer policy verdict, slice layout, basis and
// sampling window.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/error_memory.h"
#include "engine/host_readback.h"
#include "gradiveq/conv_layout.h"
#include "gradiveq/options.h"
#include "gradiveq/pca_compressor.h"
#include "gradiveq/types.h"

namespace gradiveq::detail {

struct EngineLayer {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  int64_t slot = 0;  ///< registration index
  bool compressible = false;
  ConvSliceLayout layout;
  /// Shape the gradient is viewed as for `layout`: the parameter's own (F, D, H, W) for a conv weight,
  /// (1, 1, out, in) for a 2-D weight, whose kernel rows are then its output rows (K = in), and
  /// (F, 1, D*H*W, 1) with filter columns, whose kernel rows are the columns across all filters (K = F).
  std::vector<int64_t> layout_shape;
  int64_t fit_owner = -1;  ///< the rank that fits this layer's basis (compressible layers only)
  at::Device device{at::kCPU};
  PcaCompressor pca;
  uint64_t checksum = 0;            ///< of pca's serialized image
  std::vector<at::Tensor> samples;  ///< the current window's finite slices, (rows, K) float32 CPU each
  /// Samples on their way to the host (HostReadback), with whether they are finite: settle_samples() moves
  /// them into `samples` before anything reads those, so that keeping a sample never waits for the device.
  std::vector<std::pair<HostReadback, HostReadback>> arriving_samples;
  ErrorMemory error;  ///< error-feedback memory, on the layer's device (error_memory.h)
  LayerStats stats;
  /// The last compressed step's eq. 7 terms (squared residual, squared gradient; 0-dim, on the layer's
  /// device), which stats.relative_error is computed from when the stats are read.
  std::pair<at::Tensor, at::Tensor> last_error_terms;

  /// Moves the arriving samples that are finite into `samples` (pageable copies: the pinned blocks go back to
  /// the allocator) and counts the others as skipped. `wait` false: only those already on the host, in order.
  void settle_samples(bool wait = true) {
    size_t settled = 0;
    for (; settled < arriving_samples.size(); ++settled) {
      const auto& [slices, finite] = arriving_samples[settled];
      if (!wait && !(slices.ready() && finite.ready())) break;
      if (finite.wait().item<bool>()) {
        const at::Tensor& host = slices.wait();
        samples.push_back(host.is_pinned() ? host.clone() : host);
      } else {
        stats.skipped_samples += 1;
      }
    }
    arriving_samples.erase(arriving_samples.begin(), arriving_samples.begin() + std::ptrdiff_t(settled));
  }
  void clear_samples() {
    samples.clear();
    arriving_samples.clear();
  }

  /// Rows of the settled samples.
  int64_t sample_rows() const {
    int64_t rows = 0;
    for (const auto& s : samples) rows += s.size(0);
    return rows;
  }
};

/// The layer policy (LayerPolicy's comment in options.h) applied to one parameter: "" when it is compressed,
/// otherwise why not.
std::string policy_verdict(const NamedParameter& parameter, const LayerPolicy& policy);

/// What a configuration leaves undone over these layers (one sentence each): no compressible layer, an
/// include pattern that matches none, a schedule that never compresses. Reads the verdicts make_layer
/// recorded.
std::vector<std::string> configuration_warnings(const std::vector<std::unique_ptr<EngineLayer>>& layers,
                                                const GradiVeQOptions& options);

/// A layer for `parameter`, its layout chosen by `options.slice_layout` when it is compressible.
EngineLayer make_layer(const NamedParameter& parameter, int64_t slot, const GradiVeQOptions& options);

bool is_float_like(at::ScalarType t);

}  // namespace gradiveq::detail
