"""ResNet-32 / CIFAR-100 data-parallel benchmark: GradiVeQ against plain all-reduce, fp16, PowerSGD and QSGD.

Starts W local ranks itself (or runs under torchrun), trains the CIFAR ResNet-32 with each method in turn, and
reports per method: median / p90 step time, exposed aggregation (step minus the no-communication floor),
aggregation time (bucket handed to the hook -> its future completed, summed per step), bytes sent per step per
rank, compression ratio, loss, and test accuracy when real CIFAR-100 is given.

    python benchmarks/ddp/resnet32_cifar100.py --bandwidth-mbit 50            # the demo setting (needs root to shape)
    python benchmarks/ddp/resnet32_cifar100.py --methods plain,gradiveq --iters 30 --bandwidth-mbit 0
    torchrun --nproc-per-node 2 benchmarks/ddp/resnet32_cifar100.py --methods plain,gradiveq

--bandwidth-mbit R runs all ranks in a network namespace whose loopback is shaped to R Mbit/s with tc tbf. All
ranks then share ONE link, so the ring all-reduce floor printed is N x (bytes each rank sends) / R.
Without --data DIR (CIFAR-100 binary: train.bin, test.bin) the data are SYNTHETIC, and every output says so.
"""

import argparse
import datetime
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data import SyntheticCifar100  # noqa: E402
from datasets import CIFAR100_MEAN, CIFAR100_STD, read_cifar100_bin  # noqa: E402
from models import resnet32  # noqa: E402
from methods import (HelpFormatter, GRADIVEQ_CONFIGS, QUANTIZER_METHODS, TORCH_METHODS, Method, add_gradiveq_config,  # noqa: E402
                     ddp_kwargs, free_port, run_rank_process, shaped_rerun)

ALL_METHODS = TORCH_METHODS + list(QUANTIZER_METHODS) + list(GRADIVEQ_CONFIGS)
PAPER_SCHEDULE = (2500, 100, 400)


# ---------------------------------------------------------------------------------------------------------
class Data:
    def __init__(self, args, rank, world):
        self.synthetic = args.data is None
        self.batch = args.batch
        if self.synthetic:
            self.stream = SyntheticCifar100(args.batch, seed=args.seed, rank=rank)
            self.test = None
            return
        images, labels, _ = read_cifar100_bin(os.path.join(args.data, "train.bin"))
        self.images, self.labels = images[rank::world], labels[rank::world]
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        self.order, self.pos = torch.randperm(len(self.labels), generator=self.gen), 0
        timages, tlabels, _ = read_cifar100_bin(os.path.join(args.data, "test.bin"))
        self.test = (self._norm(timages), tlabels)

    @staticmethod
    def _norm(images):
        mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def batch_(self):
        if self.synthetic:
            return self.stream.batch()
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.labels), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        x = self._norm(self.images[idx])
        if torch.rand(1, generator=self.gen).item() < 0.5:  # random horizontal flip
            x = x.flip(3)
        return x, self.labels[idx]


def _scaled_schedule(args):
    """GradiVeQ's schedule: --schedule W,S,C, else the paper's 2500/100/400 x --schedule-scale (at least 2 sampling
    iterations, since a fit needs 2 samples)."""
    if args.schedule:
        return tuple(args.schedule)
    w, s, c = (max(1, round(v * args.schedule_scale)) for v in PAPER_SCHEDULE)
    return w, max(2, s), c


