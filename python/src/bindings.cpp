// Python bindings of the core API. Only .def calls: the logic lives in the C++ library.
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include "gradiveq/gradiveq.h"

namespace py = pybind11;
using namespace gradiveq;

PYBIND11_MODULE(_C, m) {
  m.doc() = "GradiVeQ core (C++): conv slice layout, PCA compressor, QSGD / CO3 / CASQ codecs, schedule";
  m.attr("__version__") = kVersion;
  py::register_exception<InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);

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
          }, py::arg("samples"), py::arg("energy") = 0.99, py::arg("max_components") = 0,
          py::arg("target_ratio") = 0.0, py::arg("min_ratio") = 0.0,
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
           }), py::arg("levels") = 7, py::arg("bucket_size") = 512, py::arg("norm") = "max")
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
           }), py::arg("bits") = 2, py::arg("clusters") = 4, py::arg("bucket_size") = 512)
      .def("packed_bytes", &CasqCodec::packed_bytes, py::arg("numel"))
      .def("bits_per_element", &CasqCodec::bits_per_element, py::arg("numel"))
      .def("encode", &CasqCodec::encode, py::arg("values"), py::arg("seed"))
      .def("decode", &CasqCodec::decode, py::arg("packed"), py::arg("numel"));

  py::enum_<Phase>(m, "Phase")
      .value("warmup", Phase::kWarmup)
      .value("sampling", Phase::kSampling)
      .value("compressed", Phase::kCompressed);
  py::class_<Schedule>(m, "Schedule")
      .def(py::init([](int64_t warmup, int64_t sample, int64_t compress) {
             return Schedule(ScheduleOptions{warmup, sample, compress});
           }), py::arg("warmup_iters") = 2500, py::arg("sample_iters") = 100, py::arg("compress_iters") = 400)
      .def("phase", &Schedule::phase, py::arg("iter"))
      .def("fits_after", &Schedule::fits_after, py::arg("iter"))
      .def("window_index", &Schedule::window_index, py::arg("iter"));

  py::enum_<SampleQuantizer>(m, "SampleQuantizer")
      .value("qsgd4", SampleQuantizer::kQsgd4)
      .value("none", SampleQuantizer::kNone);
  py::enum_<FitSamples>(m, "FitSamples")
      .value("first_slice", FitSamples::kFirstSlice)
      .value("all_slices", FitSamples::kAllSlices);
  py::enum_<SliceLayoutKind>(m, "SliceLayout")
      .value("kernel_row", SliceLayoutKind::kKernelRow)
      .value("kernel_position", SliceLayoutKind::kKernelPosition);

  py::class_<AggregatorOptions>(m, "AggregatorOptions")
      .def(py::init([](double energy, int64_t max_components, int64_t warmup_iters, int64_t sample_iters,
                       int64_t compress_iters, SampleQuantizer sample_quantizer, FitSamples fit_on,
                       SliceLayoutKind slice_layout, at::ScalarType coeff_dtype, std::vector<std::string> include,
                       std::vector<std::string> exclude, int64_t min_numel, bool verify_bases, uint64_t seed,
                       double target_ratio, double min_ratio, double restart_error_growth,
                       at::ScalarType basis_dtype, int64_t pipeline_chunks) {
             AggregatorOptions o;
             o.fit = FitOptions{energy, max_components, target_ratio, min_ratio};
             o.restart_error_growth = restart_error_growth;
             o.schedule = ScheduleOptions{warmup_iters, sample_iters, compress_iters};
             o.sample_quantizer = sample_quantizer;
             o.fit_on = fit_on;
             o.slice_layout = slice_layout;
             o.coeff_dtype = coeff_dtype;
             o.basis_dtype = basis_dtype;
             o.pipeline_chunks = pipeline_chunks;
             o.policy = LayerPolicy{std::move(include), std::move(exclude), min_numel};
             o.verify_bases = verify_bases;
             o.seed = seed;
             o.validate();
             return o;
           }),
           py::arg("energy"), py::arg("max_components"), py::arg("warmup_iters"), py::arg("sample_iters"),
           py::arg("compress_iters"), py::arg("sample_quantizer"), py::arg("fit_on"), py::arg("slice_layout"),
           py::arg("coeff_dtype"), py::arg("include"), py::arg("exclude"), py::arg("min_numel"),
           py::arg("verify_bases"), py::arg("seed"), py::arg("target_ratio") = 0.0, py::arg("min_ratio") = 0.0,
           py::arg("restart_error_growth") = 0.0, py::arg("basis_dtype") = at::kFloat,
           py::arg("pipeline_chunks") = 1)
      // The C++ defaults and the paper's options, so Python can check that its signature matches them.
      .def_static("defaults", [] { return AggregatorOptions{}; })
      .def_static("paper", &AggregatorOptions::paper)
      .def("as_dict", [](const AggregatorOptions& o) {
        py::dict d;
        d["energy"] = o.fit.energy;
        d["max_components"] = o.fit.max_components;
        d["target_ratio"] = o.fit.target_ratio;
        d["min_ratio"] = o.fit.min_ratio;
        d["warmup_iters"] = o.schedule.warmup_iters;
        d["sample_iters"] = o.schedule.sample_iters;
        d["compress_iters"] = o.schedule.compress_iters;
        d["sample_quantizer"] = o.sample_quantizer == SampleQuantizer::kQsgd4 ? "qsgd4" : "none";
        d["fit_on"] = o.fit_on == FitSamples::kFirstSlice ? "first_slice" : "all_slices";
        d["slice_layout"] = o.slice_layout == SliceLayoutKind::kKernelRow ? "kernel_row" : "kernel_position";
        d["min_numel"] = o.policy.min_numel;
        d["verify_bases"] = o.verify_bases;
        d["restart_error_growth"] = o.restart_error_growth;
        const auto dtype_name = [](at::ScalarType t) {
          return t == at::kHalf ? "float16" : t == at::kBFloat16 ? "bfloat16" : "float32";
        };
        d["coeff_dtype"] = dtype_name(o.coeff_dtype);
        d["basis_dtype"] = dtype_name(o.basis_dtype);
        d["pipeline_chunks"] = o.pipeline_chunks;
        return d;
      });

  py::class_<LayerStats>(m, "LayerStats")
      .def_readonly("name", &LayerStats::name)
      .def_readonly("shape", &LayerStats::shape)
      .def_readonly("compressible", &LayerStats::compressible)
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
      .def_readonly("sampling_aggregation", &StepStats::sampling_aggregation)
      .def_readonly("values_encoded", &StepStats::values_encoded)
      .def_readonly("bytes_encoded", &StepStats::bytes_encoded);

  py::class_<BucketAggregator, std::shared_ptr<BucketAggregator>>(m, "BucketAggregator")
      .def_property_readonly("iteration", &BucketAggregator::iteration)
      .def("step_stats", &BucketAggregator::step_stats)
      // The Python-callable hook body: same engine, returns a torch.futures-compatible future.
      .def("run_bucket",
           [](BucketAggregator& self, c10d::GradBucket& bucket) {
             return std::make_shared<torch::jit::PythonFutureWrapper>(run_bucket(self, bucket));
           },
           py::arg("bucket"), py::call_guard<py::gil_scoped_release>());

  py::class_<QsgdAggregator, BucketAggregator, std::shared_ptr<QsgdAggregator>>(m, "QsgdAggregator")
      .def(py::init([](c10d::ProcessGroup& pg, int64_t levels, int64_t bucket_size, const std::string& norm,
                       int64_t min_numel, uint64_t seed) {
             QsgdAggregatorOptions o;
             o.codec = QsgdOptions{levels, bucket_size, parse_qsgd_norm(norm)};
             o.min_numel = min_numel;
             o.seed = seed;
             return QsgdAggregator::create(c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&pg), o);
           }),
           py::arg("process_group"), py::arg("levels"), py::arg("bucket_size"), py::arg("norm"),
           py::arg("min_numel"), py::arg("seed"))
      .def_property_readonly("bits_per_value", [](const QsgdAggregator& a) { return a.codec().bits_per_value(); });

  // CO3 and CASQ: one aggregator class, a factory per codec.
  const auto named = [](const std::vector<std::pair<std::string, at::Tensor>>& params) {
    std::vector<NamedParameter> out;
    for (const auto& [name, tensor] : params) out.push_back({name, tensor});
    return out;
  };
  py::class_<GatherAggregator, BucketAggregator, std::shared_ptr<GatherAggregator>>(m, "GatherAggregator")
      .def_static("co3",
                  [named](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                          const std::string& format, double gamma, int64_t min_numel) {
                    return GatherAggregator::create(
                        c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&pg), named(params),
                        std::make_unique<Co3GatherCodec>(Co3Options{parse_co3_format(format)}, gamma),
                        GatherAggregatorOptions{min_numel, 0});
                  },
                  py::arg("process_group"), py::arg("parameters"), py::arg("format"), py::arg("gamma"),
                  py::arg("min_numel"))
      .def_static("casq",
                  [named](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                          int64_t bits, int64_t clusters, int64_t bucket_size, int64_t min_numel, uint64_t seed) {
                    return GatherAggregator::create(
                        c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&pg), named(params),
                        std::make_unique<CasqGatherCodec>(CasqOptions{bits, clusters, bucket_size}),
                        GatherAggregatorOptions{min_numel, seed});
                  },
                  py::arg("process_group"), py::arg("parameters"), py::arg("bits"), py::arg("clusters"),
                  py::arg("bucket_size"), py::arg("min_numel"), py::arg("seed"))
      .def_property_readonly("rank", &GatherAggregator::rank)
      .def_property_readonly("world_size", &GatherAggregator::world_size)
      .def("save_slot_states", &GatherAggregator::save_slot_states)
      .def("load_slot_states", &GatherAggregator::load_slot_states, py::arg("states"), py::arg("iteration"));

  py::class_<Aggregator, BucketAggregator, std::shared_ptr<Aggregator>>(m, "Aggregator")
      .def(py::init([](c10d::ProcessGroup& pg, const std::vector<std::pair<std::string, at::Tensor>>& params,
                       const AggregatorOptions& options) {
             std::vector<NamedParameter> named;
             for (const auto& [name, tensor] : params) named.push_back({name, tensor});
             return Aggregator::create(c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&pg),
                                       std::move(named), options);
           }),
           py::arg("process_group"), py::arg("parameters"), py::arg("options"))
      .def_property_readonly("phase", &Aggregator::phase)
      .def_property_readonly("world_size", &Aggregator::world_size)
      .def_property_readonly("rank", &Aggregator::rank)
      .def_property_readonly("window_restarts", &Aggregator::window_restarts)
      .def("layer_stats", &Aggregator::layer_stats)
      .def("save_state", &Aggregator::save_state)
      .def("load_state", &Aggregator::load_state, py::arg("state"))
      .def("basis", &Aggregator::basis, py::arg("name"))
      .def("set_basis", &Aggregator::set_basis, py::arg("name"), py::arg("pca"));

  m.def("register_comm_hook",
        [](c10d::Reducer& reducer, std::shared_ptr<BucketAggregator> aggregator) {
          reducer.register_comm_hook(std::make_unique<GradiVeQCommHook>(std::move(aggregator)));
        },
        py::arg("reducer"), py::arg("aggregator"), py::call_guard<py::gil_scoped_release>(),
        "Registers the C++ GradiVeQ hook on a DDP reducer (ddp_model.reducer).");
}
