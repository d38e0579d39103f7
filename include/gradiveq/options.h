// Every option of the library, declared once: the structs, their defaults, validate() and paper().
//
// The Python package reads its defaults from these structs through the bindings (gradiveq._C exposes each
// struct field by field), so a default changed here changes it everywhere; nothing else declares them.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradiveq {

// --- PCA fit (pca_compressor.h) ------------------------------------------------------------------------

struct FitOptions {
  /// Keep the smallest d whose eigenvalues hold at least this fraction of the total variance (the paper's
  /// 1 - lambda; 0.99 is its lambda = 0.01). Must lie in (0, 1]. 1.0 keeps all K components (d = K),
  /// including those of zero variance, so compression is lossless up to float rounding.
  double energy = 0.99;
  /// Upper bound on d, whichever rule chose it (energy, target_ratio, the engine's error_budget); 0 means no
  /// cap (the engine's default: with replicated fits a wider basis costs no broadcast, only its
  /// coefficients). With basis_sync = broadcast, 192 keeps ResNet-32's broadcasts in check (docs/results.md
  /// 7e).
  int64_t max_components = 0;
  /// If > 0, d is chosen for this compression ratio instead of by energy: d = ceil(K / target_ratio)
  /// (energy is then ignored). Must be >= 1 or 0 (off).
  double target_ratio = 0.0;
  /// If > 0, caps d at floor(K / min_ratio) (at least 1) after the energy rule, so every layer compresses at
  /// least this much however flat its spectrum is. Must be >= 1 or 0 (off).
  double min_ratio = 0.0;
  // Whatever the rule, d never exceeds the rank of the samples (n - 1 centred samples span at most n - 1
  // directions; more would be directions of zero variance in the window) unless energy is 1.0, which keeps K.

  /// Throws InvalidArgument naming the first bad option; `where` names the caller in the message.
  void validate(const char* where) const;
};

// --- Schedule (schedule.h) -----------------------------------------------------------------------------

struct ScheduleOptions {
  int64_t warmup_iters = 2500;  ///< >= 0
  int64_t sample_iters = 100;   ///< >= 1
  /// >= 0 (0: never compress, only sample). 100 (paper: 400): as long as the sampling window. With error
  /// feedback the memory then waits at most that long for a sampling step to send it: on ResNet-32 +0.30
  /// points over 200 for 7% more bytes, on the small CNN +0.13 for 0.6% (3 seeds, docs/results.md 7l).
  int64_t compress_iters = 100;
};

// --- Message codecs (qsgd.h, co3.h, casq.h); each codec's constructor validates its options -------------

enum class QsgdNorm { kMax, kL2 };

/// Parses "max" / "l2".
QsgdNorm parse_qsgd_norm(const std::string& name);

struct QsgdOptions {
  int64_t levels = 7;         ///< s >= 1: magnitude levels 0..s (7: "4-bit QSGD", 1 sign + 3 level bits)
  int64_t bucket_size = 512;  ///< values per scale
  QsgdNorm norm = QsgdNorm::kMax;
};

enum class Co3Format { kFp4, kFp8 };

/// Parses "fp4" / "fp8".
Co3Format parse_co3_format(const std::string& name);

struct Co3Options {
  Co3Format format = Co3Format::kFp4;
  /// Error-correction decay of Co3MessageCodec, in [0, 1]: v = g + gamma e (the codec itself ignores it).
  double gamma = 0.9;
};

struct CasqOptions {
  int64_t bits = 2;                ///< b in {2, 3}: B = 2^b levels per bucket
  int64_t clusters = 4;            ///< C in [1, 2^bits]: k-means clusters per bucket
  int64_t bucket_size = 512;       ///< values per codebook
  int64_t kmeans_iterations = 16;  ///< Lloyd steps, in [0, 1000]
};

// --- The GradiVeQ engine (gradiveq_aggregator.h) ---------------------------------------------------------

/// How the sampling window is aggregated.
enum class SampleQuantizer {
  kQsgd4,  ///< 4-bit QSGD (7 levels, bucket 512, max norm), as in the paper; all-gather based
  kNone,   ///< uncompressed, in the all-reduce
};

