#include "engine/engine_layer.h"

#include <algorithm>

#include "gradiveq/errors.h"

namespace gradiveq::detail {

namespace {

// Glob match: '*' any run of characters (also none), '?' exactly one.
bool glob_match(const char* pattern, const char* text) {
  const char* star = nullptr;
  const char* resume = nullptr;
  while (*text) {
    if (*pattern == '?' || *pattern == *text) {
      ++pattern;
      ++text;
    } else if (*pattern == '*') {
      star = pattern++;
      resume = text;
    } else if (star) {
      pattern = star + 1;
      text = ++resume;
    } else {
      return false;
    }
  }
  while (*pattern == '*') ++pattern;
  return *pattern == '\0';
}

bool any_match(const std::vector<std::string>& patterns, const std::string& name) {
  return std::any_of(patterns.begin(), patterns.end(),
                     [&](const std::string& p) { return glob_match(p.c_str(), name.c_str()); });
}

}  // namespace

bool is_float_like(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

std::string policy_verdict(const NamedParameter& p, const LayerPolicy& policy) {
  if (!policy.include.empty() && !any_match(policy.include, p.name)) return "matches no include pattern";
  if (any_match(policy.exclude, p.name)) return "matches an exclude pattern";
  if (p.tensor.dim() == 2 && !policy.linear_weights) {
    return "a 2-D parameter: Linear weights are compressed only with linear_weights on";
  }
  if (p.tensor.dim() != 4 && p.tensor.dim() != 2) {
    return detail::concat("a ", p.tensor.dim(),
                          "-D parameter: only 4-D (Conv2d) and, with linear_weights, 2-D "
                          "(Linear) weights are compressed");
  }
  if (p.tensor.numel() < policy.min_numel) {
    return detail::concat(p.tensor.numel(), " values, fewer than min_numel = ", policy.min_numel);
  }
  if (!is_float_like(p.tensor.scalar_type())) {
    return detail::concat("dtype ", p.tensor.scalar_type(), " is not float32, float16 or bfloat16");
  }
  return "";
}

std::vector<std::string> configuration_warnings(const std::vector<std::unique_ptr<EngineLayer>>& layers,
                                                const GradiVeQOptions& options) {
  std::vector<std::string> out;
  const auto& policy = options.policy;
  for (const auto& pattern : policy.include) {
    const bool used = std::any_of(layers.begin(), layers.end(), [&](const std::unique_ptr<EngineLayer>& l) {
      return glob_match(pattern.c_str(), l->name.c_str());
    });
    if (!used) out.push_back(detail::concat("include pattern '", pattern, "' matches no parameter"));
  }
  const bool any_compressible = std::any_of(
      layers.begin(), layers.end(), [](const std::unique_ptr<EngineLayer>& l) { return l->compressible; });
  if (!any_compressible) {
    out.push_back(detail::concat("no parameter is compressed: none of the ", layers.size(),
                                 " passes the layer policy (4-D conv weights, and 2-D weights with "
                                 "linear_weights, with at least min_numel = ",
                                 policy.min_numel,
                                 " values, matching include and not exclude), so every step is a plain "
                                 "all-reduce; the layer stats name each parameter's reason"));
  } else if (options.schedule.compress_iters == 0) {
    out.push_back("compress_iters is 0: the schedule only samples, nothing is ever compressed");
  }
  return out;
}

EngineLayer make_layer(const NamedParameter& p, int64_t slot, const GradiVeQOptions& options) {
  EngineLayer layer;
  layer.name = p.name;
  layer.shape = p.tensor.sizes().vec();
  layer.numel = p.tensor.numel();
  layer.slot = slot;
  layer.device = p.tensor.device();
  layer.stats.not_compressed_because = policy_verdict(p, options.policy);
  layer.compressible = layer.stats.not_compressed_because.empty();
  const bool columns = options.slice_layout == SliceLayoutKind::kFilterColumn;
  if (layer.compressible && (columns || p.tensor.dim() == 2)) {
    // Views whose kernel rows are the slices wanted: a filter column is a (F, 1, D*H*W, 1) weight's kernel
    // row (K = F); a Linear (out, in) weight's output row is a (1, 1, out, in) weight's (K = in).
    const int64_t filters = p.tensor.size(0), rest = p.tensor.numel() / filters;
    layer.layout_shape =
        columns ? std::vector<int64_t>{filters, 1, rest, 1} : std::vector<int64_t>{1, 1, filters, rest};
    layer.layout = ConvSliceLayout::for_weight(layer.layout_shape);
  } else if (layer.compressible) {
    layer.layout_shape = layer.shape;
    layer.layout = options.slice_layout == SliceLayoutKind::kKernelRow
                       ? ConvSliceLayout::for_weight(p.tensor.sizes())
                       : ConvSliceLayout::kernel_position(p.tensor.sizes());
  }
  auto& st = layer.stats;
  st.name = p.name;
  st.shape = layer.shape;
  st.compressible = layer.compressible;
  st.bytes_in = layer.numel * int64_t(p.tensor.element_size());
  if (layer.compressible) {
    st.slice_len = layer.layout.slice_len;
    st.num_slices = layer.layout.num_slices();
    st.tail_len = layer.layout.tail_len();
  }
  return layer;
}

}  // namespace gradiveq::detail