def run_method(rank, world, args, method):
    """Trains `method` for its warm-up + args.iters steps on this rank; returns rank 0's measurements."""
    torch.manual_seed(args.seed)
    model = resnet32()
    ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(method, args.bucket_cap_mb))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.5 * args.total), int(0.75 * args.total)])
    m = Method(ddp, model, method, seed=args.seed, schedule=_scaled_schedule(args),
               coeff_dtype=getattr(torch, args.coeff_dtype) if args.coeff_dtype else None)
    # When did backward compute its last gradient? backward() returns only after DDP has waited for every bucket's
    # future, so (return - last gradient) is the aggregation that backward's compute did not hide: the "tail".
    last_grad = [0.0]

    def grad_ready(_param):
        last_grad[0] = time.perf_counter()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(grad_ready)
    # Measure each method in its steady state: after PowerSGD's uncompressed start and GradiVeQ's warm-up.
    warmup_steps = max(args.warmup_steps, m.warmup_steps)
    data = Data(args, rank, world)
    steps = warmup_steps + args.iters
    rows = []
    progress = None
    if rank == 0 and not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=steps, desc=f"{method:>10}", leave=False, file=sys.stderr, disable=None)
        except ImportError:
            progress = None
    compressed_summary, layers_after_fit = None, None
    t_start = time.perf_counter()
    for step in range(steps):
        x, y = data.batch_()
        m.before_step()
        if args.barrier:
            dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(x), y)
        t_backward = time.perf_counter()
        loss.backward()
        t_returned = time.perf_counter()
        opt.step()
        sched.step()
        t1 = time.perf_counter()
        row = dict(step=step, time=t1 - t0, wall=t1 - t_start, loss=loss.item(), backward=last_grad[0] - t_backward,
                   tail=t_returned - last_grad[0])
        row.update(m.measure(world))
        rows.append(row)
        if method.startswith("gradiveq") and row["phase"] == "compressed":
            st = m.state.stats()
            compressed_summary = st["summary"]  # conv bytes of a compressed step, not of a sampling one
            if layers_after_fit is None:
                layers_after_fit = {n: {k: v[k] for k in ("K", "d", "ratio", "explained_variance", "basis_bytes")}
                                    for n, v in st["layers"].items() if v["compressible"]}
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    m.close()

    result = dict(method=method, rows=rows, warmup_steps=warmup_steps, synthetic=data.synthetic)
    if method.startswith("gradiveq"):
        result["gradiveq"] = dict(summary=compressed_summary or m.state.stats()["summary"],
                                  schedule=_scaled_schedule(args), layers_after_fit=layers_after_fit or {},
                                  coeff_dtype=m.state.options["coeff_dtype"])
    if data.test is not None:
        result["test_accuracy"] = evaluate(model, *data.test)
    return result


@torch.no_grad()
def evaluate(model, images, labels, batch=500):
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------------------
# Launching: W local ranks per method (fresh processes, so no state leaks between methods), or torchrun.
def _rank_entry(rank, world, port, args, method, out_path):
    torch.set_num_threads(args.threads)
    for spec in args.config:  # a spawned process starts from the module's own configurations
        add_gradiveq_config(spec)

    def body():
        result = run_method(rank, world, args, method)
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump(result, f)
    run_rank_process(rank, world, port, args.timeout, body)


def run_all_local(args):
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for method in args.methods:
                out = os.path.join(tmp, f"{method}_{rep}.pkl")
                mp.start_processes(_rank_entry, args=(args.world_size, free_port(), args, method, out),
                                   nprocs=args.world_size, start_method="spawn")
                with open(out, "rb") as f:
                    res = pickle.load(f)
                res["repeat"] = rep
                results.append(res)
                print(f"  {summarize(res, args)['line']}", flush=True)
    return results


def run_all_torchrun(args):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    args.world_size = world
    results = []
    for rep in range(args.repeats):
        for method in args.methods:
            res = run_method(rank, world, args, method)
            res["repeat"] = rep
            results.append(res)
            if rank == 0:
                print(f"  {summarize(res, args)['line']}", flush=True)
    dist.destroy_process_group()
    return results if rank == 0 else None


