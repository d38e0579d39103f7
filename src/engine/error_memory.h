// Private: one compressed layer's error-feedback memory (options.h: error_feedback).
//
// The memory is what this rank's compressed steps have not sent yet: after a step that sent c (as it travels,
// rounded) for x = g + e, it is e' = x - mu/N - U c. Forming e' after every step costs a decompress (U c),
// as much as the step's own reconstruction, so while one basis compresses the memory is kept as
//     e = E - U C,   E = e_0 + sum_t (g_t - mu/N)   (dense, (S, K)),   C = sum_t c_t,   P = U^T E   ((S, d)),
// and a step needs only the compress of its own gradient: with U^T U = I the coefficients to send are
//     U^T (g + e - mu/N) = P + U^T (g - mu/N) - C.
// U C is formed once, when the memory is read: a sampling step's flush, a checkpoint, or a new basis (the
// memory then settles onto it: E = e, P = U'^T e, C = 0). Until it settles, the memory holds on to the basis
// its coefficients are in, so a replaced basis stays allocated until the layer's next step.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "gradiveq/pca_compressor.h"

namespace gradiveq::detail {

class ErrorMemory {
 public:
  /// The three tensors, as a checkpoint holds them: `dense` E, and `projected` P and `sent` C when the
  /// memory is kept against a basis (undefined otherwise).
  struct Image {
    at::Tensor dense, projected, sent;
  };

  bool empty() const { return !dense_.defined(); }

  /// A compressed step: absorbs this rank's slices `g` ((S, K) float32) with `projected_g` = pca.compress(g,
  /// world_size), and returns the coefficients to send, (S, d) float32: U^T (g + e - mu/N).
  at::Tensor add_step(const at::Tensor& g, const at::Tensor& projected_g, const PcaCompressor& pca,
                      int64_t world_size);
  /// What the last add_step's coefficients were as they travelled (rounded to the wire's dtype). A
  /// non-finite step empties the memory: a step GradScaler skips must not poison every later one.
  void record_sent(const at::Tensor& sent);
  /// The last add_step's eq. 7 terms (0-dim float32): ||x - mu/N||^2 - ||c||^2 and ||x||^2 for x = g + e,
  /// without forming x (U^T U = I).
  std::pair<at::Tensor, at::Tensor> error_terms() const { return error_terms_; }

  /// The memory, (S, K) float32 (may share storage with the memory's own); undefined when empty.
  at::Tensor dense() const;
  /// Adds the memory to `slices` ((S, K), any float dtype) and empties it.
  void flush_into(const at::Tensor& slices);
  void clear();

  /// The checkpoint image, as settled onto `pca` (the layer's basis): what a later settle would compute, so a
  /// run resumed from it takes the same steps. The tensors may share storage with the memory's.
  Image image(const PcaCompressor& pca) const;
  /// Restores an image that `pca` (the layer's loaded basis) was current for; tensors moved to `device`.
  void restore(Image image, const PcaCompressor& pca, const at::Device& device);

 private:
  /// add_step and record_sent for CPU float32 contiguous tensors: the same values in one pass each.
  at::Tensor add_step_cpu(const at::Tensor& g, const at::Tensor& projected_g, const at::Tensor& mu_share,
                          const at::Tensor& offset);
  void record_sent_cpu(const at::Tensor& sent);
  /// Empties the memory after a non-finite step on the CPU, keeping that step's eq. 7 terms for the stats.
  void drop_non_finite_step();
  /// Keeps the memory against `pca` from now on (no-op when it already is).
  void settle_onto(const PcaCompressor& pca);

  PcaCompressor basis_;   // the compressor P and C are coefficients of (unfitted: the memory is E alone)
  at::Tensor dense_;      // E
  at::Tensor projected_;  // P
  at::Tensor sent_;       // C
  std::pair<at::Tensor, at::Tensor> error_terms_;
};

}  // namespace gradiveq::detail
