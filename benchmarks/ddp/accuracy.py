"""Accuracy on real data: 2-rank Gloo DDP on Fashion-MNIST, each method against plain all-reduce, over seeds.

Trains the small CNN (three 3x3 convs, 16-32-32 channels, linear head) or ResNet-32 (images padded to 32x32 and
repeated to 3 channels: the real-data stand-in for CIFAR-100, which is not available here) with every method for
the same number of epochs and seeds (model init and data order), and reports test accuracy (mean and spread), the
difference to plain all-reduce, the conv-layer compression ratio, bytes per step, GradiVeQ's held-out relative
error (each compressed step's local loss, eq. 7, on gradients the basis was not fitted on) and the time to reach
a test accuracy, as a markdown table and plots in benchmarks/results/.

    python benchmarks/ddp/accuracy.py --model cnn --methods plain,qsgd4,gradiveq,gradiveq-pooled --seeds 0,1,2
    python benchmarks/ddp/accuracy.py --quick          # tiny subset, what CI runs
"""

import argparse
import datetime
import os
import pickle
import shlex
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

from datasets import FASHION_MNIST_DIR, load_fashion_mnist  # noqa: E402
from models import SmallCNN, resnet32  # noqa: E402
from methods import (HelpFormatter, GRADIVEQ_CONFIGS, QUANTIZER_METHODS, TORCH_METHODS, Method, add_gradiveq_config,  # noqa: E402
                     ddp_kwargs, free_port, run_rank_process, shaped_rerun)


def known_methods():
    return [m for m in TORCH_METHODS if m != "nocomm"] + list(QUANTIZER_METHODS) + list(GRADIVEQ_CONFIGS)


def prepare(images, model_name):
    if model_name == "resnet32":  # 28x28x1 -> 32x32x3
        images = F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return (images - 0.2860) / 0.3530


@torch.no_grad()
def evaluate(model, images, labels, batch=1000):
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(labels), batch))
    model.train()
    return correct / len(labels)


def train_rank(rank, world, args, method, seed, out_path):
    torch.set_num_threads(args.threads)
    for spec in args.config:  # a spawned process starts from the module's own configurations
        add_gradiveq_config(spec)
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(args.data)
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[:args.test_subset], test_y[:args.test_subset]
    train_x, test_x = prepare(train_x, args.model), prepare(test_x, args.model)
    torch.manual_seed(seed)
    model = SmallCNN() if args.model == "cnn" else resnet32(num_classes=10)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(method))
    lr, wd = (0.05, 0.0) if args.model == "cnn" else (0.1, 5e-4)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps_per_epoch = len(train_y) // (args.batch * world)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    m = Method(ddp, model, method, seed=seed, schedule=args.schedule)
    gen = torch.Generator().manual_seed(seed)
    rows, evals, rel_errors, layer_errors = [], [], [], {}
    compressed_ratio = None  # conv-layer ratio of the last compressed step
    t0 = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_y), generator=gen)  # same permutation on every rank: shard it
        for i in range(steps_per_epoch):
            idx = order[(i * world + rank) * args.batch:(i * world + rank + 1) * args.batch]
            m.before_step()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            row = m.measure(world)
            row.update(step=step, loss=loss.item(), wall=time.perf_counter() - t0)
            rows.append(row)
            if rank == 0 and row.get("relative_error", -1) >= 0:  # CO3 / CASQ: the quantization error
                rel_errors.append(row["relative_error"])
            if rank == 0 and method.startswith("gradiveq") and row["phase"] == "compressed":
                layers = m.state.stats()["layers"]
                errs = {n: v["relative_error"] for n, v in layers.items()
                        if v["compressible"] and v["relative_error"] >= 0}
                if errs:
                    rel_errors.append(statistics.mean(errs.values()))
                for n, e in errs.items():
                    layer_errors.setdefault(n, []).append(e)
                compressed_ratio = m.state.stats()["summary"].get("conv_ratio", compressed_ratio)
            if rank == 0 and (step % args.eval_every == 0 or step == total):
                eval_start = time.perf_counter()
                acc = evaluate(model, test_x, test_y)
                t0 += time.perf_counter() - eval_start  # evaluation time does not count as training time
                evals.append(dict(step=step, wall=time.perf_counter() - t0, acc=acc))
    m.close()
    if rank == 0:
        result = dict(method=method, seed=seed, rows=rows, evals=evals, final_acc=evals[-1]["acc"],
                      rel_error=statistics.mean(rel_errors) if rel_errors else None)
        bits = [r["bits_per_element"] for r in rows if "bits_per_element" in r]
        if bits:
            result["bits_per_element"] = statistics.mean(bits)
        if method.startswith("gradiveq"):
            st = m.state.stats()
            result["conv_ratio"] = compressed_ratio
            conv = [v for v in st["layers"].values() if v["compressible"] and v["d"] > 0]
            result["basis_ratio"] = (statistics.median(v["ratio"] for v in conv) if conv else None)
            result["restarts"] = st["step"]["window_restarts"]
            result["layers"] = {n: dict(K=v["K"], d=v["d"], ratio=v["ratio"], basis_bytes=v["basis_bytes"],
                                        bytes_in=v["bytes_in"],
                                        error=statistics.mean(layer_errors[n]) if layer_errors.get(n) else None)
                                for n, v in st["layers"].items() if v["compressible"]}
        with open(out_path, "wb") as f:
            pickle.dump(result, f)


