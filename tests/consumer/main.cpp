// Fits a compressor on a low-rank window and round-trips one layer's gradient through the installed library.
#include <gradiveq/gradiveq.h>

#include <iostream>

int main() {
  at::manual_seed(0);
  auto layout = gradiveq::ConvSliceLayout::for_weight({16, 16, 3, 3});
  at::Tensor samples = at::randn({64, 8}).matmul(at::randn({8, layout.slice_len}));
  auto pca = gradiveq::PcaCompressor::fit(samples, {/*energy=*/0.999});
  at::Tensor grad = at::randn({8}).matmul(at::randn({8, layout.slice_len})).repeat({3}).view({16, 16, 3, 3});
  at::Tensor flat = layout.to_paper_order(grad);
  at::Tensor back = pca.decompress(pca.compress(layout.slices(flat)));
  std::cout << "gradiveq " << gradiveq::kVersion << " consumer: K=" << layout.slice_len
            << " d=" << pca.num_components() << " slices=" << layout.num_slices() << std::endl;
  return back.sizes() == layout.slices(flat).sizes() ? 0 : 1;
}
