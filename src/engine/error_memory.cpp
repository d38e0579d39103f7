#include "engine/error_memory.h"

#include <cmath>

namespace gradiveq::detail {

namespace {

bool same_compressor(const PcaCompressor& a, const PcaCompressor& b) {
  return a.is_fitted() && b.is_fitted() && a.basis().is_same(b.basis()) && a.mean().is_same(b.mean());
}

at::Tensor sum_of_products(const at::Tensor& a, const at::Tensor& b) { return (a * b).sum(at::kDouble); }

// ---- the CPU path: one pass over E and one over P instead of ~35 tensor operations per layer ----
//
// Each operation costs a few microseconds of dispatch whatever its size, which made the bookkeeping 2.2 ms of
// ResNet-32's compressed step (docs/results.md 7m), most of it on the 20 small layers. The loops compute the
// same elementwise float32 values as the operations below them (the same additions in the same order, so E, P
// and c are bit-identical) and the eq. 7 sums in double, in another order than at::sum (they may differ in
// the last bits of a double).

bool is_cpu_float32_contiguous(const at::Tensor& t) {
  return !t.defined() || (t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous());
}

// Double sums in eight independent lanes (blocks of 8 elements, lane = position in the block), so that the
// additions neither wait on each other nor go through memory; added up in a fixed tree at the end.
struct Lanes8 {
  double lane[8] = {};
  double total() const {
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
};

// E = (E + g) - m over n elements of one slice, m = mu/N; adds ||E||^2 and <E, m> (after the update).
void absorb_slice(float* __restrict e, const float* __restrict g, const float* __restrict m, int64_t n,
                  Lanes8& sq, Lanes8& mu) {
  double s2[8] = {}, sm[8] = {};
  const auto one = [&](int64_t k, int l) {
    const float v = (e[k] + g[k]) - m[k];
    e[k] = v;
    s2[l] += double(v) * double(v);
    sm[l] += double(v) * double(m[k]);
  };
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) one(k + l, l);
  }
  for (int l = 0; k < n; ++k, ++l) one(k, l);
  for (int l = 0; l < 8; ++l) sq.lane[l] += s2[l], mu.lane[l] += sm[l];
}

// E = (E + g) - m for every slice; returns ||E||^2 and sum_s <E_s, m>.
std::pair<double, double> absorb_gradient(float* e, const float* g, const float* m, int64_t S, int64_t K) {
  Lanes8 sq, mu;
  for (int64_t s = 0; s < S; ++s) absorb_slice(e + s * K, g + s * K, m, K, sq, mu);
  return {sq.total(), mu.total()};
}

struct CoefficientSums {
  double sent_dot_projected = 0, sent_sq = 0, sent_dot_offset = 0, coeff_sq = 0;
};

// P += P_g and c = P - C (C null: nothing sent yet, c = P), with the sums eq. 7 needs of C, P and c. Small
// (S x d values): one lane per sum.
CoefficientSums absorb_projection(float* p, const float* pg, const float* sent, const float* offset, float* c,
                                  int64_t S, int64_t d) {
  CoefficientSums sums;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t i = s * d, j = 0; j < d; ++i, ++j) {
      p[i] += pg[i];
      c[i] = sent ? p[i] - sent[i] : p[i];
      sums.coeff_sq += double(c[i]) * double(c[i]);
      if (!sent) continue;
      sums.sent_dot_projected += double(sent[i]) * double(p[i]);
      sums.sent_sq += double(sent[i]) * double(sent[i]);
      sums.sent_dot_offset += double(sent[i]) * double(offset[j]);
    }
  }
  return sums;
}

at::Tensor scalar(double v) { return at::scalar_tensor(v, at::kFloat); }

}  // namespace

at::Tensor ErrorMemory::add_step(const at::Tensor& g, const at::Tensor& projected_g, const PcaCompressor& pca,
                                 int64_t world_size) {
  settle_onto(pca);
  const at::Tensor mu_share = pca.mean() / double(world_size);
  if (is_cpu_float32_contiguous(g) && is_cpu_float32_contiguous(projected_g) &&
      is_cpu_float32_contiguous(dense_) && is_cpu_float32_contiguous(projected_) &&
      is_cpu_float32_contiguous(sent_)) {
    return add_step_cpu(g, projected_g, mu_share, pca.offset(world_size));
  }
  if (empty()) {
    dense_ = g - mu_share;
    projected_ = projected_g.clone();
  } else {
    dense_.add_(g).sub_(mu_share);
    projected_.add_(projected_g);
  }
  const bool sent_before = sent_.defined();
  at::Tensor c = sent_before ? projected_ - sent_ : projected_.clone();
  // x - mu/N = E - U C, so ||x - mu/N||^2 = ||E||^2 - 2 <C, P> + ||C||^2 and <x - mu/N, mu/N> (summed over
  // the slices) = <sum_s E_s, mu/N> - <sum_s C_s, U^T mu/N>, where offset(N) = -U^T mu/N. In double: E is a
  // running sum, so these differences cancel more than the step's own terms would.
  at::Tensor centred_sq = sum_of_products(dense_, dense_), mu_term = sum_of_products(dense_.sum(0), mu_share);
  if (sent_before) {
    centred_sq = centred_sq - 2.0 * sum_of_products(sent_, projected_) + sum_of_products(sent_, sent_);
    mu_term = mu_term + sum_of_products(sent_.sum(0), pca.offset(world_size));
  }
  const at::Tensor signal_sq =
      centred_sq + 2.0 * mu_term + double(g.size(0)) * sum_of_products(mu_share, mu_share);
  error_terms_ = {(centred_sq - sum_of_products(c, c)).to(at::kFloat), signal_sq.to(at::kFloat)};
  return c;
}

