// Data-parallel ResNet-32 training on CIFAR-100 with GradiVeQ, in C++ only (no Python, no DDP).
//
//   train_resnet32 --world-size 2 --iters 200 [--data DIR] [--log-every 20]
//   train_resnet32 --world-size 8 --iters 6 --die-at 3 --die-rank 5 --die-signal stop --pg-timeout 10
//
// Without --rank it is the launcher: it starts W copies of itself on this machine (ranks 0..W-1, a TCPStore on
// 127.0.0.1 at a free port) and waits for them. Each rank builds a Gloo process group, the CIFAR ResNet-32, SGD
// with momentum, and a gradiveq::GradientSynchronizer, and prints loss, step time, aggregation time and bytes
// sent. With --data DIR it reads the CIFAR-100 binary files DIR/train.bin and DIR/test.bin; otherwise it trains
// on SYNTHETIC CIFAR-100-shaped data and says so.
//
// Fault drill: --die-at N makes rank --die-rank send itself --die-signal (kill: SIGKILL, stop: SIGSTOP) in the
// middle of step N's backward, once the head's gradient exists. The other ranks must then raise (a lost peer, or
// the process group's --pg-timeout seconds) and exit 1; the launcher reports every rank's end, kills a stopped
// rank once all others have ended, and exits 1.
#include <gradiveq/gradiveq.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <string>

#include "cifar100.h"

extern char** environ;

namespace F = torch::nn::functional;

// ---- ResNet-32 (He et al. 2016, CIFAR variant; option-A shortcuts: no 1x1 convs) ------------------------------
struct BasicBlockImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  int64_t stride, pad;
  BasicBlockImpl(int64_t in, int64_t planes, int64_t stride_) : stride(stride_), pad(planes - in) {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, planes, 3).stride(stride).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(planes, planes, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes));
  }
  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor out = torch::relu(bn1(conv1(x)));
    out = bn2(conv2(out));
    if (stride != 1 || pad != 0) {
      using torch::indexing::Slice;
      x = x.index({Slice(), Slice(), Slice(torch::indexing::None, torch::indexing::None, stride),
                   Slice(torch::indexing::None, torch::indexing::None, stride)});
      x = F::pad(x, F::PadFuncOptions({0, 0, 0, 0, pad / 2, pad - pad / 2}));
    }
    return torch::relu(out + x);
  }
};
TORCH_MODULE(BasicBlock);

struct ResNet32Impl : torch::nn::Module {
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  torch::nn::Sequential layers;
  torch::nn::Linear fc{nullptr};
  explicit ResNet32Impl(int64_t classes) {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 16, 3).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(16));
    int64_t in = 16;
    for (auto [planes, stride] : {std::pair<int64_t, int64_t>{16, 1}, {32, 2}, {64, 2}}) {
      for (int i = 0; i < 5; ++i) {
        layers->push_back(BasicBlock(in, planes, i == 0 ? stride : 1));
        in = planes;
      }
    }
    register_module("layers", layers);
    fc = register_module("fc", torch::nn::Linear(64, classes));
    for (auto& m : modules(false)) {
      if (auto* c = m->as<torch::nn::Conv2d>()) torch::nn::init::kaiming_normal_(c->weight, 0, torch::kFanOut, torch::kReLU);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn1(conv1(x)));
    x = layers->forward(x);
    return fc(F::adaptive_avg_pool2d(x, F::AdaptiveAvgPool2dFuncOptions(1)).flatten(1));
  }
};
TORCH_MODULE(ResNet32);

// ---- Arguments ------------------------------------------------------------------------------------------------
struct Args {
  int world_size = 2, rank = -1, iters = 100, batch = 32, log_every = 10, threads = 1;
  int store_port = 0;
  std::string data, save, load, method = "gradiveq";
  double lr = 0.1, energy = gradiveq::GradiVeQOptions{}.fit.energy;
  int64_t warmup = 20, sample = 10, compress = 40;
  uint64_t seed = 0;
  int die_at = -1, die_rank = 1, pg_timeout_s = 120;
  std::string die_signal = "kill";
};

