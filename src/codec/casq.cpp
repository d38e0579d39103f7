#include "gradiveq/casq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gradiveq/errors.h"
#include "util/hash_mix.h"
#include "util/packed_bits.h"

namespace gradiveq {

namespace {

using detail::ceil_div;
using detail::check_decode_out;
using detail::check_packed;
using detail::uniform01;  // the generator of qsgd.cpp

// A cluster is the run sorted[begin, end).
struct Cluster {
  int64_t begin, end;
};

// 1-D k-means on sorted values with prefix sums: an assignment is K - 1 split points, found by binary search
// on the midpoints between centroids, and a centroid is a difference of prefix sums, so one Lloyd step costs
// O(K log m) after the sort.
std::vector<Cluster> kmeans_1d(const std::vector<float>& sorted, const std::vector<double>& prefix, int64_t k,
                               int64_t iterations) {
  const int64_t m = int64_t(sorted.size()), clusters = std::min(k, m);
  std::vector<double> centroid(static_cast<size_t>(clusters));
  for (int64_t c = 0; c < clusters; ++c) {
    centroid[size_t(c)] =
        sorted[size_t(std::min(m - 1, int64_t((double(c) + 0.5) * double(m) / double(clusters))))];
  }
  std::vector<int64_t> split(static_cast<size_t>(clusters + 1), 0);
  split.back() = m;
  auto assign = [&] {
    for (int64_t c = 0; c + 1 < clusters; ++c) {
      const double threshold = 0.5 * (centroid[size_t(c)] + centroid[size_t(c + 1)]);
      // A value equal to the threshold joins the lower cluster.
      split[size_t(c + 1)] = std::upper_bound(sorted.begin(), sorted.end(), threshold,
                                              [](double t, float v) { return t < double(v); }) -
                             sorted.begin();
    }
  };
  assign();
  for (int64_t it = 0; it < iterations; ++it) {
    for (int64_t c = 0; c < clusters; ++c) {
      const int64_t b = split[size_t(c)], e = split[size_t(c + 1)];
      // An empty cluster keeps its centroid, which stays between its neighbours' (their means lie on the far
      // sides of the thresholds it defines), so the centroids stay sorted.
      if (e > b) centroid[size_t(c)] = (prefix[size_t(e)] - prefix[size_t(b)]) / double(e - b);
    }
    const std::vector<int64_t> previous = split;
    assign();
    if (split == previous) break;
  }
  std::vector<Cluster> out;
  for (int64_t c = 0; c < clusters; ++c) {
    if (split[size_t(c + 1)] > split[size_t(c)]) out.push_back({split[size_t(c)], split[size_t(c + 1)]});
  }
  return out;
}

// The bucket's codebook: `levels` ascending float32 values whose first is the bucket's min and last its max.
void build_codebook(const std::vector<float>& sorted, const std::vector<double>& prefix,
                    const CasqOptions& options, int64_t levels, float* codebook) {
  const std::vector<Cluster> clusters =
      kmeans_1d(sorted, prefix, options.clusters, options.kmeans_iterations);
  const size_t nc = clusters.size();
  // Neyman allocation: weights n_c sigma_c; one level each, the rest to the cluster furthest below its share.
  std::vector<double> weight(nc), mean(nc);
  double total = 0.0;
  for (size_t c = 0; c < nc; ++c) {
    const int64_t n = clusters[c].end - clusters[c].begin;
    mean[c] = (prefix[size_t(clusters[c].end)] - prefix[size_t(clusters[c].begin)]) / double(n);
    double ss = 0.0;
    for (int64_t i = clusters[c].begin; i < clusters[c].end; ++i) {
      const double d = double(sorted[size_t(i)]) - mean[c];
      ss += d * d;
    }
    weight[c] = double(n) * std::sqrt(ss / double(n));
    total += weight[c];
  }
  std::vector<int64_t> alloc(nc, 1);
  GVQ_ASSERT(int64_t(nc) <= levels);
  if (total > 0.0) {
    // Each step picks a cluster with a positive deficit (the deficits sum to the levels left), so a cluster
    // with sigma = 0 never gets a second level.
    for (int64_t left = levels - int64_t(nc); left > 0; --left) {
      size_t best = 0;
      double best_deficit = -std::numeric_limits<double>::infinity();
      for (size_t c = 0; c < nc; ++c) {
        const double deficit = double(levels) * weight[c] / total - double(alloc[c]);
        if (deficit > best_deficit) {
          best = c;
          best_deficit = deficit;
        }
      }
      ++alloc[best];
    }
  }
  int64_t j = 0;
  for (size_t c = 0; c < nc; ++c) {
    const float lo = sorted[size_t(clusters[c].begin)], hi = sorted[size_t(clusters[c].end - 1)];
    if (alloc[c] >= 2) {
      const int64_t last = alloc[c] - 1;
      codebook[j++] = lo;  // the ends exactly: the bucket's min and max must be levels
      for (int64_t l = 1; l < last; ++l) {
        codebook[j++] = float(double(lo) + (double(hi) - double(lo)) * double(l) / double(last));
      }
      codebook[j++] = hi;
    } else if (c == 0) {
      codebook[j++] = lo;  // the bucket's min must be a level
    } else if (c == nc - 1) {
      codebook[j++] = hi;  // and so must its max
    } else {
      codebook[j++] = std::clamp(float(mean[c]), lo, hi);
    }
  }
  for (; j < levels; ++j) codebook[j] = codebook[j - 1];  // unused levels repeat the max
}


}  // namespace

CasqCodec::CasqCodec(const CasqOptions& options) : options_(options) {
  GVQ_CHECK_ARG(options.bits == 2 || options.bits == 3, "CasqCodec", "bits", "must be 2 or 3, got ",
                options.bits);
  const int64_t levels = int64_t(1) << options.bits;
  GVQ_CHECK_ARG(options.clusters >= 1 && options.clusters <= levels, "CasqCodec", "clusters",
                "must lie in [1, ", levels, "] (2^bits levels, one at least per cluster), got ",
                options.clusters);
  GVQ_CHECK_ARG(options.bucket_size >= 1, "CasqCodec", "bucket_size", "must be >= 1, got ",
                options.bucket_size);
  GVQ_CHECK_ARG(options.kmeans_iterations >= 0 && options.kmeans_iterations <= 1000, "CasqCodec",
                "kmeans_iterations", "must lie in [0, 1000], got ", options.kmeans_iterations);
}

int64_t CasqCodec::packed_bytes(int64_t numel) const {
  return 4 * levels() * ceil_div(numel, options_.bucket_size) + ceil_div(numel * options_.bits, 8);
}

double CasqCodec::bits_per_element(int64_t numel) const {
  GVQ_CHECK_ARG(numel > 0, "CasqCodec.bits_per_element", "numel", "must be > 0, got ", numel);
  return 8.0 * double(packed_bytes(numel)) / double(numel);
}

at::Tensor CasqCodec::encode(const at::Tensor& values, uint64_t seed) const {
  constexpr const char* kWhere = "CasqCodec.encode";
  GVQ_CHECK_ARG(values.defined() && values.scalar_type() == at::kFloat && values.dim() == 1, kWhere, "values",
                "must be a 1-D float32 tensor");
  at::Tensor v = values.to(at::kCPU).contiguous();
  const int64_t n = v.numel(), bucket = options_.bucket_size, levels = this->levels(), bits = options_.bits;
  const int64_t num_buckets = ceil_div(n, bucket);
  at::Tensor out = at::zeros({packed_bytes(n)}, at::kByte);
  const float* x = v.data_ptr<float>();
  uint8_t* codebooks = out.data_ptr<uint8_t>();
  uint8_t* codes = codebooks + 4 * levels * num_buckets;

  std::vector<float> sorted, codebook(static_cast<size_t>(levels));
  std::vector<double> prefix;
  detail::LsbBitWriter writer(codes);
  for (int64_t b = 0; b < num_buckets; ++b) {
    const int64_t begin = b * bucket, end = std::min(n, begin + bucket), m = end - begin;
    sorted.assign(x + begin, x + end);
    bool finite = true;
    for (float s : sorted) finite &= std::isfinite(s);
    if (finite) {
      std::sort(sorted.begin(), sorted.end());
      prefix.assign(static_cast<size_t>(m + 1), 0.0);
      for (int64_t i = 0; i < m; ++i) prefix[size_t(i + 1)] = prefix[size_t(i)] + double(sorted[size_t(i)]);
      build_codebook(sorted, prefix, options_, levels, codebook.data());
    } else {
      std::fill(codebook.begin(), codebook.end(), std::numeric_limits<float>::quiet_NaN());
    }
    std::memcpy(codebooks + 4 * levels * b, codebook.data(), size_t(4 * levels));
    for (int64_t i = begin; i < end; ++i) {
      uint64_t code = 0;
      if (finite) {
        // The two levels around x; x lies in [codebook[0], codebook[B - 1]] (the bucket's min and max).
        const int64_t upper = std::upper_bound(codebook.begin(), codebook.end(), x[i]) - codebook.begin();
        const int64_t j = std::clamp<int64_t>(upper - 1, 0, levels - 2);
        const double lo = codebook[size_t(j)], hi = codebook[size_t(j + 1)];
        code = uint64_t(j);
        if (hi > lo && uniform01(seed, uint64_t(i)) < (double(x[i]) - lo) / (hi - lo)) code += 1;
      }
      writer.put(code, int(bits));
    }
  }
  const int64_t byte = writer.finish();
  GVQ_ASSERT(4 * levels * num_buckets + byte == out.numel());
  return out;
}

void CasqCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  constexpr const char* kWhere = "CasqCodec.decode";
  check_decode_out(out, kWhere);
  const int64_t n = out.numel(), bucket = options_.bucket_size, levels = this->levels(), bits = options_.bits;
  check_packed(packed, packed_bytes(n), kWhere);
  const int64_t num_buckets = ceil_div(n, bucket);
  const uint8_t* codebooks = packed.data_ptr<uint8_t>();
  const uint8_t* codes = codebooks + 4 * levels * num_buckets;
  float* y = out.data_ptr<float>();
  std::vector<float> codebook(static_cast<size_t>(levels));

