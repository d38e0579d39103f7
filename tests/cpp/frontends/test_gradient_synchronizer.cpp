// Multi-rank tests of include/gradiveq/gradient_synchronizer.h and process_group.h: 2 to 4 ranks, each a thread
// with its own FileStore client and Gloo process group on 127.0.0.1.
#include "gradiveq/gradient_synchronizer.h"

#include <chrono>
#include <cstdio>
#include <functional>
#include <csignal>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include <sys/socket.h>
#include <unistd.h>

#include "gradiveq/casq.h"
#include "gradiveq/co3.h"
#include "gradiveq/gather_aggregator.h"
#include "gradiveq/process_group.h"
#include "gradiveq/qsgd.h"
#include "rank_threads.h"
#include "resume_check.h"
#include "tiny_net.h"
#include "test_helpers.h"

namespace gradiveq {
namespace {

using testing::expect_invalid;
using testing::rel_error;
using testing::run_ranks;
using testing::TinyNet;
using testing::batch;

// Every gradient of `net` (aggregated by a synchronizer) against the plain all-reduce average of `reference`'s,
// within `tolerance` (relative error); `context` names the case in a failure.
void expect_plain_average(TinyNet& net, TinyNet& reference, c10d::ProcessGroup& pg, double tolerance,
                          const std::string& context) {
  for (size_t i = 0; i < net.params.size(); ++i) {
    std::vector<at::Tensor> t{reference.p(i).grad().clone()};
    pg.allreduce(t)->wait();
    EXPECT_LT(rel_error(net.p(i).grad(), t[0] / double(pg.getSize())), tolerance)
        << context << " " << net.params[i].name;
  }
}

SynchronizerOptions exact_options() {
  SynchronizerOptions o;
  o.gradiveq.fit.energy = 1.0;
  o.gradiveq.fit.min_ratio = 0.0;
  o.gradiveq.fit.max_components = 0;
  o.gradiveq.coeff_dtype = o.gradiveq.uncompressed_dtype = at::kFloat;  // lossless up to float32 rounding
  o.gradiveq.schedule = {1, 2, 3};
  o.gradiveq.sample_quantizer = SampleQuantizer::kNone;
  o.gradiveq.policy.min_numel = 100;
  o.bucket_cap_bytes = 4000;  // several buckets
  return o;
}

class SynchronizerRanks : public ::testing::TestWithParam<int> {};

TEST_P(SynchronizerRanks, FullRankEqualsPlainAllReduceAverageInEveryPhase) {
  const int world = GetParam();
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(7), reference(7);
    GradientSynchronizer sync(pg, net.params, exact_options());
    ASSERT_GT(sync.num_buckets(), 1);
    for (int step = 0; step < 9; ++step) {  // warm-up 1, sampling 2, compressed 3, sampling 2, compressed 1
      auto [x, y] = batch(rank, step);
      net.zero_grad();
      reference.zero_grad();
      net.loss(x, y).backward();
      reference.loss(x, y).backward();
      sync.synchronize();
      expect_plain_average(net, reference, *pg, 1e-5, "rank " + std::to_string(rank) + " step " + std::to_string(step));
      if (step == 0) EXPECT_GT(sync.buckets_launched_in_backward(), 0);  // overlap with backward happened
    }
    EXPECT_EQ(sync.aggregator().iteration(), 9);
    EXPECT_EQ(sync.aggregator().layer_stats()[1].fits, 2);  // conv2 fitted after each sampling window
  });
}

INSTANTIATE_TEST_SUITE_P(World, SynchronizerRanks, ::testing::Values(2, 3, 4));