# ---------------------------------------------------------------------------------------------------------
def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def summarize(res, args):
    rows = res["rows"][res["warmup_steps"]:]
    times = [r["time"] for r in rows]
    s = dict(method=res["method"], median=statistics.median(times), p90=_pct(times, 0.9), mean=statistics.mean(times),
             agg=statistics.median([r["agg"] for r in rows]), bytes=statistics.mean([r["bytes"] for r in rows]),
             wire=statistics.mean([r["wire"] for r in rows]), uncompressed=rows[0]["uncompressed"],
             loss=statistics.mean([r["loss"] for r in rows[-10:]]), steps=len(rows),
             backward=statistics.median(r["backward"] for r in rows), tail=statistics.median(r["tail"] for r in rows),
             buckets=statistics.median(r["buckets"] for r in rows))
    s["ratio"] = s["uncompressed"] / s["bytes"] if s["bytes"] else float("inf")
    if res["method"].startswith("gradiveq"):
        by_phase = {}
        for r in rows:
            by_phase.setdefault(r["phase"], []).append(r["time"])
        s["phase_median"] = {p: statistics.median(v) for p, v in by_phase.items()}
        s["codec"] = statistics.median([r["codec"] for r in rows if r["phase"] == "compressed"] or [0.0])
    if "compress" in rows[0]:  # our hooks: where the aggregation time goes (medians over the measured steps)
        s["compress"] = statistics.median(r["compress"] for r in rows)
        s["decompress"] = statistics.median(r["decompress"] for r in rows)
        s["fit"] = statistics.mean(r["fit"] for r in rows)  # once per window: amortised over the steps
    if "bits_per_element" in rows[0]:  # CO3 / CASQ
        s["bits_per_element"] = statistics.median(r["bits_per_element"] for r in rows)
        s["relative_error"] = statistics.median(r["relative_error"] for r in rows)
        s["codec"] = statistics.median(r["codec"] for r in rows)
    if "test_accuracy" in res:
        s["test_accuracy"] = res["test_accuracy"]
    s["line"] = (f"{s['method']:>10}: step median {1e3 * s['median']:7.1f} ms (p90 {1e3 * s['p90']:7.1f}), "
                 f"aggregation {1e3 * s['agg']:7.1f} ms, {s['bytes'] / 1e3:8.1f} KB/step/rank, ratio {s['ratio']:6.1f}, "
                 f"loss {s['loss']:.3f}")
    if "bits_per_element" in s:
        s["line"] += f", {s['bits_per_element']:.2f} bits/value, rel. error {s['relative_error']:.3f}"
    return s


