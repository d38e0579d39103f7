// Python bindings of the core API. Only .def calls: the logic lives in the C++ library.
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "gradiveq/gradiveq.h"
#include "kernels/kernels_cuda.h"

namespace py = pybind11;
using namespace gradiveq;

namespace {

// Binds `Class::outer.inner` as the flat property `name`: the options keep their C++ grouping (fit, schedule,
// policy) while Python sees one field per option.
template <typename Class, typename Outer, typename Inner>
void def_nested(py::class_<Class>& cls, const char* name, Outer Class::*outer, Inner Outer::*inner) {
  cls.def_property(
      name, [outer, inner](const Class& o) { return o.*outer.*inner; },
      [outer, inner](Class& o, const Inner& v) { (o.*outer).*inner = v; });
}

std::vector<NamedParameter> named(const std::vector<std::pair<std::string, at::Tensor>>& params) {
  std::vector<NamedParameter> out;
  for (const auto& [name, tensor] : params) out.push_back({name, tensor});
  return out;
}

c10::intrusive_ptr<c10d::ProcessGroup> group(c10d::ProcessGroup& pg) {
  return c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&pg);
}

void bind_codecs(py::module_& m) {
  py::class_<ConvSliceLayout>(m, "ConvSliceLayout")
      .def_static("for_weight", [](std::vector<int64_t> shape, int64_t slice_len) {
            return ConvSliceLayout::for_weight(shape, slice_len);
          }, py::arg("weight_shape"), py::arg("slice_len") = 0)
      .def_static("kernel_position", [](std::vector<int64_t> shape) {
            return ConvSliceLayout::kernel_position(shape);
          }, py::arg("weight_shape"))
      .def_readonly("filters", &ConvSliceLayout::filters)
      .def_readonly("depth", &ConvSliceLayout::depth)
      .def_readonly("height", &ConvSliceLayout::height)
      .def_readonly("width", &ConvSliceLayout::width)
      .def_readonly("slice_len", &ConvSliceLayout::slice_len)
      .def_property_readonly("numel", &ConvSliceLayout::numel)
      .def_property_readonly("num_slices", &ConvSliceLayout::num_slices)
      .def_property_readonly("tail_len", &ConvSliceLayout::tail_len)
      .def("to_paper_order", &ConvSliceLayout::to_paper_order, py::arg("weight_grad"))
      .def("from_paper_order", &ConvSliceLayout::from_paper_order, py::arg("flat"))
      .def("slices", &ConvSliceLayout::slices, py::arg("paper_flat"))
      .def("tail", &ConvSliceLayout::tail, py::arg("paper_flat"));

  py::class_<PcaCompressor>(m, "PcaCompressor")
      .def(py::init<>())
      .def_static("fit", [](const at::Tensor& samples, double energy, int64_t max_components, double target_ratio,
                            double min_ratio) {
            return PcaCompressor::fit(samples, FitOptions{energy, max_components, target_ratio, min_ratio});
          }, py::arg("samples"), py::arg("energy") = FitOptions{}.energy,
          py::arg("max_components") = FitOptions{}.max_components, py::arg("target_ratio") = FitOptions{}.target_ratio,
          py::arg("min_ratio") = FitOptions{}.min_ratio,
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("is_fitted", &PcaCompressor::is_fitted)
      .def_property_readonly("slice_len", &PcaCompressor::slice_len)
      .def_property_readonly("num_components", &PcaCompressor::num_components)
      .def_property_readonly("num_samples", &PcaCompressor::num_samples)
      .def_property_readonly("compression_ratio", &PcaCompressor::compression_ratio)
      .def_property_readonly("explained_variance", &PcaCompressor::explained_variance)
      .def_property_readonly("mean", &PcaCompressor::mean)
      .def_property_readonly("basis", &PcaCompressor::basis)
      .def_property_readonly("eigenvalues", &PcaCompressor::eigenvalues)
      .def("compress", &PcaCompressor::compress, py::arg("slices"), py::arg("world_size") = 1)
      .def("decompress", &PcaCompressor::decompress, py::arg("coeffs"))
      .def("serialize", &PcaCompressor::serialize)
      .def_static("deserialize", &PcaCompressor::deserialize, py::arg("data"))
      .def("checksum", &PcaCompressor::checksum);

  py::enum_<QsgdNorm>(m, "QsgdNorm").value("max", QsgdNorm::kMax).value("l2", QsgdNorm::kL2);
  py::class_<QsgdCodec>(m, "QsgdCodec")
      .def(py::init([](int64_t levels, int64_t bucket_size, const std::string& norm) {
             return QsgdCodec(QsgdOptions{levels, bucket_size, parse_qsgd_norm(norm)});
           }), py::arg("levels") = QsgdOptions{}.levels, py::arg("bucket_size") = QsgdOptions{}.bucket_size,
           py::arg("norm") = "max")
      .def_property_readonly("bits_per_value", &QsgdCodec::bits_per_value)
      .def("packed_bytes", &QsgdCodec::packed_bytes, py::arg("numel"))
      .def("encode", &QsgdCodec::encode, py::arg("values"), py::arg("seed"))
      .def("decode", &QsgdCodec::decode, py::arg("packed"), py::arg("numel"));

  py::class_<Co3Codec>(m, "Co3Codec")
      .def(py::init([](const std::string& format) { return Co3Codec(Co3Options{parse_co3_format(format)}); }),
           py::arg("format") = "fp4")
      .def_property_readonly("grid", &Co3Codec::grid)
      .def_property_readonly("header_bytes", &Co3Codec::header_bytes)
      .def("fit_scale", &Co3Codec::fit_scale, py::arg("values"))
      .def("encode", [](const Co3Codec& c, const at::Tensor& values) { return c.encode(values); },
           py::arg("values"))
      .def("decode", &Co3Codec::decode, py::arg("packed"), py::arg("numel"));

  py::class_<CasqCodec>(m, "CasqCodec")
      .def(py::init([](int64_t bits, int64_t clusters, int64_t bucket_size) {
             return CasqCodec(CasqOptions{bits, clusters, bucket_size});
           }), py::arg("bits") = CasqOptions{}.bits, py::arg("clusters") = CasqOptions{}.clusters,
           py::arg("bucket_size") = CasqOptions{}.bucket_size)
      .def("packed_bytes", &CasqCodec::packed_bytes, py::arg("numel"))
      .def("bits_per_element", &CasqCodec::bits_per_element, py::arg("numel"))
      .def("encode", &CasqCodec::encode, py::arg("values"), py::arg("seed"))
      .def("decode", &CasqCodec::decode, py::arg("packed"), py::arg("numel"));

}

void bind_schedule(py::module_& m) {
  py::enum_<Phase>(m, "Phase")
      .value("warmup", Phase::kWarmup)
      .value("sampling", Phase::kSampling)
      .value("compressed", Phase::kCompressed);
  py::class_<Schedule>(m, "Schedule")
      .def(py::init([](int64_t warmup, int64_t sample, int64_t compress) {
             return Schedule(ScheduleOptions{warmup, sample, compress});
           }), py::arg("warmup_iters") = ScheduleOptions{}.warmup_iters,
           py::arg("sample_iters") = ScheduleOptions{}.sample_iters,
           py::arg("compress_iters") = ScheduleOptions{}.compress_iters)
      .def("phase", &Schedule::phase, py::arg("iter"))
      .def("fits_after", &Schedule::fits_after, py::arg("iter"))
      .def("window_index", &Schedule::window_index, py::arg("iter"));

  py::enum_<SampleQuantizer>(m, "SampleQuantizer")
      .value("qsgd4", SampleQuantizer::kQsgd4)
      .value("none", SampleQuantizer::kNone);
  py::enum_<FitSamples>(m, "FitSamples")
      .value("first_slice", FitSamples::kFirstSlice)
      .value("all_slices", FitSamples::kAllSlices);
  py::enum_<SampleSource>(m, "SampleSource")
      .value("aggregated", SampleSource::kAggregated)
      .value("local", SampleSource::kLocal);
  py::enum_<BasisSync>(m, "BasisSync")
      .value("auto", BasisSync::kAuto)
      .value("broadcast", BasisSync::kBroadcast)
      .value("replicated", BasisSync::kReplicated);
  py::enum_<ErrorFeedback>(m, "ErrorFeedback")
      .value("auto", ErrorFeedback::kAuto)
      .value("on", ErrorFeedback::kOn)
      .value("off", ErrorFeedback::kOff);
  py::enum_<SliceLayoutKind>(m, "SliceLayout")
      .value("kernel_row", SliceLayoutKind::kKernelRow)
      .value("kernel_position", SliceLayoutKind::kKernelPosition)
      .value("filter_column", SliceLayoutKind::kFilterColumn);

}

void bind_options(py::module_& m) {
  // Every GradiVeQ option, field by field (options.h is their only declaration; Python reads the defaults here).
  py::class_<GradiVeQOptions> options(m, "GradiVeQOptions");
  options.def(py::init<>())
      .def_static("paper", &GradiVeQOptions::paper)
      .def("validate", &GradiVeQOptions::validate)
      .def("effective_error_feedback", &GradiVeQOptions::effective_error_feedback)
      .def("state_is_per_rank", &GradiVeQOptions::state_is_per_rank);
  def_nested(options, "energy", &GradiVeQOptions::fit, &FitOptions::energy);
  def_nested(options, "max_components", &GradiVeQOptions::fit, &FitOptions::max_components);
  def_nested(options, "target_ratio", &GradiVeQOptions::fit, &FitOptions::target_ratio);
  def_nested(options, "min_ratio", &GradiVeQOptions::fit, &FitOptions::min_ratio);
  def_nested(options, "warmup_iters", &GradiVeQOptions::schedule, &ScheduleOptions::warmup_iters);
  def_nested(options, "sample_iters", &GradiVeQOptions::schedule, &ScheduleOptions::sample_iters);
  def_nested(options, "compress_iters", &GradiVeQOptions::schedule, &ScheduleOptions::compress_iters);
  options.def_readwrite("sample_quantizer", &GradiVeQOptions::sample_quantizer)
      .def_readwrite("fit_on", &GradiVeQOptions::fit_on)
      .def_readwrite("slice_layout", &GradiVeQOptions::slice_layout)
      .def_readwrite("coeff_dtype", &GradiVeQOptions::coeff_dtype)
      .def_readwrite("basis_dtype", &GradiVeQOptions::basis_dtype)
      .def_readwrite("uncompressed_dtype", &GradiVeQOptions::uncompressed_dtype);
  def_nested(options, "include", &GradiVeQOptions::policy, &LayerPolicy::include);
  def_nested(options, "exclude", &GradiVeQOptions::policy, &LayerPolicy::exclude);
  def_nested(options, "min_numel", &GradiVeQOptions::policy, &LayerPolicy::min_numel);
  def_nested(options, "linear_weights", &GradiVeQOptions::policy, &LayerPolicy::linear_weights);
  options.def_readwrite("verify_bases", &GradiVeQOptions::verify_bases)
      .def_readwrite("seed", &GradiVeQOptions::seed)
      .def_readwrite("restart_error_growth", &GradiVeQOptions::restart_error_growth)
      .def_readwrite("pipeline_chunks", &GradiVeQOptions::pipeline_chunks)
      .def_readwrite("sample_source", &GradiVeQOptions::sample_source)
      .def_readwrite("error_feedback", &GradiVeQOptions::error_feedback)
      .def_readwrite("error_budget", &GradiVeQOptions::error_budget)
      .def_readwrite("refit_threshold", &GradiVeQOptions::refit_threshold)
      .def_readwrite("basis_sync", &GradiVeQOptions::basis_sync)
      .def_readwrite("fit_delay_iters", &GradiVeQOptions::fit_delay_iters);

  // The gather engine's and its codecs' options, for the quantizer states' defaults.
  py::class_<GatherAggregatorOptions>(m, "GatherAggregatorOptions")
      .def(py::init<>())
      .def_readwrite("min_numel", &GatherAggregatorOptions::min_numel)
      .def_readwrite("seed", &GatherAggregatorOptions::seed);
  py::class_<QsgdOptions>(m, "QsgdOptions")
      .def(py::init<>())
      .def_readwrite("levels", &QsgdOptions::levels)
      .def_readwrite("bucket_size", &QsgdOptions::bucket_size)
      .def_property_readonly("norm", [](const QsgdOptions& o) { return o.norm == QsgdNorm::kMax ? "max" : "l2"; });
  py::class_<Co3Options>(m, "Co3Options")
      .def(py::init<>())
      .def_property_readonly("format", [](const Co3Options& o) { return o.format == Co3Format::kFp4 ? "fp4" : "fp8"; })
      .def_readwrite("gamma", &Co3Options::gamma);
  py::class_<CasqOptions>(m, "CasqOptions")
      .def(py::init<>())
      .def_readwrite("bits", &CasqOptions::bits)
      .def_readwrite("clusters", &CasqOptions::clusters)
      .def_readwrite("bucket_size", &CasqOptions::bucket_size);

}

void bind_stats(py::module_& m) {
  py::class_<LayerStats>(m, "LayerStats")
      .def_readonly("name", &LayerStats::name)
      .def_readonly("shape", &LayerStats::shape)
      .def_readonly("compressible", &LayerStats::compressible)
      .def_readonly("not_compressed_because", &LayerStats::not_compressed_because)
      .def_readonly("phase", &LayerStats::phase)
      .def_readonly("slice_len", &LayerStats::slice_len)
      .def_readonly("num_slices", &LayerStats::num_slices)
      .def_readonly("tail_len", &LayerStats::tail_len)
      .def_readonly("num_components", &LayerStats::num_components)
      .def_readonly("compression_ratio", &LayerStats::compression_ratio)
      .def_readonly("explained_variance", &LayerStats::explained_variance)
      .def_readonly("relative_error", &LayerStats::relative_error)
      .def_readonly("bytes_in", &LayerStats::bytes_in)
      .def_readonly("bytes_out", &LayerStats::bytes_out)
      .def_readonly("window_samples", &LayerStats::window_samples)
      .def_readonly("skipped_samples", &LayerStats::skipped_samples)
      .def_readonly("bases_kept", &LayerStats::bases_kept)
      .def_readonly("fits", &LayerStats::fits)
      .def_readonly("fit_status", &LayerStats::fit_status)
      .def_readonly("basis_checksum", &LayerStats::basis_checksum)
      .def_readonly("basis_bytes", &LayerStats::basis_bytes);

  py::class_<StepStats>(m, "StepStats")
      .def_readonly("iteration", &StepStats::iteration)
      .def_readonly("phase", &StepStats::phase)
      .def_readonly("buckets", &StepStats::buckets)
      .def_readonly("collectives", &StepStats::collectives)
      .def_readonly("bytes_uncompressed", &StepStats::bytes_uncompressed)
      .def_readonly("bytes_payload", &StepStats::bytes_payload)
      .def_readonly("bytes_wire", &StepStats::bytes_wire)
      .def_readonly("aggregation_ms", &StepStats::aggregation_ms)
      .def_readonly("compress_ms", &StepStats::compress_ms)
      .def_readonly("relative_error", &StepStats::relative_error)
      .def_readonly("window_restarts", &StepStats::window_restarts)
      .def_readonly("decompress_ms", &StepStats::decompress_ms)
      .def_readonly("fit_ms", &StepStats::fit_ms)
      .def_readonly("fit_background_ms", &StepStats::fit_background_ms)
      .def_readonly("bytes_bases", &StepStats::bytes_bases)
      .def_readonly("sampling_aggregation", &StepStats::sampling_aggregation)
      .def_readonly("values_encoded", &StepStats::values_encoded)
      .def_readonly("bytes_encoded", &StepStats::bytes_encoded)
      .def_readonly("warning", &StepStats::warning);
}

void bind_engines(py::module_& m) {
  py::class_<BucketAggregator, std::shared_ptr<BucketAggregator>>(m, "BucketAggregator")
      .def_property_readonly("iteration", &BucketAggregator::iteration)
      .def("step_stats", &BucketAggregator::step_stats)
      // The Python-callable hook body: same engine, returns a torch.futures-compatible future.
      .def("run_bucket",
           [](BucketAggregator& self, c10d::GradBucket& bucket) {
             return std::make_shared<torch::jit::PythonFutureWrapper>(run_bucket(self, bucket));
           },
           py::arg("bucket"), py::call_guard<py::gil_scoped_release>());

  // QSGD, CO3 and CASQ: one gather engine, a factory per message codec.
  py::class_<GatherAggregator, BucketAggregator, std::shared_ptr<GatherAggregator>>(m, "GatherAggregator")
      .def_static("qsgd",
                  [](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                     int64_t levels, int64_t bucket_size, const std::string& norm, int64_t min_numel, uint64_t seed) {
                    return GatherAggregator::create(
                        group(pg), named(params),
                        std::make_unique<QsgdMessageCodec>(QsgdOptions{levels, bucket_size, parse_qsgd_norm(norm)}),
                        GatherAggregatorOptions{min_numel, seed});
                  },
                  py::arg("process_group"), py::arg("parameters"), py::arg("levels"), py::arg("bucket_size"),
                  py::arg("norm"), py::arg("min_numel"), py::arg("seed"))
      .def_static("co3",
                  [](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                     const std::string& format, double gamma, int64_t min_numel) {
                    return GatherAggregator::create(
                        group(pg), named(params),
                        std::make_unique<Co3MessageCodec>(Co3Options{parse_co3_format(format)}, gamma),
                        GatherAggregatorOptions{min_numel, 0});
                  },
                  py::arg("process_group"), py::arg("parameters"), py::arg("format"), py::arg("gamma"),
                  py::arg("min_numel"))
      .def_static("casq",
                  [](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                     int64_t bits, int64_t clusters, int64_t bucket_size, int64_t min_numel, uint64_t seed) {
                    return GatherAggregator::create(
                        group(pg), named(params),
                        std::make_unique<CasqMessageCodec>(CasqOptions{bits, clusters, bucket_size}),
                        GatherAggregatorOptions{min_numel, seed});
                  },
                  py::arg("process_group"), py::arg("parameters"), py::arg("bits"), py::arg("clusters"),
                  py::arg("bucket_size"), py::arg("min_numel"), py::arg("seed"))
      .def_property_readonly("rank", &GatherAggregator::rank)
      .def_property_readonly("world_size", &GatherAggregator::world_size)
      .def("save_slot_states", &GatherAggregator::save_slot_states)
      .def("load_slot_states", &GatherAggregator::load_slot_states, py::arg("states"), py::arg("iteration"));

  py::class_<GradiVeQAggregator, BucketAggregator, std::shared_ptr<GradiVeQAggregator>>(m, "GradiVeQAggregator")
      .def(py::init([](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                       const GradiVeQOptions& options) {
             return GradiVeQAggregator::create(group(pg), named(params), options);
           }),
           py::arg("process_group"), py::arg("parameters"), py::arg("options"))
      .def_property_readonly("phase", &GradiVeQAggregator::phase)
      .def_property_readonly("world_size", &GradiVeQAggregator::world_size)
      .def_property_readonly("rank", &GradiVeQAggregator::rank)
      .def_property_readonly("window_restarts", &GradiVeQAggregator::window_restarts)
      .def("layer_stats", &GradiVeQAggregator::layer_stats)
      .def_property_readonly("configuration_warning", &GradiVeQAggregator::configuration_warning)
      .def("save_state", &GradiVeQAggregator::save_state)
      .def("load_state", &GradiVeQAggregator::load_state, py::arg("state"))
      .def("basis", &GradiVeQAggregator::basis, py::arg("name"))
      .def("set_basis", &GradiVeQAggregator::set_basis, py::arg("name"), py::arg("pca"));

  m.def("register_comm_hook",
        [](c10d::Reducer& reducer, std::shared_ptr<BucketAggregator> aggregator) {
          reducer.register_comm_hook(std::make_unique<AggregatorCommHook>(std::move(aggregator)));
        },
        py::arg("reducer"), py::arg("aggregator"), py::call_guard<py::gil_scoped_release>(),
        "Registers the C++ hook of any engine on a DDP reducer (ddp_model.reducer).");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "GradiVeQ core (C++): conv slice layout, PCA compressor, QSGD / CO3 / CASQ codecs, schedule, engines";
  m.attr("__version__") = kVersion;
  py::register_exception<InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);
  bind_codecs(m);
  bind_schedule(m);
  bind_options(m);
  bind_stats(m);
  bind_engines(m);
  m.def("cuda_kernels_built", &gradiveq::detail::cuda_kernels_built,
        "Whether this build has the CUDA kernels (cuda/).");
  m.def("cuda_kernels_enabled", &gradiveq::detail::cuda_kernels_enabled,
        "Whether CUDA tensors go through the CUDA kernels (off by default; GRADIVEQ_CUDA_KERNELS=1 turns "
        "them on).");
  m.def("set_cuda_kernels_enabled", &gradiveq::detail::set_cuda_kernels_enabled, py::arg("enabled"),
        "Switches the CUDA kernels on or off for this process (ValueError on a build without them).");
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  // For benchmarks/gpu_codec.py: one grouped launch over (input, basis, bias, out, scale) tuples.
  m.def("_cuda_project_grouped", [](const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                                                 float>>& tasks, bool decompress) {
    std::vector<gradiveq::detail::ProjectionTask> t;
    for (const auto& [input, basis, bias, out, scale] : tasks) t.push_back({input, basis, bias, out, scale});
    decompress ? gradiveq::detail::cuda_decompress_grouped(t) : gradiveq::detail::cuda_compress_grouped(t);
  });
#endif
}