// uncompressed_dtype = float16: every phase averages like plain all-reduce within float16 rounding, the warm-up
// and sampling steps put half the bytes into their collectives, and no step takes more collectives.
TEST(GradientSynchronizer, HalfPrecisionUncompressedValuesHalveTheirBytes) {
  std::vector<std::vector<at::Tensor>> grads(2);
  run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(7), full_net(7), reference(7);
    SynchronizerOptions half = exact_options(), full = exact_options();
    half.gradiveq.uncompressed_dtype = half.gradiveq.coeff_dtype = at::kHalf;
    full.gradiveq.coeff_dtype = at::kHalf;
    full.gradiveq.uncompressed_dtype = at::kFloat;
    GradientSynchronizer sync(pg, net.params, half), full_sync(pg, full_net.params, full);
    for (int step = 0; step < 6; ++step) {  // warm-up 1, sampling 2, compressed 3
      auto [x, y] = batch(rank, step);
      for (TinyNet* n : {&net, &full_net, &reference}) {
        n->zero_grad();
        n->loss(x, y).backward();
      }
      sync.synchronize();
      full_sync.synchronize();
      expect_plain_average(net, reference, *pg, 2e-3,
                           "rank " + std::to_string(rank) + " step " + std::to_string(step));
      const StepStats h = sync.engine().step_stats(), f = full_sync.engine().step_stats();
      if (step < 3) EXPECT_LT(double(h.bytes_payload), 0.52 * double(f.bytes_payload)) << step;
      // The verification code rides in the float16 all-reduce too: never an extra collective.
      EXPECT_LE(h.collectives, f.collectives) << step;
    }
    for (auto& np : net.params) grads[rank].push_back(np.tensor.grad().clone());
  });
  for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_TRUE(at::equal(grads[0][i], grads[1][i])) << i;
}

// The LibTorch front end runs any engine: QSGD, CO3 and CASQ through the gather engine. Each must average the
// ranks' gradients (QSGD and CASQ unbiased, CO3 fp8 fine-grained) with every rank applying the same result, and
// report its codec as the step's phase.
std::unique_ptr<MessageCodec> codec_named(const std::string& name) {
  if (name == "qsgd") return std::make_unique<QsgdMessageCodec>(QsgdOptions{});
  if (name == "co3") return std::make_unique<Co3MessageCodec>(Co3Options{Co3Format::kFp8}, 0.0);
  return std::make_unique<CasqMessageCodec>(CasqOptions{3, 4, 512, 16});
}

class SynchronizerCodecs : public ::testing::TestWithParam<std::string> {};

TEST_P(SynchronizerCodecs, RunsAnyMessageCodecAndAveragesLikePlainAllReduce) {
  const std::string name = GetParam();
  const int world = 2;
  std::vector<std::vector<at::Tensor>> grads(world);
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(5), reference(5);
    SynchronizerOptions o;
    o.bucket_cap_bytes = 4000;
    GradientSynchronizer sync(GatherAggregator::create(pg, net.params, codec_named(name), {100, 3}), net.params, o);
    for (int step = 0; step < 3; ++step) {
      auto [x, y] = batch(rank, step);
      net.zero_grad();
      reference.zero_grad();
      net.loss(x, y).backward();
      reference.loss(x, y).backward();
      sync.synchronize();
      // conv2 (1152 values) is encoded; the rest is smaller than min_numel = 100 or quantised too.
      expect_plain_average(net, reference, *pg, name == "co3" ? 0.05 : 0.6,
                           name + " rank " + std::to_string(rank) + " step " + std::to_string(step));
    }
    for (auto& np : net.params) grads[rank].push_back(np.tensor.grad().clone());
    EXPECT_EQ(sync.engine().step_stats().phase, name);
    EXPECT_EQ(sync.engine().iteration(), 3);
    EXPECT_GT(sync.engine().step_stats().values_encoded, 0);
    expect_invalid([&] { sync.aggregator(); }, {"engine", "not the GradiVeQ engine"});
  });
  for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_TRUE(at::equal(grads[0][i], grads[1][i])) << i;
}

INSTANTIATE_TEST_SUITE_P(Codecs, SynchronizerCodecs, ::testing::Values("qsgd", "co3", "casq"));