def report(results, args):
    per_method = {}
    for res in results:
        per_method.setdefault(res["method"], []).append(summarize(res, args))
    def med(method, key):
        return statistics.median(x[key] for x in per_method[method])
    floor = med("nocomm", "median") if "nocomm" in per_method else None
    plain = med("plain", "median") if "plain" in per_method else None
    bw = args.bandwidth_mbit_effective
    synthetic = results[0]["synthetic"]
    lines = []
    title = (f"ResNet-32, {'SYNTHETIC CIFAR-100-shaped data' if synthetic else 'CIFAR-100'}, {args.world_size} ranks, "
             f"batch {args.batch}/rank, Gloo, {args.threads} thread(s)/rank, "
             f"{'link shaped to %g Mbit/s, tbf burst %d KB (one loopback shared by all ranks)' % (bw, args.burst_kb) if bw else 'unshaped loopback'}, "
             f"{args.iters} measured steps x {args.repeats} repeat(s)")
    lines.append(f"# {title}\n")
    lines.append(f"Command: `{args.command}`  \nDate: {datetime.datetime.now().isoformat(timespec='seconds')}, "
                 f"torch {torch.__version__}\n")
    header = ("| method | step median ms | p90 ms | spread of medians ms | exposed ms | x plain | aggregation ms | "
              "KB/step/rank | ratio | link floor ms | buckets | backward tail ms | loss (last 10) |")
    lines.append(header)
    lines.append("|---" * (header.count("|") - 1) + "|")
    for method in args.methods:
        if method not in per_method:
            continue
        xs = per_method[method]
        m = med(method, "median")
        spread = f"{1e3 * min(x['median'] for x in xs):.0f}-{1e3 * max(x['median'] for x in xs):.0f}"
        exposed = f"{1e3 * (m - floor):.0f}" if floor is not None else "-"
        vs_plain = f"{m / plain:.2f}" if plain else "-"
        link_floor = f"{1e3 * args.world_size * med(method, 'wire') * 8 / (bw * 1e6):.0f}" if bw else "-"
        lines.append(f"| {method} | {1e3 * m:.0f} | {1e3 * med(method, 'p90'):.0f} | {spread} | {exposed} | {vs_plain} | "
                     f"{1e3 * med(method, 'agg'):.0f} | {med(method, 'bytes') / 1e3:.1f} | {med(method, 'ratio'):.1f} | "
                     f"{link_floor} | {med(method, 'buckets'):.0f} | {1e3 * med(method, 'tail'):.0f} | "
                     f"{med(method, 'loss'):.3f} |")
    for name in [m for m in args.methods if m.startswith("gradiveq") and m in per_method]:
        g = per_method[name][0]
        res = next(r for r in results if r["method"] == name)
        w, s_, c = res["gradiveq"]["schedule"]
        summ = res["gradiveq"]["summary"]
        lines.append("")
        lines.append(f"{name}: schedule warm-up {w} / sampling {s_} / compressed {c} (paper: 2500/100/400); "
                     f"coefficients {res['gradiveq']['coeff_dtype']}; median step by phase: " +
                     ", ".join(f"{p} {1e3 * v:.0f} ms" for p, v in g["phase_median"].items()) +
                     f"; codec {1e3 * g['codec']:.1f} ms per compressed step (median over all measured steps: "
                     f"compress {1e3 * statistics.median(x['compress'] for x in per_method[name]):.1f} ms, decompress "
                     f"{1e3 * statistics.median(x['decompress'] for x in per_method[name]):.1f} ms, fits amortised "
                     f"{1e3 * statistics.median(x['fit'] for x in per_method[name]):.1f} ms); conv layers "
                     f"{summ['conv_bytes_in'] / 1e3:.0f} KB -> {summ['conv_bytes_out'] / 1e3:.1f} KB per step "
                     f"in a compressed step (ratio {summ.get('conv_ratio', float('nan')):.1f}); bases "
                     f"{summ['basis_bytes'] / 1e6:.1f} MB.")
        layers = res["gradiveq"]["layers_after_fit"]
        if layers:
            lines += ["", f"{name} per conv layer after the first fit (K = slice length, d = kept components):", "",
                      "| layer | K | d | K/d | explained variance | basis KB |", "|---|---|---|---|---|---|"]
            for n, v in layers.items():
                lines.append(f"| {n} | {v['K']} | {v['d']} | {v['ratio']:.1f} | {v['explained_variance']:.3f} | "
                             f"{v['basis_bytes'] / 1e3:.0f} |")
    for name in [m for m in args.methods if m in per_method and "bits_per_element" in per_method[m][0]]:
        lines.append("")
        lines.append(f"{name}: {med(name, 'bits_per_element'):.2f} bits per encoded value (messages, Huffman "
                     f"table / codebooks included; median step), this rank's relative quantization error "
                     f"{med(name, 'relative_error'):.3f}, codec {1e3 * med(name, 'codec'):.1f} ms per step; parameters "
                     f"under 1000 values travel as float32.")
    if any("test_accuracy" in x for xs in per_method.values() for x in xs):
        lines.append("")
        lines.append("Test accuracy: " + ", ".join(f"{m} {statistics.median(x['test_accuracy'] for x in xs):.4f}"
                                                   for m, xs in per_method.items() if "test_accuracy" in xs[0]))
    lines.append("")
    lines.append("Columns: step = forward + backward (with aggregation) + optimizer step on rank 0, after each "
                 "method's warm-up; exposed = step - no-communication step (aggregation time compute did not hide); "
                 "aggregation = sum over buckets of (bucket handed to the hook -> its future completed), median "
                 "step; KB = payload this rank put into collectives; link floor = N x ring bytes per rank / "
                 "bandwidth (all ranks share one shaped link); buckets = buckets DDP handed to the hook per step; "
                 "backward tail = backward()'s return minus the moment its last gradient was accumulated (median "
                 "step): the aggregation that backward's own compute did not hide (the rest ran beside it).")
    text = "\n".join(lines) + "\n"
    return text, per_method


