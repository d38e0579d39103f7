// The error-feedback memory kept in coefficient space (src/engine/error_memory.h) against the dense memory
// it replaces, e' = x - mu/N - U round(U^T (x - mu/N)) with x = g + e, formed after every step.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "engine/error_memory.h"
#include "gradiveq/pca_compressor.h"

namespace gradiveq::detail {
namespace {

constexpr int64_t kSlices = 3, kLen = 48, kWorld = 2;

// A basis of d = 12 for K = 48 from low-rank samples, so that compression loses something every step.
PcaCompressor fitted_basis(int64_t seed) {
  at::manual_seed(seed);
  const at::Tensor samples = at::randn({40, 12}).matmul(at::randn({12, kLen})) + 0.1 * at::randn({40, kLen});
  FitOptions fit;
  fit.energy = 1.0 - 1e-9;
  fit.max_components = 12;
  return PcaCompressor::fit(samples, fit);
}

at::Tensor as_travelled(const at::Tensor& c, at::ScalarType wire = at::kHalf) {
  return c.to(wire).to(at::kFloat);
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
}

// One step of `memory` with gradient `g` under `pca`; returns the coefficients before they were rounded.
at::Tensor step(ErrorMemory& memory, const at::Tensor& g, const PcaCompressor& pca) {
  const at::Tensor c = memory.add_step(g, pca.compress(g, kWorld), pca, kWorld);
  memory.record_sent(as_travelled(c));
  return c;
}

void random_steps(ErrorMemory& memory, const PcaCompressor& pca, int steps) {
  for (int i = 0; i < steps; ++i) step(memory, at::randn({kSlices, kLen}), pca);
}

struct DenseReference {
  at::ScalarType wire;
  at::Tensor e = at::zeros({kSlices, kLen});
  double residual_sq = 0, signal_sq = 0;

