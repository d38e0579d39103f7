#include "engine/basis_sync.h"

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

#include "gradiveq/errors.h"
#include "util/hash_mix.h"

namespace gradiveq::detail {

namespace {

constexpr int64_t kKeptBasis = -1;  // broadcast size of a layer whose current basis stays

uint64_t double_bits(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// The helpers below run in Eigen (double, single-threaded) rather than ATen: with basis_sync = replicated
// every rank takes their decisions (d, keep or replace) itself and must take the same ones, while MKL's
// products may depend on thread count and alignment (pca_compressor.cpp).
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A 2-D tensor (or a 1-D one, as one row) as a double matrix.
MatD to_matrix(const at::Tensor& t) {
  const at::Tensor x = t.to(at::kCPU, at::kDouble).contiguous();
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0), cols = x.dim() == 1 ? x.size(0) : x.size(1);
  return Eigen::Map<const MatD>(x.data_ptr<double>(), rows, cols);
}

// Held-out relative error of `pca` on `held` (rows, K) for every d = 1..D: ||h - mu - U_d U_d^T (h - mu)|| /
// ||h||, from one projection (U is orthonormal, so the residual shrinks by each component's energy).
std::vector<double> held_out_errors(const PcaCompressor& pca, const at::Tensor& held) {
  const MatD h = to_matrix(held);
  const MatD centred = h.rowwise() - to_matrix(pca.mean()).row(0);
  const Eigen::RowVectorXd energy = (centred * to_matrix(pca.basis())).colwise().squaredNorm();
  const double total = h.squaredNorm();
  double residual = centred.squaredNorm();
  std::vector<double> out;
  for (Eigen::Index j = 0; j < energy.size(); ++j) {
    residual -= energy(j);
    out.push_back(total > 0 ? std::sqrt(std::max(0.0, residual) / total) : 0.0);
  }
  return out;
}

// error_budget: d is the smallest whose held-out error (every 4th sample, fitted on the others) is within
// the budget, at most what the fit options' caps allow; the basis is then fitted on all samples with that d.
PcaCompressor fit_within_budget(const at::Tensor& samples, const GradiVeQOptions& options) {
  // Every direction the samples have (energy just under 1: 1.0 itself would ask for all K), up to the caps.
  FitOptions capped = options.fit;
  capped.energy = 1.0 - 1e-12;
  capped.target_ratio = 0.0;
  const at::Tensor rows = at::arange(samples.size(0));
  const at::Tensor held_mask = rows.remainder(4).eq(3);
  const at::Tensor held = samples.index({held_mask}), fitted = samples.index({held_mask.logical_not()});
  if (held.size(0) < 1 || fitted.size(0) < 2) return PcaCompressor::fit(samples, options.fit);
  const PcaCompressor trial = PcaCompressor::fit(fitted, capped);
  const std::vector<double> errors = held_out_errors(trial, held);
  int64_t d = int64_t(errors.size());
  for (size_t j = 0; j < errors.size(); ++j) {
    if (errors[j] <= options.error_budget) {
      d = int64_t(j) + 1;
      break;
    }
  }
  FitOptions exact = capped;
  exact.min_ratio = 0.0;
  exact.max_components = std::min<int64_t>(d, std::max<int64_t>(1, samples.size(0) - 1));
  return PcaCompressor::fit(samples, exact);
}

// How far `fresh` moved from `current`: 1 - ||U_old^T U_new||_F^2 / d_new, 0 for the same subspace, 1 for an
// orthogonal one.
double subspace_movement(const PcaCompressor& current, const PcaCompressor& fresh) {
  const MatD overlap = to_matrix(current.basis()).transpose() * to_matrix(fresh.basis());
  return 1.0 - overlap.squaredNorm() / double(fresh.num_components());
}

// The fit of one window's layer: its image, or why it was skipped, or that its current basis stays.
void fit_layer(const FitWindow::Layer& l, const GradiVeQOptions& options, at::Tensor& image,
               std::string& failure, char& kept) {
  int64_t rows = 0;
  for (const auto& s : l.samples) rows += s.size(0);
  if (rows < 2) {
    failure = "skipped: fewer than 2 finite samples in the window";
    return;
  }
  try {
    const at::Tensor samples = at::cat(l.samples);
    // Rounded to basis_dtype before the broadcast: every rank then stores exactly the same basis.
    PcaCompressor pca = (options.error_budget > 0 ? fit_within_budget(samples, options)
                                                  : PcaCompressor::fit(samples, options.fit))
                            .with_basis_dtype(options.basis_dtype);
    if (options.refit_threshold > 0 && l.current.is_fitted() &&
        subspace_movement(l.current, pca) <= options.refit_threshold) {
      kept = 1;
      return;
    }
    image = pca.serialize();
  } catch (const InvalidArgument& e) {
    failure = std::string("skipped: ") + e.what();
  }
}

// The size table of layers `owned` (an image's size, 0: no basis, kKeptBasis: keep the current one) and their
// images in one payload (undefined when there are none).
std::pair<at::Tensor, at::Tensor> image_table(const std::vector<size_t>& owned,
                                              const std::vector<at::Tensor>& images,
                                              const std::vector<char>& kept) {
  at::Tensor sizes = at::zeros({int64_t(owned.size())}, at::kLong);
  std::vector<at::Tensor> payload;
  for (size_t i = 0; i < owned.size(); ++i) {
    const size_t j = owned[i];
    sizes[i] = kept[j] ? kKeptBasis : images[j].defined() ? images[j].numel() : 0;
    if (images[j].defined()) payload.push_back(images[j]);
  }
  return {sizes, payload.empty() ? at::Tensor() : at::cat(payload)};
}

// Root `root` broadcasts the size table of its layers, then their images in one payload. Returns both, on the
// CPU.
std::pair<at::Tensor, at::Tensor> broadcast_images(c10d::ProcessGroup& pg, int64_t root,
                                                   const std::vector<size_t>& owned,
                                                   const std::vector<at::Tensor>& images,
                                                   const std::vector<char>& kept,
                                                   const at::TensorOptions& comm) {
  const bool is_root = root == pg.getRank();
  auto [sizes, mine] = is_root ? image_table(owned, images, kept)
                               : std::pair<at::Tensor, at::Tensor>{
                                     at::zeros({int64_t(owned.size())}, at::kLong), at::Tensor()};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  std::vector<at::Tensor> sizes_vec{sizes.to(comm.dtype(at::kLong))};
  pg.broadcast(sizes_vec, opts)->wait();
  sizes = sizes_vec[0].to(at::kCPU);
  const int64_t total = sizes.clamp_min(0).sum().item<int64_t>();
  if (total == 0) return {sizes, at::Tensor()};
  std::vector<at::Tensor> payload_vec{at::empty({total}, comm.dtype(at::kByte))};
  if (is_root) payload_vec[0].copy_(mine);
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
    if (n == kKeptBasis) {
      l->stats.fit_status = "kept: the refitted basis moved no more than refit_threshold";
      l->stats.bases_kept += 1;
      continue;
    }
    if (n == 0) {
      l->stats.fit_status = own ? failures[owned[i]] : "skipped on the fitting rank (see its stats)";
      continue;
    }
    at::Tensor image = payload.narrow(0, offset, n).contiguous();
    offset += n;
    PcaCompressor pca = PcaCompressor::deserialize(image);
    GVQ_ASSERT(pca.slice_len() == l->layout.slice_len, "fitted basis has the wrong slice length");
    l->pca = pca.with_basis_dtype(basis_dtype).to(l->device);  // a no-op unless the image is of another dtype
    l->checksum = checksum_bytes(image);
    l->stats.fits += 1;
    l->stats.fit_status = "ok";
  }
}

}  // namespace

