// CO3, "convert, compress, correct" (Chen, Hernandez, Huang, Rini; arXiv 2203.09044 / 2204.08211): gradients
// are rounded to a tiny floating-point grid after a per-layer scale, the grid indices are Huffman-coded, and
// the rounding error is fed back with a decay factor. What is known of the method:
// docs/algorithms.md, "CO3".
//
// Convert. q = round_grid(alpha * v) / alpha, where round_grid rounds to the nearest value of the format's
// grid (values past the largest magnitude clamp to it). The grids are IEEE-754 style with subnormals and with
// the all-ones exponent left unused (no inf/NaN codes), as in the official code:
//   fp4 = [sign 1, exponent 2, mantissa 1], bias 1:  {0, +-0.5, +-1, +-1.5, +-2, +-3}, 11 values
//   fp8 = [sign 1, exponent 5, mantissa 2], bias 15: 247 values, +-2^-16 .. +-57344
// A value exactly halfway between two grid values goes to the lower one (toward -inf), as
// numpy.searchsorted(bin_edges, x, side='left') does in the official code.
//
// Scale alpha (one per message, i.e. per layer), `Co3Codec::fit_scale`:
//   fp4: the official rule. Fit a generalized normal (shape beta, scale sigma, location 0) to the values and
//        take alpha = max(p(beta), 0.0009) / sigma, with p(b) = 0.46 - 2.85b + 5.37b^2 - 2.85b^3 + 0.52b^4.
//        The fit is the method of moments: E x^2 / (E|x|)^2 = G(1/b) G(3/b) / G(2/b)^2 (G: gamma function)
//        is solved for beta by bisection (the ratio falls monotonically in beta), then
//        sigma = E|x| G(1/b) / G(2/b).
//        p(beta) tracks the MSE-optimal alpha * sigma for beta in [0.5, 2.2], the range gradients live in.
//        Past it, p grows like 0.52 beta^4 and overshoots badly (measured at beta = 3: relative MSE 0.15
//        against 0.016 at the best alpha), so beta is capped at kCo3Fp4BetaCap = 2.2 before evaluating p.
//        The 0.0009 floor is kept for fidelity but never binds: p's minimum over beta > 0 is 0.0057, at
//        beta = 0.36.
//   fp8: the official code has no fp8 fit. alpha is the power of two that maps max|v| into [2^14, 2^15): the
//        largest value lands near the top of the grid (max 57344 = 1.75 * 2^15, so nothing clamps) and every
//        value down to max|v| * 2^-28 keeps the format's full 3 significant bits. A power of two makes the
//        scaling itself exact.
// The hook's schedule (alpha = 1 at first, refit every 5 epochs on epoch-averaged g + gamma e) is the
// caller's: encode() fits alpha on the values it is given, encode_with_scale() takes a fixed one.
//
// Compress. The grid index of every value (0 = most negative grid value) is Huffman-coded with a table built
// for this message and sent with it (include/gradiveq/huffman.h).
//
// Packed layout (little-endian):
//   [float32 alpha][Huffman table: ceil(G / 2) bytes][Huffman payload: ceil(sum of code lengths / 8) bytes]
// with G the grid size (11 or 247), so a message of n values is 4 + ceil(G / 2) + ceil(bits / 8) bytes:
// header_bytes() = 10 (fp4) or 128 (fp8) plus the payload. The size depends on the data; the bytes returned
// are exactly the bytes that travel, and bits_per_element() reports them per value.
//
// Non-finite input: a message holding NaN or inf is sent as alpha = NaN with an empty table and no payload,
// and decodes to all NaN, so an overflow stays visible to AMP's GradScaler after aggregation.
//
// Correct (Co3ErrorCorrection): v = g + gamma e; q = Q(v); e <- v - q, gamma in [0, 1] (default 0.9).
#pragma once

#include "gradiveq/message_codec.h"
#include "gradiveq/options.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradiveq {

/// Generalized normal density  beta / (2 sigma G(1/beta)) exp(-(|x| / sigma)^beta), centred at 0.
struct GeneralizedNormalFit {
  double beta = 2.0;
  double sigma = 0.0;
};

/// Method-of-moments fit (see above) of a generalized normal centred at 0. beta is kept within
/// [kGnBetaMin, kGnBetaMax]; all-zero (or empty) values give sigma = 0. `values` must be finite.
GeneralizedNormalFit fit_generalized_normal(const at::Tensor& values);
constexpr double kGnBetaMin = 0.02;
constexpr double kGnBetaMax = 50.0;

/// The fp4 scale rule: max(p(min(beta, kCo3Fp4BetaCap)), 0.0009) / sigma (1 when sigma = 0).
double co3_fp4_scale(const GeneralizedNormalFit& fit);
constexpr double kCo3Fp4BetaCap = 2.2;