  at::Tensor step(const at::Tensor& g, const PcaCompressor& pca) {
    const at::Tensor x = g + e;
    const at::Tensor c = pca.compress(x, kWorld);
    residual_sq =
        (x - pca.mean() / double(kWorld)).pow(2).sum().item<double>() - c.pow(2).sum().item<double>();
    signal_sq = x.pow(2).sum().item<double>();
    e = x - (pca.decompress(as_travelled(c, wire)) - pca.mean() * (1.0 - 1.0 / double(kWorld)));
    return c;
  }
};

// Same coefficients, same memory and same eq. 7 terms, step by step, through a change of basis mid-way (the
// memory settles onto the new one) and a flush. Coefficients travelling in float32 differ by float rounding
// only; in float16 one may round to the neighbouring half (2^-11 relative), which the memory then carries.
void expect_same_as_dense_memory(at::ScalarType wire, double coeff_tol, double memory_tol) {
  const PcaCompressor first = fitted_basis(1), second = fitted_basis(2);
  ErrorMemory lazy;
  DenseReference dense{wire};
  at::manual_seed(3);
  for (int step = 0; step < 16; ++step) {
    const PcaCompressor& pca = step < 9 ? first : second;
    const at::Tensor g = at::randn({kSlices, kLen}) + 0.5;  // a mean the basis' mu does not cancel
    const at::Tensor expected = dense.step(g, pca);
    const at::Tensor c = lazy.add_step(g, pca.compress(g, kWorld), pca, kWorld);
    lazy.record_sent(as_travelled(c, wire));  // not step(): this one travels in `wire`
    EXPECT_LT(rel(c, expected), coeff_tol) << "step " << step;
    EXPECT_LT(rel(lazy.dense(), dense.e), memory_tol) << "step " << step;
    const auto [residual_sq, signal_sq] = lazy.error_terms();
    EXPECT_NEAR(residual_sq.item<double>(), dense.residual_sq, memory_tol * dense.signal_sq)
        << "step " << step;
    EXPECT_NEAR(signal_sq.item<double>(), dense.signal_sq, memory_tol * dense.signal_sq) << "step " << step;
  }
  EXPECT_GT(dense.e.norm().item<double>(), 1.0);  // the test has a memory to compare
  at::Tensor out = at::zeros({kSlices, kLen});
  lazy.flush_into(out);
  EXPECT_LT(rel(out, dense.e), memory_tol);
  EXPECT_TRUE(lazy.empty());
}

TEST(ErrorMemory, KeepsWhatTheDenseMemoryKeepsWithoutADecompressPerStep) {
  expect_same_as_dense_memory(at::kFloat, 2e-5, 2e-5);
  expect_same_as_dense_memory(at::kHalf, 1e-3, 1e-4);
}

// Same values with column-major strides: a memory fed only such tensors takes the general path of tensor
// operations (the one GPUs take), where contiguous CPU float32 tensors take the one-pass loops.
at::Tensor column_major(const at::Tensor& t) { return t.t().contiguous().t(); }

// The CPU loops against the tensor operations: E, P and the coefficients bit for bit (the same float32
// additions in the same order), the eq. 7 terms to double rounding, through a change of basis and a
// non-finite step.
TEST(ErrorMemory, CpuLoopsMatchTheTensorOperations) {
  const PcaCompressor first = fitted_basis(1), second = fitted_basis(2);
  ErrorMemory loops, ops;
  at::manual_seed(6);
  for (int i = 0; i < 12; ++i) {
    const PcaCompressor& pca = i < 5 ? first : second;
    at::Tensor g = at::randn({kSlices, kLen}) + 0.5;
    if (i == 8) g[2][7] = std::numeric_limits<float>::quiet_NaN();
    const at::Tensor projected = pca.compress(g, kWorld);
    const at::Tensor c_loops = loops.add_step(g, projected, pca, kWorld);
    const at::Tensor c_ops = ops.add_step(column_major(g), column_major(projected), pca, kWorld);
    ASSERT_TRUE(at::equal(c_loops, c_ops) || i == 8) << "step " << i;
    const auto [loops_residual, loops_signal] = loops.error_terms();
    const auto [ops_residual, ops_signal] = ops.error_terms();
    if (i != 8) {
      EXPECT_NEAR(loops_residual.item<double>(), ops_residual.item<double>(),
                  1e-6 * ops_signal.item<double>());
      EXPECT_NEAR(loops_signal.item<double>(), ops_signal.item<double>(), 1e-6 * ops_signal.item<double>());
    }
    loops.record_sent(as_travelled(c_loops));
    ops.record_sent(column_major(as_travelled(c_ops)));
    ASSERT_EQ(loops.empty(), ops.empty()) << "step " << i;
    EXPECT_EQ(loops.empty(), i == 8);
    if (!ops.empty()) ASSERT_TRUE(at::equal(loops.dense(), ops.dense())) << "step " << i;
  }
}

// A step GradScaler will skip (a non-finite gradient) empties the memory instead of poisoning later steps.
TEST(ErrorMemory, NonFiniteStepEmptiesIt) {
  const PcaCompressor pca = fitted_basis(1);
  ErrorMemory memory;
  at::Tensor g = at::randn({kSlices, kLen});
  step(memory, g, pca);
  ASSERT_FALSE(memory.empty());
  g[1][5] = std::numeric_limits<float>::infinity();
  step(memory, g, pca);
  EXPECT_TRUE(memory.empty());
  const auto [residual_sq, signal_sq] = memory.error_terms();  // that step's terms are still there to record
  ASSERT_TRUE(residual_sq.defined() && signal_sq.defined());
  EXPECT_FALSE(std::isfinite(signal_sq.item<double>()));
}

// The checkpoint image, restored against the same basis, continues bit for bit, also when it was taken
// while the memory was still kept against an older basis (it is saved as settled onto the current one).
TEST(ErrorMemory, ImageRestoresBitForBit) {
  const PcaCompressor first = fitted_basis(1), second = fitted_basis(2);
  for (const PcaCompressor* current : {&first, &second}) {
    ErrorMemory run;
    at::manual_seed(4);
    random_steps(run, first, 3);
    ErrorMemory resumed;
    resumed.restore(run.image(*current), *current, at::kCPU);
    for (int i = 0; i < 3; ++i) {
      const at::Tensor g = at::randn({kSlices, kLen});
      ASSERT_TRUE(at::equal(step(run, g, *current), step(resumed, g, *current))) << "step " << i;
    }
    EXPECT_TRUE(at::equal(run.dense(), resumed.dense()));
  }
}

// A version 5-7 checkpoint holds the memory as one dense tensor: restored, it settles onto the basis at the
// next step and sends what the memory it was taken from sends (to float rounding).
TEST(ErrorMemory, DenseImageRestoresTheSameMemory) {
  const PcaCompressor pca = fitted_basis(1);
  ErrorMemory run;
  at::manual_seed(5);
  random_steps(run, pca, 3);
  ErrorMemory resumed;
  resumed.restore({run.dense().clone(), {}, {}}, pca, at::kCPU);
  const at::Tensor g = at::randn({kSlices, kLen});
  EXPECT_LT(rel(step(resumed, g, pca), step(run, g, pca)), 1e-5);
}

}  // namespace
}  // namespace gradiveq::detail
