// Python bindings of the core API. Only .def calls: the logic lives in the C++ library.
#include <torch/csrc/utils/pybind.h>

#include "gradiveq/gradiveq.h"

namespace py = pybind11;
using namespace gradiveq;

PYBIND11_MODULE(_C, m) {
  m.doc() = "GradiVeQ core (C++): conv slice layout, PCA compressor, QSGD codec, schedule";
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
      .def_static("fit", [](const at::Tensor& samples, double energy, int64_t max_components) {
            return PcaCompressor::fit(samples, FitOptions{energy, max_components});
          }, py::arg("samples"), py::arg("energy") = 0.99, py::arg("max_components") = 0,
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
}