/// Which slices of a layer's aggregated gradient become PCA samples.
enum class FitSamples {
  kFirstSlice,  ///< the paper (s = infinity): the first slice of every sampled iteration
  kAllSlices,   ///< every slice of every sampled iteration (more samples, higher rank)
};

/// Where the PCA samples of a window come from.
enum class SampleSource {
  kAggregated,  ///< the window's aggregated gradients: the window travels uncompressed (or QSGD-coded)
  /// The fitting rank's own local gradients (error-corrected when error_feedback is on), scaled by N to
  /// estimate the sum: once a layer has a basis its sampling windows are compressed steps like any other, and
  /// only the new bases travel. The first window, before any basis exists, is the last sample_iters steps of
  /// the warm-up (uncompressed like the rest of it, whatever sample_quantizer says), so nothing travels
  /// uncompressed after warm-up.
  kLocal,
};

/// How every rank comes to hold the same bases after a sampling window.
enum class BasisSync {
  /// kReplicated where it can work (aggregated samples, verify_bases on), else kBroadcast.
  kAuto,
  /// Layer j is fitted by rank j % N, which broadcasts the basis: each rank fits 1/N of the layers, and the
  /// bases cost K x d values per layer and refit on the wire.
  kBroadcast,
  /// Every rank fits every layer from the window's aggregated samples, which are identical on all ranks, and
  /// the fit is deterministic (Eigen, single-threaded), so the bases are bit-identical without a byte on the
  /// wire; each rank spends N times the fitting time. It needs sample_source = kAggregated, and verify_bases,
  /// which makes every rank raise should a rank's fit ever differ (ranks of different builds or CPUs).
  kReplicated,
};

/// Whether each rank keeps what compression lost and sends it in a later step
/// (GradiVeQOptions::error_feedback).
enum class ErrorFeedback {
  /// kOn wherever compression can lose something (compress_iters > 0, energy below 1 or a cap on d, and a
  /// basis that can move: refit_threshold < 1) and the paper's adaptive window is off (its error, eq. 7,
  /// would count the memory as drift and restart for it), else kOff. On ResNet-32 and the small CNN on
  /// Fashion-MNIST it wins on every seed (docs/results.md 7k), which is why it is the default.
  kAuto,
  /// Always; raises where it can do nothing (see kAuto).
  kOn,
  /// Never: what compression loses is dropped, as in the paper.
  kOff,
};

/// How a layer is cut into slices.
enum class SliceLayoutKind {
  kKernelRow,       ///< K = W*D*F, the paper's default
  kKernelPosition,  ///< K = D*F
  /// K = F: one slice per (input channel, kernel position), holding that position's weight of every filter,
  /// so a conv layer is D*H*W slices of its F output channels (a Linear weight: in slices of K = out). The
  /// basis is then F x d, small enough to refit every few steps from local samples.
  kFilterColumn,
};

/// Which parameters are compressed. A parameter is compressible when it is 4-D (a conv weight), has at least
/// min_numel values, matches one of `include` (if any is given) and none of `exclude`. Patterns are globs on
/// the parameter's name (`*` any run of characters, `?` one character), e.g. "layers.*.conv2.weight".
struct LayerPolicy {
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  int64_t min_numel = 1000;
  /// Also compress 2-D weights (nn.Linear, shape (out, in)): one output row per slice (K = in), or with the
  /// filter-column layout one input column per slice (K = out).
  bool linear_weights = false;
};

