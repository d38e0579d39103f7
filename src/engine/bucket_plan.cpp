#include "engine/bucket_plan.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "gradiveq/errors.h"
#include "kernels/kernels_cuda.h"
#include "util/hash_mix.h"

namespace gradiveq::detail {

namespace {

// A window's sample: `sum`, an aggregated gradient in paper order (or N times a local one); a non-finite one
// never enters a fit (EngineLayer::settle_samples).
void keep_sample(EngineLayer& l, const at::Tensor& sum, const PlanContext& ctx) {
  const at::Tensor slices = l.layout.slices(sum.to(at::kFloat));  // half-precision buckets: fit in float32
  const at::Tensor sample = ctx.fit_on == FitSamples::kFirstSlice ? slices.narrow(0, 0, 1) : slices;
  HostReadback values(sample), finite(at::isfinite(sum).all());
  std::lock_guard<std::mutex> lock(*ctx.samples_mutex);
  l.arriving_samples.emplace_back(std::move(values), std::move(finite));
}

// Error feedback, uncompressed or QSGD routes: the memory goes out with this step's values (paper-ordered
// `flat`, any float dtype) and is emptied.
void flush_error(EngineLayer& l, const at::Tensor& flat, const PlanContext& ctx) {
  if (ctx.error_feedback) l.error.flush_into(l.layout.slices(flat));
}

// Compressed route, first half: this rank's gradient in paper order, float32.
at::Tensor compressed_flat(Entry& e) { return e.layer->layout.to_paper_order(e.grad.to(at::kFloat)); }

// Compressed route, second half, once the slices of `flat` are compressed to `projected` (S, d) float32,
// U^T (g - mu/N). With error feedback the memory adds its own coefficients (error_memory.h) and keeps what
// the coefficients, as they travel in coeff_dtype, leave unsent.
void finish_compressed_pack(Entry& e, BucketPlan& plan, const PlanContext& ctx, const at::Tensor& flat,
                            const at::Tensor& projected) {
  EngineLayer& l = *e.layer;
  const int64_t n = ctx.world_size;
  const at::Tensor slices = l.layout.slices(flat);
  // A local sample is N x, the estimate of the sum an aggregated sample would have been; with error feedback
  // x = g + e, so that what one basis missed enters the next (this is where the memory is formed every step).
  if (e.local_sample) {
    at::Tensor sample = flat.mul(double(n));
    if (ctx.error_feedback && !l.error.empty()) l.layout.slices(sample).add_(l.error.dense(), double(n));
    keep_sample(l, sample, ctx);
  }
  at::Tensor c = projected;
  if (ctx.error_feedback) {
    c = l.error.add_step(slices, projected, l.pca, n);
    l.error.record_sent(c.to(ctx.coeff_dtype).to(at::kFloat));
    std::tie(e.residual_sq, e.signal_sq) = l.error.error_terms();
  } else {
    // Local loss of eq. 7 without decompressing: U is orthonormal, so with x = g - mu/N,
    // ||x - U U^T x||^2 = ||x||^2 - ||U^T x||^2.
    e.residual_sq = (slices - l.pca.mean() / double(n)).pow(2).sum() - c.pow(2).sum();
    e.signal_sq = slices.pow(2).sum();
  }
  plan.coeffs.narrow(0, e.coeff_offset, e.coeff_len).view(c.sizes()).copy_(c);
  plan.packed.narrow(0, e.raw_offset, e.raw_len).copy_(l.layout.tail(flat));
}

// The entry's summed coefficients, (S, d), in `coeffs` (the plan's coefficient segment, or a float32 copy).
at::Tensor entry_coeffs(const Entry& e, const at::Tensor& coeffs) {
  return coeffs.narrow(0, e.coeff_offset, e.coeff_len).view({e.layer->layout.num_slices(), -1});
}

void unpack_sample(Entry& e, const at::Tensor& sum, BucketPlan& plan, const PlanContext& ctx) {
  keep_sample(*e.layer, sum, ctx);
  e.layer->layout.from_paper_order_into(sum.to(plan.buffer.device()).mul(1.0 / double(ctx.world_size)),
                                        e.grad);
}

// --- raw: uncompressed, in the raw all-reduce -------------------------------------------------------------

const Route kRawRoute{
    "uncompressed",
    [](Entry& e, Segments& s) {
      e.raw_offset = s.raw;
      e.raw_len = e.layer->numel;
      s.raw += e.raw_len;
    },
    [](Entry& e, BucketPlan& plan, const PlanContext&) {
      plan.packed.narrow(0, e.raw_offset, e.raw_len).view(e.grad.sizes()).copy_(e.grad);
    },
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      e.grad.copy_(plan.packed.narrow(0, e.raw_offset, e.raw_len).view(e.grad.sizes()))
          .mul_(1.0 / double(ctx.world_size));
    },
    [](const Entry& e, const PlanContext& ctx, LayerStats& st, StepRecorder&) {
      st.bytes_out = e.layer->numel * ctx.raw_element_size;
    },
};

// --- compressed: coefficients and the slices' tail; decompressed once --------------------------------------

const Route kCompressedRoute{
    "compressed",
    [](Entry& e, Segments& s) {
      const EngineLayer& l = *e.layer;
      e.coeff_offset = s.coeff;
      e.coeff_len = l.layout.num_slices() * l.pca.num_components();
      e.raw_offset = s.raw;
      e.raw_len = l.layout.tail_len();
      s.coeff += e.coeff_len;
      s.raw += e.raw_len;
    },
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      at::Tensor flat = compressed_flat(e);
      const at::Tensor slices = e.layer->layout.slices(flat);
      finish_compressed_pack(e, plan, ctx, flat, e.layer->pca.compress(slices, ctx.world_size));
    },
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      const EngineLayer& l = *e.layer;
      at::Tensor flat = at::empty({l.numel}, plan.packed.options().dtype(at::kFloat));
      l.pca.decompress_into(entry_coeffs(e, plan.coeffs), l.layout.slices(flat));
      l.layout.tail(flat).copy_(plan.packed.narrow(0, e.raw_offset, e.raw_len));
      l.layout.from_paper_order_into(flat.mul_(1.0 / double(ctx.world_size)), e.grad);
    },
    [](const Entry& e, const PlanContext& ctx, LayerStats& st, StepRecorder& steps) {
      st.bytes_out =
          e.coeff_len * int64_t(c10::elementSize(ctx.coeff_dtype)) + e.raw_len * ctx.raw_element_size;
      // Read on the host only when the stats are (GradiVeQAggregator::layer_stats, StepRecorder::last).
      e.layer->last_error_terms = {e.residual_sq, e.signal_sq};
      steps.add_error_terms(e.residual_sq, e.signal_sq);
    },
};