[[noreturn]] void usage(const std::string& error) {
  (error.empty() ? std::cout : std::cerr)
      << (error.empty() ? "" : "train_resnet32: " + error + "\n")
      << "usage: train_resnet32 [--method gradiveq|qsgd|co3|casq] [--world-size W] [--iters N] [--batch B]\n"
      << "       [--data DIR] [--log-every N] [--lr LR] [--energy E] [--schedule W,S,C] [--threads T] [--seed S]\n"
      << "       [--save FILE] [--load FILE] [--pg-timeout S] [--die-at N --die-rank R --die-signal kill|stop]\n"
      << "defaults: --method gradiveq --world-size 2 --iters 100 --batch 32 --log-every 10 --lr 0.1 --energy "
      << gradiveq::GradiVeQOptions{}.fit.energy
      << " --schedule 20,10,40 --threads 1 --seed 0 --pg-timeout 120 --die-rank 1 --die-signal kill;\n"
      << "synthetic data without --data.\n"
      << "--energy and --schedule are GradiVeQ's; --save/--load FILE: FILE.model and each rank's own\n"
      << "FILE.rank<R>.gradiveq; --die-at N: rank --die-rank sends itself --die-signal mid-step N (a fault\n"
      << "drill: the others must fail, not hang).\n";
  std::exit(error.empty() ? 0 : 2);
}

Args parse(int argc, char** argv) {
  Args a;
  std::map<std::string, std::string> kv;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--help" || key == "-h") usage("");
    if (key.rfind("--", 0) != 0 || i + 1 >= argc) usage("bad argument '" + key + "'");
    kv[key.substr(2)] = argv[++i];
  }
  auto num = [&](const std::string& k, auto& out) {
    if (!kv.count(k)) return;
    try {
      out = static_cast<std::decay_t<decltype(out)>>(std::stod(kv[k]));
    } catch (...) {
      usage("argument --" + k + " must be a number, got '" + kv[k] + "'");
    }
    kv.erase(k);
  };
  num("world-size", a.world_size), num("rank", a.rank), num("iters", a.iters), num("batch", a.batch);
  num("log-every", a.log_every), num("threads", a.threads), num("store-port", a.store_port);
  num("lr", a.lr), num("energy", a.energy), num("seed", a.seed);
  num("die-at", a.die_at), num("die-rank", a.die_rank), num("pg-timeout", a.pg_timeout_s);
  for (const char* k : {"data", "save", "load", "method", "die-signal"}) {
    if (!kv.count(k)) continue;
    const std::string key = k;
    (key == "data" ? a.data : key == "save" ? a.save : key == "load" ? a.load : key == "method" ? a.method
                                                                                             : a.die_signal) = kv[k];
    kv.erase(k);
  }
  if (a.die_signal != "kill" && a.die_signal != "stop") {
    usage("argument --die-signal must be kill or stop, got '" + a.die_signal + "'");
  }
  if (a.die_at >= 0 && (a.die_rank < 0 || a.die_rank >= a.world_size)) {
    usage("argument --die-rank must name a rank in [0, --world-size), got " + std::to_string(a.die_rank));
  }
  if (a.pg_timeout_s < 1) usage("argument --pg-timeout must be >= 1 second");
  if (a.method != "gradiveq" && a.method != "qsgd" && a.method != "co3" && a.method != "casq") {
    usage("argument --method must be gradiveq, qsgd, co3 or casq, got '" + a.method + "'");
  }
  if (a.method != "gradiveq" && (!a.save.empty() || !a.load.empty())) {
    usage("arguments --save / --load checkpoint the GradiVeQ engine; --method " + a.method + " has none here");
  }
  if (kv.count("schedule")) {
    if (std::sscanf(kv["schedule"].c_str(), "%ld,%ld,%ld", &a.warmup, &a.sample, &a.compress) != 3) {
      usage("argument --schedule must be W,S,C, got '" + kv["schedule"] + "'");
    }
    kv.erase("schedule");
  }
  if (!kv.empty()) usage("unknown argument --" + kv.begin()->first);
  if (a.world_size < 1) usage("argument --world-size must be >= 1");
  if (a.iters < 1 || a.batch < 1 || a.log_every < 1) usage("arguments --iters, --batch, --log-every must be >= 1");
  return a;
}

