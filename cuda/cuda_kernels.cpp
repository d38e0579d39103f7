// The tensor side of the CUDA kernels (kernels/kernels_cuda.h): argument checks, the current stream, job
// tables and output buffers; the launches themselves are in the .cu files beside this one.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "gradiveq/casq.h"
#include "gradiveq/errors.h"
#include "gradiveq/qsgd.h"
#include "kernels/kernels_cuda.h"
#include "launch.h"
#include "util/hash_mix.h"

namespace gradiveq::detail {

namespace {

cuda::Dtype kernel_dtype(at::ScalarType t, const char* where, const char* arg) {
  switch (t) {
    case at::kFloat:
      return cuda::Dtype::kFloat32;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case at::kHalf:
      return cuda::Dtype::kFloat16;
    default:
      GVQ_CHECK_ARG(false, where, arg, "must be float32, bfloat16 or float16, got ", t);
      return cuda::Dtype::kFloat32;
  }
}

void check_cuda(const at::Tensor& t, const at::Device& device, const char* where, const char* arg) {
  GVQ_CHECK_ARG(t.defined() && t.is_cuda(), where, arg, "must be a CUDA tensor");
  GVQ_CHECK_ARG(t.device() == device, where, arg, "is on ", t.device(), ", the other tensors on ", device);
}

// Checks one task against its neighbours' device and dtypes and turns it into a raw job. compress: the task's
// input is (S, K), the basis (K, d), bias (d), out (S, d); decompress: input (S, d), bias (K), out (S, K).
cuda::GemmJob projection_job(const ProjectionTask& t, const ProjectionTask& first, bool decompress) {
  constexpr const char* kWhere = "cuda projection";
  const at::Device device = first.input.device();
  for (const auto& [tensor, name] :
       {std::pair{t.input, "input"}, {t.basis, "basis"}, {t.bias, "bias"}, {t.out, "out"}}) {
    check_cuda(tensor, device, kWhere, name);
  }
  GVQ_CHECK_ARG(
      t.basis.scalar_type() == first.basis.scalar_type() && t.out.scalar_type() == first.out.scalar_type(),
      kWhere, "tasks", "must share one basis dtype and one out dtype within a launch");
  GVQ_CHECK_ARG(t.input.scalar_type() == at::kFloat && t.input.dim() == 2 && t.input.stride(1) == 1, kWhere,
                "input", "must be a 2-D float32 tensor with unit column stride");
  GVQ_CHECK_ARG(t.basis.dim() == 2 && t.basis.is_contiguous(), kWhere, "basis",
                "must be a contiguous (K, d) tensor");
  const int64_t k = t.basis.size(0), d = t.basis.size(1), inner = decompress ? d : k,
                cols = decompress ? k : d;
  GVQ_CHECK_ARG(t.input.size(1) == inner, kWhere, "input", "has ", t.input.size(1), " columns, expected ",
                inner);
  GVQ_CHECK_ARG(t.bias.scalar_type() == at::kFloat && t.bias.is_contiguous() && t.bias.numel() == cols,
                kWhere, "bias", "must be a contiguous float32 tensor of ", cols, " values");
  GVQ_CHECK_ARG(
      t.out.dim() == 2 && t.out.size(0) == t.input.size(0) && t.out.size(1) == cols && t.out.stride(1) == 1,
      kWhere, "out", "must be (", t.input.size(0), ", ", cols, ") with unit column stride, got ",
      t.out.sizes());
  cuda::GemmJob job;
  job.a = t.input.data_ptr();
  job.b = t.basis.data_ptr();
  job.bias = t.bias.data_ptr<float>();
  job.out = t.out.data_ptr();
  job.rows = t.input.size(0);
  job.inner = inner;
  job.cols = cols;
  job.a_stride = t.input.stride(0);
  job.out_stride = t.out.stride(0);
  job.scale = t.scale;
  return job;
}

void grouped_projection(const std::vector<ProjectionTask>& tasks, bool decompress) {
  if (tasks.empty()) return;
  const ProjectionTask& first = tasks.front();
  const cuda::Dtype b_dtype = kernel_dtype(first.basis.scalar_type(), "cuda projection", "basis");
  const cuda::Dtype out_dtype = kernel_dtype(first.out.scalar_type(), "cuda projection", "out");
  std::vector<cuda::GemmJob> jobs;
  jobs.reserve(tasks.size());
  int64_t partials = 0;
  for (const auto& t : tasks) {
    jobs.push_back(projection_job(t, first, decompress));
    jobs.back().splits = cuda::inner_splits(jobs.back());
    partials += cuda::partial_floats(jobs.back());
  }
  const c10::cuda::CUDAGuard guard(first.input.device());
  // One workspace for every split job's partial sums; the caching allocator keeps it for this stream's work.
  const at::Tensor workspace = at::empty({partials}, first.input.options());
  float* next = workspace.data_ptr<float>();
  for (auto& job : jobs) {
    if (job.splits <= 1) continue;
    job.partials = next;
    next += cuda::partial_floats(job);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t begin = 0; begin < jobs.size(); begin += size_t(kMaxGroupedTasks)) {
    const int count = int(std::min<size_t>(size_t(kMaxGroupedTasks), jobs.size() - begin));
    cuda::launch_projection(jobs.data() + begin, count, /*transpose_b=*/decompress, b_dtype, out_dtype,
                            stream);
  }
}

// The CPU codecs own the options' checks, the code width and the message size; the kernels follow them.
QsgdCodec qsgd_codec(int64_t levels, int64_t bucket_size, bool l2_norm) {
  return QsgdCodec(QsgdOptions{levels, bucket_size, l2_norm ? QsgdNorm::kL2 : QsgdNorm::kMax});
}
CasqCodec casq_codec(int64_t bits, int64_t bucket_size) {
  CasqOptions o;
  o.bits = bits;
  o.clusters = 1;  // the clustering stays on the CPU; one cluster is valid for every bit width
  o.bucket_size = bucket_size;
  return CasqCodec(o);
}

// A zeroed byte buffer of `bytes` on `device`, padded to whole 32-bit words for the kernels' atomicOr.
at::Tensor zeroed_message(int64_t bytes, const at::Device& device) {
  return at::zeros({ceil_div(bytes, 4) * 4}, at::TensorOptions().dtype(at::kByte).device(device))
      .narrow(0, 0, bytes);
}

void check_values(const at::Tensor& v, const char* where, const char* arg) {
  GVQ_CHECK_ARG(
      v.defined() && v.is_cuda() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.is_contiguous(), where,
      arg, "must be a contiguous 1-D float32 CUDA tensor");
}

void check_message(const at::Tensor& packed, int64_t expected, const at::Tensor& out, const char* where) {
  check_values(out, where, "out");
  check_cuda(packed, out.device(), where, "packed");
  GVQ_CHECK_ARG(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(), where,
                "packed", "must be a contiguous 1-D uint8 tensor");
  GVQ_CHECK_ARG(packed.numel() == expected, where, "packed", "has ", packed.numel(), " bytes, expected ",
                expected);
}

}  // namespace

void cuda_compress_grouped(const std::vector<ProjectionTask>& tasks) { grouped_projection(tasks, false); }
void cuda_decompress_grouped(const std::vector<ProjectionTask>& tasks) { grouped_projection(tasks, true); }

void cuda_accumulate_moments(const at::Tensor& x, at::Tensor& moments, bool transposed) {
  constexpr const char* kWhere = "cuda_accumulate_moments";
  GVQ_CHECK_ARG(
      x.defined() && x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
      kWhere, "x", "must be a contiguous 2-D float32 CUDA tensor");
  check_cuda(moments, x.device(), kWhere, "moments");
  const int64_t n = x.size(0), k = x.size(1), side = transposed ? k : n;
  GVQ_CHECK_ARG(moments.scalar_type() == at::kDouble && moments.is_contiguous() && moments.dim() == 2 &&
                    moments.size(0) == side && moments.size(1) == side,
                kWhere, "moments", "must be a contiguous (", side, ", ", side, ") float64 tensor");
  cuda::GemmJob job;
  job.a = x.data_ptr<float>();
  job.b = x.data_ptr<float>();
  job.out = moments.data_ptr<double>();
  job.rows = side;
  job.inner = transposed ? n : k;
  job.cols = side;
  job.a_stride = k;
  job.out_stride = side;
  job.accumulate = true;
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::launch_moments(job, /*transpose_a=*/transposed, at::cuda::getCurrentCUDAStream());
}

at::Tensor cuda_qsgd_encode(const at::Tensor& values, int64_t levels, int64_t bucket_size, bool l2_norm,
                            uint64_t seed) {
  constexpr const char* kWhere = "cuda_qsgd_encode";
  check_values(values, kWhere, "values");
  const QsgdCodec codec = qsgd_codec(levels, bucket_size, l2_norm);
  const int64_t n = values.numel(), num_buckets = ceil_div(n, bucket_size);
  const int bits = int(codec.bits_per_value());
  at::Tensor out = zeroed_message(codec.packed_bytes(n), values.device());
  at::Tensor scratch = at::empty({num_buckets}, values.options().dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(values.device());
  uint8_t* base = out.data_ptr<uint8_t>();
  cuda::launch_qsgd_encode(values.data_ptr<float>(), n, levels, bucket_size, l2_norm, seed, bits,
                           reinterpret_cast<float*>(base), scratch.data_ptr<double>(),
                           reinterpret_cast<uint32_t*>(base + 4 * num_buckets),
                           at::cuda::getCurrentCUDAStream());
  return out;
}

void cuda_qsgd_decode_add(const at::Tensor& packed, int64_t levels, int64_t bucket_size, at::Tensor& out) {
  constexpr const char* kWhere = "cuda_qsgd_decode_add";
  const QsgdCodec codec =
      qsgd_codec(levels, bucket_size, /*l2_norm=*/false);  // the norm is not in the message
  const int64_t n = out.defined() ? out.numel() : 0;
  const int bits = int(codec.bits_per_value());
  check_message(packed, codec.packed_bytes(n), out, kWhere);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::launch_qsgd_decode_add(packed.data_ptr<uint8_t>(), n, levels, bucket_size, bits,
                               out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
}

at::Tensor cuda_casq_encode(const at::Tensor& values, const at::Tensor& codebooks, int64_t bits,
                            int64_t bucket_size, uint64_t seed) {
  constexpr const char* kWhere = "cuda_casq_encode";
  check_values(values, kWhere, "values");
  const CasqCodec codec = casq_codec(bits, bucket_size);
  const int64_t n = values.numel(), levels = codec.levels(), num_buckets = ceil_div(n, bucket_size);
  check_cuda(codebooks, values.device(), kWhere, "codebooks");
  GVQ_CHECK_ARG(codebooks.scalar_type() == at::kFloat && codebooks.is_contiguous() &&
                    codebooks.numel() == num_buckets * levels,
                kWhere, "codebooks", "must be a contiguous float32 tensor of ", num_buckets, " x ", levels,
                " levels");
  const int64_t book_bytes = 4 * levels * num_buckets;
  at::Tensor out = zeroed_message(codec.packed_bytes(n), values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  out.narrow(0, 0, book_bytes).copy_(codebooks.view(-1).view(at::kByte));
  cuda::launch_casq_encode(values.data_ptr<float>(), n, codebooks.data_ptr<float>(), levels, bucket_size,
                           seed, int(bits), reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>() + book_bytes),
                           at::cuda::getCurrentCUDAStream());
  return out;
}

void cuda_casq_decode_add(const at::Tensor& packed, int64_t bits, int64_t bucket_size, at::Tensor& out) {
  constexpr const char* kWhere = "cuda_casq_decode_add";
  const CasqCodec codec = casq_codec(bits, bucket_size);
  const int64_t n = out.defined() ? out.numel() : 0, levels = codec.levels();
  check_message(packed, codec.packed_bytes(n), out, kWhere);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::launch_casq_decode_add(packed.data_ptr<uint8_t>(), n, levels, bucket_size, int(bits),
                               out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
}

}  // namespace gradiveq::detail