// The defaults are chosen by measurement (benchmarks/ddp/accuracy.py, docs/results.md): every slice of every
// sampled gradient is a PCA sample, one kernel position per slice (K = D*F), energy 0.995 with d capped at
// K/4, every rank fitting every basis itself (no broadcasts, so no cap on d for their sake), a compressed
// window twice the sampling window, the sampling windows as the paper's 4-bit QSGD, the coefficients and
// everything left uncompressed in float16. On Fashion-MNIST (small CNN and ResNet-32, 2 ranks, 3 seeds) they
// keep test accuracy far closer to plain all-reduce than the paper's choices (paper()), with fewer wire bytes
// than torch's PowerSGD rank 2 (docs/results.md 7f).
// QSGD sampling all-gathers: from about 8 ranks on, sample_quantizer = kNone puts fewer bytes on the wire.
struct GradiVeQOptions {
  FitOptions fit = default_fit();
  ScheduleOptions schedule;
  SampleQuantizer sample_quantizer = SampleQuantizer::kQsgd4;
  FitSamples fit_on = FitSamples::kAllSlices;
  SliceLayoutKind slice_layout = SliceLayoutKind::kKernelPosition;
  /// dtype the compressed coefficients travel in: float16 (default: half the bytes of float32; on
  /// Fashion-MNIST the same test accuracy as float32, docs/results.md), bfloat16, or float32 (one all-reduce
  /// for the whole bucket; the paper's). Half-precision coefficients take a second all-reduce of their own
  /// dtype unless uncompressed_dtype is the same. A float16 coefficient beyond 65504 (loss scaling too
  /// high) becomes inf on every rank alike, which GradScaler detects and skips, as with torch's fp16 hook.
  at::ScalarType coeff_dtype = at::kHalf;
  /// dtype the bases are stored in: float32, or bfloat16 / float16 (half the basis memory, half the bytes
  /// the codec streams per step and half those of every basis broadcast; products still accumulate in
  /// float32). The fitting rank rounds before the broadcast, so every rank holds the same basis. bfloat16
  /// measured on ResNet-32 (3 seeds): accuracy as float32's within seed noise, a compressed step's codec
  /// about 0.8x on one CPU thread (docs/results.md 7n). A lossless fit (energy 1) stays lossless only in
  /// float32.
  at::ScalarType basis_dtype = at::kFloat;
  /// dtype the values sent uncompressed travel in: the warm-up, uncompressed sampling windows, the layers
  /// that are not compressed and the compressed layers' slice tails. float16 (default) or bfloat16 halves
  /// those bytes, as torch's fp16 / bf16 hooks do (on Fashion-MNIST without loss of accuracy,
  /// docs/results.md); float32 keeps them float32. A half-precision bucket always sends its own dtype (as
  /// DDP's default all-reduce), so a bfloat16 model keeps its range. When it equals coeff_dtype the
  /// coefficients ride in the same all-reduce, and so do the verification code and the restart vote, cut into
  /// chunks whose sums stay exact integers in that dtype.
  at::ScalarType uncompressed_dtype = at::kHalf;
  LayerPolicy policy;
  /// Carry a checksum of the iteration, the schedule and all bases in the first bucket of every step and
  /// raise on every rank when any rank differs (docs/design.md, "Verification code").
  bool verify_bases = true;
  uint64_t seed = 0;  ///< seeds QSGD's stochastic rounding (mixed with iteration, rank and layer)
  /// The paper's adaptive window (eq. 7); 0 disables it, otherwise it must be > 1. Each rank measures its
  /// local loss over the layers it compresses in a step, E = sqrt(sum ||x - U U^T x||^2 / sum ||g||^2) with
  /// x = g - mu/N. When E exceeds restart_error_growth times the window's baseline E on any rank, every rank
  /// leaves the compressed window after that step and starts a new sampling window (the baseline is the mean
  /// E of the window's first 3 compressed steps, which never vote). The ranks agree through one float carried
  /// in the step's last all-reduce, so the decision is identical on all.
  double restart_error_growth = 0.0;
  /// Compressed steps: the compressed layers of a bucket are cut into up to this many groups of about equal
  /// size, each with its own all-reduce, so the codec of one group overlaps the transfer of another. 1 = one
  /// all-reduce per bucket. Must be >= 1.
  int64_t pipeline_chunks = 1;
  /// Where the window's PCA samples come from (SampleSource above).
  SampleSource sample_source = SampleSource::kAggregated;
  /// Error feedback: each rank keeps what its compressed layers lost, e = x - U U^T x (as sent, after
  /// rounding to coeff_dtype), and adds it to the next step's gradient, x = g + e. With local samples the
  /// next basis is fitted on those error-corrected gradients, so the directions one basis missed enter the
  /// next; an uncompressed (or QSGD) step sends x and empties e. The memory is per rank, so with it on each
  /// rank saves and loads its own save_state(). Auto (the default): on wherever something can be lost.
  ErrorFeedback error_feedback = ErrorFeedback::kAuto;
  /// If > 0 (it must lie in (0, 1)), each layer's d is the smallest whose held-out relative error
  /// ||h - mu - U U^T (h - mu)|| / ||h|| over every 4th sample of the window (fitted on the others) is at
  /// most this budget, capped as the fit options cap d; energy and target_ratio are then ignored. 0: off.
  double error_budget = 0.0;
  /// A refitted basis replaces the layer's current one only when the subspace moved by more than this:
  /// 1 - ||U_old^T U_new||_F^2 / d_new, in [0, 1]. A kept basis is not broadcast (only a marker is). 0: every
  /// refit replaces; 1: the first basis is kept for good (error_feedback is then off).
  double refit_threshold = 0.0;
  /// How the fitted bases reach every rank (BasisSync above). Auto (the default) replicates the fits, which
  /// on Fashion-MNIST trains bit for bit like the broadcast with fewer wire bytes: 16.0 -> 14.5 KB/step/rank
  /// on the small CNN, 497.1 -> 261.6 on ResNet-32 with the default d (docs/results.md 7f).
  BasisSync basis_sync = BasisSync::kAuto;
  /// If > 0, a window's fits run on a worker thread of idle priority while this many compressed steps go
  /// on with the current bases (a layer without one yet goes uncompressed), and every rank installs the
  /// new bases at the start of the same step, so ranks stay bit-identical; the step waits only for what the
  /// worker has not finished by then. A new sampling window (an adaptive-window restart) installs them at
  /// once. 0: the fits run at the start of the window's first compressed step, which waits for all of them.
  /// Must lie in [0, compress_iters).
  int64_t fit_delay_iters = 0;

