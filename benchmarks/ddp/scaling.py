"""Aggregation at 2-16 ranks on an emulated cluster (cluster.py): a shaped link per node, real DDP, real hooks.

Every method aggregates real ResNet-32 gradients recorded once from Fashion-MNIST training (images padded to
32x32): the compute of a training step is replaced by replaying them, so that 16 ranks fit on 2 cores while DDP,
its buckets and every hook run exactly as in training. A replayed step is a backward through one autograd
function that hands each parameter its recorded gradient (rank r at step s takes recorded batch (r + N s) mod G,
G = 101), so a step's wall time is its aggregation: the hook's codec, the collectives and DDP's bucket handling.

Per method and world size: the median (and 10th-90th percentile) wall time of the timed steps on rank 0, the
bytes each node's link carried per step (its eth0 tx and rx counters, read at barriers before and after the
timed steps; mean and max over nodes), the CPU time each rank's process spent per step (all its threads: the
hook, Gloo, DDP; median over ranks), the share of the machine's cores busy during the timed steps (from
/proc/stat: near 100% means the ranks queued for the 2 cores, so the row measures this machine's CPU, not the
network) and the hook's codec time (this library's methods report it). After the methods, a probe times bare
collectives at that world size with nothing else running (a 4-byte and a 1 MiB all-reduce, a 4-byte and a
256 KiB all-gather): the network's latency and bandwidth as the ranks see them, for scaling_model.py. Warm-up steps
first bring every method into its steady state: GradiVeQ compressed (schedule 2 / 50 / 10^6: bases fitted on a
50-step window, which is not timed; accuracy.py measures whole runs), PowerSGD past start_powerSGD_iter = 2.

    python benchmarks/ddp/scaling.py --ranks 2,4,8,16 --mbit 100
    python benchmarks/ddp/scaling.py --train --ranks 2,4 --methods nocomm,plain,...   # full training steps
    python benchmarks/ddp/scaling.py --quick      # 2 ranks, 3 methods, a few steps: what the tests run

--train replaces the replay by real training steps (ResNet-32 on Fashion-MNIST, batch 64 per rank, forward,
backward, SGD): with "nocomm" (DDP with a hook that sends nothing) among the methods, a method's step less
nocomm's is the aggregation a training step leaves exposed, to set beside the replayed aggregation.

Without root (or ip / tc) it says so and runs on the shared loopback, unshaped.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cluster import EmulatedCluster, link_bytes, node_address, unavailable  # noqa: E402
from methods import HelpFormatter, Method, ddp_kwargs, free_port  # noqa: E402
from models import resnet32  # noqa: E402

ALL_METHODS = ["plain", "bf16", "powersgd1", "powersgd2", "qsgd4", "co3", "casq2", "gradiveq-paper", "gradiveq"]
# GradiVeQ fits on a 50-step window of aggregated gradients, as in accuracy.py's runs (warm-up 100, sampling 50), so
# its d per layer is what training gives; the window is not timed.
GRADIVEQ_SCHEDULE = (2, 50, 10 ** 6)
# Recorded batches: a prime number, so that the windows rank r + N s (mod G) of the 50 sampled steps are 50
# different sums of N batches at every N <= 16, as the aggregates of 50 real steps would be.
RECORDED_BATCHES = 101
QUICK_RECORDING = dict(count=13, pretrain_steps=5)  # --quick: enough to run the code paths, not to measure


# --- recording -------------------------------------------------------------------------------------------------

def record_gradients(path, count=RECORDED_BATCHES, batch=64, pretrain_steps=200, seed=0):
    """ResNet-32 (10 classes, 1 channel) trained `pretrain_steps` SGD steps on Fashion-MNIST, then the gradients
    of `count` further batches at that point: what a training step's backward would hand DDP."""
    from datasets import load_fashion_mnist
    (x, y), _ = load_fashion_mnist()
    x = F.pad(x, (2, 2, 2, 2))
    torch.manual_seed(seed)
    model = resnet32(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for step in range(pretrain_steps + count):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if step < pretrain_steps:
            opt.step()
        else:
            grads.append([p.grad.detach().clone() for p in model.parameters()])
    torch.save(dict(names=[n for n, _ in model.named_parameters()], grads=grads, pretrain_steps=pretrain_steps,
                    batch=batch), path)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source, *params):
        ctx.grads = source.current
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return (None, *[g.clone() for g in ctx.grads])


class ReplayModel(torch.nn.Module):
    """ResNet-32's parameters (same names, shapes and order, so DDP forms the same buckets) whose backward hands
    each parameter a recorded gradient."""

    def __init__(self, recorded):
        super().__init__()
        self.net = resnet32(num_classes=10, in_channels=1)
        self.recorded = recorded["grads"]
        self.current = None

    def forward(self, batch_index):
        self.current = self.recorded[batch_index % len(self.recorded)]
        return _Replay.apply(self, *self.parameters())


