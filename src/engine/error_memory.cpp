#include "engine/error_memory.h"

namespace gradiveq::detail {

namespace {

bool same_compressor(const PcaCompressor& a, const PcaCompressor& b) {
  return a.is_fitted() && b.is_fitted() && a.basis().is_same(b.basis()) && a.mean().is_same(b.mean());
}

at::Tensor sum_of_products(const at::Tensor& a, const at::Tensor& b) { return (a * b).sum(at::kDouble); }

}  // namespace

at::Tensor ErrorMemory::add_step(const at::Tensor& g, const at::Tensor& projected_g, const PcaCompressor& pca,
                                 int64_t world_size) {
  settle_onto(pca);
  const at::Tensor mu_share = pca.mean() / double(world_size);
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

void ErrorMemory::record_sent(const at::Tensor& sent) {
  sent_ = sent_.defined() ? sent_ + sent : sent.clone();
  const at::Tensor finite = at::isfinite(sent).all();
  if (finite.is_cpu()) {
    if (!finite.item<bool>()) {
      const auto terms = error_terms_;  // the step's own eq. 7 terms stay readable
      clear();
      error_terms_ = terms;
    }
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