// ---- Launcher: W local ranks ----------------------------------------------------------------------------------
int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// Waits for every rank and says how each ended. A stopped rank (SIGSTOP) never ends by itself: once every other
// rank has, it is killed, so that a stalled rank cannot hang the launcher.
int wait_for_ranks(const std::vector<pid_t>& pids) {
  std::map<pid_t, size_t> running, stopped;
  for (size_t r = 0; r < pids.size(); ++r) running[pids[r]] = r;
  int succeeded = 0, raised = 0, signalled = 0;
  while (!running.empty()) {
    if (running.size() == stopped.size()) {
      for (auto [pid, r] : stopped) {
        std::cerr << "train_resnet32: rank " << r << " is stopped (SIGSTOP) and every other rank has ended: "
                  << "killing it\n";
        kill(pid, SIGKILL);
      }
      stopped.clear();
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WUNTRACED);
    if (pid < 0 || !running.count(pid)) continue;
    const size_t r = running[pid];
    if (WIFSTOPPED(status)) {
      stopped[pid] = r;
      continue;
    }
    running.erase(pid);
    stopped.erase(pid);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      ++succeeded;
    } else if (WIFSIGNALED(status)) {
      ++signalled;
      std::cerr << "train_resnet32: rank " << r << " was killed by signal " << WTERMSIG(status) << "\n";
    } else {
      ++raised;
      std::cerr << "train_resnet32: rank " << r << " failed (exit code " << WEXITSTATUS(status) << ")\n";
    }
  }
  if (succeeded == int(pids.size())) return 0;
  std::cerr << "train_resnet32: " << pids.size() << " ranks: " << succeeded << " exited 0, " << raised
            << " raised an error, " << signalled << " killed by a signal\n";
  return 1;
}

int launch(int argc, char** argv, const Args& a) {
  const std::string port = std::to_string(free_port());
  std::vector<pid_t> pids;
  for (int r = 0; r < a.world_size; ++r) {
    std::vector<std::string> args(argv, argv + argc);
    for (const std::string& s : {std::string("--rank"), std::to_string(r), std::string("--store-port"), port}) args.push_back(s);
    std::vector<char*> cargs;
    for (auto& s : args) cargs.push_back(s.data());
    cargs.push_back(nullptr);
    pid_t pid;
    if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, cargs.data(), environ) != 0) {
      std::cerr << "train_resnet32: could not start rank " << r << "\n";
      return 1;
    }
    pids.push_back(pid);
  }
  return wait_for_ranks(pids);
}

// ---- One rank -------------------------------------------------------------------------------------------------
// The engine --method names: GradiVeQ's summable PCA codec, or one of the message codecs through the gather
// engine (all-gather, decode, sum). Either runs behind the same GradientSynchronizer.
std::shared_ptr<gradiveq::BucketAggregator> make_engine(const Args& a, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                        const std::vector<gradiveq::NamedParameter>& params) {
  if (a.method == "gradiveq") {
    gradiveq::GradiVeQOptions o;
    o.fit.energy = a.energy;
    o.schedule = {a.warmup, a.sample, a.compress};
    o.seed = a.seed;
    return gradiveq::GradiVeQAggregator::create(std::move(pg), params, o);
  }
  std::unique_ptr<gradiveq::MessageCodec> codec;
  if (a.method == "qsgd") codec = std::make_unique<gradiveq::QsgdMessageCodec>(gradiveq::QsgdOptions{});
  if (a.method == "co3") codec = std::make_unique<gradiveq::Co3MessageCodec>(gradiveq::Co3Options{}, gradiveq::Co3Options{}.gamma);
  if (a.method == "casq") codec = std::make_unique<gradiveq::CasqMessageCodec>(gradiveq::CasqOptions{});
  gradiveq::GatherAggregatorOptions o;
  o.seed = a.seed;
  return gradiveq::GatherAggregator::create(std::move(pg), params, std::move(codec), o);
}