def _entry(rank, world, port, args, method, seed, out_path):
    run_rank_process(rank, world, port, 300, lambda: train_rank(rank, world, args, method, seed, out_path))


def run_all(args):
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                out = os.path.join(args.runs_dir or tmp, f"{args.model}_{method}_{seed}.pkl")
                if not (args.report_only and os.path.exists(out)):
                    if args.report_only:
                        continue
                    mp.start_processes(_entry, args=(2, free_port(), args, method, seed, out), nprocs=2,
                                       start_method="spawn")
                with open(out, "rb") as f:
                    res = pickle.load(f)
                results.append(res)
                print(f"  {method:>16} seed {seed}: test accuracy {res['final_acc']:.4f}"
                      + (f", conv ratio {res['conv_ratio']:.1f}" if res.get("conv_ratio") else "")
                      + (f", {'quantization' if res.get('bits_per_element') else 'held-out'} rel. error "
                         f"{res['rel_error']:.3f}" if res.get("rel_error") else "")
                      + (f", {res['bits_per_element']:.2f} bits/value" if res.get("bits_per_element") else ""),
                      flush=True)
    return results


def report(results, args):
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    plain = {r["seed"]: r["final_acc"] for r in by.get("plain", [])}
    lines = [f"# Fashion-MNIST accuracy: {args.model}, 2 ranks (Gloo), {args.epochs} epoch(s), batch {args.batch}/rank, "
             f"seeds {','.join(map(str, args.seeds))}"
             + (f", link {args.bandwidth_mbit:g} Mbit/s" if args.bandwidth_mbit else "")
             + (" (QUICK: subset)" if args.quick else ""), "",
             f"Command: `{args.command}`  ",
             f"Data: Debian's dataset-fashion-mnist ({args.data}), {'subset' if args.train_subset else 'all'} train "
             f"images, {'subset' if args.test_subset else 'all 10,000'} test images. GradiVeQ schedule "
             f"{'/'.join(map(str, args.schedule))} (warm-up / sampling / compressed). "
             f"Date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}.", "",
             f"| method | test accuracy mean | min-max | vs plain (points, paired) | conv ratio | KB/step/rank | "
             f"held-out rel. error | time to {args.target:.2f} s |",
             "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        rs = by.get(method, [])
        if not rs:
            continue
        accs = [r["final_acc"] for r in rs]
        diffs = [100 * (r["final_acc"] - plain[r["seed"]]) for r in rs if r["seed"] in plain]
        kb = statistics.mean(statistics.mean(x["bytes"] for x in r["rows"]) for r in rs) / 1e3
        ratio = [r["conv_ratio"] for r in rs if r.get("conv_ratio")]
        errs = [r["rel_error"] for r in rs if r.get("rel_error") is not None]
        tta = []
        for r in rs:
            hit = next((e["wall"] for e in r["evals"] if e["acc"] >= args.target), None)
            tta.append(hit)
        tta_s = ("/".join("-" if t is None else f"{t:.0f}" for t in tta))
        lines.append(f"| {method} | {statistics.mean(accs):.4f} | {min(accs):.4f}-{max(accs):.4f} | "
                     f"{(f'{statistics.mean(diffs):+.2f}' if diffs else '-') if method != 'plain' else '-'} | "
                     f"{f'{statistics.median(ratio):.1f}' if ratio else '-'} | {kb:.1f} | "
                     f"{f'{statistics.mean(errs):.3f}' if errs else '-'} | {tta_s} |")
    bits = {m: statistics.mean(r["bits_per_element"] for r in by[m]) for m in args.methods
            if by.get(m) and all(r.get("bits_per_element") for r in by[m])}
    if bits:
        lines += ["", "Bits per encoded value (mean over steps and seeds): "
                  + ", ".join(f"{m} {b:.2f}" for m, b in bits.items())
                  + ". For these methods the rel. error column is the quantization error ||Q(v) - v|| / ||v|| of "
                    "the values rank 0 encoded (mean over steps), not a held-out error."]
    lines += ["", "Configurations: " + "; ".join(f"{k} = {describe_config(c)}" for k, c in GRADIVEQ_CONFIGS.items()
                                                 if k in args.methods),
              "Conv ratio: the conv layers' uncompressed bytes over the bytes they sent in the last compressed step "
              "(rank 0). Time to accuracy: training wall-clock seconds (evaluation excluded) per seed, '-' = not reached."]
    lines += layer_tables(by, args)
    return "\n".join(lines) + "\n", by


def describe_config(options: dict) -> str:
    rest = {k: v for k, v in options.items() if k != "paper"}
    args = ", ".join(f"{k}={v!r}" for k, v in rest.items())
    if options.get("paper"):
        return f"GradiVeQState.paper({args})"
    return f"GradiVeQState({args})" + ("" if args else " (the library's defaults)")


def layer_tables(by, args):
    """Per-layer K, d, ratio and held-out relative error for each GradiVeQ configuration (means over seeds)."""
    out = []
    for method in args.methods:
        rs = [r for r in by.get(method, []) if r.get("layers")]
        if not rs:
            continue
        restarts = [r.get("restarts", 0) for r in rs]
        out += ["", f"#### {method}: per conv layer (held-out relative error: mean over compressed steps, rank 0, "
                    f"mean over seeds; windows left early by the adaptive window per seed: "
                    f"{'/'.join(map(str, restarts))})", "",
                "| layer | K | d | ratio | held-out rel. error | basis KB |", "|---|---|---|---|---|---|"]
        for name, first in rs[0]["layers"].items():
            ds = [r["layers"][name]["d"] for r in rs]
            errs = [r["layers"][name]["error"] for r in rs if r["layers"][name]["error"] is not None]
            ratio = statistics.mean(r["layers"][name]["ratio"] for r in rs)
            out.append(f"| {name} | {first['K']} | {'/'.join(map(str, ds))} | {ratio:.1f} | "
                       f"{f'{statistics.mean(errs):.3f}' if errs else '-'} | {first['basis_bytes'] / 1e3:.0f} |")
    return out


def plot(by, args, prefix):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rs in by.items():
        ratio = [r.get("conv_ratio") or (1.0 if method == "plain" else None) for r in rs]
        xs = [x for x in ratio if x]
        if xs:
            ax1.scatter([statistics.median(xs)] * len(rs), [r["final_acc"] for r in rs], label=method)
        r0 = rs[0]
        ax2.plot([e["wall"] for e in r0["evals"]], [e["acc"] for e in r0["evals"]], marker="o", ms=3, label=method)
    ax1.set_xscale("log")
    ax1.set_xlabel("conv-layer compression ratio")
    ax1.set_ylabel("final test accuracy (one point per seed)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("training wall-clock, s (first seed)")
    ax2.set_ylabel("test accuracy")
    ax2.legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST, {args.model}, 2 ranks")
    fig.tight_layout()
    path = prefix + ".png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="cnn", choices=["cnn", "resnet32"])
    ap.add_argument("--methods", default="plain,fp16,powersgd2,qsgd4,gradiveq-paper,gradiveq")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                    help='extra GradiVeQ configuration, e.g. gradiveq-r16=\'{"fit_on": "all_slices", "target_ratio": 16}\' '
                         '(repeatable; then name it in --methods)')
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="batch per rank")
    ap.add_argument("--schedule", default="100,50,200", help="GradiVeQ warm-up,sampling,compressed iterations")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.80, help="test accuracy for the time-to-accuracy column")
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bandwidth-mbit", type=float, default=0)
    ap.add_argument("--burst-kb", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny subset (8192 images), 2 epochs, 1 seed: a smoke run for CI")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "benchmark-results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--runs-dir", default=None, help="keep each run's result here (one pickle per model, method, seed)")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: report the runs already in --runs-dir (missing ones are left out)")
    args = ap.parse_args(argv)
    for spec in args.config:
        try:
            add_gradiveq_config(spec)
        except ValueError as e:
            ap.error(f"argument --config: {e}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in known_methods():
            ap.error(f"argument --methods: unknown method {m!r}; choose from {known_methods()}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.schedule = tuple(int(v) for v in args.schedule.split(","))
        assert len(args.schedule) == 3 and args.schedule[1] >= 2
    except (ValueError, AssertionError):
        ap.error("arguments --seeds (ints) and --schedule (W,S,C with S >= 2) are malformed")
    if args.quick:
        args.train_subset, args.test_subset, args.epochs = args.train_subset or 8192, args.test_subset or 1000, 2
        args.seeds, args.eval_every = args.seeds[:1], 16
        args.schedule = (10, 8, 20)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # Shell-quoted, and without --report-only: the command that trains these runs.
    args.command = "python benchmarks/ddp/accuracy.py " + " ".join(shlex.quote(a) for a in argv if a != "--report-only")
    if args.bandwidth_mbit and not os.environ.get("GRADIVEQ_NETNS"):
        rc = shaped_rerun(os.path.abspath(__file__), argv, args.bandwidth_mbit, args.burst_kb)
        if rc is not None:
            return rc
        args.bandwidth_mbit = 0
    print(f"Fashion-MNIST accuracy: {args.model}, methods {','.join(args.methods)}, seeds {args.seeds}", flush=True)
    results = run_all(args)
    text, by = report(results, args)
    print()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, args.tag or f"accuracy_fashion_mnist_{args.model}")
    pngs = plot(by, args, prefix)
    with open(prefix + ".md", "w") as f:
        f.write(text)
        for p in pngs:
            f.write(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n")
    print(f"results: {prefix}.md" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