def plot(results, per_method, args, path_prefix):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return []
    methods = [m for m in args.methods if m in per_method]
    fig, ax = plt.subplots(figsize=(8, 4))
    meds = [1e3 * statistics.median(x["median"] for x in per_method[m]) for m in methods]
    lo = [1e3 * min(x["median"] for x in per_method[m]) for m in methods]
    hi = [1e3 * max(x["p90"] for x in per_method[m]) for m in methods]
    ax.bar(methods, meds, yerr=[[a - b for a, b in zip(meds, lo)], [b - a for a, b in zip(meds, hi)]],
           capsize=4, color=["#999999" if m in ("nocomm", "plain") else "#cc3311" if m.startswith("gradiveq") else "#4477aa"
                             for m in methods])
    ax.set_ylabel("step time, ms\n(median; whiskers: min median .. max p90)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")  # many method names side by side must not overlap
    bw = args.bandwidth_mbit_effective
    ax.set_title(f"ResNet-32, {args.world_size} ranks, {'%g Mbit/s' % bw if bw else 'unshaped'}"
                 f"{', synthetic data' if results[0]['synthetic'] else ''}")
    fig.tight_layout()
    bars = path_prefix + "_steptime.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for m in methods:
        res = next(r for r in results if r["method"] == m)
        ax.plot([r["wall"] for r in res["rows"]], [r["loss"] for r in res["rows"]], label=m, lw=1)
    ax.set_xlabel("wall-clock time, s")
    ax.set_ylabel("training loss (rank 0)")
    ax.legend()
    fig.tight_layout()
    curves = path_prefix + "_loss.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    pngs = [bars, curves]
    if "nocomm" in per_method:
        pngs.append(plot_breakdown(per_method, methods, args, path_prefix + "_breakdown.png", plt))
    return pngs


