// Conv weight gradients in the paper's slice layout.
//
// PyTorch stores a conv weight (and its gradient) as (F, D, H, W): F filters of depth D and size H x W.
// GradiVeQ (Yu et al. 2018, Sec. 2) flattens it so that the F values at the same (h, w, d) position of all
// filters sit next to each other, the position running over depth, then width, then height: the flat
// order is (H, W, D, F) with F fastest. That vector is cut into consecutive slices of K values.
//
// Rules, for every conv shape including 1x1:
//  * K must be a positive multiple of F*D, so a slice always holds whole kernel positions (the
//    compression loss drops sharply at multiples of F*D, paper Fig. 5).
//  * The default K is one kernel row, W*D*F (768 for a 3x3 16->16 conv). For a 1x1 conv that is D*F:
//    the whole layer is a single slice.
//  * A layer has S = numel / K full slices. When K does not divide numel, the last numel - S*K values
//    (the tail, whole kernel positions) are not compressed: they travel as plain values.
//  * K may not exceed numel (the layer would have no slice at all).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace gradiveq {

/// How one conv layer's gradient maps onto slices. Plain value type.
struct ConvSliceLayout {
  int64_t filters = 0;    ///< F, output channels
  int64_t depth = 0;      ///< D, input channels (per group)
  int64_t height = 0;     ///< H, kernel height
  int64_t width = 0;      ///< W, kernel width
  int64_t slice_len = 0;  ///< K, values per slice; a positive multiple of F*D

  /// Layout for a weight of shape (F, D, H, W). slice_len 0 picks the paper's default, one kernel row
  /// (K = W*D*F). Throws InvalidArgument for a shape that is not 4-D with positive sizes or for a K that is
  /// not a positive multiple of F*D or exceeds the layer.
  static ConvSliceLayout for_weight(at::IntArrayRef weight_shape, int64_t slice_len = 0);

  /// The alternative layout of one kernel position per slice: K = D*F.
  static ConvSliceLayout kernel_position(at::IntArrayRef weight_shape);

  int64_t numel() const { return filters * depth * height * width; }
  int64_t num_slices() const { return numel() / slice_len; }           ///< S, full slices
  int64_t sliced_numel() const { return num_slices() * slice_len; }    ///< S*K
  int64_t tail_len() const { return numel() - sliced_numel(); }        ///< values sent uncompressed

  /// (F, D, H, W) gradient -> new contiguous 1-D tensor in the paper's (H, W, D, F) order.
  at::Tensor to_paper_order(const at::Tensor& weight_grad) const;
  /// Same, written into `flat`, a contiguous 1-D tensor of numel() values (any float dtype).
  void to_paper_order_into(const at::Tensor& weight_grad, at::Tensor& flat) const;
  /// Writes the (H, W, D, F)-ordered `flat` (numel values) back into `weight_grad` of shape (F, D, H, W).
  void from_paper_order_into(const at::Tensor& flat, at::Tensor& weight_grad) const;
  /// Allocating inverse of to_paper_order: returns an (F, D, H, W) tensor.
  at::Tensor from_paper_order(const at::Tensor& flat) const;

  /// View of the first S*K values of a paper-ordered 1-D tensor as (S, K) slices.
  at::Tensor slices(const at::Tensor& paper_flat) const;
  /// View of the tail (the last tail_len values) of a paper-ordered 1-D tensor.
  at::Tensor tail(const at::Tensor& paper_flat) const;

  /// Checks that `weight_grad` has this layout's (F, D, H, W) shape; `where`/`arg` name the caller.
  void check_matches(const at::Tensor& weight_grad, const char* where, const char* arg) const;
};

}  // namespace gradiveq
