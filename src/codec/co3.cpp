#include "gradiveq/co3.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "gradiveq/errors.h"
#include "util/packed_bits.h"
#include "gradiveq/huffman.h"

namespace gradiveq {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The non-negative values of an IEEE-754-style format with `exp_bits` exponent bits, `man_bits` mantissa bits
// and the given bias, subnormals included and the all-ones exponent left out (no inf/NaN codes).
std::vector<float> float_grid(int exp_bits, int man_bits, int bias) {
  std::vector<float> magnitudes;
  const int mantissas = 1 << man_bits;
  for (int e = 0; e <= (1 << exp_bits) - 2; ++e) {
    for (int m = 0; m < mantissas; ++m) {
      const double significand = e == 0 ? double(m) / mantissas : 1.0 + double(m) / mantissas;
      magnitudes.push_back(float(std::ldexp(significand, (e == 0 ? 1 : e) - bias)));
    }
  }
  std::vector<float> grid;
  for (auto it = magnitudes.rbegin(); it != magnitudes.rend(); ++it) {
    if (*it > 0.0f) grid.push_back(-*it);
  }
  grid.insert(grid.end(), magnitudes.begin(), magnitudes.end());  // starts with the single 0
  return grid;
}

// Branchless lower bound over `edges` padded with +inf to 2^k - 1 entries: the number of edges < x, which is
// the index of the nearest grid value with ties going down (x equal to an edge is not counted). k compares,
// no unpredictable branches: 4 for fp4, 8 for fp8.
inline int64_t grid_index(const double* edges, int64_t padded, double x) {
  int64_t index = 0;
  for (int64_t step = (padded + 1) / 2; step >= 1; step /= 2) index += edges[index + step - 1] < x ? step : 0;
  return index;
}

double gn_moment_ratio(double beta) {  // E x^2 / (E|x|)^2 = G(1/b) G(3/b) / G(2/b)^2
  return std::exp(std::lgamma(1.0 / beta) + std::lgamma(3.0 / beta) - 2.0 * std::lgamma(2.0 / beta));
}

void check_values(const at::Tensor& values, const char* where) {
  GVQ_CHECK_ARG(values.defined() && values.scalar_type() == at::kFloat && values.dim() == 1, where, "values",
                "must be a 1-D float32 tensor");
}

bool all_finite(const float* x, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(x[i]);
  return finite;
}

}  // namespace

Co3Format parse_co3_format(const std::string& name) {
  if (name == "fp4") return Co3Format::kFp4;
  if (name == "fp8") return Co3Format::kFp8;
  GVQ_CHECK_ARG(false, "Co3Options", "format", "must be 'fp4' or 'fp8', got '", name, "'");
  return Co3Format::kFp4;
}

GeneralizedNormalFit fit_generalized_normal(const at::Tensor& values) {
  constexpr const char* kWhere = "fit_generalized_normal";
  check_values(values, kWhere);
  at::Tensor v = values.to(at::kCPU).contiguous();
  const float* x = v.data_ptr<float>();
  const int64_t n = v.numel();
  double m1 = 0.0, m2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(double(x[i]));
    GVQ_CHECK_ARG(std::isfinite(a), kWhere, "values", "must be finite, element ", i, " is ", x[i]);
    m1 += a;
    m2 += a * a;
  }
  GeneralizedNormalFit fit;
  if (n == 0 || m1 == 0.0) return fit;  // sigma = 0: nothing to scale
  m1 /= double(n);
  m2 /= double(n);
  const double ratio = m2 / (m1 * m1);
  // The moment ratio falls monotonically from +inf (beta -> 0) to 4/3 (beta -> inf): bisect on log beta.
  if (ratio >= gn_moment_ratio(kGnBetaMin)) {
    fit.beta = kGnBetaMin;
  } else if (ratio <= gn_moment_ratio(kGnBetaMax)) {
    fit.beta = kGnBetaMax;
  } else {
    double lo = std::log(kGnBetaMin), hi = std::log(kGnBetaMax);
    for (int it = 0; it < 100 && hi - lo > 1e-12; ++it) {
      const double mid = 0.5 * (lo + hi);
      (gn_moment_ratio(std::exp(mid)) > ratio ? lo : hi) = mid;
    }
    fit.beta = std::exp(0.5 * (lo + hi));
  }
  fit.sigma = m1 * std::exp(std::lgamma(1.0 / fit.beta) - std::lgamma(2.0 / fit.beta));
  return fit;
}

