// Unit tests for include/gradiveq/schedule.h
#include "gradiveq/schedule.h"

#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;

TEST(Schedule, PaperDefaultsSwitchAtExactIterations) {
  Schedule s({2500, 100, 400});  // the paper's schedule (the default compresses 100, not 400)
  EXPECT_EQ(s.phase(0), Phase::kWarmup);
  EXPECT_EQ(s.phase(2499), Phase::kWarmup);
  EXPECT_EQ(s.phase(2500), Phase::kSampling);
  EXPECT_EQ(s.phase(2599), Phase::kSampling);
  EXPECT_EQ(s.phase(2600), Phase::kCompressed);
  EXPECT_EQ(s.phase(2999), Phase::kCompressed);
  EXPECT_EQ(s.phase(3000), Phase::kSampling);  // re-sampling every 500 iterations
  EXPECT_EQ(s.phase(3100), Phase::kCompressed);
  EXPECT_TRUE(s.fits_after(2599));
  EXPECT_TRUE(s.fits_after(3099));
  EXPECT_FALSE(s.fits_after(2598));
  EXPECT_FALSE(s.fits_after(2600));
  EXPECT_FALSE(s.fits_after(100));
  EXPECT_EQ(s.window_index(2499), -1);
  EXPECT_EQ(s.window_index(2500), 0);
  EXPECT_EQ(s.window_index(2999), 0);
  EXPECT_EQ(s.window_index(3000), 1);
}

TEST(Schedule, ShortScheduleCountsPhasesPerWindow) {
  Schedule s({/*warmup=*/3, /*sample=*/2, /*compress=*/5});
  int counts[3] = {0, 0, 0};
  int fits = 0;
  for (int64_t it = 0; it < 3 + 7 * 4; ++it) {
    counts[int(s.phase(it))]++;
    fits += s.fits_after(it);
  }
  EXPECT_EQ(counts[int(Phase::kWarmup)], 3);
  EXPECT_EQ(counts[int(Phase::kSampling)], 8);
  EXPECT_EQ(counts[int(Phase::kCompressed)], 20);
  EXPECT_EQ(fits, 4);
  EXPECT_EQ(phase_name(Phase::kCompressed), "compressed");
}

TEST(Schedule, NoWarmupAndNoCompression) {
  Schedule no_warmup({0, 1, 1});
  EXPECT_EQ(no_warmup.phase(0), Phase::kSampling);
  EXPECT_TRUE(no_warmup.fits_after(0));
  EXPECT_EQ(no_warmup.phase(1), Phase::kCompressed);
  Schedule never({0, 5, 0});
  for (int64_t it = 0; it < 20; ++it) EXPECT_EQ(never.phase(it), Phase::kSampling);
}

TEST(Schedule, RejectsBadInput) {
  expect_invalid([] { Schedule({-1, 100, 400}); }, {"warmup_iters", "-1"});
  expect_invalid([] { Schedule({0, 0, 400}); }, {"sample_iters", "got 0"});
  expect_invalid([] { Schedule({0, 10, -4}); }, {"compress_iters", "-4"});
  expect_invalid([] { Schedule().phase(-3); }, {"iter", "-3"});
}

}  // namespace
}  // namespace gradiveq
