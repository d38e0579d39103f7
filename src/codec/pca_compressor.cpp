#include "gradiveq/pca_compressor.h"

#include <c10/core/GradMode.h>

#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <vector>

#include "gradiveq/errors.h"
#include "kernels/kernels.h"
#include "kernels/kernels_cuda.h"
#include "util/byte_io.h"
#include "util/hash_mix.h"

namespace gradiveq {

namespace {

constexpr char kMagic[4] = {'G', 'V', 'Q', 'B'};
// Version 2 stores U in its own dtype (a half-precision basis broadcasts half the bytes); version 1, float32
// throughout, is still read (checkpoints written before).
constexpr uint32_t kFormatVersion = 2;
constexpr uint32_t kFloat32OnlyVersion = 1;
// magic, version, K, d, num_samples; version 2 adds the basis dtype (uint32 code)
constexpr size_t kHeaderBytesV1 = 4 + 4 + 8 + 8 + 8;
constexpr size_t kHeaderBytes = kHeaderBytesV1 + 4;

// A version-2 image names its basis dtype by its index in this table.
constexpr at::ScalarType kBasisDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};

// CUDA tensors with the kernels switched on (kernels_cuda.h): the product as a grouped launch of one layer.
// The kernel reads float32 input with unit column stride and writes rows of unit column stride; anything else
// goes through a temporary.
void project_with_cuda_kernels(const at::Tensor& input, const at::Tensor& basis, const at::Tensor& bias,
                               at::Tensor out, bool decompress) {
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  detail::ProjectionTask task;
  task.input =
      input.scalar_type() == at::kFloat && input.stride(1) == 1 ? input : input.to(at::kFloat).contiguous();
  task.basis = basis.contiguous();
  task.bias = bias.reshape({-1}).contiguous();
  const bool direct = out.stride(1) == 1;
  task.out = direct ? out : at::empty(out.sizes(), out.options());
  if (decompress) {
    detail::cuda_decompress_grouped({task});
  } else {
    detail::cuda_compress_grouped({task});
  }
  if (!direct) out.copy_(task.out);
#else
  (void)input, (void)basis, (void)bias, (void)out, (void)decompress;
  GVQ_ASSERT(false, "CUDA kernels used in a build without them");
#endif
}

uint32_t basis_dtype_code(at::ScalarType dtype) {
  const auto* it = std::find(std::begin(kBasisDtypes), std::end(kBasisDtypes), dtype);
  GVQ_ASSERT(it != std::end(kBasisDtypes), "basis of an unsupported dtype");
  return uint32_t(it - std::begin(kBasisDtypes));
}

// Relative threshold under which an eigenvalue of the Gram/covariance matrix is treated as zero: the
// corresponding direction is rounding noise, and dividing by its square root would amplify it.
constexpr double kRankTolerance = 1e-10;

// The fit runs in Eigen rather than at::matmul / at::linalg_qr: every rank fits the same samples and must get
// bit-identical bases (their checksums are compared), and MKL's results may depend on memory alignment and thread
// count (see cpu_codec_kernels.h). Eigen's single-threaded products depend only on the shapes.
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Symmetric eigen-decomposition of `sym` (m x m; only its lower triangle is read): eigenvalues decreasing,
// vectors in matching columns.
void symmetric_eigen(const MatD& sym, Eigen::VectorXd& values, MatD& vectors) {
  Eigen::SelfAdjointEigenSolver<MatD> solver(sym);
  GVQ_ASSERT(solver.info() == Eigen::Success, "eigen-solver did not converge");
  // Eigen returns increasing order; reverse into decreasing.
  values = solver.eigenvalues().reverse();
  vectors = solver.eigenvectors().rowwise().reverse();
}

// a a^T, lower triangle only: a symmetric rank update does half the multiply-adds of the full product.
MatD lower_gram(const MatD& a) {
  MatD out = MatD::Zero(a.rows(), a.rows());
  out.selfadjointView<Eigen::Lower>().rankUpdate(a);
  return out;
}

// Orthonormalises the columns of `u` (K x r) with a Householder QR, keeping each column's direction.
MatD orthonormalize(const MatD& u) {
  const Eigen::Index k = u.rows(), r = u.cols();
  Eigen::HouseholderQR<MatD> qr(u);
  MatD q = qr.householderQ() * MatD::Identity(k, r);
  for (Eigen::Index j = 0; j < r; ++j) {
    if (qr.matrixQR()(j, j) < 0) q.col(j) *= -1.0;
  }
  return q;
}

// d columns: the r columns of `u` (K x r, orthonormal) followed by d - r orthonormal columns spanning part of
// its orthogonal complement. Only needed when more components are requested than the samples have directions
// (energy 1.0, or samples without variance).
MatD complete_basis(const MatD& u, int64_t d) {
  const Eigen::Index k = u.rows(), r = u.cols();
  if (r >= d) return u.leftCols(d);
  if (r == 0) return MatD::Identity(k, d);
  Eigen::HouseholderQR<MatD> qr(u);
  MatD q = qr.householderQ() * MatD::Identity(k, d);  // q's first r columns span u; the rest its complement
  MatD out(k, d);
  out.leftCols(r) = u;
  out.rightCols(d - r) = q.rightCols(d - r);
  return out;
}

at::Tensor to_float_tensor(const MatD& m) {
  at::Tensor t = at::empty({int64_t(m.rows()), int64_t(m.cols())}, at::kFloat);
  Eigen::Map<MatF>(t.data_ptr<float>(), m.rows(), m.cols()) = m.cast<float>();
  return t;
}

// Converts `t` to float32 if needed and returns a contiguous view.
at::Tensor contiguous_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

bool is_float_like(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

uint64_t checksum_bytes(const at::Tensor& bytes) {
  GVQ_CHECK_ARG(bytes.device().is_cpu() && bytes.is_contiguous(), "checksum_bytes", "bytes",
                "must be a contiguous CPU tensor");
  const auto* p = static_cast<const uint8_t*>(bytes.data_ptr());
  const size_t n = bytes.nbytes();
  // FNV-1a over whole words, each word first scrambled by splitmix64's finaliser. Plain word-wise FNV-1a is
  // blind to pairs of flipped top bits: (h ^ w ^ 2^63) * P = ((h ^ w) * P) ^ 2^63 for any odd P, so two such
  // flips cancel (found by the sanitizer build's fuzz test). The finaliser spreads every bit over the word.
  const auto scramble = detail::splitmix64;
  uint64_t h = 1469598103934665603ull;
  constexpr uint64_t kPrime = 1099511628211ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) h = (h ^ scramble(get<uint64_t>(p + i))) * kPrime;
  for (; i < n; ++i) h = (h ^ scramble(p[i])) * kPrime;
  return scramble(h ^ n);
}

void FitOptions::validate(const char* where) const {
  GVQ_CHECK_ARG(energy > 0.0 && energy <= 1.0, where, "energy", "must lie in (0, 1], got ", energy);
  GVQ_CHECK_ARG(max_components >= 0, where, "max_components", "must be >= 0 (0 = no cap), got ", max_components);
  GVQ_CHECK_ARG(target_ratio == 0.0 || target_ratio >= 1.0, where, "target_ratio", "must be >= 1 or 0 (off), got ",
                target_ratio);
  GVQ_CHECK_ARG(min_ratio == 0.0 || min_ratio >= 1.0, where, "min_ratio", "must be >= 1 or 0 (off), got ",
                min_ratio);
  GVQ_CHECK_ARG(energy < 1.0 || (min_ratio == 0.0 && target_ratio == 0.0 && max_components == 0), where, "energy",
                "is 1.0 (keep all K components: lossless) but min_ratio = ", min_ratio, ", target_ratio = ",
                target_ratio, " and max_components = ", max_components,
                " limit d; set all three to 0 (and, for the engine, coeff_dtype to float32) for a lossless run");
}

namespace {

// d: the smallest count whose eigenvalues (`variances`, decreasing, r of them) reach the energy threshold
// (paper eq. 6), or the count that gives the target ratio; then the caps.
int64_t choose_components(const Eigen::VectorXd& variances, int64_t k, const FitOptions& options) {
  const int64_t r = variances.size();
  int64_t d = 0;
  const double total = variances.sum();
  if (options.target_ratio > 0.0) {
    d = std::min<int64_t>(int64_t(std::ceil(double(k) / options.target_ratio - 1e-9)), std::max<int64_t>(r, 1));
  } else if (options.energy >= 1.0) {
    d = k;
  } else if (total <= 0.0) {
    d = 1;  // no variance at all: one direction is as good as any; the mean carries the signal
  } else {
    double cumulative = 0.0;
    for (int64_t i = 0; i < r && cumulative + variances(i) < options.energy * total; ++i) {
      cumulative += variances(i);
      d = i + 1;
    }
    d += 1;
    d = std::min(d, r);
  }
  if (options.min_ratio > 0.0) d = std::min<int64_t>(d, int64_t(std::floor(double(k) / options.min_ratio + 1e-9)));
  if (options.max_components > 0) d = std::min(d, options.max_components);
  return std::max<int64_t>(d, 1);
}

// Gram directions xc^T v_i / sqrt(l_i) are orthonormal up to about n eps l_1 / l_i (G v_i is exact only to
// eps ||G||, n the window's sample count). While every kept eigenvalue is above this fraction of the top one,
// that loss (< 1e-9 for windows up to 2000 samples) is far below float32's rounding of the stored basis, and
// the Householder QR, most of a fit's time at K = 4096 (measured: 0.86 s of a 1.3 s fit), is skipped. Below
// it the directions are orthonormalised.
constexpr double kDirectGramRatio = 1e-4;

// The eigen-decomposition of the centred samples `xc` (n x K): variances (decreasing, the r above the rank
// tolerance) and what principal_directions needs to form their directions.
struct Spectrum {
  Eigen::VectorXd variances;
  Eigen::VectorXd values;  // Gram path: eigenvalues of xc xc^T (n of them); empty on the covariance path
  MatD vectors;            // Gram path: n x n eigenvectors of xc xc^T; covariance path: K x K directions
};

// From the n x n Gram matrix when n <= K (cheaper), else from the K x K covariance.
Spectrum spectrum_of(const MatD& xc) {
  const int64_t n = xc.rows(), k = xc.cols();
  // Number of eigenvalues above the rank tolerance (0 when the top one is not positive).
  auto numerical_rank = [](const Eigen::VectorXd& vals) -> int64_t {
    const double top = std::max(vals(0), 0.0);
    if (top <= 0) return 0;
    return (vals.array() > kRankTolerance * top).count();
  };
  Spectrum out;
  if (n <= k) {
    // xc xc^T = V L V^T  =>  principal directions xc^T V L^-1/2, variances L / (n - 1).
    symmetric_eigen(lower_gram(xc), out.values, out.vectors);
    out.variances = out.values.head(numerical_rank(out.values)) / double(n - 1);
  } else {
    Eigen::VectorXd cov_vals;
    symmetric_eigen(lower_gram(xc.transpose()) / double(n - 1), cov_vals, out.vectors);
    out.variances = cov_vals.head(numerical_rank(cov_vals));
  }
  return out;
}

// The first m (<= r) principal directions, K x m with orthonormal columns. Only the directions the basis
// keeps are formed: d is usually well below the window's rank.
MatD principal_directions(const MatD& xc, const Spectrum& spectrum, int64_t m) {
  const int64_t k = xc.cols();
  if (m == 0) return MatD(k, 0);
  if (spectrum.values.size() == 0) return spectrum.vectors.leftCols(m);
  const Eigen::VectorXd kept = spectrum.values.head(m);
  MatD directions = xc.transpose() * spectrum.vectors.leftCols(m);
  directions *= kept.cwiseSqrt().cwiseInverse().asDiagonal();
  if (kept(m - 1) >= kDirectGramRatio * kept(0)) return directions;
  return orthonormalize(directions);
}

}  // namespace

PcaCompressor PcaCompressor::fit(const at::Tensor& samples, const FitOptions& options) {
  constexpr const char* kWhere = "PcaCompressor.fit";
  options.validate(kWhere);
  GVQ_CHECK_ARG(samples.defined(), kWhere, "samples", "is an undefined tensor");
  GVQ_CHECK_ARG(samples.scalar_type() == at::kFloat, kWhere, "samples", "must be float32, got ",
                samples.scalar_type());
  GVQ_CHECK_ARG(samples.dim() == 2, kWhere, "samples", "must be 2-D (n samples, K), got shape ",
                samples.sizes());
  const int64_t n = samples.size(0), k = samples.size(1);
  GVQ_CHECK_ARG(n >= 2, kWhere, "samples", "must hold at least 2 samples to estimate a covariance, got ", n);
  GVQ_CHECK_ARG(k >= 1, kWhere, "samples", "must have a positive slice length K, got ", k);
  GVQ_CHECK_ARG(at::isfinite(samples).all().item<bool>(), kWhere, "samples",
                "contains non-finite values (NaN or inf); such a window must not be fitted");

  c10::NoGradGuard no_grad;
  const at::Tensor x = samples.to(at::kCPU, at::kDouble).contiguous();
  const Eigen::Map<const MatD> xs(x.data_ptr<double>(), n, k);
  const Eigen::RowVectorXd mean = xs.colwise().mean();
  const MatD xc = xs.rowwise() - mean;

  const Spectrum spectrum = spectrum_of(xc);
  const Eigen::VectorXd& variances = spectrum.variances;  // of the sample covariance, decreasing
  const int64_t r = variances.size();
  const int64_t d = choose_components(variances, k, options);
  const MatD u = principal_directions(xc, spectrum, std::min(d, r));  // K x min(d, r), orthonormal

  PcaCompressor pca;
  pca.mean_ = to_float_tensor(mean).view({k});
  pca.basis_ = to_float_tensor(complete_basis(u, d));
  pca.eigenvalues_ = at::zeros({k}, at::kFloat);
  // Variances of gradients above ~1e19 exceed float32's range: clamp them (they only feed explained_variance)
  // rather than store inf, which the basis broadcast and checkpoints would refuse as non-finite.
  constexpr double kFloatMax = double(std::numeric_limits<float>::max());
  for (int64_t i = 0; i < r; ++i) {
    pca.eigenvalues_.data_ptr<float>()[i] = float(std::clamp(variances(i), 0.0, kFloatMax));
  }
  pca.num_samples_ = n;
  pca.finish_init();
  return pca;
}

void PcaCompressor::finish_init() {
  const at::Tensor mean = contiguous_float(mean_.to(at::kCPU)), basis = contiguous_float(basis_.to(at::kCPU));
  const int64_t k = basis.size(0), d = basis.size(1);
  const std::vector<float> no_offset(d, 0.0f);
  mean_proj_ = at::empty({d}, at::kFloat);
  detail::cpu_compress(mean.data_ptr<float>(), basis.data_ptr<float>(), no_offset.data(), mean_proj_.data_ptr<float>(), 1, k, d);
  mean_proj_ = mean_proj_.to(basis_.device());
}

void PcaCompressor::check_fitted(const char* where) const {
  GVQ_CHECK_ARG(is_fitted(), where, "self", "is not fitted: call PcaCompressor.fit (or deserialize) first");
}

int64_t PcaCompressor::slice_len() const { return is_fitted() ? basis_.size(0) : 0; }
int64_t PcaCompressor::num_components() const { return is_fitted() ? basis_.size(1) : 0; }

double PcaCompressor::explained_variance() const {
  check_fitted("PcaCompressor.explained_variance");
  const double total = eigenvalues_.sum(at::kDouble).item<double>();
  if (total <= 0.0) return 1.0;
  return eigenvalues_.narrow(0, 0, num_components()).sum(at::kDouble).item<double>() / total;
}

at::Tensor PcaCompressor::offset(int64_t world_size) const {
  check_fitted("PcaCompressor.offset");
  GVQ_CHECK_ARG(world_size >= 1, "PcaCompressor.offset", "world_size", "must be >= 1, got ", world_size);
  return mean_proj_ * (-1.0 / double(world_size));
}

at::Tensor PcaCompressor::compress(const at::Tensor& slices, int64_t world_size) const {
  check_fitted("PcaCompressor.compress");
  GVQ_CHECK_ARG(slices.defined() && slices.dim() == 2, "PcaCompressor.compress", "slices",
                "must be a 2-D (S, K) tensor");
  at::Tensor out = at::empty({slices.size(0), num_components()}, slices.options().dtype(at::kFloat));
  compress_into(slices, world_size, out);
  return out;
}

void PcaCompressor::compress_into(const at::Tensor& slices, int64_t world_size, at::Tensor out) const {
  constexpr const char* kWhere = "PcaCompressor.compress";
  check_fitted(kWhere);
  GVQ_CHECK_ARG(world_size >= 1, kWhere, "world_size", "must be >= 1, got ", world_size);
  GVQ_CHECK_ARG(slices.defined() && slices.dim() == 2 && slices.size(1) == slice_len(), kWhere, "slices",
                "must be (S, K) with K = ", slice_len(), " (the basis' slice length), got shape ",
                slices.defined() ? slices.sizes() : at::IntArrayRef{});
  GVQ_CHECK_ARG(is_float_like(slices.scalar_type()), kWhere, "slices",
                "must be float32, float16 or bfloat16, got ", slices.scalar_type());
  GVQ_CHECK_ARG(slices.device() == basis_.device(), kWhere, "slices", "is on ", slices.device(),
                " but the basis is on ", basis_.device(), " (use PcaCompressor.to)");
  GVQ_CHECK_ARG(out.dim() == 2 && out.size(0) == slices.size(0) && out.size(1) == num_components(), kWhere,
                "out", "must be (S, d) = [", slices.size(0), ", ", num_components(), "], got shape ",
                out.sizes());
  GVQ_CHECK_ARG(is_float_like(out.scalar_type()), kWhere, "out", "must be float32, float16 or bfloat16, got ",
                out.scalar_type());
  c10::NoGradGuard no_grad;
  const at::Tensor offset = this->offset(world_size).view({1, -1});
  if (slices.device().is_cpu()) {
    const at::Tensor g = contiguous_float(slices);
    const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
    at::Tensor target = direct ? out : at::empty(out.sizes(), at::kFloat);
    const int64_t s_rows = g.size(0), k = g.size(1), d = num_components();
    float* dst = target.data_ptr<float>();
    const float* off = offset.data_ptr<float>();
    switch (basis_.scalar_type()) {
      case at::kBFloat16:
        detail::cpu_compress(g.data_ptr<float>(), basis_.data_ptr<c10::BFloat16>(), off, dst, s_rows, k, d);
        break;
      case at::kHalf:
        detail::cpu_compress(g.data_ptr<float>(), basis_.data_ptr<c10::Half>(), off, dst, s_rows, k, d);
        break;
      default:
        detail::cpu_compress(g.data_ptr<float>(), basis_.data_ptr<float>(), off, dst, s_rows, k, d);
    }
    if (!direct) out.copy_(target);
    return;
  }
  if (slices.is_cuda() && detail::cuda_kernels_enabled()) {
    project_with_cuda_kernels(slices, basis_, offset, out, /*decompress=*/false);
    return;
  }
  const at::Tensor g = slices.scalar_type() == at::kFloat ? slices : slices.to(at::kFloat);
  const at::Tensor basis = basis_.to(at::kFloat);
  if (out.scalar_type() == at::kFloat && out.is_contiguous()) {
    at::addmm_out(out, offset, g, basis);
  } else {
    out.copy_(at::addmm(offset, g, basis));
  }
}

at::Tensor PcaCompressor::decompress(const at::Tensor& coeffs) const {
  check_fitted("PcaCompressor.decompress");
  GVQ_CHECK_ARG(coeffs.defined() && coeffs.dim() == 2, "PcaCompressor.decompress", "coeffs",
                "must be a 2-D (S, d) tensor");
  at::Tensor out = at::empty({coeffs.size(0), slice_len()}, coeffs.options().dtype(at::kFloat));
  decompress_into(coeffs, out);
  return out;
}

void PcaCompressor::decompress_into(const at::Tensor& coeffs, at::Tensor out) const {
  constexpr const char* kWhere = "PcaCompressor.decompress";
  check_fitted(kWhere);
  GVQ_CHECK_ARG(coeffs.defined() && coeffs.dim() == 2 && coeffs.size(1) == num_components(), kWhere, "coeffs",
                "must be (S, d) with d = ", num_components(), ", got shape ",
                coeffs.defined() ? coeffs.sizes() : at::IntArrayRef{});
  GVQ_CHECK_ARG(is_float_like(coeffs.scalar_type()), kWhere, "coeffs",
                "must be float32, float16 or bfloat16, got ", coeffs.scalar_type());
  GVQ_CHECK_ARG(coeffs.device() == basis_.device(), kWhere, "coeffs", "is on ", coeffs.device(),
                " but the basis is on ", basis_.device(), " (use PcaCompressor.to)");
  GVQ_CHECK_ARG(out.dim() == 2 && out.size(0) == coeffs.size(0) && out.size(1) == slice_len(), kWhere, "out",
                "must be (S, K) = [", coeffs.size(0), ", ", slice_len(), "], got shape ", out.sizes());
  c10::NoGradGuard no_grad;
  if (coeffs.device().is_cpu()) {
    const at::Tensor c = contiguous_float(coeffs);
    // Rows may be strided (a view into a gradient); elements within a row must be adjacent.
    const bool direct = out.scalar_type() == at::kFloat && out.stride(1) == 1;
    at::Tensor target = direct ? out : at::empty(out.sizes(), at::kFloat);
    const int64_t s_rows = c.size(0), k = slice_len(), d = num_components(), stride = target.stride(0);
    float* dst = target.data_ptr<float>();
    const float* mu = mean_.data_ptr<float>();
    switch (basis_.scalar_type()) {
      case at::kBFloat16:
        detail::cpu_decompress(c.data_ptr<float>(), basis_.data_ptr<c10::BFloat16>(), mu, dst, stride, s_rows, k, d);
        break;
      case at::kHalf:
        detail::cpu_decompress(c.data_ptr<float>(), basis_.data_ptr<c10::Half>(), mu, dst, stride, s_rows, k, d);
        break;
      default:
        detail::cpu_decompress(c.data_ptr<float>(), basis_.data_ptr<float>(), mu, dst, stride, s_rows, k, d);
    }
    if (!direct) out.copy_(target);
    return;
  }
  if (coeffs.is_cuda() && detail::cuda_kernels_enabled() && is_float_like(out.scalar_type())) {
    project_with_cuda_kernels(coeffs, basis_, mean_, out, /*decompress=*/true);
    return;
  }
  const at::Tensor c = coeffs.scalar_type() == at::kFloat ? coeffs : coeffs.to(at::kFloat);
  const at::Tensor basis = basis_.to(at::kFloat);
  if (out.scalar_type() == at::kFloat && out.is_contiguous()) {
    at::addmm_out(out, mean_.view({1, -1}), c, basis.t());
  } else {
    out.copy_(at::addmm(mean_.view({1, -1}), c, basis.t()));
  }
}

at::Tensor PcaCompressor::serialize() const {
  check_fitted("PcaCompressor.serialize");
  detail::ByteWriter out;
  out.put_raw(kMagic, 4);
  out.put(kFormatVersion);
  out.put(slice_len());
  out.put(num_components());
  out.put(num_samples_);
  out.put(basis_dtype_code(basis_.scalar_type()));
  GVQ_ASSERT(out.size() == kHeaderBytes);
  for (const at::Tensor& t : {mean_, eigenvalues_, basis_}) {
    const at::Tensor c = t.to(at::kCPU).contiguous();
    out.put_raw(c.data_ptr(), c.nbytes());
  }
  return out.to_tensor();
}

PcaCompressor PcaCompressor::deserialize(const at::Tensor& bytes) {
  constexpr const char* kWhere = "PcaCompressor.deserialize";
  GVQ_CHECK_ARG(bytes.defined() && bytes.scalar_type() == at::kByte && bytes.dim() == 1, kWhere, "bytes",
                "must be a 1-D uint8 tensor");
  at::Tensor b = bytes.to(at::kCPU).contiguous();
  const size_t n = b.numel();
  GVQ_CHECK_ARG(n >= kHeaderBytes, kWhere, "bytes", "is truncated: ", n, " bytes, shorter than the ",
                kHeaderBytes, "-byte header");
  detail::ByteReader in(b.data_ptr<uint8_t>(), n, kWhere, "bytes");
  GVQ_CHECK_ARG(std::memcmp(in.take(4), kMagic, 4) == 0, kWhere, "bytes", "does not start with the GVQB magic");
  const auto version = in.get<uint32_t>();
  GVQ_CHECK_ARG(version == kFormatVersion || version == kFloat32OnlyVersion, kWhere, "bytes", "has format version ",
                version, ", this build reads versions ", kFloat32OnlyVersion, " and ", kFormatVersion);
  const auto k = in.get<int64_t>(), d = in.get<int64_t>(), samples = in.get<int64_t>();
  GVQ_CHECK_ARG(k >= 1 && d >= 1 && d <= k && k <= (int64_t(1) << 24) && samples >= 0, kWhere, "bytes",
                "has an invalid header (K = ", k, ", d = ", d, ", samples = ", samples, ")");
  at::ScalarType basis_dtype = at::kFloat;
  if (version == kFormatVersion) {
    const auto code = in.get<uint32_t>();
    GVQ_CHECK_ARG(code < std::size(kBasisDtypes), kWhere, "bytes", "has an unknown basis dtype code ", code);
    basis_dtype = kBasisDtypes[code];
  }
  const size_t header = version == kFormatVersion ? kHeaderBytes : kHeaderBytesV1;
  const size_t expected = header + sizeof(float) * size_t(k + k) + at::elementSize(basis_dtype) * size_t(k * d);
  GVQ_CHECK_ARG(n == expected, kWhere, "bytes", "has ", n, " bytes, expected ", expected, " for K = ", k,
                ", d = ", d, ", a ", basis_dtype, " basis (truncated or corrupted)");
  auto take = [&](at::IntArrayRef shape, at::ScalarType dtype) {
    at::Tensor t = at::empty(shape, dtype);
    std::memcpy(t.data_ptr(), in.take(t.nbytes()), t.nbytes());
    return t;
  };
  PcaCompressor pca;
  pca.mean_ = take({k}, at::kFloat);
  pca.eigenvalues_ = take({k}, at::kFloat);
  pca.basis_ = take({k, d}, basis_dtype);
  pca.num_samples_ = samples;
  for (const at::Tensor& t : {pca.mean_, pca.eigenvalues_, pca.basis_}) {
    GVQ_CHECK_ARG(at::isfinite(t).all().item<bool>(), kWhere, "bytes", "holds non-finite values");
  }
  pca.finish_init();
  return pca;
}

uint64_t PcaCompressor::checksum() const {
  check_fitted("PcaCompressor.checksum");
  return checksum_bytes(serialize());
}

PcaCompressor PcaCompressor::with_basis_dtype(at::ScalarType dtype) const {
  constexpr const char* kWhere = "PcaCompressor.with_basis_dtype";
  check_fitted(kWhere);
  GVQ_CHECK_ARG(is_float_like(dtype), kWhere, "dtype", "must be float32, float16 or bfloat16, got ", dtype);
  PcaCompressor out = *this;
  if (dtype == basis_.scalar_type()) return out;
  // Round to nearest even (exact when widening back), so the same float32 basis gives the same stored basis on
  // every rank. Columns stay orthonormal to within the format's precision (~2^-8 for bfloat16, 2^-11 float16);
  // float16's range (6e-5 .. 65504) suits unit-norm columns once K >= 2^-28, i.e. always.
  out.basis_ = basis_.to(at::kFloat).to(dtype).contiguous();
  out.finish_init();  // U^T mu from the stored basis, so compress and decompress use one and the same U
  return out;
}

PcaCompressor PcaCompressor::to(const at::Device& device) const {
  check_fitted("PcaCompressor.to");
  PcaCompressor out = *this;
  out.mean_ = mean_.to(device);
  out.basis_ = basis_.to(device);
  out.eigenvalues_ = eigenvalues_.to(device);
  out.mean_proj_ = mean_proj_.to(device);
  return out;
}

}  // namespace gradiveq