double co3_fp4_scale(const GeneralizedNormalFit& fit) {
  GVQ_CHECK_ARG(std::isfinite(fit.beta) && fit.beta > 0.0, "co3_fp4_scale", "fit.beta", "must be > 0, got ",
                fit.beta);
  GVQ_CHECK_ARG(std::isfinite(fit.sigma) && fit.sigma >= 0.0, "co3_fp4_scale", "fit.sigma",
                "must be finite and >= 0, got ", fit.sigma);
  if (fit.sigma == 0.0) return 1.0;
  const double b = std::min(fit.beta, kCo3Fp4BetaCap);
  const double p = 0.46 - 2.85 * b + 5.37 * b * b - 2.85 * b * b * b + 0.52 * b * b * b * b;
  return std::max(p, 0.0009) / fit.sigma;
}

Co3Codec::Co3Codec(const Co3Options& options) : options_(options) {
  GVQ_CHECK_ARG(options.format == Co3Format::kFp4 || options.format == Co3Format::kFp8, "Co3Codec", "format",
                "is not a known format (", int(options.format), ")");
  grid_ = options.format == Co3Format::kFp4 ? float_grid(2, 1, 1) : float_grid(5, 2, 15);
  GVQ_ASSERT(grid_.size() == (options.format == Co3Format::kFp4 ? 11u : 247u));
  int64_t padded = 1;
  while (padded < int64_t(grid_.size())) padded = 2 * padded + 1;  // 2^k - 1 >= number of edges
  edges_.assign(size_t(padded), std::numeric_limits<double>::infinity());
  for (size_t i = 0; i + 1 < grid_.size(); ++i) edges_[i] = 0.5 * (double(grid_[i]) + double(grid_[i + 1]));
}

int64_t Co3Codec::header_bytes() const { return 4 + HuffmanCode::table_bytes(int64_t(grid_.size())); }

double Co3Codec::bits_per_element(const at::Tensor& packed, int64_t numel) {
  GVQ_CHECK_ARG(numel > 0, "Co3Codec.bits_per_element", "numel", "must be > 0, got ", numel);
  return 8.0 * double(packed.numel()) / double(numel);
}

float Co3Codec::fit_scale(const at::Tensor& values) const {
  if (options_.format == Co3Format::kFp4) {
    const double alpha = co3_fp4_scale(fit_generalized_normal(values));
    return float(std::clamp(alpha, double(FLT_MIN), double(FLT_MAX)));
  }
  check_values(values, "Co3Codec.fit_scale");
  at::Tensor v = values.to(at::kCPU).contiguous();
  const float* x = v.data_ptr<float>();
  float max_abs = 0.0f;
  for (int64_t i = 0; i < v.numel(); ++i) {
    GVQ_CHECK_ARG(std::isfinite(x[i]), "Co3Codec.fit_scale", "values", "must be finite, element ", i, " is ",
                  x[i]);
    max_abs = std::max(max_abs, std::fabs(x[i]));
  }
  if (max_abs == 0.0f) return 1.0f;
  // max_abs * 2^k in [2^14, 2^15); the exponent stays within float's normal range.
  const int k = std::clamp(14 - std::ilogb(double(max_abs)), -126, 127);
  return std::ldexp(1.0f, k);
}

at::Tensor Co3Codec::round_to_grid(const at::Tensor& x) const {
  GVQ_CHECK_ARG(x.defined() && x.scalar_type() == at::kFloat, "Co3Codec.round_to_grid", "x",
                "must be a float32 tensor");
  at::Tensor in = x.to(at::kCPU).contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t padded = int64_t(edges_.size());
  for (int64_t i = 0; i < in.numel(); ++i) {
    dst[i] = std::isfinite(src[i]) ? grid_[size_t(grid_index(edges_.data(), padded, double(src[i])))] : kNaN;
  }
  return out;
}

at::Tensor Co3Codec::encode(const at::Tensor& values, Co3EncodeInfo* info) const {
  check_values(values, "Co3Codec.encode");
  at::Tensor v = values.to(at::kCPU).contiguous();
  // Non-finite values go down the NaN path of encode_with_scale; fit_scale would reject them.
  const float alpha = all_finite(v.data_ptr<float>(), v.numel()) ? fit_scale(v) : 1.0f;
  return encode_with_scale(v, alpha, info);
}