  detail::LsbBitReader reader(codes);
  for (int64_t b = 0; b < num_buckets; ++b) {
    std::memcpy(codebook.data(), codebooks + 4 * levels * b, size_t(4 * levels));
    const int64_t begin = b * bucket, end = std::min(n, begin + bucket);
    for (int64_t i = begin; i < end; ++i) {
      y[i] += codebook[reader.get(int(bits))];
    }
  }
}

at::Tensor CasqCodec::decode(const at::Tensor& packed, int64_t numel) const {
  GVQ_CHECK_ARG(numel >= 0, "CasqCodec.decode", "numel", "must be >= 0, got ", numel);
  at::Tensor out = at::zeros({numel}, at::kFloat);
  decode_add(packed, out);
  return out;
}

// --- as a message codec -------------------------------------------------------------------------------

namespace {
double sum_sq(const at::Tensor& x) {
  const float* p = x.data_ptr<float>();
  double s = 0.0;
  for (int64_t i = 0; i < x.numel(); ++i) s += double(p[i]) * double(p[i]);
  return s;
}
}  // namespace

CasqMessageCodec::CasqMessageCodec(const CasqOptions& options) : codec_(options) {}

EncodedMessage CasqMessageCodec::encode(const at::Tensor& values, int64_t, uint64_t seed) {
  EncodedMessage m;
  m.packed = codec_.encode(values, seed);
  // The error statistic needs the decoded values; decoding is a codebook lookup, cheap next to the
  // clustering.
  at::Tensor q = codec_.decode(m.packed, values.numel());
  if (bool(at::isfinite(q).all().item<bool>())) {
    m.residual_sq = sum_sq(q.sub_(values));
    m.signal_sq = sum_sq(values);
  }
  return m;
}

void CasqMessageCodec::decode_add(const at::Tensor& packed, at::Tensor& out) const {
  codec_.decode_add(packed, out);
}

}  // namespace gradiveq