// The GradiVeQ engine's state of this rank: with error feedback (the default) each rank holds its own memory,
// so each rank saves and loads its own file.
std::string engine_state_file(const std::string& prefix, int rank) {
  return prefix + ".rank" + std::to_string(rank) + ".gradiveq";
}

// --load: the model and this rank's GradiVeQ engine state; returns the iteration to go on from.
int resume(const Args& a, ResNet32& model, gradiveq::GradientSynchronizer& sync) {
  torch::load(model, a.load + ".model");
  const std::string file = engine_state_file(a.load, a.rank);
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("--load: cannot open '" + file + "'");
  std::vector<char> bytes(static_cast<size_t>(in.tellg()));
  in.seekg(0).read(bytes.data(), bytes.size());
  sync.aggregator().load_state(at::from_blob(bytes.data(), {int64_t(bytes.size())}, at::kByte).clone());
  return int(sync.aggregator().iteration());
}

// --save, on every rank: the model (rank 0; identical on all ranks) and this rank's GradiVeQ engine state.
void save_checkpoint(const Args& a, ResNet32& model, gradiveq::GradientSynchronizer& sync) {
  if (a.rank == 0) torch::save(model, a.save + ".model");
  const std::string file = engine_state_file(a.save, a.rank);
  at::Tensor state = sync.aggregator().save_state();
  std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(state.data_ptr()), state.numel());
  if (a.rank == 0) {
    std::printf("saved %s.model and %s.rank<R>.gradiveq at iteration %ld\n", a.save.c_str(), a.save.c_str(),
                long(sync.aggregator().iteration()));
  }
}

// After training, on rank 0: test accuracy (real data only) and one layer's basis.
void finish(const Args& a, ResNet32& model, gradiveq::GradientSynchronizer& sync, const cifar100::Split* test) {
  if (a.rank != 0) return;
  if (test != nullptr) {
    const cifar100::Split& test_split = *test;
    torch::NoGradGuard ng;
    model->eval();
    int64_t correct = 0, n = test_split.fine.size(0);
    for (int64_t i = 0; i < n; i += 500) {
      const int64_t m = std::min<int64_t>(500, n - i);
      auto logits = model->forward(cifar100::normalize(test_split.images.narrow(0, i, m)));
      correct += logits.argmax(1).eq(test_split.fine.narrow(0, i, m)).sum().item<int64_t>();
    }
    std::printf("test accuracy %.4f\n", double(correct) / double(n));
  }
  if (a.method == "gradiveq") {
    for (const auto& l : sync.aggregator().layer_stats()) {
      if (l.compressible && l.name == "layers.14.conv2.weight") {
        std::printf("layers.14.conv2.weight: K %ld, d %ld, ratio %.1f, local relative error %.3f, fits %ld\n",
                    long(l.slice_len), long(l.num_components), l.compression_ratio, l.relative_error, long(l.fits));
      }
    }
  }
}

