// Unit tests for include/gradiveq/conv_layout.h
#include "gradiveq/conv_layout.h"

#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;

struct Shape {
  int64_t f, d, h, w;
};

class ConvLayoutRoundTrip : public ::testing::TestWithParam<Shape> {};

TEST_P(ConvLayoutRoundTrip, PaperOrderInvertsAndSlicesCoverTheLayer) {
  const Shape s = GetParam();
  at::Tensor g = at::randn({s.f, s.d, s.h, s.w});
  auto layout = ConvSliceLayout::for_weight(g.sizes());
  EXPECT_EQ(layout.slice_len, s.w * s.d * s.f);  // default: one kernel row
  at::Tensor flat = layout.to_paper_order(g);
  ASSERT_EQ(flat.numel(), g.numel());
  EXPECT_TRUE(at::equal(layout.from_paper_order(flat), g));
  EXPECT_EQ(layout.num_slices() * layout.slice_len + layout.tail_len(), g.numel());
  EXPECT_EQ(layout.num_slices(), s.h);  // one slice per kernel row
  EXPECT_EQ(layout.tail_len(), 0);
  // In-place inverse into a strided destination.
  at::Tensor dst = at::zeros_like(g);
  layout.from_paper_order_into(flat, dst);
  EXPECT_TRUE(at::equal(dst, g));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvLayoutRoundTrip,
                         ::testing::Values(Shape{16, 3, 3, 3}, Shape{16, 16, 3, 3}, Shape{32, 16, 3, 3},
                                           Shape{64, 64, 3, 3}, Shape{8, 4, 5, 5}, Shape{32, 16, 1, 1},
                                           Shape{6, 2, 7, 3}));

TEST(ConvLayout, FilterIndexIsFastest) {
  // Element (f, d, h, w) lands at ((h * W + w) * D + d) * F + f.
  const int64_t F = 3, D = 2, H = 2, W = 2;
  at::Tensor g = at::arange(F * D * H * W, at::kFloat).view({F, D, H, W});
  at::Tensor flat = ConvSliceLayout::for_weight(g.sizes()).to_paper_order(g);
  for (int64_t f = 0; f < F; ++f)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          EXPECT_EQ(flat[((h * W + w) * D + d) * F + f].item<float>(), g[f][d][h][w].item<float>());
        }
}

TEST(ConvLayout, PaperExampleHasKernelRowSlices) {
  auto layout = ConvSliceLayout::for_weight({16, 16, 3, 3});
  EXPECT_EQ(layout.slice_len, 768);
  EXPECT_EQ(layout.num_slices(), 3);
}

TEST(ConvLayout, OneByOneConvIsOneSlice) {
  auto layout = ConvSliceLayout::for_weight({64, 32, 1, 1});
  EXPECT_EQ(layout.slice_len, 64 * 32);
  EXPECT_EQ(layout.num_slices(), 1);
  EXPECT_EQ(layout.tail_len(), 0);
}

TEST(ConvLayout, KernelPositionLayoutRoundTrips) {
  at::Tensor g = at::randn({32, 16, 3, 3});
  auto layout = ConvSliceLayout::kernel_position(g.sizes());
  EXPECT_EQ(layout.slice_len, 32 * 16);
  EXPECT_EQ(layout.num_slices(), 9);
  at::Tensor flat = layout.to_paper_order(g);
  // Slice p is kernel position p = h * W + w: all F*D values of that tap.
  at::Tensor slices = layout.slices(flat);
  EXPECT_TRUE(at::equal(slices[4].view({16, 32}).t(), g.select(2, 1).select(2, 1)));
  EXPECT_TRUE(at::equal(layout.from_paper_order(flat), g));
}

TEST(ConvLayout, TailThatDoesNotFillASliceStaysSeparate) {
  // 5x5 kernel with K = 2 kernel positions: 25 positions -> 12 slices and a tail of one position.
  auto layout = ConvSliceLayout::for_weight({4, 2, 5, 5}, 2 * 8);
  EXPECT_EQ(layout.num_slices(), 12);
  EXPECT_EQ(layout.tail_len(), 8);
  at::Tensor g = at::randn({4, 2, 5, 5});
  at::Tensor flat = layout.to_paper_order(g);
  EXPECT_TRUE(at::equal(layout.tail(flat), flat.narrow(0, 12 * 16, 8)));
  EXPECT_TRUE(at::equal(layout.tail(flat), g.select(2, 4).select(2, 4).t().reshape({-1})));
}

TEST(ConvLayout, RejectsBadInput) {
  expect_invalid([] { ConvSliceLayout::for_weight({16, 16, 3}); }, {"weight_shape", "4-D", "[16, 16, 3]"});
  expect_invalid([] { ConvSliceLayout::for_weight({16, 0, 3, 3}); }, {"weight_shape", "positive"});
  expect_invalid([] { ConvSliceLayout::for_weight({16, 16, 3, 3}, 100); },
                 {"slice_len", "multiple of F*D = 256", "100"});
  expect_invalid([] { ConvSliceLayout::for_weight({16, 16, 3, 3}, -256); }, {"slice_len", "-256"});
  expect_invalid([] { ConvSliceLayout::for_weight({16, 16, 3, 3}, 256 * 10); }, {"slice_len", "exceed", "2560"});
  auto layout = ConvSliceLayout::for_weight({16, 16, 3, 3});
  expect_invalid([&] { layout.to_paper_order(at::randn({16, 8, 3, 3})); }, {"weight_grad", "[16, 16, 3, 3]"});
  expect_invalid([&] { layout.slices(at::randn({100})); }, {"paper_flat", "2304"});
}

}  // namespace
}  // namespace gradiveq
