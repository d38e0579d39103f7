// The LibTorch front end on CUDA tensors: an NCCL process group of one rank on one GPU, and 2 Gloo ranks
// with CUDA tensors, with the CUDA kernels on and off, against the plain average. They skip without a GPU;
// the NCCL refusal runs everywhere.
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include <string>
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "gradiveq/gradient_synchronizer.h"
#include "gradiveq/process_group.h"
#include "gradiveq/schedule.h"
#include "kernel_switch_guard.h"
#include "kernels/kernels_cuda.h"
#include "rank_threads.h"
#include "test_helpers.h"
#include "tiny_net.h"

namespace gradiveq {
namespace {

using testing::batch;
using testing::expect_invalid;
using testing::fresh_store_path;
using testing::KernelSwitchGuard;
using testing::rel_error;
using testing::run_ranks;
using testing::TinyNet;

// Float32 rounding through a full-rank basis, on the GPU (cuBLAS or the kernels) and through NCCL or Gloo.
constexpr double kLosslessTolerance = 1e-5;

at::Device gpu() { return at::Device(at::kCUDA, 0); }

// TinyNet's parameters moved to the GPU (same values on every rank).
void to_gpu(TinyNet& net) {
  for (auto& np : net.params) np.tensor = np.tensor.detach().to(gpu()).set_requires_grad(true);
}

SynchronizerOptions lossless_options() {
  SynchronizerOptions o;
  o.gradiveq.fit.energy = 1.0;
  o.gradiveq.fit.min_ratio = 0.0;
  o.gradiveq.fit.max_components = 0;
  o.gradiveq.coeff_dtype = o.gradiveq.uncompressed_dtype = at::kFloat;
  o.gradiveq.schedule = {1, 2, 3};
  o.gradiveq.sample_quantizer = SampleQuantizer::kNone;
  o.gradiveq.policy.min_numel = 100;
  o.bucket_cap_bytes = 4000;
  return o;
}

// Trains `net` 9 steps through `pg` (warm-up, sampling, compressed, sampling, compressed) and checks every
// gradient against the plain all-reduce average of an identical net's.
void expect_plain_average_every_step(int rank, const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                     const std::string& context) {
  TinyNet net(7), reference(7);
  to_gpu(net);
  to_gpu(reference);
  GradientSynchronizer sync(pg, net.params, lossless_options());
  for (int step = 0; step < 9; ++step) {
    auto [x, y] = batch(rank, step);
    x = x.to(gpu());
    y = y.to(gpu());
    for (TinyNet* n : {&net, &reference}) {
      n->zero_grad();
      n->loss(x, y).backward();
    }
    sync.synchronize();
    for (size_t i = 0; i < net.params.size(); ++i) {
      std::vector<at::Tensor> t{reference.p(i).grad().clone()};
      pg->allreduce(t)->wait();
      EXPECT_LT(rel_error(net.p(i).grad(), t[0] / double(pg->getSize())), kLosslessTolerance)
          << context << " rank " << rank << " step " << step << " " << net.params[i].name;
    }
  }
  EXPECT_EQ(sync.aggregator().layer_stats()[1].fits, 2) << context;
}

// Runs body(kernels) with the CUDA kernels off, then on where they are built; the switch is restored after.
template <typename Body>
void for_each_kernel_setting(const Body& body) {
  KernelSwitchGuard guard;
  for (const bool kernels : {false, true}) {
    if (kernels && !detail::cuda_kernels_built()) continue;
    detail::set_cuda_kernels_enabled(kernels);
    body(kernels);
  }
}

#ifdef GRADIVEQ_WITH_CUDA_KERNELS
// While it lives, every operation that makes the host wait for the device raises (torch's
// set_sync_debug_mode("error")): .item(), copies into pageable host memory, stream synchronisation.
class HostSyncsRaise {
 public:
  explicit HostSyncsRaise(bool on) : before_(c10::cuda::warning_state().get_sync_debug_mode()) {
    if (on) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  }
  ~HostSyncsRaise() { c10::cuda::warning_state().set_sync_debug_mode(before_); }