// Ranks whose layer policy or wire dtypes differ would send collectives of other sizes once compression starts
// (Gloo's "collective mismatch", or a hang until the timeout). The verification code covers them, so every rank
// raises the library's error in the very first step instead.
TEST(GradientSynchronizer, RanksWithOtherPolicyOrDtypesRaiseInTheFirstStep) {
  for (const std::string differs : {"min_numel", "coeff_dtype"}) {
    std::vector<std::string> errors(2);
    run_ranks(2, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
      TinyNet net(5);
      SynchronizerOptions o;
      o.gradiveq.schedule = {2, 2, 2};
      if (rank == 1 && differs == "min_numel") o.gradiveq.policy.min_numel = 10;
      if (rank == 1 && differs == "coeff_dtype") o.gradiveq.coeff_dtype = at::kBFloat16;
      GradientSynchronizer sync(pg, net.params, o);
      auto [x, y] = batch(rank, 0);
      net.loss(x, y).backward();
      try {
        sync.synchronize();
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
    for (int r = 0; r < 2; ++r) {
      EXPECT_NE(errors[r].find("ranks disagree on GradiVeQ state at iteration 0"), std::string::npos)
          << differs << " rank " << r << ": '" << errors[r] << "'";
      EXPECT_NE(errors[r].find("layer policy"), std::string::npos) << errors[r];
    }
  }
}

// A configuration that compresses nothing says so, and each layer says why it is not compressed.
TEST(GradientSynchronizer, ConfigurationThatCompressesNothingSaysWhy) {
  run_ranks(1, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(5);
    SynchronizerOptions o;
    o.gradiveq.policy.include = {"fc.*", "no.such.layer"};
    GradientSynchronizer sync(pg, net.params, o);
    const std::string& w = sync.aggregator().configuration_warning();
    EXPECT_NE(w.find("include pattern 'no.such.layer' matches no parameter"), std::string::npos) << w;
    EXPECT_NE(w.find("no parameter is compressed"), std::string::npos) << w;
    auto [x, y] = batch(rank, 0);
    net.loss(x, y).backward();
    sync.synchronize();
    EXPECT_EQ(sync.engine().step_stats().warning, w);
    const auto layers = sync.aggregator().layer_stats();
    EXPECT_EQ(layers[0].not_compressed_because, "matches no include pattern");  // conv1.weight
    EXPECT_EQ(layers[3].not_compressed_because, "a 2-D parameter: Linear weights are compressed only with linear_weights on");
    TinyNet plain(5);
    GradientSynchronizer defaults(pg, plain.params, SynchronizerOptions{});
    EXPECT_EQ(defaults.aggregator().configuration_warning(), "");  // conv2 (1152 values) is compressed
    EXPECT_EQ(defaults.aggregator().layer_stats()[1].not_compressed_because, "");
  });
}

TEST(GradientSynchronizer, RanksHoldIdenticalParametersAfterTraining) {
  const int world = 2;
  std::vector<std::vector<at::Tensor>> final_params(world);
  run_ranks(world, [&](int rank, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(3);
    SynchronizerOptions o;
    o.gradiveq.schedule = {2, 3, 4};
    o.gradiveq.policy.min_numel = 100;
    GradientSynchronizer sync(pg, net.params, o);  // the library's defaults
    for (int step = 0; step < 14; ++step) {
      auto [x, y] = batch(rank, step);
      net.zero_grad();
      net.loss(x, y).backward();
      sync.synchronize();
      net.sgd(0.1);
    }
    for (auto& np : net.params) final_params[rank].push_back(np.tensor.detach().clone());
    EXPECT_EQ(sync.aggregator().step_stats().phase, "compressed");
  });
  for (size_t i = 0; i < final_params[0].size(); ++i) EXPECT_TRUE(at::equal(final_params[0][i], final_params[1][i]));
}

TEST(GradientSynchronizer, SavedStateContinuesIdenticallyInANewProcessGroup) {
  const int world = 2, steps = 12, cut = 5;  // cut inside the first sampling window: samples are saved too
  SynchronizerOptions o;
  o.gradiveq.schedule = {2, 4, 4};
  o.gradiveq.fit.energy = 0.95;
  o.gradiveq.policy.min_numel = 100;
  const std::vector<at::Tensor> saved_state = testing::expect_resumed_run_matches(
      world, steps, cut, o, 0.1, {},
      [&](int, GradientSynchronizer& sync) { EXPECT_EQ(sync.aggregator().iteration(), cut); });
  // A state saved with 2 ranks does not load into a group of another size.
  run_ranks(1, [&](int, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    TinyNet net(5);
    GradientSynchronizer sync(pg, net.params, o);
    expect_invalid([&] { sync.aggregator().load_state(saved_state[0]); }, {"world size 2", "1 ranks"});
    TinyNet other(5);
    other.params.pop_back();  // a different model
    GradientSynchronizer sync2(pg, other.params, o);
    expect_invalid([&] { sync2.aggregator().load_state(saved_state[0]); }, {"state"});
    at::Tensor truncated = saved_state[0].narrow(0, 0, saved_state[0].numel() / 2);
    expect_invalid([&] { sync.aggregator().load_state(truncated); }, {"state"});
    EXPECT_EQ(sync.aggregator().iteration(), 0);  // failed loads leave the state untouched
  });
}

// Seeded random mutations of real state images (mid-sampling: samples saved; mid-compression: bases saved): every
// damaged image raises InvalidArgument naming the state (the trailing checksum catches what the structure checks
// cannot, e.g. a flipped bit in a basis value), and a failed load leaves the running state untouched. Nothing
// crashes or throws anything else (run under ASan by make test-sanitize).
TEST(GradientSynchronizer, LoadStateSurvivesRandomlyMutatedImages) {
  SynchronizerOptions o;
  o.gradiveq.schedule = {1, 3, 3};
  o.gradiveq.fit.energy = 0.95;
  o.gradiveq.policy.min_numel = 100;
  run_ranks(1, [&](int, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    std::vector<at::Tensor> images;
    {
      TinyNet net(5);
      GradientSynchronizer sync(pg, net.params, o);
      for (int step = 0; step < 6; ++step) {
        auto [x, y] = batch(0, step);
        net.zero_grad();
        net.loss(x, y).backward();
        sync.synchronize();
        net.sgd(0.1);
        if (step == 2 || step == 5) images.push_back(sync.aggregator().save_state());
      }
    }
    TinyNet net(5);
    GradientSynchronizer sync(pg, net.params, o);
    std::mt19937_64 rng(2024);
    int accepted = 0, rejected = 0;
    for (int trial = 0; trial < 1500; ++trial) {
      const at::Tensor& original = images[trial % images.size()];
      std::vector<uint8_t> bytes(original.data_ptr<uint8_t>(), original.data_ptr<uint8_t>() + original.numel());
      switch (rng() % 5) {
        case 0:  // flip a few bits anywhere
          for (int i = 0, n = 1 + rng() % 4; i < n; ++i) bytes[rng() % bytes.size()] ^= uint8_t(1u << (rng() % 8));
          break;
        case 4:  // flip the top bit of two 8-byte words (cancelled out in the format-3 checksum)
        {
          const size_t words = bytes.size() / 8;
          const size_t a = rng() % words, b = (a + 1 + rng() % (words - 1)) % words;
          bytes[a * 8 + 7] ^= 0x80;
          bytes[b * 8 + 7] ^= 0x80;
          break;
        }
        case 1:  // overwrite an 8-byte word (lengths, counts, shapes) with random or extreme values
        {
          const size_t at = rng() % (bytes.size() - 8);
          const uint64_t v = (rng() % 2) ? rng() : ~uint64_t(0) >> (rng() % 64);
          std::memcpy(bytes.data() + at, &v, 8);
          break;
        }
        case 2:  // truncate
          bytes.resize(rng() % bytes.size());
          break;
        default:  // insert random bytes
        {
          const size_t at = rng() % bytes.size();
          std::vector<uint8_t> junk(1 + rng() % 16);
          for (auto& b : junk) b = uint8_t(rng());
          bytes.insert(bytes.begin() + at, junk.begin(), junk.end());
        }
      }
      at::Tensor mutated = at::empty({int64_t(bytes.size())}, at::kByte);
      if (!bytes.empty()) std::memcpy(mutated.data_ptr<uint8_t>(), bytes.data(), bytes.size());
      // Two flips of the same bit, or a word overwritten with its own value, leave the image intact.
      const bool unchanged = bytes.size() == size_t(original.numel()) &&
                             std::memcmp(bytes.data(), original.data_ptr<uint8_t>(), bytes.size()) == 0;
      const int64_t iteration_before = sync.aggregator().iteration();
      try {
        sync.aggregator().load_state(mutated);
        ++accepted;
        EXPECT_TRUE(unchanged) << "trial " << trial << ": a damaged state image was loaded";
      } catch (const InvalidArgument& e) {
        ++rejected;
        EXPECT_FALSE(unchanged) << "trial " << trial << ": an intact image was refused: " << e.what();
        EXPECT_NE(std::string(e.what()).find("argument 'state'"), std::string::npos) << e.what();
        EXPECT_EQ(sync.aggregator().iteration(), iteration_before) << "trial " << trial;
      }
    }
    EXPECT_GT(rejected, 1450);
    std::printf("mutated state images: %d rejected with InvalidArgument, %d accepted\n", rejected, accepted);
  });
}

TEST(GradientSynchronizer, RejectsBadInput) {
  run_ranks(1, [&](int, c10::intrusive_ptr<c10d::ProcessGroup> pg) {
    std::vector<NamedParameter> mixed{{"a", at::zeros({4, 4, 3, 3}).set_requires_grad(true)},
                                      {"b", at::empty({4}, at::TensorOptions().device(at::kMeta)).set_requires_grad(true)}};
    expect_invalid([&] { GradientSynchronizer(pg, mixed); }, {"parameters", "mixed devices", "meta"});
    std::vector<NamedParameter> frozen{{"a", at::zeros({4})}};
    expect_invalid([&] { GradientSynchronizer(pg, frozen); }, {"parameters", "requires grad"});
    std::vector<NamedParameter> dup{{"a", at::zeros({4}).set_requires_grad(true)},
                                    {"a", at::zeros({4}).set_requires_grad(true)}};
    expect_invalid([&] { GradientSynchronizer(pg, dup); }, {"parameters", "'a' twice"});
    SynchronizerOptions bad;
    bad.bucket_cap_bytes = 0;
    expect_invalid([&] { GradientSynchronizer(pg, {{"a", at::zeros({4}).set_requires_grad(true)}}, bad); },
                   {"bucket_cap_bytes"});
    expect_invalid([&] { GradientSynchronizer(std::shared_ptr<BucketAggregator>(), frozen); }, {"engine", "null"});
  });
  expect_invalid([] { connect_store({}, 2, 2); }, {"rank", "[0, 2)", "got 2"});
  expect_invalid([] { connect_store({}, 0, 0); }, {"world_size"});
}

TEST(ProcessGroup, UnreachableStoreFailsWithinTheTimeout) {
  const auto start = std::chrono::steady_clock::now();
  try {
    // Rank 1 of 2 looks for a store that nobody hosts (port 9 on loopback: discard, not listening).
    connect_store({"127.0.0.1", 9}, 1, 2, std::chrono::seconds(2));
    ADD_FAILURE() << "connect_store returned without a store";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("could not reach the TCPStore at 127.0.0.1:9"), std::string::npos) << msg;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

// A rank whose peer died must raise, not die: gloo writes without MSG_NOSIGNAL, and the C++ example's 8-rank
// kill drill once lost a second rank to SIGPIPE. The check runs in a re-executed child ("threadsafe" death
// test), whose SIGPIPE starts at its default action as in a fresh C++ program.
TEST(ProcessGroup, ConnectingIgnoresSigpipeSoAWriteToADeadPeerFails) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::string store_file = ::testing::TempDir() + "gradiveq_sigpipe_store";
  std::remove(store_file.c_str());
  EXPECT_EXIT(
      {
        std::signal(SIGPIPE, SIG_DFL);
        StoreAddress address;
        address.file = store_file;
        auto store = connect_store(address, 0, 1);
        int fds[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) std::_Exit(2);
        close(fds[1]);  // the "peer" is gone
        const char byte = 0;
        const bool failed_with_epipe = write(fds[0], &byte, 1) < 0 && errno == EPIPE;
        std::_Exit(failed_with_epipe ? 0 : 3);
      },
      ::testing::ExitedWithCode(0), "");
  std::remove(store_file.c_str());
}

TEST(ProcessGroup, ConnectingKeepsAHandlerTheProgramInstalled) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::string store_file = ::testing::TempDir() + "gradiveq_sigpipe_handler_store";
  std::remove(store_file.c_str());
  EXPECT_EXIT(
      {
        std::signal(SIGPIPE, [](int) { std::_Exit(7); });
        StoreAddress address;
        address.file = store_file;
        auto store = connect_store(address, 0, 1);
        std::raise(SIGPIPE);
        std::_Exit(0);
      },
      ::testing::ExitedWithCode(7), "");
  std::remove(store_file.c_str());
}

}  // namespace
}  // namespace gradiveq
