#include "engine/engine_state.h"

#include <cstring>

#include "gradiveq/errors.h"
#include "util/byte_io.h"

namespace gradiveq::detail {

namespace {

constexpr const char* kWhere = "Aggregator.load_state";
constexpr char kStateMagic[4] = {'G', 'V', 'Q', 'S'};
constexpr uint32_t kStateVersion = 8;  // 6: fit_install_at; 7: rank, per rank; 8: memory coefficients
constexpr uint32_t kOldestReadableVersion = 6;
constexpr size_t kStateChecksumBytes = 8;

// Error-feedback memory, from version 8: [uint8 parts: 0 none, 1 E, 2 E and P, 3 E, P and C] then each part's
// bytes (error_memory.h); version 5-7 images hold E alone, flagged 0 or 1.
enum MemoryParts : uint8_t { kNoMemory = 0, kDense = 1, kProjected = 2, kSent = 3 };

void write_memory(ByteWriter& w, const ErrorMemory::Image& m) {
  const uint8_t parts = !m.dense.defined()       ? kNoMemory
                        : !m.projected.defined() ? kDense
                        : !m.sent.defined()      ? kProjected
                                                 : kSent;
  w.put<uint8_t>(parts);
  for (const at::Tensor* t : {&m.dense, &m.projected, &m.sent}) {
    if (t->defined()) w.put_tensor_bytes(t->to(at::kCPU).contiguous());
  }
}

void write_layer(ByteWriter& w, const EngineLayer& l) {
  w.put_string(l.name);
  w.put<int64_t>(int64_t(l.shape.size()));
  for (int64_t s : l.shape) w.put<int64_t>(s);
  w.put<uint8_t>(l.compressible ? 1 : 0);
  if (!l.compressible) return;
  w.put<int64_t>(l.layout.slice_len);
  w.put<int64_t>(l.stats.fits);
  w.put<uint8_t>(l.pca.is_fitted() ? 1 : 0);
  if (l.pca.is_fitted()) w.put_tensor_bytes(l.pca.serialize());
  w.put<int64_t>(int64_t(l.samples.size()));
  for (const auto& s : l.samples) {
    w.put<int64_t>(s.size(0));
    w.put_tensor_bytes(s);
  }
  write_memory(w, l.error.image(l.pca));
}

// Magic, version and trailing checksum; returns the body (without the checksum).
at::Tensor checked_body(const at::Tensor& image) {
  GVQ_CHECK_ARG(image.defined() && image.scalar_type() == at::kByte && image.dim() == 1, kWhere, "state",
                "must be a 1-D uint8 tensor (from save_state)");
  at::Tensor bytes = image.to(at::kCPU).contiguous();
  const size_t total = size_t(bytes.numel());
  const uint8_t* data = bytes.data_ptr<uint8_t>();
  GVQ_CHECK_ARG(total >= 8 && std::memcmp(data, kStateMagic, 4) == 0, kWhere, "state",
                "is not a GradiVeQ state image (bad magic)");
  uint32_t version = 0;
  std::memcpy(&version, data + 4, sizeof(version));
  GVQ_CHECK_ARG(version >= kOldestReadableVersion && version <= kStateVersion, kWhere, "state",
                "has format version ", version, ", this build reads versions ", kOldestReadableVersion,
                " to ", kStateVersion);
  GVQ_CHECK_ARG(total >= 8 + kStateChecksumBytes, kWhere, "state", "is truncated (", total, " bytes)");
  at::Tensor body = bytes.narrow(0, 0, int64_t(total - kStateChecksumBytes));
  uint64_t stored = 0;
  std::memcpy(&stored, data + total - kStateChecksumBytes, kStateChecksumBytes);
  GVQ_CHECK_ARG(
      checksum_bytes(body) == stored, kWhere, "state",
      "is corrupted: its checksum does not match its contents (a damaged, truncated or edited file)");
  return body;
}

EngineCounters read_counters(ByteReader& in, int64_t rank, int64_t world_size, size_t num_layers) {
  in.take(4);  // magic, checked already
  const auto version = in.get<uint32_t>();
  EngineCounters c;
  c.world_size = in.get<int64_t>();
  GVQ_CHECK_ARG(c.world_size == world_size, kWhere, "state", "was saved with world size ", c.world_size,
                " but this process group has ", world_size, " ranks");
  if (version >= 7) {
    c.rank = in.get<int64_t>();
    c.per_rank = in.get<uint8_t>() != 0;
  }
  GVQ_CHECK_ARG(!c.per_rank || c.rank == rank, kWhere, "state", "was saved on rank ", c.rank,
                ", this is rank ", rank,
                ": it holds that rank's own error-feedback memory or local samples, so each rank loads ",
                "the image it saved");
  c.iteration = in.get<int64_t>();
  c.pending_fit = in.get<uint8_t>() != 0;
  c.fit_install_at = in.get<int64_t>();
  GVQ_CHECK_ARG(c.fit_install_at >= -1 && (c.fit_install_at == -1 || c.pending_fit), kWhere, "state",
                "is corrupted: a deferred fit's install step ", c.fit_install_at, " without a pending fit");
  GVQ_CHECK_ARG(c.iteration >= 0, kWhere, "state", "holds a negative iteration ", c.iteration);
  c.schedule_shift = in.get<int64_t>();
  c.window_restarts = in.get<int64_t>();
  c.pending_vote = in.get<uint8_t>() != 0;
  GVQ_CHECK_ARG(c.schedule_shift >= 0 && c.schedule_shift <= c.iteration && c.window_restarts >= 0, kWhere,
                "state", "is corrupted: schedule shift ", c.schedule_shift, ", restarts ", c.window_restarts,
                " at iteration ", c.iteration);
  const auto count = in.get<int64_t>();
  GVQ_CHECK_ARG(count == int64_t(num_layers), kWhere, "state", "holds ", count,
                " parameters but this model has ", num_layers, " (a different model?)");
  return c;
}

// Name, shape and policy verdict of layer `i` must be this model's.
void read_layer_header(ByteReader& in, size_t i, const EngineLayer& l) {
  const std::string name = in.get_string();
  GVQ_CHECK_ARG(name == l.name, kWhere, "state", "parameter ", i, " is '", name, "' but this model has '",
                l.name, "' (a different model?)");
  const auto ndim = in.get<int64_t>();
  GVQ_CHECK_ARG(ndim >= 0 && ndim <= 8, kWhere, "state", "is corrupted: parameter '", name, "' has ", ndim,
                " dimensions");
  std::vector<int64_t> shape(static_cast<size_t>(ndim));
  for (auto& s : shape) s = in.get<int64_t>();
  GVQ_CHECK_ARG(shape == l.shape, kWhere, "state", "parameter '", name, "' has shape ",
                at::IntArrayRef(shape), " but this model's has ", at::IntArrayRef(l.shape));
  const bool compressible = in.get<uint8_t>() != 0;
  GVQ_CHECK_ARG(compressible == l.compressible, kWhere, "state", "parameter '", name, "' is ",
                compressible ? "" : "not ", "compressible in the saved state but ",
                l.compressible ? "is" : "is not", " here (different include / exclude / min_numel?)");
}

// One part of the memory: (S, cols) float32.
at::Tensor read_memory_part(ByteReader& in, const EngineLayer& l, int64_t cols, const char* part) {
  at::Tensor raw = in.get_tensor_bytes();
  const int64_t expected = l.layout.num_slices() * cols * 4;
  GVQ_CHECK_ARG(raw.numel() == expected, kWhere, "state", "is corrupted: the error-feedback memory of '",
                l.name, "' has ", raw.numel(), " bytes of ", part, ", expected ", expected);
  return raw.view(at::kFloat).view({l.layout.num_slices(), cols}).clone();
}

ErrorMemory::Image read_memory(ByteReader& in, const EngineLayer& l, const PcaCompressor& pca) {
  const auto parts = in.get<uint8_t>();
  GVQ_CHECK_ARG(parts <= kSent, kWhere, "state", "is corrupted: error-feedback memory parts ", int(parts),
                " for '", l.name, "'");
  GVQ_CHECK_ARG(parts < kProjected || pca.is_fitted(), kWhere, "state", "is corrupted: the error-feedback ",
                "memory of '", l.name, "' holds coefficients but the layer has no basis");
  ErrorMemory::Image m;
  if (parts >= kDense) m.dense = read_memory_part(in, l, l.layout.slice_len, "E");
  if (parts >= kProjected) m.projected = read_memory_part(in, l, pca.num_components(), "P");
  if (parts >= kSent) m.sent = read_memory_part(in, l, pca.num_components(), "C");
  return m;
}

LoadedLayer read_layer_body(ByteReader& in, const EngineLayer& l, at::ScalarType basis_dtype) {
  const std::string& name = l.name;
  LoadedLayer out;
  const auto k = in.get<int64_t>();
  GVQ_CHECK_ARG(k == l.layout.slice_len, kWhere, "state", "parameter '", name,
                "' was saved with slice length ", k, " but this layout has ", l.layout.slice_len,
                " (different slice_layout?)");
  out.fits = in.get<int64_t>();
  if (in.get<uint8_t>() != 0) {
    at::Tensor img = in.get_tensor_bytes();
    try {
      // A checkpoint of another basis_dtype is converted: the checksum below is of the basis in use.
      out.pca = PcaCompressor::deserialize(img).with_basis_dtype(basis_dtype);
    } catch (const InvalidArgument& e) {  // say which state and layer, not only what deserialize saw
      GVQ_CHECK_ARG(false, kWhere, "state", "holds a corrupted basis for '", name, "': ", e.what());
    }
    GVQ_CHECK_ARG(out.pca.slice_len() == k, kWhere, "state", "basis of '", name,
                  "' has K = ", out.pca.slice_len(), " but the layer's slice length is ", k);
    out.checksum = out.pca.checksum();
  }
  const auto num_samples = in.get<int64_t>();
  GVQ_CHECK_ARG(num_samples >= 0 && num_samples <= int64_t(in.remaining()), kWhere, "state",
                "is corrupted: ", num_samples, " sample blocks for '", name, "'");
  for (int64_t s = 0; s < num_samples; ++s) {
    const auto rows = in.get<int64_t>();
    at::Tensor raw = in.get_tensor_bytes();
    // Division, not rows * k * 4: a damaged count must not overflow.
    GVQ_CHECK_ARG(rows >= 1 && raw.numel() % (k * 4) == 0 && raw.numel() / (k * 4) == rows, kWhere, "state",
                  "is corrupted: a sample block of '", name, "' has ", raw.numel(), " bytes for ", rows,
                  " rows of K = ", k);
    out.samples.push_back(raw.view(at::kFloat).view({rows, k}).clone());
  }
  out.error = read_memory(in, l, out.pca);
  return out;
}

}  // namespace

at::Tensor write_state_image(const EngineCounters& c,
                             const std::vector<std::unique_ptr<EngineLayer>>& layers) {
  ByteWriter w;
  w.put_raw(kStateMagic, 4);
  w.put(kStateVersion);
  w.put<int64_t>(c.world_size);
  w.put<int64_t>(c.rank);
  w.put<uint8_t>(c.per_rank ? 1 : 0);
  w.put<int64_t>(c.iteration);
  w.put<uint8_t>(c.pending_fit ? 1 : 0);
  w.put<int64_t>(c.fit_install_at);
  w.put<int64_t>(c.schedule_shift);
  w.put<int64_t>(c.window_restarts);
  w.put<uint8_t>(c.pending_vote ? 1 : 0);
  w.put<int64_t>(int64_t(layers.size()));
  for (const auto& l : layers) write_layer(w, *l);
  at::Tensor body = w.to_tensor();
  const uint64_t checksum = checksum_bytes(body);
  at::Tensor trailer = at::empty({int64_t(kStateChecksumBytes)}, at::kByte);
  std::memcpy(trailer.data_ptr<uint8_t>(), &checksum, kStateChecksumBytes);
  return at::cat({body, trailer});
}

LoadedState read_state_image(const at::Tensor& image, int64_t rank, int64_t world_size,
                             const std::vector<std::unique_ptr<EngineLayer>>& layers,
                             at::ScalarType basis_dtype) {
  at::Tensor body = checked_body(image);
  ByteReader in(body.data_ptr<uint8_t>(), size_t(body.numel()), kWhere, "state");
  LoadedState state;
  state.counters = read_counters(in, rank, world_size, layers.size());
  state.layers.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    read_layer_header(in, i, *layers[i]);
    if (layers[i]->compressible) state.layers[i] = read_layer_body(in, *layers[i], basis_dtype);
  }
  GVQ_CHECK_ARG(in.remaining() == 0, kWhere, "state", "has ", in.remaining(), " trailing bytes (corrupted)");
  return state;
}

}  // namespace gradiveq::detail