# --- one rank --------------------------------------------------------------------------------------------------

def machine_jiffies():
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat is not per network namespace)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class TrainingSteps:
    """Real training steps: ResNet-32 on Fashion-MNIST (padded to 32x32), batch 64 per rank, SGD."""

    def __init__(self, rank, batch=64):
        from datasets import load_fashion_mnist
        (x, y), _ = load_fashion_mnist()
        self.x, self.y, self.batch = F.pad(x, (2, 2, 2, 2)), y, batch
        self.gen = torch.Generator().manual_seed(1000 + rank)

    def model(self):
        torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
        model = resnet32(num_classes=10, in_channels=1)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model

    def step(self, ddp, _):
        idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=self.gen)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(self.x[idx]), self.y[idx]).backward()
        self.optimizer.step()


class ReplaySteps:
    """Replayed steps: rank r at step s takes recorded batch r + N s (mod G)."""

    def __init__(self, recorded, rank, world):
        self.recorded, self.rank, self.world = recorded, rank, world

    def model(self):
        return ReplayModel(self.recorded)

    def step(self, ddp, s):
        ddp(self.rank + self.world * s).backward()


# Per-step numbers Method.measure() reports, with the value recorded for a method that does not report one.
REPORTED = {"codec": float("nan"), "compress": float("nan"), "decompress": float("nan"), "collectives": 0,
            "buckets": 0}


def time_method(name, steps_source, rank, world, warm, steps):
    if name.startswith("gradiveq"):  # into the compressed phase, past the fit
        warm = max(warm, sum(GRADIVEQ_SCHEDULE[:2]) + 3)
    model = steps_source.model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(name))
    method = Method(ddp, model, name, seed=0, schedule=GRADIVEQ_SCHEDULE, powersgd_start_iter=2)
    step_s, cpu_s, reported = [], [], {key: [] for key in REPORTED}
    for s in range(warm + steps):
        if s == warm:
            dist.barrier()
            before = link_bytes() if os.environ.get("GRADIVEQ_NETNS") else (0, 0)
            jiffies_before = machine_jiffies()
        method.before_step()
        start, cpu_start = time.perf_counter(), time.process_time()
        steps_source.step(ddp, s)
        if s >= warm:
            step_s.append(time.perf_counter() - start)
            cpu_s.append(time.process_time() - cpu_start)
            row = method.measure(world)
            for key, missing in REPORTED.items():
                reported[key].append(row.get(key, missing))
    jiffies_after = machine_jiffies()
    dist.barrier()
    after = link_bytes() if os.environ.get("GRADIVEQ_NETNS") else (0, 0)
    conv_ratio = method.state.stats()["summary"].get("conv_ratio") if name.startswith("gradiveq") else None
    method.close()
    busy = (jiffies_after[0] - jiffies_before[0]) / max(1, jiffies_after[1] - jiffies_before[1])
    return dict(method=name, step_s=step_s, cpu_s=cpu_s, reported=reported,
                tx=(after[0] - before[0]) / steps, rx=(after[1] - before[1]) / steps, conv_ratio=conv_ratio,
                machine_busy=busy)


# Bare collectives timed by probe_collectives(): (name, collective, float32 elements per rank).
PROBES = [("all_reduce_4B", "all_reduce", 1), ("all_reduce_1MiB", "all_reduce", 1 << 18),
          ("all_gather_4B", "all_gather", 1), ("all_gather_256KiB", "all_gather", 1 << 16)]


def probe_collectives(world, repeats):
    """Median seconds of each bare collective in PROBES on this rank, each one started right after a barrier."""
    out = {}
    for name, kind, numel in PROBES:
        t = torch.zeros(numel)
        gathered = [torch.empty_like(t) for _ in range(world)]
        times = []
        for i in range(repeats + 2):  # two unmeasured: Gloo sets up its pairs' buffers on first use
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t) if kind == "all_reduce" else dist.all_gather(gathered, t)
            if i >= 2:
                times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def rank_main(args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=args.pg_timeout))
    if args.train:
        source = TrainingSteps(args.rank)
    else:
        source = ReplaySteps(torch.load(args.gradients), args.rank, args.world)
    rows = []
    for name in args.methods:
        rows.append(time_method(name, source, args.rank, args.world, args.warm, args.steps))
    probe = probe_collectives(args.world, args.probe_repeats)
    gathered = [None] * args.world
    dist.all_gather_object(gathered, rows)
    if args.rank == 0:
        with open(args.result, "w") as f:
            json.dump(dict(ranks=gathered, probe=probe), f)
    dist.destroy_process_group()
    os._exit(0)


# --- driver ----------------------------------------------------------------------------------------------------