FitWindow snapshot_window(const std::vector<std::unique_ptr<EngineLayer>>& layers) {
  FitWindow window;
  for (const auto& l : layers) {
    if (l->compressible) window.layers.push_back({l->samples, l->pca, l->fit_owner});
  }
  return window;
}

FitResults fit_window(const FitWindow& window, const GradiVeQOptions& options, int64_t rank) {
  const size_t n = window.layers.size();
  FitResults out{std::vector<at::Tensor>(n), std::vector<std::string>(n), std::vector<char>(n, 0)};
  const bool all = options.effective_basis_sync() == BasisSync::kReplicated;
  for (size_t j = 0; j < n; ++j) {
    if (!all && window.layers[j].owner != rank) continue;
    fit_layer(window.layers[j], options, out.images[j], out.failures[j], out.kept[j]);
  }
  return out;
}

int64_t share_and_install(c10d::ProcessGroup& pg, const std::vector<std::unique_ptr<EngineLayer>>& layers,
                          const FitResults& results, const GradiVeQOptions& options, std::mutex& mutex) {
  const int64_t rank = pg.getRank(), world_size = pg.getSize();
  std::vector<EngineLayer*> fittable;
  for (const auto& l : layers) {
    if (l->compressible) fittable.push_back(l.get());
  }
  GVQ_ASSERT(results.images.size() == fittable.size(), "fit results of another set of layers");
  const auto& [images, failures, kept] = results;
  if (options.effective_basis_sync() == BasisSync::kReplicated) {
    // Every rank fitted every layer from the same samples: it installs its own images, exactly as it would
    // have installed the broadcast ones, and nothing travels.
    std::vector<size_t> all(fittable.size());
    std::iota(all.begin(), all.end(), size_t(0));
    auto [sizes, payload] = image_table(all, images, kept);
    std::lock_guard<std::mutex> lock(mutex);
    install_bases(fittable, all, sizes, payload, /*own=*/true, failures, options.basis_dtype);
    for (const auto& l : layers) l->clear_samples();
    return 0;
  }
  const at::TensorOptions comm = at::TensorOptions().device(layers.front()->device);
  int64_t sent = 0;
  for (int64_t r = 0; r < world_size; ++r) {
    std::vector<size_t> owned;
    for (size_t j = size_t(r); j < fittable.size(); j += size_t(world_size)) owned.push_back(j);
    if (owned.empty()) continue;
    auto [sizes, payload] = broadcast_images(pg, r, owned, images, kept, comm);
    if (r == rank) sent += sizes.nbytes() + (payload.defined() ? payload.nbytes() : 0);
    std::lock_guard<std::mutex> lock(mutex);
    install_bases(fittable, owned, sizes, payload, r == rank, failures, options.basis_dtype);
  }
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& l : layers) l->clear_samples();
  return sent;
}