def plot_breakdown(per_method, methods, args, path, plt):
    """Stacked bars: each method's median step split into the no-communication step (compute), the codec work
    our hooks report (compress in the hook call, decompress in the callbacks; they may overlap backward), basis
    fits amortised over the steps, and the rest of the exposed time (transfer, waiting for the slowest rank or
    bucket, and, for torch's hooks, their codec)."""
    def med(m, key):
        return statistics.median(x.get(key, 0.0) for x in per_method[m]) * 1e3
    floor = med("nocomm", "median")
    parts = {"compute (no-comm step)": [], "compress": [], "decompress": [], "basis fits (amortised)": [],
             "transfer and waiting": []}
    shown = [m for m in methods if m != "nocomm"]
    for m in shown:
        codec = [med(m, "compress"), med(m, "decompress"), med(m, "fit")]
        rest = max(0.0, med(m, "median") - floor - sum(codec))
        for key, v in zip(parts, [min(floor, med(m, "median"))] + codec + [rest]):
            parts[key].append(v)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(shown)
    colors = ["#bbbbbb", "#ee7733", "#cc3311", "#aa3377", "#4477aa"]
    for (label, values), color in zip(parts.items(), colors):
        ax.bar(shown, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per step (medians)")
    bw = args.bandwidth_mbit_effective
    ax.set_title(f"Where the step goes: ResNet-32, {args.world_size} ranks, {'%g Mbit/s' % bw if bw else 'unshaped'}")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list from {ALL_METHODS}")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30, help="measured steps per method (after its warm-up)")
    ap.add_argument("--warmup-steps", type=int, default=5, help="unmeasured steps per method")
    ap.add_argument("--repeats", type=int, default=1, help="repeat the whole sweep to report the spread")
    ap.add_argument("--batch", type=int, default=32, help="batch per rank")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--bandwidth-mbit", type=float, default=0, help="shape the loopback (0: unshaped)")
    ap.add_argument("--burst-kb", type=int, default=256,
                    help="tc tbf burst in KB (default 256; must exceed the loopback MTU)")
    ap.add_argument("--mtu", type=int, default=0, help="loopback MTU inside the namespace (0: keep 65536)")
    ap.add_argument("--data", default=None, help="directory with CIFAR-100 binary train.bin / test.bin")
    ap.add_argument("--schedule-scale", type=float, default=0.1,
                    help="GradiVeQ schedule = paper's 2500/100/400 x this (default 0.1: 250/10/40)")
    ap.add_argument("--schedule", default=None, help="GradiVeQ schedule as W,S,C (overrides --schedule-scale)")
    ap.add_argument("--coeff-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="GradiVeQ's coefficient dtype for every configuration (default: each one's own; the "
                         "library's default is float16, the paper's float32)")
    ap.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket cap (default: DDP's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="process group timeout, s")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "benchmark-results"), help="results directory")
    ap.add_argument("--tag", default=None, help="results file name stem")
    ap.add_argument("--barrier", action="store_true", help="barrier before each step (isolates steps)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", default=None, help="also write raw per-step rows here")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                    help='extra GradiVeQ configuration, e.g. gradiveq-p4=\'{"paper": true, "pipeline_chunks": 4}\' '
                         "(then name it in --methods)")
    args = ap.parse_args(argv)
    for spec in args.config:
        try:
            add_gradiveq_config(spec)
        except ValueError as e:
            ap.error(f"argument --config: {e}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.schedule:
        try:
            args.schedule = [int(v) for v in args.schedule.split(",")]
            assert len(args.schedule) == 3 and args.schedule[0] >= 0 and args.schedule[1] >= 2 and args.schedule[2] >= 0
        except (ValueError, AssertionError):
            ap.error(f"argument --schedule: expected W,S,C with W >= 0, S >= 2, C >= 0, got {args.schedule!r}")
    for m in args.methods:
        known = ALL_METHODS + [c for c in GRADIVEQ_CONFIGS if c not in ALL_METHODS]
        if m not in known:
            ap.error(f"argument --methods: unknown method {m!r}; choose from {known}")
    if args.world_size < 2:
        ap.error("argument --world-size: must be >= 2")
    if args.iters < 1 or args.repeats < 1:
        ap.error("arguments --iters and --repeats must be >= 1")
    if args.bandwidth_mbit < 0:
        ap.error("argument --bandwidth-mbit: must be >= 0")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/ddp/resnet32_cifar100.py " + " ".join(argv)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.bandwidth_mbit and not os.environ.get("GRADIVEQ_NETNS") and not under_torchrun:
        rc = shaped_rerun(os.path.abspath(__file__), argv, args.bandwidth_mbit, args.burst_kb, args.mtu)
        if rc is not None:
            return rc
        args.bandwidth_mbit = 0
    args.bandwidth_mbit_effective = args.bandwidth_mbit
    warm, sample, compress = _scaled_schedule(args)
    args.total = max(args.warmup_steps, warm) + args.iters
    data_note = "SYNTHETIC CIFAR-100-shaped data (no --data given)" if args.data is None else f"CIFAR-100 from {args.data}"
    if not under_torchrun:
        print(f"ResNet-32 benchmark: {args.world_size} ranks, {data_note}, "
              f"{'%g Mbit/s shaped loopback' % args.bandwidth_mbit if args.bandwidth_mbit else 'unshaped loopback'}, "
              f"methods {','.join(args.methods)}", flush=True)
        results = run_all_local(args)
    else:
        results = run_all_torchrun(args)
        if results is None:
            return 0
    text, per_method = report(results, args)
    print()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or f"resnet32_{int(args.bandwidth_mbit_effective)}mbit"
    md = os.path.join(args.out, tag + ".md")
    pngs = plot(results, per_method, args, os.path.join(args.out, tag))
    with open(md, "w") as f:
        f.write(text)
        for p in pngs:
            f.write(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    print(f"results: {md}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