def rank_argv(args, world, rank, master, port, result):
    return [sys.executable, os.path.abspath(__file__), "--rank", str(rank), "--world", str(world), "--master", master,
            "--port", str(port), "--result", result, "--gradients", args.gradients, "--methods", ",".join(args.methods),
            "--warm", str(args.warm), "--steps", str(args.steps), "--pg-timeout", str(args.pg_timeout),
            "--probe-repeats", str(args.probe_repeats)] + (["--train"] if args.train else [])


def wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes


def run_world(args, world, result):
    """All ranks of one world size, each in its own node of an emulated cluster (or on the loopback)."""
    port = free_port()
    if args.loopback:
        procs = [subprocess.Popen(rank_argv(args, world, r, "127.0.0.1", port, result)) for r in range(world)]
        return wait_all(procs, args.run_timeout)
    with EmulatedCluster(world, mbit=args.mbit) as cluster:
        procs = [subprocess.Popen(cluster.exec_argv(r, rank_argv(args, world, r, node_address(0), port, result)),
                                  env=cluster.env(r)) for r in range(world)]
        return wait_all(procs, args.run_timeout)


def median_ms(seconds):
    """The median in ms of the values that are not NaN (a method that does not report them), or None."""
    kept = [v for v in seconds if v == v]
    return 1e3 * statistics.median(kept) if kept else None


def summarise(world, result):
    gathered, rows = result["ranks"], []
    for i, name in enumerate(r["method"] for r in gathered[0]):
        per_rank = [g[i] for g in gathered]
        steps = sorted(per_rank[0]["step_s"])
        q = statistics.quantiles(steps, n=10) if len(steps) >= 2 else [steps[0]] * 9
        reported = per_rank[0]["reported"]
        rows.append(dict(method=name, world=world, median_ms=1e3 * statistics.median(steps), p10_ms=1e3 * q[0],
                         p90_ms=1e3 * q[-1], tx_kb_mean=statistics.mean(r["tx"] for r in per_rank) / 1e3,
                         tx_kb_max=max(r["tx"] for r in per_rank) / 1e3,
                         rx_kb_mean=statistics.mean(r["rx"] for r in per_rank) / 1e3,
                         cpu_ms=1e3 * statistics.median(statistics.median(r["cpu_s"]) for r in per_rank),
                         machine_busy=statistics.mean(r["machine_busy"] for r in per_rank),
                         collectives=statistics.median(reported["collectives"]),
                         buckets=statistics.median(reported["buckets"]),
                         codec_ms=median_ms(reported["codec"]), compress_ms=median_ms(reported["compress"]),
                         decompress_ms=median_ms(reported["decompress"]),
                         conv_ratio=per_rank[0]["conv_ratio"]))
    return rows, dict(world=world, **{k: 1e3 * v for k, v in result["probe"].items()})


