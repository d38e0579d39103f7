#include "gradiveq/conv_layout.h"

#include "gradiveq/errors.h"

namespace gradiveq {

namespace {
void check_weight_shape(at::IntArrayRef shape, const char* where) {
  GVQ_CHECK_ARG(shape.size() == 4, where, "weight_shape",
                "must be a 4-D conv weight shape (F, D, H, W), got ", shape);
  for (auto s : shape) {
    GVQ_CHECK_ARG(s > 0, where, "weight_shape", "must have positive sizes, got ", shape);
  }
}
}  // namespace

ConvSliceLayout ConvSliceLayout::for_weight(at::IntArrayRef shape, int64_t slice_len) {
  check_weight_shape(shape, "ConvSliceLayout.for_weight");
  ConvSliceLayout layout;
  layout.filters = shape[0];
  layout.depth = shape[1];
  layout.height = shape[2];
  layout.width = shape[3];
  const int64_t fd = layout.filters * layout.depth;
  if (slice_len == 0) slice_len = layout.width * fd;
  GVQ_CHECK_ARG(slice_len > 0 && slice_len % fd == 0, "ConvSliceLayout.for_weight", "slice_len",
                "must be a positive multiple of F*D = ", fd, " for weight shape ", shape, ", got ",
                slice_len);
  GVQ_CHECK_ARG(slice_len <= layout.numel(), "ConvSliceLayout.for_weight", "slice_len",
                "must not exceed the layer's ", layout.numel(), " values (weight shape ", shape,
                "), got ", slice_len);
  layout.slice_len = slice_len;
  return layout;
}

ConvSliceLayout ConvSliceLayout::kernel_position(at::IntArrayRef shape) {
  check_weight_shape(shape, "ConvSliceLayout.kernel_position");
  return for_weight(shape, shape[0] * shape[1]);
}

void ConvSliceLayout::check_matches(const at::Tensor& g, const char* where, const char* arg) const {
  GVQ_CHECK_ARG(g.dim() == 4 && g.size(0) == filters && g.size(1) == depth && g.size(2) == height &&
                    g.size(3) == width,
                where, arg, "must have shape [", filters, ", ", depth, ", ", height, ", ", width,
                "] (F, D, H, W), got ", g.sizes());
}

at::Tensor ConvSliceLayout::to_paper_order(const at::Tensor& weight_grad) const {
  check_matches(weight_grad, "ConvSliceLayout.to_paper_order", "weight_grad");
  // (F, D, H, W) -> (H, W, D, F): F becomes the fastest-moving index.
  return weight_grad.permute({2, 3, 1, 0}).contiguous().view({-1});
}

void ConvSliceLayout::to_paper_order_into(const at::Tensor& weight_grad, at::Tensor& flat) const {
  check_matches(weight_grad, "ConvSliceLayout.to_paper_order", "weight_grad");
  GVQ_CHECK_ARG(flat.dim() == 1 && flat.numel() == numel() && flat.is_contiguous(), "ConvSliceLayout.to_paper_order",
                "flat", "must be a contiguous 1-D tensor of ", numel(), " values, got shape ", flat.sizes());
  flat.view({height, width, depth, filters}).copy_(weight_grad.permute({2, 3, 1, 0}));
}

void ConvSliceLayout::from_paper_order_into(const at::Tensor& flat, at::Tensor& weight_grad) const {
  GVQ_CHECK_ARG(flat.dim() == 1 && flat.numel() == numel(), "ConvSliceLayout.from_paper_order", "flat",
                "must be 1-D with ", numel(), " values, got shape ", flat.sizes());
  check_matches(weight_grad, "ConvSliceLayout.from_paper_order", "weight_grad");
  weight_grad.permute({2, 3, 1, 0}).copy_(flat.view({height, width, depth, filters}));
}

at::Tensor ConvSliceLayout::from_paper_order(const at::Tensor& flat) const {
  at::Tensor out = at::empty({filters, depth, height, width}, flat.options());
  from_paper_order_into(flat, out);
  return out;
}

at::Tensor ConvSliceLayout::slices(const at::Tensor& paper_flat) const {
  GVQ_CHECK_ARG(paper_flat.dim() == 1 && paper_flat.numel() == numel(), "ConvSliceLayout.slices",
                "paper_flat", "must be 1-D with ", numel(), " values, got shape ", paper_flat.sizes());
  return paper_flat.narrow(0, 0, sliced_numel()).view({num_slices(), slice_len});
}

at::Tensor ConvSliceLayout::tail(const at::Tensor& paper_flat) const {
  GVQ_CHECK_ARG(paper_flat.dim() == 1 && paper_flat.numel() == numel(), "ConvSliceLayout.tail",
                "paper_flat", "must be 1-D with ", numel(), " values, got shape ", paper_flat.sizes());
  return paper_flat.narrow(0, sliced_numel(), tail_len());
}

}  // namespace gradiveq
