// Where a compressed step and a fit of GradiVeQ's defaults spend their CPU time on ResNet-32, per layer and
// per phase, on one thread (a 2-rank run on 2 cores gives each rank one).
//
// The layers are ResNet-32's 30 compressed conv weights (the stem conv is below min_numel) in the defaults'
// kernel-position layout (K = D*F, S = 9), with the d each layer had in the measured time-to-accuracy run
// (benchmarks/results/time_to_accuracy_resnet32_50mbit.md: schedule 100/50/100, so 50 x 9 = 450 samples per
// window). Each phase runs the same calls as the engine's compressed route (src/engine/bucket_plan.cpp):
//   layout      to_paper_order (+ the slices view)                    pack
//   projection  PcaCompressor::compress                                pack
//   sums        eq. 7's residual and signal terms                      pack
//   copy        coefficients and tail into the all-reduce buffer       pack
//   memory      error feedback's bookkeeping (the defaults have it on)  pack
//   reconstruct PcaCompressor::decompress_into, tail, 1/N, scatter     unpack
// --error-feedback picks the memory: "coefficients" (the engine's ErrorMemory, src/engine/error_memory.h),
// "dense" (the memory formed after every step with a decompress, as the engine did before it), or "off".
// and the fit is PcaCompressor::fit on the window's samples (plus with_basis_dtype and serialize, as
// basis_sync does).
//
//   build/benchmarks/gradiveq_step_profile [--repeats 7] [--fit-repeats 3] [--basis-dtype float32|bfloat16]
//                                          [--max-components D] [--isa portable|avx2|avx512]
//                                          [--error-feedback coefficients|dense|off] [--out FILE.md]
// --max-components caps every layer's d (and the fit's) at D, as the option of that name does. --isa runs the
// codec kernels' tiles of that instruction set (default: default_cpu_isa(), AVX2 where the CPU has it); all
// give the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "engine/error_memory.h"
#include "gradiveq/gradiveq.h"
#include "kernels/kernels.h"