 private:
  c10::cuda::SyncDebugMode before_;
};
#endif

// Everything a step can do: warm-up, sampling (QSGD-coded or not), compressed steps with error feedback (a
// lossy basis: energy 0.9), the verification code and the adaptive window's vote.
SynchronizerOptions every_step_feature(SampleQuantizer sampling) {
  SynchronizerOptions o = lossless_options();
  o.gradiveq.fit.energy = 0.9;
  o.gradiveq.error_feedback = ErrorFeedback::kOn;
  o.gradiveq.verify_bases = true;
  o.gradiveq.restart_error_growth = 1e6;  // votes in every compressed step, never restarts
  o.gradiveq.sample_quantizer = sampling;
  o.gradiveq.sample_source = SampleSource::kAggregated;
  return o;
}

// 14 steps of `o` through `pg` on `device`. With raise_on_waits (CUDA builds), every step but step 0 (setting
// up) and those that open with a fit (it runs on the host) runs under HostSyncsRaise.
void run_steps_without_waits(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const at::Device& device,
                             const SynchronizerOptions& o, bool raise_on_waits, const std::string& context) {
  const Schedule schedule(o.gradiveq.schedule);
  TinyNet net(7);
  for (auto& np : net.params) np.tensor = np.tensor.detach().to(device).set_requires_grad(true);
  GradientSynchronizer sync(pg, net.params, o);
  int64_t fits = 0;
  for (int step = 0; step < 14; ++step) {
    auto [x, y] = batch(0, step);
    x = x.to(device);
    y = y.to(device);
    net.zero_grad();
    const bool opens_with_fit = step > 0 && schedule.fits_after(step - 1);
    fits += opens_with_fit;
    try {
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
      const HostSyncsRaise guard(raise_on_waits && step > 0 && !opens_with_fit);
#endif
      net.loss(x, y).backward();
      sync.synchronize();
    } catch (const c10::Error& e) {
      ADD_FAILURE() << context << ", step " << step
                    << " waited for the device: " << e.what_without_backtrace();
      return;
    }
  }
  const auto stats = sync.aggregator().layer_stats();
  EXPECT_EQ(stats[1].fits, fits) << context;
  EXPECT_GT(stats[1].num_components, 0) << context;
  EXPECT_GE(stats[1].relative_error, 0.0) << context;  // read from the device here, after the steps
}

// The same steps on the CPU, where nothing can wait for a device: the scenario itself runs (valid options, a
// fit per window, compressed steps).
TEST(CudaSynchronizer, TheNoWaitScenarioRunsOnTheCpu) {
  for (const auto sampling : {SampleQuantizer::kNone, SampleQuantizer::kQsgd4}) {
    run_ranks(1, [&](int, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      run_steps_without_waits(pg, at::kCPU, every_step_feature(sampling), false, "cpu");
    });
  }
}

TEST(CudaSynchronizer, StepsWithoutAFitNeverWaitForTheDevice) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for_each_kernel_setting([](bool kernels) {
    auto store = connect_store({"", 0, fresh_store_path()}, 0, 1);
    run_steps_without_waits(make_nccl_process_group(store, 0, 1), gpu(),
                            every_step_feature(SampleQuantizer::kNone), true, kernels ? "kernels" : "aten");
  });
}

// The default sampling windows (4-bit QSGD, aggregated samples) stay on the device only with the kernels:
// through ATen the QSGD codec runs on the CPU.
TEST(CudaSynchronizer, QsgdSamplingWindowsNeverWaitForTheDeviceWithTheKernels) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  if (!detail::cuda_kernels_built()) GTEST_SKIP() << "built without the CUDA kernels";
  KernelSwitchGuard guard;
  detail::set_cuda_kernels_enabled(true);
  auto store = connect_store({"", 0, fresh_store_path()}, 0, 1);
  run_steps_without_waits(make_nccl_process_group(store, 0, 1), gpu(),
                          every_step_feature(SampleQuantizer::kQsgd4), true, "kernels, qsgd sampling");
}

TEST(CudaSynchronizer, NcclIsRefusedWithoutNcclOrAGpu) {
  if (detail::cuda_kernels_built() && at::hasCUDA()) GTEST_SKIP() << "this machine has a GPU";
  auto store = connect_store({"", 0, fresh_store_path()}, 0, 1);
  expect_invalid([&] { make_nccl_process_group(store, 0, 1); }, {"make_nccl_process_group"});
}

TEST(CudaSynchronizer, OneNcclRankAveragesLikePlainAllReduceWithAndWithoutKernels) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for_each_kernel_setting([](bool kernels) {
    auto store = connect_store({"", 0, fresh_store_path()}, 0, 1);
    expect_plain_average_every_step(0, make_nccl_process_group(store, 0, 1),
                                    kernels ? "nccl, kernels" : "nccl, aten");
  });
}

TEST(CudaSynchronizer, TwoGlooRanksWithCudaTensorsAverageLikePlainAllReduce) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for_each_kernel_setting([](bool kernels) {
    run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      expect_plain_average_every_step(rank, pg, kernels ? "gloo, kernels" : "gloo, aten");
    });
  });
}

}  // namespace
}  // namespace gradiveq
