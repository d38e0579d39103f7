// PcaCompressor: the per-layer linear compressor of GradiVeQ (Yu et al. 2018, eqs. 3-6).
//
// Data convention (the whole library): a batch of S slices of length K is an (S, K) row-major tensor,
// slice i, component j at [i, j]; its coefficients are an (S, d) tensor.
//
//   fit          samples (n, K) -> mean mu (K), basis U (K, d, orthonormal columns), eigenvalues (K)
//   compress     c = U^T (g - mu / N)      per slice, for one of N ranks
//   decompress   g_hat = U c + mu
//
// Because compress is one shared affine map whose offset is split into N equal parts, the sum over N ranks of
// compress(g_n, N) equals U^T (sum_n g_n - mu): the coefficients can be summed directly by a ring all-reduce
// and decompressed once. At d = K the map is an orthogonal change of basis and decompress(compress(g)) == g up
// to float rounding.
#pragma once

#include "gradiveq/options.h"

#include <ATen/ATen.h>

#include <cstdint>

namespace gradiveq {

class PcaCompressor {
 public:
  PcaCompressor() = default;

  /// Fits from `samples`, an (n, K) float32 tensor of n >= 2 finite slices (any device; the fit runs on the
  /// CPU in double precision, the symmetric eigen-solve with Eigen). Uses the n x n Gram matrix when n <= K
  /// (the usual case: 100 samples of K = 768..12288) and the K x K covariance otherwise.
  static PcaCompressor fit(const at::Tensor& samples, const FitOptions& options = {});

  bool is_fitted() const { return basis_.defined(); }
  int64_t slice_len() const;       ///< K
  int64_t num_components() const;  ///< d
  int64_t num_samples() const { return num_samples_; }
  double compression_ratio() const { return double(slice_len()) / double(num_components()); }
  /// Fraction of the samples' variance that the kept components hold (1 when the samples had none).
  double explained_variance() const;

  const at::Tensor& mean() const { return mean_; }                ///< mu, (K) float32
  /// U, (K, d), orthonormal columns; float32 unless with_basis_dtype() stored it in half precision.
  const at::Tensor& basis() const { return basis_; }
  at::ScalarType basis_dtype() const { return basis_.scalar_type(); }
  const at::Tensor& eigenvalues() const { return eigenvalues_; }  ///< (K) float32, decreasing, >= 0

  /// The affine map's offset for one of `world_size` ranks: -U^T mu / world_size, (d) float32.
  at::Tensor offset(int64_t world_size) const;
  /// (S, K) slices of one rank -> (S, d) float32 coefficients U^T (g - mu / world_size).
  at::Tensor compress(const at::Tensor& slices, int64_t world_size = 1) const;
  /// Same, written into `out` (S, d) of dtype float32, float16 or bfloat16.
  void compress_into(const at::Tensor& slices, int64_t world_size, at::Tensor out) const;
  /// (S, d) coefficients (float32, float16 or bfloat16) -> (S, K) float32 slices U c + mu.
  at::Tensor decompress(const at::Tensor& coeffs) const;
  /// Same, written into `out` (S, K), which may be a strided view (e.g. into a gradient).
  void decompress_into(const at::Tensor& coeffs, at::Tensor out) const;

  /// Self-describing, versioned byte image (uint8 CPU tensor) of mu, U and the eigenvalues: what is
  /// broadcast from the fitting rank and stored in checkpoints. U is written in its own dtype, so a
  /// half-precision basis broadcasts (K d) 2 bytes instead of 4.
  at::Tensor serialize() const;
  /// Inverse of serialize (also of version-1 images, float32 throughout); the basis comes back in the dtype
  /// it was written in. Throws InvalidArgument on a truncated, corrupted or wrong-version image.
  static PcaCompressor deserialize(const at::Tensor& bytes);
  /// 64-bit checksum of the serialized image; equal on all ranks iff their bases are bit-identical.
  uint64_t checksum() const;

  /// Copy whose basis is stored in `dtype` (float32, bfloat16 or float16), rounded to nearest: half the memory
  /// and half the bytes each compress / decompress streams. The products still accumulate in float32; the
  /// result is exactly that of the float32 widening of the stored basis. A broadcast or checkpointed
  /// half-precision basis comes back bit-identical.
  PcaCompressor with_basis_dtype(at::ScalarType dtype) const;

  /// Copy whose tensors live on `device` (the coefficients are computed where the slices are).
  PcaCompressor to(const at::Device& device) const;

 private:
  void check_fitted(const char* where) const;
  void finish_init();  // derives mean_proj_ from mean_ and basis_

  at::Tensor mean_;         // (K)
  at::Tensor basis_;        // (K, d)
  at::Tensor eigenvalues_;  // (K)
  at::Tensor mean_proj_;    // (d) = U^T mu, so compress is one GEMM plus a broadcast add
  int64_t num_samples_ = 0;
};

/// 64-bit checksum (FNV-1a over 8-byte words) of a contiguous CPU tensor's bytes.
uint64_t checksum_bytes(const at::Tensor& bytes);

}  // namespace gradiveq