at::Tensor Co3Codec::encode_with_scale(const at::Tensor& values, float alpha, Co3EncodeInfo* info) const {
  constexpr const char* kWhere = "Co3Codec.encode";
  check_values(values, kWhere);
  GVQ_CHECK_ARG(std::isfinite(alpha) && alpha > 0.0f, kWhere, "alpha", "must be finite and > 0, got ", alpha);
  at::Tensor v = values.to(at::kCPU).contiguous();
  const float* x = v.data_ptr<float>();
  const int64_t n = v.numel(), alphabet = int64_t(grid_.size()), header = header_bytes();

  if (!all_finite(x, n)) {
    // alpha = NaN, an all-zero (empty) table, no payload: decodes to NaN everywhere.
    at::Tensor out = at::zeros({header}, at::kByte);
    std::memcpy(out.data_ptr<uint8_t>(), &kNaN, 4);
    if (info) *info = {kNaN, 0, header};
    return out;
  }

  std::vector<uint8_t> symbols(static_cast<size_t>(n));
  std::vector<uint64_t> counts(static_cast<size_t>(alphabet), 0);
  const double a = double(alpha);
  const int64_t padded = int64_t(edges_.size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = grid_index(edges_.data(), padded, a * double(x[i]));  // float * float: exact in double
    symbols[size_t(i)] = uint8_t(s);
    ++counts[size_t(s)];
  }
  const HuffmanCode code = HuffmanCode::from_counts(counts);
  const int64_t bits = code.encoded_bits(counts), payload = (bits + 7) / 8;
  at::Tensor out = at::empty({header + payload}, at::kByte);
  uint8_t* bytes = out.data_ptr<uint8_t>();
  std::memcpy(bytes, &alpha, 4);
  code.write_table(bytes + 4);
  code.encode(symbols.data(), n, bytes + header, payload);
  if (info) *info = {alpha, bits, header + payload};
  return out;
}

void Co3Codec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  constexpr const char* kWhere = "Co3Codec.decode";
  detail::check_decode_out(out, kWhere);
  GVQ_CHECK_ARG(packed.defined() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                    packed.device().is_cpu() && packed.is_contiguous(),
                kWhere, "packed", "must be a contiguous 1-D uint8 CPU tensor");
  const int64_t n = out.numel(), header = header_bytes();
  GVQ_CHECK_ARG(packed.numel() >= header, kWhere, "packed", "has ", packed.numel(), " bytes, fewer than the ",
                header, "-byte header");
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  float alpha;
  std::memcpy(&alpha, bytes, 4);
  float* y = out.data_ptr<float>();
  if (std::isnan(alpha)) {  // a non-finite gradient: keep it visible
    GVQ_CHECK_ARG(packed.numel() == header, kWhere, "packed", "has ", packed.numel(), " bytes, expected the ",
                  header, "-byte header of a non-finite message");
    for (int64_t i = 0; i < n; ++i) y[i] += kNaN;
    return;
  }
  GVQ_CHECK_ARG(std::isfinite(alpha) && alpha > 0.0f, kWhere, "packed", "holds scale ", alpha,
                " (corrupted data)");
  const int64_t alphabet = int64_t(grid_.size());
  const HuffmanCode code = HuffmanCode::read_table(bytes + 4, alphabet, kWhere, "packed");
  std::vector<uint8_t> symbols(static_cast<size_t>(n));
  code.decode(bytes + header, packed.numel() - header, n, symbols.data(), kWhere, "packed");
  std::vector<float> value(static_cast<size_t>(alphabet));
  for (size_t s = 0; s < value.size(); ++s) value[s] = float(double(grid_[s]) / double(alpha));
  for (int64_t i = 0; i < n; ++i) y[i] += value[symbols[size_t(i)]];
}

at::Tensor Co3Codec::decode(const at::Tensor& packed, int64_t numel) const {
  GVQ_CHECK_ARG(numel >= 0, "Co3Codec.decode", "numel", "must be >= 0, got ", numel);
  at::Tensor out = at::zeros({numel}, at::kFloat);
  decode_add(packed, out);
  return out;
}

Co3ErrorCorrection::Co3ErrorCorrection(double gamma) : gamma_(gamma) {
  GVQ_CHECK_ARG(gamma >= 0.0 && gamma <= 1.0, "Co3ErrorCorrection", "gamma", "must lie in [0, 1], got ",
                gamma);
}