// --- sampled raw: uncompressed in paper order, kept as a sample --------------------------------------------

const Route kSampledRawRoute{
    "sampling",
    kRawRoute.reserve,
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      at::Tensor dst = plan.packed.narrow(0, e.raw_offset, e.raw_len);
      e.layer->layout.to_paper_order_into(e.grad, dst);
      flush_error(*e.layer, dst, ctx);
    },
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      unpack_sample(e, plan.packed.narrow(0, e.raw_offset, e.raw_len), plan, ctx);
    },
    kRawRoute.record,
};

// --- sampled QSGD: the paper's 4-bit QSGD through the gather pipeline, kept as a sample
// ----------------------

const Route kSampledQsgdRoute{
    "sampling",
    [](Entry&, Segments&) {},  // its message goes to the pipeline, not to the all-reduce
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      EngineLayer& l = *e.layer;
      at::Tensor flat = l.layout.to_paper_order(e.grad.to(at::kFloat));
      if (!plan.sampling->stays_on(flat.device())) flat = flat.to(at::kCPU);
      flush_error(l, flat, ctx);
      const uint64_t seed =
          mix(mix(mix(ctx.seed, uint64_t(plan.iter)), uint64_t(ctx.rank)), hash_string(l.name));
      e.message = plan.sampling->num_messages();
      e.message_bytes = plan.sampling->add(flat, l.slot, seed).packed.numel();
    },
    [](Entry& e, BucketPlan& plan, const PlanContext& ctx) {
      unpack_sample(e, plan.sampled_sums[e.message], plan, ctx);
    },
    [](const Entry& e, const PlanContext&, LayerStats& st, StepRecorder&) { st.bytes_out = e.message_bytes; },
};

}  // namespace

Mode mode_for(const EngineLayer& layer, Phase phase, SampleQuantizer sample_quantizer, SampleSource source) {
  if (layer.compressible && phase == Phase::kSampling && source == SampleSource::kLocal &&
      layer.pca.is_fitted()) {
    return Mode::kCompressed;
  }
  if (layer.compressible && phase == Phase::kSampling) {
    return samples_as_qsgd(sample_quantizer, source) ? Mode::kSampledQsgd : Mode::kSampledRaw;
  }
  if (layer.compressible && phase == Phase::kCompressed && layer.pca.is_fitted()) return Mode::kCompressed;
  return Mode::kRaw;
}

