// Multi-rank tests of include/gradiveq/gather_aggregator.h (CO3 and CASQ through all-gather, decode, sum) on
// real Gloo process groups, one thread per rank.
#include <cmath>

#include "gradiveq/casq.h"
#include "gradiveq/co3.h"
#include "gradiveq/gather_aggregator.h"
#include "rank_threads.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;
using testing::rel_error;
using testing::run_ranks;

// Two parameters DDP would bucket together: a large one (encoded) and a small one (all-reduced uncompressed).
struct Model {
  std::vector<NamedParameter> params{{"w", at::zeros({64, 64})}, {"b", at::zeros({10})}};
};

// Rank r's gradients at `step`: the large one Gaussian with a rank-dependent scale (so CO3's Huffman messages
// differ in size between ranks), the small one small integers (so its average is exact in float32).
std::vector<at::Tensor> gradients_of(int rank, int step) {
  auto gen = at::detail::createCPUGenerator(100 * rank + step + 1);
  return {at::randn({64, 64}, gen) * (1.0 + rank) * 1e-3, at::randint(-8, 8, {10}, gen).to(at::kFloat)};
}

// Runs one bucket holding `grads` through `agg`; returns the averaged gradients.
std::vector<at::Tensor> aggregate(GatherAggregator& agg, const Model& model,
                                  const std::vector<at::Tensor>& grads, int64_t index = 0,
                                  bool is_last = true) {
  at::Tensor buffer = at::cat({grads[0].reshape({-1}), grads[1].reshape({-1})});
  std::vector<at::Tensor> views{buffer.narrow(0, 0, 4096).view({64, 64}), buffer.narrow(0, 4096, 10)};
  auto fut =
      agg.aggregate_bucket(buffer, views, {model.params[0].tensor, model.params[1].tensor}, index, is_last);
  fut->wait();
  return {views[0].clone(), views[1].clone()};
}

std::shared_ptr<GatherAggregator> co3(c10::intrusive_ptr<c10d::ProcessGroup> pg, const Model& m,
                                      Co3Format format, double gamma) {
  return GatherAggregator::create(pg, m.params, std::make_unique<Co3MessageCodec>(Co3Options{format}, gamma));
}

class GatherRanks : public ::testing::TestWithParam<int> {};

// Every rank can replay every rank's CO3 error correction (it is deterministic), so the hook's average over
// ranks is known exactly: the all-gather, the length table, the padding and the decode must lose nothing.
TEST_P(GatherRanks, Co3AverageEqualsTheReplayedDecodedMessagesBitForBit) {
  const int world = GetParam();
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    Model model;
    auto agg = co3(pg, model, Co3Format::kFp4, 0.9);
    Co3Codec codec;
    std::vector<Co3ErrorCorrection> replay(world, Co3ErrorCorrection(0.9));
    for (int step = 0; step < 3; ++step) {
      auto out = aggregate(*agg, model, gradients_of(rank, step));
      at::Tensor expected = at::zeros({4096}, at::kFloat);
      at::Tensor small = at::zeros({10}, at::kFloat);
      for (int r = 0; r < world; ++r) {
        auto g = gradients_of(r, step);
        codec.decode_add(replay[r].step(codec, g[0].reshape({-1})), expected);
        small += g[1];
      }
      EXPECT_TRUE(at::equal(out[0], expected.div_(world).view({64, 64})))
          << "rank " << rank << " step " << step;
      EXPECT_TRUE(at::equal(out[1], small.div_(world))) << "small parameters travel exactly";
      // Close to the plain average: the error memory carries what fp4 rounds away.
      at::Tensor plain = at::zeros({64, 64});
      for (int r = 0; r < world; ++r) plain += gradients_of(r, step)[0];
      EXPECT_LT(rel_error(out[0], plain / world), 0.5);
    }
    const StepStats st = agg->step_stats();
    EXPECT_EQ(st.iteration, 2);
    EXPECT_EQ(st.phase, "co3");
    EXPECT_EQ(st.collectives, 3);  // all-reduce, sizes all-gather, payload all-gather
    EXPECT_EQ(st.values_encoded, 4096);
    EXPECT_GT(st.relative_error, 0.05);
    EXPECT_LT(st.relative_error, 0.3);
    // Payload: the size, the padded messages (at least this rank's message and its 8-byte length), the
    // small parameter in float32.
    EXPECT_GE(st.bytes_payload, 8 + 8 + st.bytes_encoded + 40);
    EXPECT_EQ(st.bytes_uncompressed, 4 * 4106);
    const double bits = 8.0 * double(st.bytes_encoded) / double(st.values_encoded);
    EXPECT_GT(bits, 2.0);
    EXPECT_LT(bits, 4.5);
  });
}