at::Tensor Co3ErrorCorrection::corrected(const at::Tensor& gradient) const {
  constexpr const char* kWhere = "Co3ErrorCorrection.step";
  GVQ_CHECK_ARG(gradient.defined() && gradient.scalar_type() == at::kFloat && gradient.dim() == 1, kWhere,
                "gradient", "must be a 1-D float32 tensor");
  at::Tensor g = gradient.to(at::kCPU).contiguous();
  if (!error_.defined()) return g.clone();
  GVQ_CHECK_ARG(g.numel() == error_.numel(), kWhere, "gradient", "has ", g.numel(),
                " values but the error memory has ", error_.numel(),
                " (call reset() when the layer changes)");
  at::Tensor v = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* ep = error_.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  for (int64_t i = 0; i < g.numel(); ++i) vp[i] = float(double(gp[i]) + gamma_ * double(ep[i]));
  return v;
}

void Co3ErrorCorrection::set_error(const at::Tensor& error) {
  if (!error.defined()) {
    error_ = at::Tensor();
    return;
  }
  GVQ_CHECK_ARG(error.scalar_type() == at::kFloat && error.dim() == 1, "Co3ErrorCorrection.set_error",
                "error", "must be a 1-D float32 tensor, got ", error.scalar_type(), " of shape ", error.sizes());
  error_ = error.to(at::kCPU).contiguous().clone();
}

void Co3ErrorCorrection::update(const Co3Codec& codec, const at::Tensor& v, const at::Tensor& packed,
                                Co3EncodeInfo* info) {
  const int64_t n = v.numel();
  at::Tensor q = codec.decode(packed, n);
  const float* qp = q.data_ptr<float>();
  if (!all_finite(qp, n)) return;  // overflowed step: AMP skips it, the memory stays
  at::Tensor e = at::empty_like(v);
  const float* vp = v.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  double residual_sq = 0.0, signal_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    ep[i] = vp[i] - qp[i];
    residual_sq += double(vp[i] - qp[i]) * double(vp[i] - qp[i]);
    signal_sq += double(vp[i]) * double(vp[i]);
  }
  error_ = e;
  if (info != nullptr) {
    info->residual_sq = residual_sq;
    info->signal_sq = signal_sq;
  }
}

at::Tensor Co3ErrorCorrection::step(const Co3Codec& codec, const at::Tensor& gradient, Co3EncodeInfo* info) {
  at::Tensor v = corrected(gradient);
  at::Tensor packed = codec.encode(v, info);
  update(codec, v, packed, info);
  return packed;
}

at::Tensor Co3ErrorCorrection::step_with_scale(const Co3Codec& codec, const at::Tensor& gradient, float alpha,
                                               Co3EncodeInfo* info) {
  at::Tensor v = corrected(gradient);
  at::Tensor packed = codec.encode_with_scale(v, alpha, info);
  update(codec, v, packed, info);
  return packed;
}

// --- as a message codec -------------------------------------------------------------------------------

Co3MessageCodec::Co3MessageCodec(const Co3Options& options, double gamma) : codec_(options), gamma_(gamma) {
  GVQ_CHECK_ARG(gamma >= 0.0 && gamma <= 1.0, "Co3MessageCodec", "gamma", "must lie in [0, 1], got ", gamma);
}

Co3ErrorCorrection& Co3MessageCodec::correction(int64_t slot) {
  GVQ_ASSERT(slot >= 0);
  while (int64_t(corrections_.size()) <= slot) corrections_.emplace_back(gamma_);
  return corrections_[slot];
}

EncodedMessage Co3MessageCodec::encode(const at::Tensor& values, int64_t slot, uint64_t) {
  Co3EncodeInfo info;
  EncodedMessage m;
  m.packed = correction(slot).step(codec_, values, &info);
  m.residual_sq = info.residual_sq;
  m.signal_sq = info.signal_sq;
  return m;
}

void Co3MessageCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  codec_.decode_add(packed, out);
}

at::Tensor Co3MessageCodec::slot_state(int64_t slot) const {
  if (slot >= int64_t(corrections_.size()) || !corrections_[slot].error().defined()) return {};
  return corrections_[slot].error().clone();
}

void Co3MessageCodec::set_slot_state(int64_t slot, const at::Tensor& state) {
  correction(slot).set_error(state);
}

}  // namespace gradiveq