/// What one encode() did, for logging and bit accounting.
struct Co3EncodeInfo {
  float alpha = 1.0f;
  int64_t payload_bits = 0;  ///< sum of the Huffman code lengths
  int64_t packed_bytes = 0;  ///< the whole message
  /// Filled by Co3ErrorCorrection only: ||v - q||^2 and ||v||^2 of the values v it encoded (q = the message
  /// decoded), in double; residual_sq is -1 when the message is non-finite (an overflowed step).
  double residual_sq = -1.0;
  double signal_sq = 0.0;
};

class Co3Codec {
 public:
  explicit Co3Codec(const Co3Options& options = {});

  const Co3Options& options() const { return options_; }
  /// The format's grid, ascending; symbol i of the Huffman stream is grid()[i].
  const std::vector<float>& grid() const { return grid_; }
  /// 4 (alpha) + ceil(grid size / 2) (Huffman table): the size of a message before its payload.
  int64_t header_bytes() const;
  /// 8 * packed bytes / numel: what a message costs per value, header included.
  static double bits_per_element(const at::Tensor& packed, int64_t numel);

  /// The scale encode() uses for these values (rule above). `values`: a finite 1-D float32 tensor.
  float fit_scale(const at::Tensor& values) const;
  /// Nearest grid value of every element (ties toward -inf, clamped to the largest magnitude): the "convert"
  /// step with alpha = 1. Non-finite elements come back as NaN.
  at::Tensor round_to_grid(const at::Tensor& x) const;

  /// 1-D float32 tensor -> uint8 message (layout above), alpha = fit_scale(values).
  at::Tensor encode(const at::Tensor& values, Co3EncodeInfo* info = nullptr) const;
  /// The same with a given alpha (finite, > 0).
  at::Tensor encode_with_scale(const at::Tensor& values, float alpha, Co3EncodeInfo* info = nullptr) const;
  /// Message of `numel` values -> float32 tensor: grid value / alpha, computed in double and rounded once.
  at::Tensor decode(const at::Tensor& packed, int64_t numel) const;
  /// out += decode(packed, out.numel()); `out` is a contiguous 1-D float32 CPU tensor.
  void decode_add(const at::Tensor& packed, at::Tensor& out) const;

 private:
  Co3Options options_;
  std::vector<float> grid_;
  std::vector<double> edges_;  // midpoints between neighbouring grid values
};

/// CO3's error correction ("error feedback with memory decay"), one per layer and worker:
///   v = g + gamma e;  packed = encode(v);  e <- v - decode(packed).
/// v is computed in double and rounded once to float32, e <- v - q in float32: the test can check the
/// recursion bit for bit. e starts at 0. A step whose message decodes non-finite (an overflowed gradient,
/// which AMP will skip) leaves e as it was, so one bad step does not poison every later one.
class Co3ErrorCorrection {
 public:
  explicit Co3ErrorCorrection(double gamma = 0.9);

  double gamma() const { return gamma_; }
  /// The error memory e (undefined before the first step, which is the same as zeros).
  const at::Tensor& error() const { return error_; }
  void reset() { error_ = at::Tensor(); }
  /// Restores a saved error memory: a 1-D float32 tensor (copied to the CPU), or undefined for zeros.
  void set_error(const at::Tensor& error);

  /// One step with alpha fitted on v; returns the message to send.
  at::Tensor step(const Co3Codec& codec, const at::Tensor& gradient, Co3EncodeInfo* info = nullptr);
  /// One step with a given alpha.
  at::Tensor step_with_scale(const Co3Codec& codec, const at::Tensor& gradient, float alpha,
                             Co3EncodeInfo* info = nullptr);

 private:
  at::Tensor corrected(const at::Tensor& gradient) const;
  void update(const Co3Codec& codec, const at::Tensor& v, const at::Tensor& packed, Co3EncodeInfo* info);

  double gamma_;
  at::Tensor error_;
};

/// CO3 as a message codec for the gather pipeline, with its error correction (v = g + gamma e, e <- v - Q(v)):
/// one error memory per parameter (slot) and rank, which is the codec's slot state. The scale alpha is fitted
/// on every message (it travels in the message, 4 bytes).
class Co3MessageCodec : public MessageCodec {
 public:
  Co3MessageCodec(const Co3Options& options, double gamma);

  std::string name() const override { return "co3"; }
  int64_t fixed_message_bytes(int64_t) const override { return -1; }
  EncodedMessage encode(const at::Tensor& values, int64_t slot, uint64_t seed) override;
  void decode_add(const at::Tensor& packed, at::Tensor& out) const override;
  bool keeps_slot_state() const override { return true; }
  at::Tensor slot_state(int64_t slot) const override;
  void set_slot_state(int64_t slot, const at::Tensor& state) override;
  const Co3Codec& codec() const { return codec_; }
  double gamma() const { return gamma_; }

 private:
  Co3ErrorCorrection& correction(int64_t slot);

  Co3Codec codec_;
  double gamma_;
  std::vector<Co3ErrorCorrection> corrections_;  // by slot, grown on first use
};

/// Deprecated name (0.1); removed in the next release.
using Co3GatherCodec [[deprecated("use gradiveq::Co3MessageCodec")]] = Co3MessageCodec;

}  // namespace gradiveq
