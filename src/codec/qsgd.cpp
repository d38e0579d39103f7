#include "gradiveq/qsgd.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "gradiveq/errors.h"
#include "kernels/kernels_cuda.h"
#include "util/hash_mix.h"
#include "util/packed_bits.h"

namespace gradiveq {

namespace {

using detail::ceil_div;
using detail::check_decode_out;
using detail::check_packed;
using detail::uniform01;


}  // namespace

QsgdNorm parse_qsgd_norm(const std::string& name) {
  if (name == "max") return QsgdNorm::kMax;
  if (name == "l2") return QsgdNorm::kL2;
  GVQ_CHECK_ARG(false, "QsgdOptions", "norm", "must be 'max' or 'l2', got '", name, "'");
  return QsgdNorm::kMax;
}

QsgdCodec::QsgdCodec(const QsgdOptions& options) : options_(options) {
  GVQ_CHECK_ARG(options.levels >= 1 && options.levels <= (1 << 15), "QsgdCodec", "levels",
                "must lie in [1, 32768], got ", options.levels);
  GVQ_CHECK_ARG(options.bucket_size >= 1, "QsgdCodec", "bucket_size", "must be >= 1, got ",
                options.bucket_size);
  int64_t level_bits = 0;
  while ((int64_t(1) << level_bits) < options.levels + 1) ++level_bits;
  bits_ = 1 + level_bits;
}

int64_t QsgdCodec::packed_bytes(int64_t numel) const {
  return 4 * ceil_div(numel, options_.bucket_size) + ceil_div(numel * bits_, 8);
}

bool QsgdCodec::packs_on(const at::Device& device) {
  return device.is_cuda() && detail::cuda_kernels_enabled();
}

// CUDA values with the kernels on: quantised and packed on the device, where the message stays (the gather
// pipeline all-gathers and unpacks it there: no host copy on the step's path).
at::Tensor QsgdCodec::encode_on_device(const at::Tensor& values, uint64_t seed) const {
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  return detail::cuda_qsgd_encode(values.contiguous(), options_.levels, options_.bucket_size,
                                  options_.norm == QsgdNorm::kL2, seed);
#else
  return encode(values.to(at::kCPU), seed);
#endif
}

at::Tensor QsgdCodec::encode(const at::Tensor& values, uint64_t seed) const {
  constexpr const char* kWhere = "QsgdCodec.encode";
  GVQ_CHECK_ARG(values.defined() && values.scalar_type() == at::kFloat && values.dim() == 1, kWhere, "values",
                "must be a 1-D float32 tensor");
  if (packs_on(values.device())) return encode_on_device(values, seed);
  at::Tensor v = values.to(at::kCPU).contiguous();
  const int64_t n = v.numel(), bucket = options_.bucket_size, s = options_.levels;
  const int64_t num_buckets = ceil_div(n, bucket);
  at::Tensor out = at::zeros({packed_bytes(n)}, at::kByte);
  const float* x = v.data_ptr<float>();
  uint8_t* scales = out.data_ptr<uint8_t>();
  uint8_t* codes = scales + 4 * num_buckets;

  detail::LsbBitWriter writer(codes);
  for (int64_t b = 0; b < num_buckets; ++b) {
    const int64_t begin = b * bucket, end = std::min(n, begin + bucket);
    double scale = 0.0;
    bool finite = true;
    for (int64_t i = begin; i < end; ++i) {
      const double a = std::fabs(double(x[i]));
      finite &= std::isfinite(a);
      if (options_.norm == QsgdNorm::kMax) {
        scale = std::max(scale, a);
      } else {
        scale += a * a;
      }
    }
    if (options_.norm == QsgdNorm::kL2) scale = std::sqrt(scale);
    const float scale_f = finite ? float(scale) : std::numeric_limits<float>::quiet_NaN();
    std::memcpy(scales + 4 * b, &scale_f, 4);
    for (int64_t i = begin; i < end; ++i) {
      uint64_t code = 0;
      if (finite && scale > 0.0) {
        const double r = std::fabs(double(x[i])) / scale * double(s);  // in [0, s]
        double level = std::floor(r);
        if (uniform01(seed, uint64_t(i)) < r - level) level += 1.0;
        level = std::min(level, double(s));
        code = (uint64_t(level) << 1) | (x[i] < 0.0f ? 1u : 0u);
      }
      writer.put(code, int(bits_));
    }
  }
  const int64_t byte = writer.finish();
  GVQ_ASSERT(4 * num_buckets + byte == out.numel());
  return out;
}

void QsgdCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  constexpr const char* kWhere = "QsgdCodec.decode";
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  if (out.defined() && packs_on(out.device())) {
    detail::cuda_qsgd_decode_add(packed, options_.levels, options_.bucket_size, out);
    return;
  }
#endif
  check_decode_out(out, kWhere);
  // A device message (encode() of CUDA values) into a CPU sum, as decode() does: unpacked on the CPU.
  if (packed.defined() && !packed.device().is_cpu()) return decode_add(packed.to(at::kCPU), out);
  const int64_t n = out.numel(), bucket = options_.bucket_size;
  check_packed(packed, packed_bytes(n), kWhere);
  const int64_t num_buckets = ceil_div(n, bucket);
  const uint8_t* scales = packed.data_ptr<uint8_t>();
  const uint8_t* codes = scales + 4 * num_buckets;
  float* y = out.data_ptr<float>();
  const double inv_s = 1.0 / double(options_.levels);

  detail::LsbBitReader reader(codes);
  for (int64_t b = 0; b < num_buckets; ++b) {
    float scale;
    std::memcpy(&scale, scales + 4 * b, 4);
    const int64_t begin = b * bucket, end = std::min(n, begin + bucket);
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t code = reader.get(int(bits_));
      const double level = double(code >> 1);
      GVQ_CHECK_ARG(level <= double(options_.levels), kWhere, "packed", "holds level ", level,
                    " above levels = ", options_.levels, " (corrupted data)");
      const double magnitude = std::isfinite(scale) ? double(scale) * level * inv_s : double(scale);
      y[i] += float((code & 1u) ? -magnitude : magnitude);
    }
  }
}

at::Tensor QsgdCodec::decode(const at::Tensor& packed, int64_t numel) const {
  GVQ_CHECK_ARG(numel >= 0, "QsgdCodec.decode", "numel", "must be >= 0, got ", numel);
  at::Tensor out = at::zeros({numel}, at::kFloat);
  decode_add(packed, out);
  return out;
}

// --- as a message codec -------------------------------------------------------------------------------

QsgdMessageCodec::QsgdMessageCodec(const QsgdOptions& options) : codec_(options) {}

EncodedMessage QsgdMessageCodec::encode(const at::Tensor& values, int64_t, uint64_t seed) {
  EncodedMessage m;
  m.packed = codec_.encode(values, seed);
  return m;
}

void QsgdMessageCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  codec_.decode_add(packed, out);
}

}  // namespace gradiveq
