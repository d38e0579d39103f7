#include "engine/engine_layer.h"

#include <algorithm>

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

bool is_compressible(const NamedParameter& p, const LayerPolicy& policy) {
  return p.tensor.dim() == 4 && p.tensor.numel() >= policy.min_numel &&
         is_float_like(p.tensor.scalar_type()) &&
         (policy.include.empty() || any_match(policy.include, p.name)) && !any_match(policy.exclude, p.name);
}

EngineLayer make_layer(const NamedParameter& p, int64_t slot, const GradiVeQOptions& options) {
  EngineLayer layer;
  layer.name = p.name;
  layer.shape = p.tensor.sizes().vec();
  layer.numel = p.tensor.numel();
  layer.slot = slot;
  layer.device = p.tensor.device();
  layer.compressible = is_compressible(p, options.policy);
  if (layer.compressible) {
    layer.layout = options.slice_layout == SliceLayoutKind::kKernelRow
                       ? ConvSliceLayout::for_weight(p.tensor.sizes())
                       : ConvSliceLayout::kernel_position(p.tensor.sizes());
  }
  auto& st = layer.stats;
  st.name = p.name;
  st.shape = layer.shape;
  st.compressible = layer.compressible;
  st.bytes_in = layer.numel * 4;
  if (layer.compressible) {
    st.slice_len = layer.layout.slice_len;
    st.num_slices = layer.layout.num_slices();
    st.tail_len = layer.layout.tail_len();
  }
  return layer;
}

}  // namespace gradiveq::detail