TEST_P(GatherRanks, Co3Fp8WithoutMemoryIsCloseToPlainAverage) {
  const int world = GetParam();
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    Model model;
    auto agg = co3(pg, model, Co3Format::kFp8, 0.0);
    auto out = aggregate(*agg, model, gradients_of(rank, 0));
    at::Tensor plain = at::zeros({64, 64});
    for (int r = 0; r < world; ++r) plain += gradients_of(r, 0)[0];
    // fp8 keeps 3 significant bits: each value within 2^-3 relative, the average too.
    EXPECT_LT(rel_error(out[0], plain / world), 0.0625);
    EXPECT_LT(agg->step_stats().relative_error, 0.0625);
  });
}

// CASQ's seeds are the aggregator's, so replay is not possible; instead: every rank decodes the same average,
// averaging many steps of the same gradients converges to the plain average (unbiased rounding), and the
// payload is exactly the formula (fixed sizes: no sizes all-gather).
TEST_P(GatherRanks, CasqIsUnbiasedIdenticalOnRanksAndSendsItsFormula) {
  const int world = GetParam();
  std::vector<at::Tensor> first(world);
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    Model model;
    CasqOptions o;
    auto agg = GatherAggregator::create(pg, model.params, std::make_unique<CasqMessageCodec>(o), {1000, 7});
    at::Tensor plain = at::zeros({64, 64});
    for (int r = 0; r < world; ++r) plain += gradients_of(r, 0)[0];
    plain /= world;
    at::Tensor mean = at::zeros({64, 64});
    double single = 0.0;
    const int steps = 32;
    for (int s = 0; s < steps; ++s) {
      auto out = aggregate(*agg, model, gradients_of(rank, 0));
      if (s == 0) {
        first[rank] = out[0];
        single = rel_error(out[0], plain);
      }
      mean += out[0];
    }
    mean /= steps;
    EXPECT_GT(single, 0.1);
    EXPECT_LT(rel_error(mean, plain), single / 3) << "averaging 32 draws shrinks the error about 5.7x";
    const StepStats st = agg->step_stats();
    EXPECT_EQ(st.collectives, 2);  // all-reduce and payload all-gather
    EXPECT_EQ(st.bytes_encoded, CasqCodec(o).packed_bytes(4096));
    EXPECT_EQ(st.bytes_payload, 8 + st.bytes_encoded + 40);
    EXPECT_EQ(st.bytes_wire, (world - 1) * (8 + st.bytes_encoded) + int64_t(2.0 * (world - 1) / world * 40));
  });
  for (int r = 1; r < world; ++r) EXPECT_TRUE(at::equal(first[r], first[0]));
}

// Several buckets in flight at once, issued back to back as DDP does: the collectives stay in bucket order.
TEST_P(GatherRanks, SeveralBucketsInFlightAverageCorrectly) {
  const int world = GetParam();
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    std::vector<NamedParameter> params;
    for (int i = 0; i < 4; ++i) params.push_back({"p" + std::to_string(i), at::zeros({2000 + 500 * i})});
    auto agg = GatherAggregator::create(pg, params,
                                        std::make_unique<Co3MessageCodec>(Co3Options{Co3Format::kFp8}, 0.0));
    std::vector<at::Tensor> buffers;
    std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
    for (int i = 0; i < 4; ++i) {
      auto gen = at::detail::createCPUGenerator(10 * rank + i);
      buffers.push_back(at::randn({2000 + 500 * i}, gen));
      futures.push_back(agg->aggregate_bucket(buffers[i], {buffers[i]}, {params[i].tensor}, i, i == 3));
    }
    for (int i = 0; i < 4; ++i) {
      futures[i]->wait();
      at::Tensor plain = at::zeros({2000 + 500 * i});
      for (int r = 0; r < world; ++r)
        plain += at::randn({2000 + 500 * i}, at::detail::createCPUGenerator(10 * r + i));
      EXPECT_LT(rel_error(buffers[i], plain / world), 0.0625) << "bucket " << i;
    }
    EXPECT_EQ(agg->step_stats().buckets, 4);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, GatherRanks, ::testing::Values(2, 4));

