// Shared helpers for the C++ tests.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "gradiveq/errors.h"

namespace gradiveq::testing {

/// ||a - b|| / ||b||
inline double rel_error(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>() / b.to(at::kDouble).norm().item<double>();
}

/// Expects `fn` to throw gradiveq::InvalidArgument whose message contains every string in `needles`.
inline void expect_invalid(const std::function<void()>& fn, std::initializer_list<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "expected gradiveq::InvalidArgument, nothing was thrown";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) {
      EXPECT_NE(msg.find(n), std::string::npos) << "message '" << msg << "' lacks '" << n << "'";
    }
  }
}

/// n samples of length k near a rank-`rank` subspace: low-rank signal plus isotropic noise of std `noise`,
/// with a non-zero mean (gradients are not centred).
inline at::Tensor low_rank_samples(int64_t n, int64_t k, int64_t rank, double noise, at::Generator gen) {
  at::Tensor basis = at::randn({rank, k}, gen);
  at::Tensor scales = at::linspace(3.0, 1.0, rank).view({rank, 1});
  at::Tensor mean = at::randn({1, k}, gen) * 0.5;
  return at::randn({n, rank}, gen).matmul(basis * scales) + mean + noise * at::randn({n, k}, gen);
}

}  // namespace gradiveq::testing
