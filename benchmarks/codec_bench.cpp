// CPU codec throughput on every ResNet-32 conv layer shape (CIFAR ResNet-32: 31 conv layers, option-A shortcuts).
//
// For each shape: fit (100 samples, the paper's window), compress and decompress of one layer gradient with the
// paper's slice layout (K = W*D*F) and d = min(K / 8, 90), side by side with the bare at::matmul of the same
// shapes, and the whole model's compress + decompress per step for both slice layouts and each basis dtype. GB/s counts gradient bytes processed; the
// "basis_MB" counter shows the bytes of U each call also streams (the codec is memory-bound on U).
//
//   build/benchmarks/gradiveq_codec_bench --benchmark_min_time=0.5 --benchmark_repetitions=5
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <string>
#include <vector>

#include "gradiveq/gradiveq.h"

namespace {

using gradiveq::ConvSliceLayout;
using gradiveq::PcaCompressor;

struct LayerShape {
  int64_t f, d, h, w, count;  // count: how many layers of ResNet-32 have this shape
};
const std::vector<LayerShape> kResNet32Convs = {{16, 3, 3, 3, 1},  {16, 16, 3, 3, 10}, {32, 16, 3, 3, 1},
                                                {32, 32, 3, 3, 9}, {64, 32, 3, 3, 1},  {64, 64, 3, 3, 9}};

std::string name(const LayerShape& s) {
  return std::to_string(s.f) + "x" + std::to_string(s.d) + "x" + std::to_string(s.h) + "x" + std::to_string(s.w);
}

int64_t components(const ConvSliceLayout& layout) { return std::min<int64_t>(90, std::max<int64_t>(1, layout.slice_len / 8)); }

// A compressor with exactly d components, fitted on low-rank samples of rank d + 10 (at least d + 11 samples,
// as a pooled window of sample_iters x slices gives).
PcaCompressor make_compressor(const ConvSliceLayout& layout, int64_t d) {
  const int64_t n = std::max<int64_t>(100, d + 11);
  at::Tensor samples = at::randn({n, d + 10}).matmul(at::randn({d + 10, layout.slice_len}));
  return PcaCompressor::fit(samples, {1.0 - 1e-7, d});
}

void set_counters(benchmark::State& state, int64_t grad_bytes, int64_t basis_bytes, int64_t calls) {
  state.SetBytesProcessed(state.iterations() * grad_bytes * calls);
  state.counters["basis_MB"] = double(basis_bytes) / 1e6;
  state.counters["grad_MB"] = double(grad_bytes) / 1e6;
}

void BM_Fit(benchmark::State& state, LayerShape s) {
  auto layout = ConvSliceLayout::for_weight({s.f, s.d, s.h, s.w});
  at::Tensor samples = at::randn({100, layout.slice_len});
  for (auto _ : state) benchmark::DoNotOptimize(PcaCompressor::fit(samples, {0.99}));
  state.counters["K"] = double(layout.slice_len);
}

void BM_Compress(benchmark::State& state, LayerShape s) {
  auto layout = ConvSliceLayout::for_weight({s.f, s.d, s.h, s.w});
  auto pca = make_compressor(layout, components(layout));
  at::Tensor grad = at::randn({s.f, s.d, s.h, s.w});
  at::Tensor coeffs = at::empty({layout.num_slices(), pca.num_components()});
  for (auto _ : state) pca.compress_into(layout.slices(layout.to_paper_order(grad)), 2, coeffs);
  set_counters(state, grad.nbytes(), pca.basis().nbytes(), 1);
  state.counters["d"] = double(pca.num_components());
}

void BM_Decompress(benchmark::State& state, LayerShape s) {
  auto layout = ConvSliceLayout::for_weight({s.f, s.d, s.h, s.w});
  auto pca = make_compressor(layout, components(layout));
  at::Tensor grad = at::randn({s.f, s.d, s.h, s.w});
  at::Tensor coeffs = at::randn({layout.num_slices(), pca.num_components()});
  at::Tensor flat = at::empty({layout.numel()});
  for (auto _ : state) {
    pca.decompress_into(coeffs, layout.slices(flat));
    layout.from_paper_order_into(flat, grad);
  }
  set_counters(state, grad.nbytes(), pca.basis().nbytes(), 1);
}

// The bare GEMMs of compress and decompress with the same shapes and no layout work: the floor to compare with.
void BM_MatmulBaseline(benchmark::State& state, LayerShape s) {
  auto layout = ConvSliceLayout::for_weight({s.f, s.d, s.h, s.w});
  const int64_t d = components(layout);
  at::Tensor slices = at::randn({layout.num_slices(), layout.slice_len});
  at::Tensor basis = at::randn({layout.slice_len, d});
  for (auto _ : state) {
    at::Tensor c = at::matmul(slices, basis);
    benchmark::DoNotOptimize(at::matmul(c, basis.t()));
  }
  set_counters(state, slices.nbytes(), basis.nbytes(), 1);
}

void BM_CompressDecompress(benchmark::State& state, LayerShape s) {
  auto layout = ConvSliceLayout::for_weight({s.f, s.d, s.h, s.w});
  auto pca = make_compressor(layout, components(layout));
  at::Tensor grad = at::randn({s.f, s.d, s.h, s.w});
  at::Tensor flat = at::empty({layout.numel()});
  for (auto _ : state) {
    at::Tensor c = pca.compress(layout.slices(layout.to_paper_order(grad)), 2);
    pca.decompress_into(c, layout.slices(flat));
    layout.from_paper_order_into(flat, grad);
  }
  set_counters(state, grad.nbytes(), pca.basis().nbytes(), 1);
}

// All 31 conv layers of ResNet-32, compress + decompress: the codec's cost per training step, for a slice layout
// (the paper's kernel row with d = min(K / 8, 90), or the library default's kernel position with d = K / 8, its
// largest) and the dtype the bases are stored in.
void BM_ResNet32AllConvLayers(benchmark::State& state, bool kernel_position, at::ScalarType basis_dtype) {
  struct Layer {
    ConvSliceLayout layout;
    PcaCompressor pca;
    at::Tensor grad, flat;
  };
  std::vector<Layer> layers;
  int64_t grad_bytes = 0, basis_bytes = 0, coeff_bytes = 0;
  for (const auto& s : kResNet32Convs) {
    auto layout = kernel_position ? ConvSliceLayout::kernel_position({s.f, s.d, s.h, s.w})
                                  : ConvSliceLayout::for_weight({s.f, s.d, s.h, s.w});
    const int64_t d = kernel_position ? std::max<int64_t>(1, layout.slice_len / 8) : components(layout);
    auto pca = make_compressor(layout, d).with_basis_dtype(basis_dtype);
    for (int64_t i = 0; i < s.count; ++i) {
      layers.push_back({layout, pca, at::randn({s.f, s.d, s.h, s.w}), at::empty({layout.numel()})});
      grad_bytes += layers.back().grad.nbytes();
      basis_bytes += pca.basis().nbytes() + pca.mean().nbytes();
      coeff_bytes += layout.num_slices() * d * 4 + layout.tail_len() * 4;
    }
  }
  for (auto _ : state) {
    for (auto& l : layers) {
      at::Tensor c = l.pca.compress(l.layout.slices(l.layout.to_paper_order(l.grad)), 2);
      l.pca.decompress_into(c, l.layout.slices(l.flat));
      l.layout.from_paper_order_into(l.flat, l.grad);
    }
  }
  set_counters(state, grad_bytes, basis_bytes, 1);
  state.counters["layers"] = double(layers.size());
  state.counters["sent_KB"] = double(coeff_bytes) / 1e3;
}

void register_all() {
  for (const auto& s : kResNet32Convs) {
    benchmark::RegisterBenchmark(("Fit/" + name(s)).c_str(), BM_Fit, s)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("Compress/" + name(s)).c_str(), BM_Compress, s)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("Decompress/" + name(s)).c_str(), BM_Decompress, s)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("CompressDecompress/" + name(s)).c_str(), BM_CompressDecompress, s)
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("MatmulBaseline/" + name(s)).c_str(), BM_MatmulBaseline, s)
        ->Unit(benchmark::kMicrosecond);
  }
  for (bool kernel_position : {false, true}) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      const std::string label = std::string("ResNet32AllConvLayers/") +
                                (kernel_position ? "kernel_position" : "kernel_row") + "/basis_" +
                                (dtype == at::kFloat ? "float32" : dtype == at::kHalf ? "float16" : "bfloat16");
      benchmark::RegisterBenchmark(label.c_str(), BM_ResNet32AllConvLayers, kernel_position, dtype)
          ->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);  // one thread per rank, as in a 2-rank run on 2 cores
  at::manual_seed(0);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
