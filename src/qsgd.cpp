#include "gradiveq/qsgd.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "gradiveq/errors.h"
#include "hash_mix.h"

namespace gradiveq {

namespace {

using detail::ceil_div;
using detail::uniform01;

void check_packed(const at::Tensor& packed, int64_t expected, const char* where) {
  GVQ_CHECK_ARG(packed.defined() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                    packed.device().is_cpu() && packed.is_contiguous(),
                where, "packed", "must be a contiguous 1-D uint8 CPU tensor");
  GVQ_CHECK_ARG(packed.numel() == expected, where, "packed", "has ", packed.numel(), " bytes, expected ",
                expected);
}

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

at::Tensor QsgdCodec::encode(const at::Tensor& values, uint64_t seed) const {
  constexpr const char* kWhere = "QsgdCodec.encode";
  GVQ_CHECK_ARG(values.defined() && values.scalar_type() == at::kFloat && values.dim() == 1, kWhere, "values",
                "must be a 1-D float32 tensor");
  at::Tensor v = values.to(at::kCPU).contiguous();
  const int64_t n = v.numel(), bucket = options_.bucket_size, s = options_.levels;
  const int64_t num_buckets = ceil_div(n, bucket);
  at::Tensor out = at::zeros({packed_bytes(n)}, at::kByte);
  const float* x = v.data_ptr<float>();
  uint8_t* scales = out.data_ptr<uint8_t>();
  uint8_t* codes = scales + 4 * num_buckets;

  uint64_t acc = 0;  // bit accumulator, flushed byte by byte
  int acc_bits = 0;
  int64_t byte = 0;
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
      acc |= code << acc_bits;
      acc_bits += int(bits_);
      while (acc_bits >= 8) {
        codes[byte++] = uint8_t(acc & 0xFF);
        acc >>= 8;
        acc_bits -= 8;
      }
    }
  }
  if (acc_bits > 0) codes[byte++] = uint8_t(acc & 0xFF);
  GVQ_ASSERT(4 * num_buckets + byte == out.numel());
  return out;
}

void QsgdCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  constexpr const char* kWhere = "QsgdCodec.decode";
  GVQ_CHECK_ARG(out.defined() && out.scalar_type() == at::kFloat && out.dim() == 1 && out.is_contiguous() &&
                    out.device().is_cpu(),
                kWhere, "out", "must be a contiguous 1-D float32 CPU tensor");
  const int64_t n = out.numel(), bucket = options_.bucket_size;
  check_packed(packed, packed_bytes(n), kWhere);
  const int64_t num_buckets = ceil_div(n, bucket);
  const uint8_t* scales = packed.data_ptr<uint8_t>();
  const uint8_t* codes = scales + 4 * num_buckets;
  float* y = out.data_ptr<float>();
  const uint64_t mask = (uint64_t(1) << bits_) - 1;
  const double inv_s = 1.0 / double(options_.levels);

  uint64_t acc = 0;
  int acc_bits = 0;
  int64_t byte = 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    float scale;
    std::memcpy(&scale, scales + 4 * b, 4);
    const int64_t begin = b * bucket, end = std::min(n, begin + bucket);
    for (int64_t i = begin; i < end; ++i) {
      while (acc_bits < bits_) {
        acc |= uint64_t(codes[byte++]) << acc_bits;
        acc_bits += 8;
      }
      const uint64_t code = acc & mask;
      acc >>= bits_;
      acc_bits -= int(bits_);
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

}  // namespace gradiveq