TEST(GatherAggregator, NonFiniteGradientStaysNonFiniteOnEveryRank) {
  for (bool casq : {false, true}) {
    run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      Model model;
      std::unique_ptr<MessageCodec> codec;
      if (casq) {
        codec = std::make_unique<CasqMessageCodec>(CasqOptions{});
      } else {
        codec = std::make_unique<Co3MessageCodec>(Co3Options{}, 0.9);
      }
      auto agg = GatherAggregator::create(pg, model.params, std::move(codec));
      auto g = gradients_of(rank, 0);
      if (rank == 0) {
        g[0][3][5] = INFINITY;
        g[1][2] = INFINITY;
      }
      auto out = aggregate(*agg, model, g);
      EXPECT_FALSE(at::isfinite(out[0]).all().item<bool>()) << (casq ? "casq" : "co3");
      EXPECT_FALSE(at::isfinite(out[1]).all().item<bool>());
      if (!casq) {  // rank 0's overflowed step leaves its error memory as it was (none yet); rank 1 has one
        EXPECT_EQ(agg->save_slot_states().empty(), rank == 0);
      }
    });
  }
}

TEST(GatherAggregator, Co3ErrorMemoryRoundTripsThroughSlotStates) {
  run_ranks(1, [&](int, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    Model model;
    auto a = co3(pg, model, Co3Format::kFp4, 0.9);
    aggregate(*a, model, gradients_of(0, 0));
    aggregate(*a, model, gradients_of(0, 1));
    auto saved = a->save_slot_states();
    ASSERT_EQ(saved.size(), 1u);  // only the encoded parameter has memory
    EXPECT_EQ(saved[0].first, "w");
    EXPECT_GT(saved[0].second.norm().item<double>(), 0.0);

    auto b = co3(pg, model, Co3Format::kFp4, 0.9);
    b->load_slot_states(saved, a->iteration());
    EXPECT_EQ(b->iteration(), 2);
    auto from_a = aggregate(*a, model, gradients_of(0, 2));
    auto from_b = aggregate(*b, model, gradients_of(0, 2));
    EXPECT_TRUE(at::equal(from_a[0], from_b[0]));
    auto fresh = co3(pg, model, Co3Format::kFp4, 0.9);
    EXPECT_FALSE(at::equal(aggregate(*fresh, model, gradients_of(0, 2))[0], from_a[0])) << "memory matters";

    // Refused images change nothing.
    auto before = b->save_slot_states();
    expect_invalid([&] { b->load_slot_states({{"nope", at::zeros({4096})}}, 0); }, {"states", "nope"});
    expect_invalid([&] { b->load_slot_states({{"w", at::zeros({4095})}}, 0); }, {"states", "4096"});
    expect_invalid([&] { b->load_slot_states({}, -1); }, {"iteration"});
    EXPECT_TRUE(at::equal(b->save_slot_states()[0].second, before[0].second));
    EXPECT_EQ(b->iteration(), 3);

    auto c = GatherAggregator::create(pg, model.params, std::make_unique<CasqMessageCodec>(CasqOptions{}));
    expect_invalid([&] { c->load_slot_states(saved, 0); }, {"states", "casq"});
  });
}

TEST(GatherAggregator, RejectsBadArguments) {
  run_ranks(1, [&](int, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    Model model;
    expect_invalid([&] { Co3MessageCodec(Co3Options{}, 1.5); }, {"gamma", "1.5"});
    expect_invalid([&] { GatherAggregator::create(pg, model.params, nullptr); }, {"codec"});
    expect_invalid(
        [&] { GatherAggregator::create(pg, {}, std::make_unique<CasqMessageCodec>(CasqOptions{})); },
        {"parameters"});
    expect_invalid(
        [&] {
          GatherAggregator::create(pg, model.params, std::make_unique<CasqMessageCodec>(CasqOptions{}),
                                   {-1, 0});
        },
        {"min_numel"});
    auto agg = GatherAggregator::create(pg, model.params, std::make_unique<CasqMessageCodec>(CasqOptions{}));
    at::Tensor stranger = at::zeros({2000});
    expect_invalid([&] { agg->aggregate_bucket(stranger, {stranger}, {stranger}, 0, true); },
                   {"parameters", "not registered"});
  });
}

}  // namespace
}  // namespace gradiveq