at::Tensor ErrorMemory::add_step_cpu(const at::Tensor& g, const at::Tensor& projected_g,
                                     const at::Tensor& mu_share, const at::Tensor& offset) {
  if (empty()) {  // (0 + g) - m is g - m, and 0 + P_g is P_g: the same values as the first step below
    dense_ = at::zeros_like(g);
    projected_ = at::zeros_like(projected_g);
  }
  const int64_t S = g.size(0);
  const float* m = mu_share.data_ptr<float>();
  const auto [dense_sq, dense_mu] =
      absorb_gradient(dense_.data_ptr<float>(), g.data_ptr<float>(), m, S, g.size(1));
  at::Tensor c = at::empty_like(projected_);
  const CoefficientSums sums =
      absorb_projection(projected_.data_ptr<float>(), projected_g.data_ptr<float>(),
                        sent_.defined() ? sent_.data_ptr<float>() : nullptr,
                        offset.contiguous().data_ptr<float>(), c.data_ptr<float>(), S, projected_.size(1));
  double mu_sq = 0;
  for (int64_t k = 0; k < g.size(1); ++k) mu_sq += double(m[k]) * double(m[k]);
  const double centred_sq = dense_sq - 2.0 * sums.sent_dot_projected + sums.sent_sq;
  const double mu_term = dense_mu + sums.sent_dot_offset;
  error_terms_ = {scalar(centred_sq - sums.coeff_sq), scalar(centred_sq + 2.0 * mu_term + double(S) * mu_sq)};
  return c;
}

void ErrorMemory::record_sent_cpu(const at::Tensor& sent) {
  if (!sent_.defined()) sent_ = at::zeros_like(sent);  // 0 + c is c
  float* __restrict total = sent_.data_ptr<float>();
  const float* __restrict c = sent.data_ptr<float>();
  bool finite = true;
  for (int64_t j = 0, n = sent.numel(); j < n; ++j) {
    total[j] += c[j];
    finite &= std::isfinite(c[j]);
  }
  if (!finite) drop_non_finite_step();
}

void ErrorMemory::record_sent(const at::Tensor& sent) {
  if (is_cpu_float32_contiguous(sent) && is_cpu_float32_contiguous(sent_)) {
    record_sent_cpu(sent);
    return;
  }
  sent_ = sent_.defined() ? sent_ + sent : sent.clone();
  const at::Tensor finite = at::isfinite(sent).all();
  if (finite.is_cpu()) {
    if (!finite.item<bool>()) drop_non_finite_step();
    return;
  }
  // On a GPU, without waiting for the device: the same memory, zeroed.
  dense_ = at::where(finite, dense_, 0.0);
  projected_ = at::where(finite, projected_, 0.0);
  sent_ = at::where(finite, sent_, 0.0);
}

at::Tensor ErrorMemory::dense() const {
  if (empty() || !sent_.defined()) return dense_;
  at::Tensor sent_part = basis_.decompress(sent_);  // U C + mu
  return dense_ - sent_part.sub_(basis_.mean());
}

void ErrorMemory::flush_into(const at::Tensor& slices) {
  if (empty()) return;
  slices.add_(dense().to(slices.device()));
  clear();
}

void ErrorMemory::clear() { *this = ErrorMemory(); }

void ErrorMemory::drop_non_finite_step() {
  const auto terms = error_terms_;  // the step's own eq. 7 terms stay readable
  clear();
  error_terms_ = terms;
}

void ErrorMemory::settle_onto(const PcaCompressor& pca) {
  if (same_compressor(basis_, pca)) return;
  dense_ = dense();
  sent_ = at::Tensor();
  basis_ = pca;
  // U^T e through compress, whose offset is -U^T mu (world size 1) and is taken off again; world size 1 on
  // every path, so a memory settled at a checkpoint holds the bits a later settle would have computed.
  projected_ = empty() ? at::Tensor() : pca.compress(dense_, 1).sub_(pca.offset(1));
}

ErrorMemory::Image ErrorMemory::image(const PcaCompressor& pca) const {
  if (empty()) return {};
  if (!pca.is_fitted()) return {dense(), {}, {}};
  ErrorMemory settled = *this;  // shares the tensors; settle_onto replaces them rather than writing to them
  settled.settle_onto(pca);
  return {settled.dense_, settled.projected_, settled.sent_};
}

void ErrorMemory::restore(Image image, const PcaCompressor& pca, const at::Device& device) {
  clear();
  if (!image.dense.defined()) return;
  // Copies: the steps write E and P in place, and the image's tensors may be another memory's.
  const auto own = [&](const at::Tensor& t) { return t.to(device, /*non_blocking=*/false, /*copy=*/true); };
  dense_ = own(image.dense);
  if (image.projected.defined()) {
    basis_ = pca;
    projected_ = own(image.projected);
    if (image.sent.defined()) sent_ = own(image.sent);
  }
}

}  // namespace gradiveq::detail