int64_t fit_and_broadcast(c10d::ProcessGroup& pg, const std::vector<std::unique_ptr<EngineLayer>>& layers,
                          const GradiVeQOptions& options, std::mutex& mutex) {
  FitWindow window;
  {
    std::lock_guard<std::mutex> lock(mutex);
    window = snapshot_window(layers);
  }
  return share_and_install(pg, layers, fit_window(window, options, pg.getRank()), options, mutex);
}

// Idle priority (SCHED_IDLE): the worker then runs only on a core nothing else wants, so a fit takes no time
// from the steps (the training thread, torch's intra-op threads, the other ranks). Best effort: where the
// policy is refused the worker runs at normal priority.
struct DeferredFit::Priority {
  std::mutex mutex;
  bool urgent = false;   // a step waits for the fit: normal priority from now on
  bool running = false;  // the worker thread exists and `worker` names it
#ifdef __linux__
  pthread_t worker{};
#endif

  void worker_started() {
    std::lock_guard<std::mutex> lock(mutex);
#ifdef __linux__
    worker = pthread_self();
    if (!urgent) set(SCHED_IDLE);
#endif
    running = true;
  }
  void worker_finished() {
    std::lock_guard<std::mutex> lock(mutex);
    running = false;
  }
  void raise() {
    std::lock_guard<std::mutex> lock(mutex);
    urgent = true;
    if (running) set(SCHED_OTHER);
  }

 private:
  void set([[maybe_unused]] int policy) {
#ifdef __linux__
    sched_param param{};
    param.sched_priority = 0;
    pthread_setschedparam(worker, policy, &param);
#endif
  }
};

DeferredFit::DeferredFit(FitWindow window, const GradiVeQOptions& options, int64_t rank, int64_t install_at)
    : install_at_(install_at), priority_(std::make_shared<Priority>()) {
  results_ = std::async(std::launch::async, [window = std::move(window), options, rank, p = priority_] {
    p->worker_started();
    c10::NoGradGuard no_grad;
    const auto start = std::chrono::steady_clock::now();
    struct Finished {
      Priority& p;
      ~Finished() { p.worker_finished(); }
    } finished{*p};
    FitResults results = fit_window(window, options, rank);
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    return std::make_pair(std::move(results), took.count());
  });
}

DeferredFit::~DeferredFit() {
  if (results_.valid()) {
    priority_->raise();
    results_.wait();
  }
}

FitResults DeferredFit::wait() {
  priority_->raise();
  auto [results, ms] = results_.get();
  worker_ms_ = ms;
  return std::move(results);
}