namespace {

using gradiveq::ConvSliceLayout;
using gradiveq::PcaCompressor;

struct LayerSpec {
  std::string name;
  int64_t f, d_in, d;  // filters, input channels, components
};

// ResNet-32's compressed conv layers and the d the defaults chose for them in the measured run.
std::vector<LayerSpec> resnet32_layers() {
  std::vector<LayerSpec> out;
  const int64_t big_d[] = {420, 419, 418, 415, 409, 409, 399, 407, 393};
  for (int64_t b = 0; b < 15; ++b) {
    for (int64_t c = 1; c <= 2; ++c) {
      const std::string name = "layers." + std::to_string(b) + ".conv" + std::to_string(c);
      if (b < 5) {
        out.push_back({name, 16, 16, 64});
      } else if (b == 5 && c == 1) {
        out.push_back({name, 32, 16, 128});
      } else if (b < 10) {
        out.push_back({name, 32, 32, 256});
      } else if (b == 10 && c == 1) {
        out.push_back({name, 64, 32, 412});
      } else {
        out.push_back({name, 64, 64, big_d[out.size() - 21]});
      }
    }
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double time_ms(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

struct Layer {
  LayerSpec spec;
  ConvSliceLayout layout;
  PcaCompressor pca;
  at::Tensor grad, samples, packed_coeffs, packed_tail;
  gradiveq::detail::ErrorMemory memory;  // --error-feedback coefficients
  at::Tensor dense_memory;               // --error-feedback dense
};

enum class Memory { kCoefficients, kDense, kOff };

const char* kPhases[] = {"layout", "projection", "sums", "copy", "memory", "reconstruct"};

// The engine's memory before ErrorMemory: x = g + e in, e = x - (U c + mu/N) out, every step.
void dense_memory_step(Layer& l, const at::Tensor& x, const at::Tensor& c, int64_t n) {
  const at::Tensor sent = c.to(at::kHalf).to(at::kFloat);
  const at::Tensor error = x - (l.pca.decompress(sent) - l.pca.mean().mul(1.0 - 1.0 / double(n)));
  l.dense_memory = at::where(at::isfinite(error), error, 0.0);
}

// One compressed step of one layer, phase by phase, added into `ms` (world size 2, as the measured run).
void compressed_step(Layer& l, Memory memory, std::map<std::string, double>& ms) {
  constexpr int64_t n = 2;
  at::Tensor flat, slices, c;
  ms["layout"] += time_ms([&] {
    flat = l.layout.to_paper_order(l.grad.to(at::kFloat));
    slices = l.layout.slices(flat);
    if (memory == Memory::kDense && l.dense_memory.defined()) slices.add_(l.dense_memory);
  });
  ms["projection"] += time_ms([&] { c = l.pca.compress(slices, n); });
  if (memory != Memory::kCoefficients) {
    ms["sums"] += time_ms([&] {
      at::Tensor residual = (slices - l.pca.mean() / double(n)).pow(2).sum() - c.pow(2).sum();
      at::Tensor signal = slices.pow(2).sum();
      (void)residual, (void)signal;
    });
  }
  ms["memory"] += time_ms([&] {
    if (memory == Memory::kDense) {
      dense_memory_step(l, slices, c, n);
    } else if (memory == Memory::kCoefficients) {
      c = l.memory.add_step(slices, c, l.pca, n);  // its eq. 7 terms included
      l.memory.record_sent(c.to(at::kHalf).to(at::kFloat));
    }
  });
  ms["copy"] += time_ms([&] {
    l.packed_coeffs.copy_(c);
    l.packed_tail.copy_(l.layout.tail(flat));
  });
  ms["reconstruct"] += time_ms([&] {
    at::Tensor out = at::empty({l.layout.numel()}, at::kFloat);
    l.pca.decompress_into(l.packed_coeffs.to(at::kFloat), l.layout.slices(out));
    l.layout.tail(out).copy_(l.packed_tail);
    l.layout.from_paper_order_into(out.mul_(1.0 / double(n)), l.grad);
  });
}

struct Args {
  int repeats = 7, fit_repeats = 3;
  at::ScalarType basis_dtype = at::kFloat;
  int64_t window_iters = 50;
  int64_t max_components = 0;  // 0: the measured run's d
  gradiveq::detail::CpuIsa isa = gradiveq::detail::default_cpu_isa();
  Memory memory = Memory::kCoefficients;
  std::string out;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "step_profile: " << k << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    const auto integer = [&]() -> int64_t {
      const std::string v = value();
      size_t used = 0;
      int64_t n = 0;
      try {
        n = std::stoll(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != v.size()) {
        std::cerr << "step_profile: " << k << " must be an integer, got " << v << "\n";
        std::exit(2);
      }
      return n;
    };
    if (k == "--repeats") {
      a.repeats = int(integer());
    } else if (k == "--fit-repeats") {
      a.fit_repeats = int(integer());
    } else if (k == "--window-iters") {
      a.window_iters = integer();
    } else if (k == "--basis-dtype") {
      const std::string v = value();
      if (v != "float32" && v != "bfloat16") {
        std::cerr << "step_profile: --basis-dtype must be float32 or bfloat16, got " << v << "\n";
        std::exit(2);
      }
      a.basis_dtype = v == "float32" ? at::kFloat : at::kBFloat16;
    } else if (k == "--max-components") {
      a.max_components = integer();
    } else if (k == "--isa") {
      const std::string v = value();
      bool known = false;
      for (auto isa : gradiveq::detail::kAllCpuIsas) {
        if (v == gradiveq::detail::cpu_isa_name(isa)) a.isa = isa, known = true;
      }
      if (!known || !gradiveq::detail::cpu_supports(a.isa)) {
        std::cerr << "step_profile: --isa must be portable, avx2 or avx512 and one this CPU has (default: "
                  << gradiveq::detail::cpu_isa_name(gradiveq::detail::default_cpu_isa()) << "), got " << v
                  << "\n";
        std::exit(2);
      }
    } else if (k == "--error-feedback") {
      const std::string v = value();
      if (v != "coefficients" && v != "dense" && v != "off") {
        std::cerr << "step_profile: --error-feedback must be coefficients, dense or off, got " << v << "\n";
        std::exit(2);
      }
      a.memory = v == "coefficients" ? Memory::kCoefficients : v == "dense" ? Memory::kDense : Memory::kOff;
    } else if (k == "--out") {
      a.out = value();
    } else {
      std::cerr << "step_profile: unknown argument " << k << "\n";
      std::exit(2);
    }
  }
  if (a.repeats < 1 || a.fit_repeats < 0 || a.window_iters < 1 || a.max_components < 0) {
    std::cerr << "step_profile: --repeats and --window-iters must be >= 1, --fit-repeats and "
                 "--max-components >= 0\n";
    std::exit(2);
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  at::set_num_threads(1);
  at::manual_seed(0);
  gradiveq::detail::set_cpu_kernel_isa(args.isa);
  std::vector<Layer> layers;
  for (auto spec : resnet32_layers()) {
    if (args.max_components > 0) spec.d = std::min(spec.d, args.max_components);
    Layer l;
    l.spec = spec;
    l.layout = ConvSliceLayout::kernel_position({spec.f, spec.d_in, 3, 3});
    const int64_t k = l.layout.slice_len, s = l.layout.num_slices();
    // A window of samples whose spectrum decays (gradients are far from white), so the energy rule has work.
    const int64_t n = args.window_iters * s;
    const at::Tensor scales = at::pow(at::arange(1, std::min(n, k) + 1, at::kFloat), -0.75).view({1, -1});
    l.samples = (at::randn({n, std::min(n, k)}) * scales).matmul(at::randn({std::min(n, k), k})) * 1e-3f;
    gradiveq::FitOptions fit;
    fit.energy = 1.0 - 1e-9;
    fit.max_components = spec.d;
    l.pca = PcaCompressor::fit(l.samples, fit).with_basis_dtype(args.basis_dtype);
    l.grad = at::randn({spec.f, spec.d_in, 3, 3}) * 1e-3f;
    l.packed_coeffs = at::empty({s, l.pca.num_components()}, at::kHalf);
    l.packed_tail = at::empty({l.layout.tail_len()}, at::kHalf);
    layers.push_back(std::move(l));
  }

  // Per layer and phase: the median over repeats of one compressed step.
  std::vector<std::map<std::string, std::vector<double>>> per_layer(layers.size());
  std::vector<double> step_totals;
  for (int r = 0; r < args.repeats + 1; ++r) {  // the first pass warms caches and allocator, not counted
    double total = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
      std::map<std::string, double> ms;
      compressed_step(layers[i], args.memory, ms);
      for (const auto& [phase, v] : ms) {
        if (r > 0) per_layer[i][phase].push_back(v);
        total += v;
      }
    }
    if (r > 0) step_totals.push_back(total);
  }
  std::vector<double> fit_ms(layers.size(), 0.0);
  gradiveq::FitOptions defaults = gradiveq::GradiVeQOptions().fit;
  if (args.max_components > 0) defaults.max_components = args.max_components;
  for (size_t i = 0; i < layers.size() && args.fit_repeats > 0; ++i) {
    std::vector<double> v;
    for (int r = 0; r < args.fit_repeats; ++r) {
      v.push_back(time_ms([&] {
        PcaCompressor p = PcaCompressor::fit(layers[i].samples, defaults).with_basis_dtype(args.basis_dtype);
        (void)p.serialize();
      }));
    }
    fit_ms[i] = median(v);
  }

  std::ostringstream md;
  md << "| layer | K | S | d | basis MB |";
  for (const char* p : kPhases) md << " " << p << " ms |";
  md << " step ms | fit ms |\n|---|---|---|---|---|";
  for (size_t p = 0; p < std::size(kPhases) + 2; ++p) md << "---|";
  md << "\n";
  std::map<std::string, double> phase_sums;
  double fit_sum = 0;
  char buf[64];
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& l = layers[i];
    double row = 0;
    std::snprintf(buf, sizeof(buf), "%.2f", double(l.pca.basis().nbytes()) / 1e6);
    md << "| " << l.spec.name << " | " << l.layout.slice_len << " | " << l.layout.num_slices() << " | "
       << l.pca.num_components() << " | " << buf << " |";
    for (const char* p : kPhases) {
      const double v = median(per_layer[i][p]);
      phase_sums[p] += v;
      row += v;
      std::snprintf(buf, sizeof(buf), " %.3f |", v);
      md << buf;
    }
    fit_sum += fit_ms[i];
    std::snprintf(buf, sizeof(buf), " %.3f | %.1f |", row, fit_ms[i]);
    md << buf << "\n";
  }
  md << "| **all 30 layers** | | | | |";
  double all = 0;
  for (const char* p : kPhases) {
    all += phase_sums[p];
    std::snprintf(buf, sizeof(buf), " **%.2f** |", phase_sums[p]);
    md << buf;
  }
  std::snprintf(buf, sizeof(buf), " **%.2f** | **%.0f** |", all, fit_sum);
  md << buf << "\n\n";
  std::vector<double> sorted = step_totals;
  std::sort(sorted.begin(), sorted.end());
  std::snprintf(buf, sizeof(buf), "%.2f (min %.2f, max %.2f)", median(step_totals), sorted.front(),
                sorted.back());
  md << "Whole compressed step, all layers, median of " << args.repeats << " repeats: " << buf
     << " ms (kernel tiles: " << gradiveq::detail::cpu_isa_name(args.isa) << "; error feedback: "
     << (args.memory == Memory::kCoefficients ? "coefficients"
         : args.memory == Memory::kDense      ? "dense"
                                              : "off")
     << ").\n";
  std::cout << md.str();
  if (!args.out.empty()) {
    std::ofstream f(args.out);
    f << md.str();
    if (!f) {
      std::cerr << "step_profile: cannot write --out " << args.out << "\n";
      return 1;
    }
  }
  return 0;
}
