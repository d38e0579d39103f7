// Shared by the multi-rank C++ tests: a small CNN written with ATen ops, and each rank's seeded batches.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <utility>
#include <vector>

#include "gradiveq/types.h"

namespace gradiveq::testing {

// A small CNN written with ATen ops: two 3x3 convs, bias, a linear head.
struct TinyNet {
  std::vector<NamedParameter> params;
  explicit TinyNet(uint64_t seed) {
    auto gen = at::detail::createCPUGenerator(seed);
    auto make = [&](const char* name, at::IntArrayRef shape, double scale) {
      params.push_back({name, (at::randn(shape, gen) * scale).set_requires_grad(true)});
    };
    make("conv1.weight", {8, 3, 3, 3}, 0.3);
    make("conv2.weight", {16, 8, 3, 3}, 0.15);
    make("conv2.bias", {16}, 0.1);
    make("fc.weight", {10, 16}, 0.3);
  }
  at::Tensor& p(size_t i) { return params[i].tensor; }
  at::Tensor loss(const at::Tensor& x, const at::Tensor& y) {
    at::Tensor h = at::relu(at::conv2d(x, p(0), {}, 1, 1));
    h = at::relu(at::conv2d(h, p(1), p(2), 1, 1));
    return at::cross_entropy_loss(at::matmul(h.mean({2, 3}), p(3).t()), y);
  }
  void zero_grad() {
    for (auto& np : params) np.tensor.mutable_grad() = at::Tensor();
  }
  void sgd(double lr) {
    c10::NoGradGuard g;
    for (auto& np : params) np.tensor.sub_(np.tensor.grad() * lr);
  }
};

inline std::pair<at::Tensor, at::Tensor> batch(int rank, int step) {
  auto gen = at::detail::createCPUGenerator(1000 * rank + step + 1);
  return {at::randn({4, 3, 8, 8}, gen), at::randint(0, 10, {4}, gen)};
}

}  // namespace gradiveq::testing