int train(const Args& a) {
  torch::set_num_threads(a.threads);
  auto store = gradiveq::connect_store({"127.0.0.1", uint16_t(a.store_port)}, a.rank, a.world_size,
                                       std::chrono::seconds(60));
  auto pg = gradiveq::make_gloo_process_group(store, a.rank, a.world_size, std::chrono::seconds(a.pg_timeout_s));

  torch::manual_seed(a.seed);
  ResNet32 model(100);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(a.lr).momentum(0.9).weight_decay(5e-4));
  std::vector<gradiveq::NamedParameter> params;
  for (auto& p : model->named_parameters()) params.push_back({p.key(), p.value()});
  gradiveq::GradientSynchronizer sync(make_engine(a, pg, params), params);

  const int start = a.load.empty() ? 0 : resume(a, model, sync);

  // Data: real CIFAR-100 when --data is given, otherwise synthetic images with a class-dependent template.
  cifar100::Split train_split, test_split;
  const bool synthetic = a.data.empty();
  at::Tensor templates;
  if (synthetic) {
    torch::manual_seed(a.seed + 1);
    templates = F::interpolate(torch::randn({100, 3, 8, 8}),
                               F::InterpolateFuncOptions().size(std::vector<int64_t>{32, 32}).mode(torch::kBilinear).align_corners(false));
  } else {
    std::tie(train_split, test_split) = cifar100::read_dir(a.data);
  }
  auto gen = at::detail::createCPUGenerator(1000 * a.seed + a.rank + 1);
  auto next_batch = [&]() -> std::pair<torch::Tensor, torch::Tensor> {
    if (synthetic) {
      torch::Tensor y = torch::randint(0, 100, {a.batch}, gen);
      return {templates.index_select(0, y) + torch::randn({a.batch, 3, 32, 32}, gen), y};
    }
    torch::Tensor idx = torch::randint(0, train_split.fine.size(0), {a.batch}, gen);
    return {cifar100::normalize(train_split.images.index_select(0, idx)), train_split.fine.index_select(0, idx)};
  };
  if (a.rank == 0) {
    std::printf("ResNet-32 in LibTorch + GradiVeQ (--method %s): %d ranks (Gloo, 127.0.0.1), %s, batch %d/rank, "
                "schedule %ld/%ld/%ld, energy %.3g, %ld buckets\n",
                a.method.c_str(), a.world_size, synthetic ? "SYNTHETIC CIFAR-100-shaped data (no --data given)" : ("CIFAR-100 from " + a.data).c_str(),
                a.batch, a.warmup, a.sample, a.compress, a.energy, long(sync.num_buckets()));
  }
  double step_ms_sum = 0, agg_ms_sum = 0, loss_sum = 0;
  int64_t bytes_sum = 0;
  int window = 0;
  for (int it = start; it < start + a.iters; ++it) {
    auto [x, y] = next_batch();
    const auto t0 = std::chrono::steady_clock::now();
    opt.zero_grad();
    if (it == a.die_at && a.rank == a.die_rank) {
      // Mid-step: the head's gradient is the first one backward produces; the other ranks are in the step too.
      const int sig = a.die_signal == "stop" ? SIGSTOP : SIGKILL;
      model->fc->weight.register_hook([sig](const torch::Tensor&) { ::kill(::getpid(), sig); });
    }
    torch::Tensor loss = F::cross_entropy(model->forward(x), y);
    loss.backward();
    sync.synchronize();
    opt.step();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const auto st = sync.engine().step_stats();
    step_ms_sum += ms, agg_ms_sum += st.aggregation_ms, bytes_sum += st.bytes_payload, loss_sum += loss.item<double>();
    ++window;
    if (a.rank == 0 && ((it + 1) % a.log_every == 0 || it + 1 == start + a.iters)) {
      std::printf("iter %5d  phase %-10s  loss %.3f  step %7.1f ms  aggregation %7.1f ms  sent %8.1f KB/step  "
                  "(uncompressed %.1f KB)\n",
                  it + 1, st.phase.c_str(), loss_sum / window, step_ms_sum / window, agg_ms_sum / window,
                  double(bytes_sum) / window / 1e3, double(st.bytes_uncompressed) / 1e3);
      std::fflush(stdout);
      step_ms_sum = agg_ms_sum = loss_sum = 0, bytes_sum = 0, window = 0;
    }
  }
  if (!a.save.empty()) save_checkpoint(a, model, sync);
  finish(a, model, sync, synthetic ? nullptr : &test_split);
  return 0;
}

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  try {
    if (a.rank < 0) return launch(argc, argv, a);
    return train(a);
  } catch (const std::exception& e) {
    std::cerr << "train_resnet32 (rank " << a.rank << "): " << e.what() << "\n";
    return 1;
  }
}