def report(args, rows, probes, out_dir, tag):
    link = "shared loopback, unshaped" if args.loopback else f"{args.mbit:g} Mbit/s per node, each way"
    what = "Training steps of ResNet-32" if args.train else "Aggregation of ResNet-32's gradients"
    lines = [f"# {what} at {', '.join(map(str, args.ranks))} ranks ({link})", "",
             f"Command: `python benchmarks/ddp/scaling.py {' '.join(sys.argv[1:])}`  ",
             f"Date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
             f"{os.cpu_count()} CPU cores shared by all ranks. {args.warm} warm-up steps, {args.steps} timed steps "
             "per method. CPU ms: each rank's process CPU time per step (all threads), median over ranks; busy: "
             "the share of the machine's cores in use during the timed steps.", "",
             "| method | ranks | step median ms | p10-p90 ms | CPU ms/rank | busy | codec ms (rank 0) | "
             "tx KB/step/node mean | max | rx KB/step/node mean | conv ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        codec = f"{r['codec_ms']:.1f}" if r["codec_ms"] is not None else "-"
        ratio = f"{r['conv_ratio']:.1f}" if r["conv_ratio"] else "-"
        lines.append(f"| {r['method']} | {r['world']} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
                     f"{r['cpu_ms']:.1f} | {100 * r['machine_busy']:.0f}% | {codec} | {r['tx_kb_mean']:.1f} | "
                     f"{r['tx_kb_max']:.1f} | {r['rx_kb_mean']:.1f} | {ratio} |")
    lines += ["", "Bare collectives, rank 0, median of " + f"{args.probe_repeats} (ms):", "",
              "| ranks | " + " | ".join(name for name, _, _ in PROBES) + " |", "|---|" + "---|" * len(PROBES)]
    lines += [f"| {p['world']} | " + " | ".join(f"{p[name]:.2f}" for name, _, _ in PROBES) + " |" for p in probes]
    if args.train:
        lines += ["", *exposed_table(rows)]
    path = os.path.join(out_dir, f"{tag}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump(dict(args={k: v for k, v in vars(args).items() if k != "func"}, rows=rows, probes=probes), f,
                  indent=1)
    plot(rows, os.path.join(out_dir, f"{tag}.png"), link, args.train)
    return path


def exposed_table(rows):
    """A training step less nocomm's (the compute floor) at the same world size: the exposed aggregation. nocomm
    may run more than once (first and last, say): the floor is the mean of its medians, and their spread shows
    how far the machine drifted during the run."""
    floors = {}
    for r in rows:
        if r["method"] == "nocomm":
            floors.setdefault(r["world"], []).append(r["median_ms"])
    lines = ["Exposed aggregation: step median less nocomm's at the same ranks (ms). nocomm medians: "
             + "; ".join(f"{n} ranks {', '.join(f'{v:.1f}' for v in vs)}" for n, vs in floors.items()) + ".", "",
             "| method | ranks | exposed ms |", "|---|---|---|"]
    for r in rows:
        if r["method"] != "nocomm" and r["world"] in floors:
            floor = statistics.mean(floors[r["world"]])
            lines.append(f"| {r['method']} | {r['world']} | {r['median_ms'] - floor:.1f} |")
    return lines


def plot(rows, path, link, train=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        ax.plot([r["world"] for r in mine], [r["median_ms"] for r in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks (nodes)")
    ax.set_ylabel(("training" if train else "aggregation") + " time per step, median (ms)")
    ax.set_title(f"ResNet-32 {'training steps' if train else 'gradients'}, {link}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def drive(args):
    os.makedirs(args.out, exist_ok=True)
    why = unavailable()
    args.loopback = args.loopback or why is not None
    if why:
        print(f"no emulated cluster ({why}): running on the shared loopback, UNSHAPED", flush=True)
    if not args.train and not os.path.exists(args.gradients):
        print(f"recording ResNet-32 gradients into {args.gradients}", flush=True)
        record_gradients(args.gradients, **(QUICK_RECORDING if args.quick else {}))
    rows, probes = [], []
    for world in args.ranks:
        result = os.path.join(args.out, f"{args.tag}_{world}.raw.json")
        codes = run_world(args, world, result)
        if any(c != 0 for c in codes):
            raise SystemExit(f"{world} ranks: rank exit codes {codes} (None: killed at --run-timeout)")
        with open(result) as f:
            world_rows, probe = summarise(world, json.load(f))
        os.remove(result)
        rows += world_rows
        probes.append(probe)
        for r in world_rows:
            print(f"  {world:>2} ranks {r['method']:>15}: {r['median_ms']:8.1f} ms/step, "
                  f"CPU {r['cpu_ms']:6.1f} ms/rank, busy {100 * r['machine_busy']:3.0f}%, "
                  f"tx {r['tx_kb_mean']:8.1f} KB/step/node", flush=True)
        print(f"  {world:>2} ranks probe: " + ", ".join(f"{k} {v:.2f} ms" for k, v in probe.items() if k != "world"))
    print("results:", report(args, rows, probes, args.out, args.tag))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 8, 16])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=ALL_METHODS)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--loopback", action="store_true", help="no emulated cluster: all ranks on 127.0.0.1")
    ap.add_argument("--gradients", default=os.path.join(ROOT, "build", "resnet32_fashion_gradients.pt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "benchmarks"))
    ap.add_argument("--tag", default="scaling")
    ap.add_argument("--run-timeout", type=float, default=1200.0)
    ap.add_argument("--pg-timeout", type=float, default=300.0)
    ap.add_argument("--train", action="store_true", help="real training steps instead of replayed gradients")
    ap.add_argument("--probe-repeats", type=int, default=20, help="timed repeats of each bare collective")
    ap.add_argument("--quick", action="store_true",
                    help="2 ranks, plain / powersgd2 / gradiveq, a few steps, gradients of a short recording")
    for hidden in ("--rank", "--world", "--port", "--master", "--result"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_repeats < 1:
        ap.error(f"argument --probe-repeats: must be >= 1, got {args.probe_repeats}")
    if args.rank is not None:
        args.rank, args.world, args.port = int(args.rank), int(args.world), int(args.port)
        return rank_main(args)
    if args.quick:
        args.ranks, args.warm, args.steps, args.probe_repeats = [2], 4, 3, 3
        if "--methods" not in sys.argv:
            args.methods = ["plain", "powersgd2", "gradiveq"]
        if "--gradients" not in sys.argv:
            args.gradients = os.path.join(ROOT, "build", "resnet32_fashion_gradients_quick.pt")
        args.run_timeout, args.pg_timeout = min(args.run_timeout, 300.0), min(args.pg_timeout, 120.0)
    drive(args)


if __name__ == "__main__":
    main()