uint64_t configuration_code(const std::vector<std::unique_ptr<EngineLayer>>& layers,
                            const GradiVeQOptions& options) {
  uint64_t h = mix(0x6776715f636f6e66ull, uint64_t(layers.size()));
  for (const auto& l : layers) {
    h = mix(mix(h, hash_string(l->name)), uint64_t(l->numel));
    h = mix(mix(h, uint64_t(l->compressible)), uint64_t(l->layout.slice_len));
  }
  h = mix(mix(h, uint64_t(options.coeff_dtype)), uint64_t(options.basis_dtype));
  // Mixed in only when set, so the codes (and checkpoints) of earlier configurations stay as they were.
  if (options.uncompressed_dtype != at::kFloat) h = mix(h, uint64_t(options.uncompressed_dtype));
  h = mix(mix(h, uint64_t(options.sample_quantizer)), uint64_t(options.fit_on));
  h = mix(mix(h, uint64_t(options.slice_layout)), uint64_t(options.pipeline_chunks));
  h = mix(mix(h, uint64_t(options.sample_source)), uint64_t(options.effective_error_feedback()));
  h = mix(h, uint64_t(options.effective_basis_sync()));
  h = mix(mix(h, double_bits(options.error_budget)), double_bits(options.refit_threshold));
  h = mix(h, uint64_t(options.policy.linear_weights));
  if (options.fit_delay_iters != 0) h = mix(h, uint64_t(options.fit_delay_iters));
  return mix(h, double_bits(options.restart_error_growth));
}

uint64_t bases_checksum(const std::vector<std::unique_ptr<EngineLayer>>& layers) {
  uint64_t h = 0;
  for (const auto& l : layers) h = mix(mix(h, hash_string(l->name)), l->pca.is_fitted() ? l->checksum : 0);
  return h;
}

namespace {

// The largest integer below which every integer is exact in a half-precision dtype (2^(mantissa bits + 1)).
int64_t exact_integers(at::ScalarType carrier) { return carrier == at::kHalf ? 2048 : 256; }

// The widest chunk (at most 16 bits) whose sum over world_size ranks stays exact in `carrier`; 0 if none.
int64_t chunk_bits(int64_t world_size, at::ScalarType carrier) {
  if (carrier == at::kFloat) return world_size <= 256 ? 16 : 8;
  int64_t bits = 16;
  while (bits > 0 && ((int64_t(1) << bits) - 1) * world_size > exact_integers(carrier)) --bits;
  return bits;
}

}  // namespace

VerificationCode::VerificationCode(uint64_t code, int64_t world_size, at::ScalarType carrier)
    : code_(code), world_size_(world_size), bits_(chunk_bits(world_size, carrier)) {
  TORCH_CHECK(bits_ > 0, "gradiveq: the verification code cannot travel in ", carrier, " for ", world_size,
              " ranks");
}

bool VerificationCode::fits(int64_t world_size, at::ScalarType carrier) {
  return chunk_bits(world_size, carrier) > 0;
}

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
  // One fill per chunk rather than a copy from a host tensor: a copy from pageable memory into a device
  // tensor makes the host wait for the device. Exact in the carrier: each chunk is a small integer.
  for (int64_t j = 0; j < length(); ++j) slot.narrow(0, j, 1).fill_(double(chunk(j)));
}

void VerificationCode::check(const at::Tensor& summed, int64_t iteration, int64_t rank) const {
  const at::Tensor sums = summed.to(at::kCPU, at::kDouble).contiguous();
  for (int64_t j = 0; j < length(); ++j) {
    if (sums.data_ptr<double>()[j] == double(chunk(j)) * double(world_size_)) continue;
    std::ostringstream msg;
    msg << "gradiveq: ranks disagree on GradiVeQ state at iteration " << iteration
        << " (verify_bases): the iteration counter, the schedule, the layer policy (include, exclude, "
           "min_numel), "
           "the wire or basis dtypes, the sampling options or the PCA bases differ between ranks (this rank "
        << rank << " of " << world_size_ << ", state checksum " << std::hex << code_
        << "). Typical causes: options that differ between ranks, a checkpoint loaded on some ranks only, or "
           "a basis modified on one rank, or with basis_sync = replicated ranks whose own fits came out "
           "differently (other builds or CPU kinds: use basis_sync = broadcast there).";
    throw std::runtime_error(msg.str());
  }
}

}  // namespace gradiveq::detail