const Route& route_of(Mode mode) {
  switch (mode) {
    case Mode::kRaw:
      return kRawRoute;
    case Mode::kCompressed:
      return kCompressedRoute;
    case Mode::kSampledRaw:
      return kSampledRawRoute;
    case Mode::kSampledQsgd:
      return kSampledQsgdRoute;
  }
  return kRawRoute;
}

std::vector<std::vector<Entry>> split_into_groups(std::vector<Entry> entries, int64_t pipeline_chunks) {
  int64_t compressed_numel = 0, compressed_layers = 0;
  for (const auto& e : entries) {
    if (e.mode != Mode::kCompressed) continue;
    compressed_numel += e.layer->numel;
    ++compressed_layers;
  }
  // Groups keep the bucket's order, so every rank issues the same collectives in the same order.
  const int64_t groups = std::max<int64_t>(1, std::min(pipeline_chunks, compressed_layers));
  std::vector<std::vector<Entry>> chunks(static_cast<size_t>(groups));
  int64_t done = 0;
  for (auto& e : entries) {
    const int64_t g = std::min<int64_t>(groups - 1, done * groups / std::max<int64_t>(compressed_numel, 1));
    if (e.mode == Mode::kCompressed) done += e.layer->numel;
    chunks[size_t(g)].push_back(std::move(e));
  }
  // A layer larger than a group's share leaves the next group empty: only non-empty groups go out.
  chunks.erase(std::remove_if(chunks.begin(), chunks.end(), [](const auto& c) { return c.empty(); }),
               chunks.end());
  return chunks;
}

bool groups_on_cuda(const BucketPlan& plan) { return plan.buffer.is_cuda() && cuda_kernels_enabled(); }

// One kernel launch for every compressed entry of the plan (kernels_cuda.h), then each entry's own second
// half.
void pack_compressed_grouped(BucketPlan& plan, const PlanContext& ctx) {
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  std::vector<Entry*> entries;
  std::vector<at::Tensor> flats;
  std::vector<ProjectionTask> tasks;
  for (auto& e : plan.entries) {
    if (e.mode != Mode::kCompressed) continue;
    const PcaCompressor& pca = e.layer->pca;
    entries.push_back(&e);
    flats.push_back(compressed_flat(e));
    const at::Tensor slices = e.layer->layout.slices(flats.back());
    tasks.push_back({slices, pca.basis(), pca.offset(ctx.world_size),
                     at::empty({slices.size(0), pca.num_components()}, slices.options()), 1.0f});
  }
  cuda_compress_grouped(tasks);
  for (size_t i = 0; i < entries.size(); ++i)
    finish_compressed_pack(*entries[i], plan, ctx, flats[i], tasks[i].out);
#else
  (void)plan, (void)ctx;
  GVQ_ASSERT(false, "CUDA kernels used in a build without them");
#endif
}

// One launch decompresses every compressed entry (mean added, averaged over ranks) into a float32 buffer
// in paper order; each entry then adds its tail and scatters into its gradient.
void unpack_compressed_grouped(BucketPlan& plan, const PlanContext& ctx) {
#ifdef GRADIVEQ_WITH_CUDA_KERNELS
  const double inv_n = 1.0 / double(ctx.world_size);
  const at::Tensor coeffs = plan.coeffs.to(at::kFloat);
  std::vector<Entry*> entries;
  std::vector<at::Tensor> flats;
  std::vector<ProjectionTask> tasks;
  for (auto& e : plan.entries) {
    if (e.mode != Mode::kCompressed) continue;
    const EngineLayer& l = *e.layer;
    entries.push_back(&e);
    flats.push_back(at::empty({l.numel}, coeffs.options()));
    tasks.push_back(
        {entry_coeffs(e, coeffs), l.pca.basis(), l.pca.mean(), l.layout.slices(flats.back()), float(inv_n)});
  }
  cuda_decompress_grouped(tasks);
  for (size_t i = 0; i < entries.size(); ++i) {
    Entry& e = *entries[i];
    e.layer->layout.tail(flats[i]).copy_(plan.packed.narrow(0, e.raw_offset, e.raw_len)).mul_(inv_n);
    e.layer->layout.from_paper_order_into(flats[i], e.grad);
  }
#else
  (void)plan, (void)ctx;
  GVQ_ASSERT(false, "CUDA kernels used in a build without them");
#endif
}

}  // namespace gradiveq::detail
