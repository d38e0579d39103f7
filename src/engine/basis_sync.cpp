#include "engine/basis_sync.h"

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include "gradiveq/errors.h"
#include "util/hash_mix.h"

namespace gradiveq::detail {

namespace {

uint64_t double_bits(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// The fits of the layers this rank owns (layer j of `fittable` belongs to rank j % N): serialized images, or
// why a fit was skipped.
void fit_owned(const std::vector<EngineLayer*>& fittable, const GradiVeQOptions& options, int64_t rank,
               int64_t world_size, std::vector<at::Tensor>& images, std::vector<std::string>& failures) {
  for (size_t j = 0; j < fittable.size(); ++j) {
    if (int64_t(j) % world_size != rank) continue;
    EngineLayer* l = fittable[j];
    if (l->sample_rows() < 2) {
      failures[j] = "skipped: fewer than 2 finite samples in the window";
      continue;
    }
    try {
      // Rounded to basis_dtype before the broadcast: every rank then stores exactly the same basis.
      images[j] = PcaCompressor::fit(at::cat(l->samples), options.fit)
                      .with_basis_dtype(options.basis_dtype)
                      .serialize();
    } catch (const InvalidArgument& e) {
      failures[j] = std::string("skipped: ") + e.what();
    }
  }
}

// Root `root` broadcasts the sizes of its layers' images, then the images in one payload. Returns the sizes
// (0: no basis) and the payload (undefined when empty), on the CPU.
std::pair<at::Tensor, at::Tensor> broadcast_images(c10d::ProcessGroup& pg, int64_t root,
                                                   const std::vector<size_t>& owned,
                                                   const std::vector<at::Tensor>& images,
                                                   const at::TensorOptions& comm) {
  at::Tensor sizes = at::zeros({int64_t(owned.size())}, at::kLong);
  if (root == pg.getRank()) {
    for (size_t i = 0; i < owned.size(); ++i)
      sizes[i] = images[owned[i]].defined() ? images[owned[i]].numel() : 0;
  }
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  std::vector<at::Tensor> sizes_vec{sizes.to(comm.dtype(at::kLong))};
  pg.broadcast(sizes_vec, opts)->wait();
  sizes = sizes_vec[0].to(at::kCPU);
  const int64_t total = sizes.sum().item<int64_t>();
  if (total == 0) return {sizes, at::Tensor()};
  std::vector<at::Tensor> payload_vec{at::empty({total}, comm.dtype(at::kByte))};
  if (root == pg.getRank()) {
    std::vector<at::Tensor> mine;
    for (size_t j : owned) {
      if (images[j].defined()) mine.push_back(images[j]);
    }
    payload_vec[0].copy_(at::cat(mine));
  }
  pg.broadcast(payload_vec, opts)->wait();
  return {sizes, payload_vec[0].to(at::kCPU)};
}

// Every rank installs the bases root `root` broadcast for its layers (caller holds the stats mutex).
void install_bases(const std::vector<EngineLayer*>& fittable, const std::vector<size_t>& owned,
                   const at::Tensor& sizes, const at::Tensor& payload, bool own,
                   const std::vector<std::string>& failures, at::ScalarType basis_dtype) {
  int64_t offset = 0;
  for (size_t i = 0; i < owned.size(); ++i) {
    EngineLayer* l = fittable[owned[i]];
    const int64_t n = sizes[i].item<int64_t>();
    if (n == 0) {
      l->stats.fit_status = own ? failures[owned[i]] : "skipped on the fitting rank (see its stats)";
      continue;
    }
    at::Tensor image = payload.narrow(0, offset, n).contiguous();
    offset += n;
    PcaCompressor pca = PcaCompressor::deserialize(image);
    GVQ_ASSERT(pca.slice_len() == l->layout.slice_len, "fitted basis has the wrong slice length");
    l->pca = pca.with_basis_dtype(basis_dtype).to(l->device);
    l->checksum = checksum_bytes(image);
    l->stats.fits += 1;
    l->stats.fit_status = "ok";
  }
}

}  // namespace

void fit_and_broadcast(c10d::ProcessGroup& pg, const std::vector<std::unique_ptr<EngineLayer>>& layers,
                       const GradiVeQOptions& options, std::mutex& mutex) {
  const int64_t rank = pg.getRank(), world_size = pg.getSize();
  std::vector<EngineLayer*> fittable;
  for (const auto& l : layers) {
    if (l->compressible) fittable.push_back(l.get());
  }
  std::vector<at::Tensor> images(fittable.size());
  std::vector<std::string> failures(fittable.size());
  fit_owned(fittable, options, rank, world_size, images, failures);
  const at::TensorOptions comm = at::TensorOptions().device(layers.front()->device);
  for (int64_t r = 0; r < world_size; ++r) {
    std::vector<size_t> owned;
    for (size_t j = size_t(r); j < fittable.size(); j += size_t(world_size)) owned.push_back(j);
    if (owned.empty()) continue;
    auto [sizes, payload] = broadcast_images(pg, r, owned, images, comm);
    std::lock_guard<std::mutex> lock(mutex);
    install_bases(fittable, owned, sizes, payload, r == rank, failures, options.basis_dtype);
  }
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& l : layers) l->samples.clear();
}

uint64_t configuration_code(const std::vector<std::unique_ptr<EngineLayer>>& layers,
                            const GradiVeQOptions& options) {
  uint64_t h = mix(0x6776715f636f6e66ull, uint64_t(layers.size()));
  for (const auto& l : layers) {
    h = mix(mix(h, hash_string(l->name)), uint64_t(l->numel));
    h = mix(mix(h, uint64_t(l->compressible)), uint64_t(l->layout.slice_len));
  }
  h = mix(mix(h, uint64_t(options.coeff_dtype)), uint64_t(options.basis_dtype));
  h = mix(mix(h, uint64_t(options.sample_quantizer)), uint64_t(options.fit_on));
  h = mix(mix(h, uint64_t(options.slice_layout)), uint64_t(options.pipeline_chunks));
  return mix(h, double_bits(options.restart_error_growth));
}

uint64_t bases_checksum(const std::vector<std::unique_ptr<EngineLayer>>& layers) {
  uint64_t h = 0;
  for (const auto& l : layers) h = mix(mix(h, hash_string(l->name)), l->pca.is_fitted() ? l->checksum : 0);
  return h;
}

VerificationCode::VerificationCode(uint64_t code, int64_t world_size)
    : code_(code), world_size_(world_size), bits_(world_size <= 256 ? 16 : 8) {}

uint64_t VerificationCode::of_state(int64_t iteration, const GradiVeQOptions& options, int64_t schedule_shift,
                                    uint64_t configuration_code, uint64_t bases_checksum) {
  uint64_t h = mix(0x6776715f73746174ull, uint64_t(iteration));
  h = mix(h, uint64_t(options.schedule.warmup_iters));
  h = mix(h, uint64_t(options.schedule.sample_iters));
  h = mix(h, uint64_t(options.schedule.compress_iters));
  h = mix(h, double_bits(options.fit.energy));
  h = mix(h, uint64_t(schedule_shift));
  h = mix(h, configuration_code);
  return mix(h, bases_checksum);
}

void VerificationCode::write(at::Tensor slot) const {
  std::vector<float> values(static_cast<size_t>(length()));
  for (int64_t j = 0; j < length(); ++j) values[static_cast<size_t>(j)] = float(chunk(j));
  slot.copy_(at::tensor(values, at::kFloat));
}

void VerificationCode::check(const at::Tensor& summed, int64_t iteration, int64_t rank) const {
  at::Tensor sums = summed.to(at::kCPU);
  for (int64_t j = 0; j < length(); ++j) {
    if (sums[j].item<double>() == double(chunk(j)) * double(world_size_)) continue;
    std::ostringstream msg;
    msg << "gradiveq: ranks disagree on GradiVeQ state at iteration " << iteration
        << " (verify_bases): the iteration counter, the schedule, the layer policy (include, exclude, "
           "min_numel), "
           "the wire or basis dtypes, the sampling options or the PCA bases differ between ranks (this rank "
        << rank << " of " << world_size_ << ", state checksum " << std::hex << code_
        << "). Typical causes: options that differ between ranks, a checkpoint loaded on some ranks only, or "
           "a "
           "basis modified on one rank.";
    throw std::runtime_error(msg.str());
  }
}

}  // namespace gradiveq::detail