  /// Throws InvalidArgument naming the first bad option.
  void validate() const;
  /// basis_sync with kAuto resolved: kReplicated when the samples are aggregated and verify_bases is on.
  BasisSync effective_basis_sync() const;
  /// error_feedback with kAuto resolved: on unless compression cannot lose anything, the basis never moves or
  /// the adaptive window is on.
  bool effective_error_feedback() const;
  /// Whether save_state() holds this rank's own data (error-feedback memory, local samples): each rank then
  /// saves and loads its own image.
  bool state_is_per_rank() const;

  /// The paper's method exactly (Yu et al. 2018): first-slice fit, K = one kernel row, energy 0.99, 4-bit
  /// QSGD sampling, schedule 2500 / 100 / 400, no adaptive window, float32 coefficients and uncompressed
  /// values. The defaults above differ where measurements on real data showed the paper's choices to cost
  /// accuracy (docs/results.md).
  static GradiVeQOptions paper();

 private:
  static FitOptions default_fit() {
    FitOptions f;
    f.energy = 0.995;
    f.min_ratio = 4.0;
    return f;
  }
};

/// Deprecated name of GradiVeQOptions (0.1); removed in the next release.
using AggregatorOptions [[deprecated("use gradiveq::GradiVeQOptions")]] = GradiVeQOptions;

// --- The gather engine (gather_aggregator.h): QSGD, CO3, CASQ --------------------------------------------

struct GatherAggregatorOptions {
  int64_t min_numel = 1000;  ///< smaller parameters travel uncompressed
  uint64_t seed = 0;         ///< mixed with iteration, rank and position into each message's seed
};

// --- The LibTorch front end (gradient_synchronizer.h) -----------------------------------------------------

struct SynchronizerOptions {
  /// The GradiVeQ engine's options, used by the constructor that builds a GradiVeQ engine itself.
  GradiVeQOptions gradiveq;
  int64_t bucket_cap_bytes = 25 * 1024 * 1024;
  /// Launch each bucket from a gradient hook as soon as backward fills it (one backward per step after
  /// zero_grad()); off: synchronize() averages whatever .grad holds (gradient accumulation).
  bool overlap_with_backward = true;
};

}  // namespace gradiveq
