"""Accuracy on real data: 2-rank Gloo DDP on Fashion-MNIST, each method against plain all-reduce, over seeds.

Trains the small CNN (three 3x3 convs, 16-32-32 channels, linear head) or ResNet-32 (images padded to 32x32 and
repeated to 3 channels: the real-data stand-in for CIFAR-100, which is not available here) with every method for
the same number of epochs and seeds (model init and data order), and reports test accuracy (mean and spread), the
paired difference to plain all-reduce, the bytes on the wire and the payload per step, the conv-layer compression
ratio, GradiVeQ's held-out relative error (each compressed step's local loss, eq. 7, on gradients the basis was not
fitted on) and the time to reach a test accuracy, as a markdown table, a JSON file and plots in --out.

Methods (methods.py): plain, fp16, bf16 (torch's all-reduce hooks), powersgdR (torch's PowerSGD at rank R, error
feedback and warm start on, start_powerSGD_iter = the GradiVeQ warm-up W of --schedule, at least 2), qsgd4, co3,
casq2, casq3 (this library's quantizers), gradiveq, gradiveq-paper and --config ones.

Wire bytes: as root with `ip`, each (method, seed) run trains in its own fresh network namespace (this script
re-executed with --run-one inside it), and rank 0 reads the namespace's loopback tx_bytes at a barrier before the
first training step and after the last one: every byte both ranks put on the link, TCP/IP overhead included, for
every method alike. --bandwidth-mbit shapes that loopback with tc tbf. Without root or ip the runs use no namespace
and the wire column is '-'.

Evaluation: every rank takes rank 0's BatchNorm statistics (one small broadcast, left out of the wire count) and
classifies its share of the test set; rank 0 adds the counts (written to files, not sent). Evaluation time is not
training time.

    python benchmarks/ddp/accuracy.py --model cnn --methods plain,qsgd4,gradiveq,gradiveq-pooled --seeds 0,1,2
    python benchmarks/ddp/accuracy.py --quick          # tiny subset, what CI runs
"""

import argparse
import datetime
import json
import os
import pickle
import shlex
import statistics
import subprocess
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
from methods import (HelpFormatter, GRADIVEQ_CONFIGS, QUANTIZER_METHODS, TORCH_METHODS, Method,  # noqa: E402
                     NetnsError, add_gradiveq_config, ddp_kwargs, free_port, netns_env, netns_unavailable,
                     network_namespace, powersgd_rank, run_rank_process)

DEFAULT_METHODS = "plain,fp16,bf16,powersgd1,powersgd2,powersgd4,qsgd4,co3,casq2,gradiveq-paper,gradiveq"
QUICK_METHODS = "plain,powersgd2,gradiveq"  # --quick without --methods: what CI can afford
LO_TX_BYTES = "/sys/class/net/lo/statistics/tx_bytes"  # inside `ip netns exec`, /sys is the namespace's own


def known_methods():
    return [m for m in TORCH_METHODS if m != "nocomm"] + list(QUANTIZER_METHODS) + list(GRADIVEQ_CONFIGS)


def is_known(method):
    return method in known_methods() or powersgd_rank(method) is not None


def lo_tx_bytes() -> int:
    with open(LO_TX_BYTES) as f:
        return int(f.read())


def prepare(images, model_name):
    if model_name == "resnet32":  # 28x28x1 -> 32x32x3
        images = F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return (images - 0.2860) / 0.3530


@torch.no_grad()
def count_correct(model, images, labels, batch=1000) -> int:
    """How many of `images` the bare module classifies right: never the DDP wrapper, so the forward passes run no
    collective and put nothing on the wire (their traffic would otherwise land in the wire bytes)."""
    assert not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(labels), batch))
    model.train()
    return int(correct)


def test_shard(images, labels, rank, world):
    """Rank `rank`'s contiguous share of the test set. The replicas are identical, so each rank evaluating one
    share and the counts being added gives the whole set's accuracy in 1/world of the time."""
    return images.chunk(world)[rank], labels.chunk(world)[rank]


def take_rank0_buffers(model, count_wire) -> int:
    """Gives every rank rank 0's buffers (BatchNorm's running statistics) before an evaluation: DDP broadcasts
    them only at the start of a forward, and each rank's last training forward moved its own, so without this
    the shares would be evaluated on slightly different models. Returns the bytes this put on the loopback
    (rank 0, counting runs), which the wire count leaves out: the same few KB for every method."""
    floats = [b for b in model.buffers() if b.is_floating_point()]
    if dist.get_world_size() == 1 or not floats:
        return 0
    counting = count_wire and dist.get_rank() == 0
    before = lo_tx_bytes() if counting else 0
    flat = torch._utils._flatten_dense_tensors(floats)
    dist.broadcast(flat, 0)
    for b, v in zip(floats, torch._utils._unflatten_dense_tensors(flat, floats)):
        b.copy_(v)
    dist.barrier()  # rank 0 reads the counter after every rank's share of the broadcast was sent
    return lo_tx_bytes() - before if counting else 0


def shard_counts_path(out_path, rank) -> str:
    return f"{out_path}.correct{rank}.json"


def merge_shard_counts(evals, out_path, world, test_size):
    """Adds the other ranks' correct counts (written to files: no collective, nothing on the wire) to rank 0's
    and turns each evaluation's count into the test accuracy."""
    for r in range(1, world):
        path = shard_counts_path(out_path, r)
        with open(path) as f:
            counts = json.load(f)
        os.remove(path)
        if [c[0] for c in counts] != [e["step"] for e in evals]:
            raise RuntimeError(f"rank {r} evaluated at other steps than rank 0: {path}")
        for e, (_, correct) in zip(evals, counts):
            e["correct"] += correct
    for e in evals:
        e["acc"] = e.pop("correct") / test_size


def evaluates_at(step, total, args) -> bool:
    """Every --eval-every steps, every --fine-eval-every steps from --fine-eval-from on (where the target's
    crossing is expected: finer evaluations there read it closely without paying for them all run long), and
    after the last step."""
    fine = args.fine_eval_every > 0 and step >= args.fine_eval_from and step % args.fine_eval_every == 0
    return step % args.eval_every == 0 or fine or step == total


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
    m = Method(ddp, model, method, seed=seed, schedule=args.schedule, powersgd_start_iter=powersgd_start(args))
    gen = torch.Generator().manual_seed(seed)
    rows, evals, rel_errors, layer_errors = [], [], [], {}
    compressed_ratio = None  # conv-layer ratio of the last compressed step
    count_wire = bool(args.netns)  # a --run-one child in its own namespace: the loopback carries only this run
    if count_wire:
        dist.barrier()  # both ranks at the first step: what the set-up sent (DDP's broadcast) is not counted
        tx_start = lo_tx_bytes() if rank == 0 else 0
    eval_wire_bytes = 0
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
            if evaluates_at(step, total, args):
                # Every rank evaluates its share of the test set, so no core idles meanwhile: an idle core would
                # hand a deferred fit's idle-priority worker (fit_delay_iters) free time no training step gives.
                eval_start = time.perf_counter()
                eval_wire_bytes += take_rank0_buffers(model, count_wire)
                correct = count_correct(model, *test_shard(test_x, test_y, rank, world))
                t0 += time.perf_counter() - eval_start  # evaluation time does not count as training time
                evals.append(dict(step=step, wall=time.perf_counter() - t0, correct=correct))
    if rank > 0:
        with open(shard_counts_path(out_path, rank), "w") as f:
            json.dump([[e["step"], e["correct"]] for e in evals], f)
    dist.barrier()  # every rank past the last step, its counts written
    wire_bytes = None
    if count_wire and rank == 0:
        wire_bytes = lo_tx_bytes() - tx_start - eval_wire_bytes
    m.close()
    if rank == 0:
        merge_shard_counts(evals, out_path, world, len(test_y))
        result = dict(method=method, seed=seed, rows=rows, evals=evals, final_acc=evals[-1]["acc"],
                      rel_error=statistics.mean(rel_errors) if rel_errors else None,
                      steps=step, world=world, wire_bytes=wire_bytes, netns=args.netns,
                      powersgd_start_iter=m.state.start_powerSGD_iter if powersgd_rank(method) else None)
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


def powersgd_start(args) -> int:
    """PowerSGD's start_powerSGD_iter: the GradiVeQ warm-up, so both compress from the same step on; torch
    requires > 1 with error feedback or warm start."""
    return max(2, args.schedule[0])


def train_here(args, method, seed, out):
    """One (method, seed) run: two spawned ranks in this process's network namespace; rank 0 writes `out`."""
    mp.start_processes(_entry, args=(2, free_port(), args, method, seed, out), nprocs=2, start_method="spawn")


def train_in_namespace(args, method, seed, out, n):
    """One (method, seed) run in a fresh network namespace (shaped when --bandwidth-mbit): this script re-executed
    there with --run-one; the namespace and whatever is left inside are removed afterwards, also on failure,
    Ctrl-C, SIGTERM and timeout."""
    name = f"{args.netns_prefix}{n}"
    argv = [a for a in args.argv if a != "--report-only"] + ["--run-one", method, str(seed), "--run-out", out]
    with network_namespace(name, args.bandwidth_mbit, args.burst_kb):
        try:
            rc = subprocess.run(["ip", "netns", "exec", name, sys.executable, os.path.abspath(__file__)] + argv,
                                env=netns_env(name), timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{method} seed {seed}: not done within --run-timeout {args.run_timeout:g} s") from None
    if rc != 0:
        raise RuntimeError(f"{method} seed {seed}: the run in network namespace {name} failed (exit code {rc})")


def choose_process_model(args):
    """Sets args.wire (runs in their own namespaces, wire bytes counted) and args.wire_note; drops --bandwidth-mbit
    where it cannot be applied. Prints what it decided once."""
    args.netns_prefix = f"gvqacc{os.getpid()}_"
    why = netns_unavailable()
    if why is None:
        try:
            with network_namespace(args.netns_prefix + "probe"):
                pass
        except NetnsError as e:
            why = str(e)
    args.wire = why is None
    if args.wire:
        args.wire_note = ("each (method, seed) run in its own network namespace; wire bytes = its loopback's "
                          "tx_bytes between a barrier before the first training step and one after the last")
        print(f"wire bytes: counted per run in network namespaces {args.netns_prefix}<n> (removed afterwards)",
              flush=True)
    else:
        args.wire_note = (f"wire bytes NOT measured ({why}; a network namespace per run needs root and ip): runs "
                          f"share the host's loopback, wire column '-'")
        print(f"{args.wire_note}", flush=True)
    if args.bandwidth_mbit:
        shape_why = why or netns_unavailable(shape=True)
        if shape_why is None:
            try:
                with network_namespace(args.netns_prefix + "probe", args.bandwidth_mbit, args.burst_kb):
                    pass
            except NetnsError as e:
                shape_why = str(e)
        if shape_why:
            print(f"cannot shape the link to {args.bandwidth_mbit:g} Mbit/s ({shape_why}): running UNSHAPED",
                  flush=True)
            args.bandwidth_mbit = 0


def run_all(args):
    results = []
    n = 0
    if args.runs_dir and not args.report_only:
        os.makedirs(args.runs_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                out = os.path.join(args.runs_dir or tmp, f"{args.model}_{method}_{seed}.pkl")
                if not (args.report_only and os.path.exists(out)):
                    if args.report_only:
                        continue
                    if args.wire:
                        train_in_namespace(args, method, seed, out, n)
                    else:
                        train_here(args, method, seed, out)
                    n += 1
                with open(out, "rb") as f:
                    res = pickle.load(f)
                results.append(res)
                wire = wire_kb(res)
                print(f"  {method:>16} seed {seed}: test accuracy {res['final_acc']:.4f}"
                      + (f", wire {wire:.1f} KB/step/rank" if wire is not None else "")
                      + (f", conv ratio {res['conv_ratio']:.1f}" if res.get("conv_ratio") else "")
                      + (f", {'quantization' if res.get('bits_per_element') else 'held-out'} rel. error "
                         f"{res['rel_error']:.3f}" if res.get("rel_error") else "")
                      + (f", {res['bits_per_element']:.2f} bits/value" if res.get("bits_per_element") else ""),
                      flush=True)
    return results


def wire_kb(res):
    """Wire KB per step per rank of one run, None when it was not measured (older pickles, no namespace)."""
    if res.get("wire_bytes") is None:
        return None
    return res["wire_bytes"] / (res.get("steps") or len(res["rows"])) / res.get("world", 2) / 1e3


def payload_kb(res):
    """Payload KB per step per rank by the method's own accounting (rank 0, mean over all steps)."""
    return statistics.mean(x["bytes"] for x in res["rows"]) / 1e3


def time_target(by, args):
    """(target accuracy, where it comes from): --target, else plain's mean final accuracy minus 1 point."""
    if args.target is not None:
        return args.target, "--target"
    if by.get("plain"):
        return statistics.mean(r["final_acc"] for r in by["plain"]) - 0.01, "plain's mean final accuracy - 1 point"
    return 0.80, "default; no plain run"


def first_eval_at_target(run, target):
    """The run's first evaluation at or above `target` (its step, wall clock and accuracy), or None."""
    return next((e for e in run["evals"] if e["acc"] >= target), None)


def summarize(by, args, target):
    """Per method: the numbers of the table and the JSON file."""
    plain = {r["seed"]: r["final_acc"] for r in by.get("plain", [])}
    out = {}
    for method in args.methods:
        rs = by.get(method, [])
        if not rs:
            continue
        accs = [r["final_acc"] for r in rs]
        diffs = [100 * (r["final_acc"] - plain[r["seed"]]) for r in rs if r["seed"] in plain]
        wires = [w for w in (wire_kb(r) for r in rs) if w is not None]
        ratio = [r["conv_ratio"] for r in rs if r.get("conv_ratio")]
        errs = [r["rel_error"] for r in rs if r.get("rel_error") is not None]
        tta = {r["seed"]: (first_eval_at_target(r, target) or {}).get("wall") for r in rs}
        out[method] = dict(
            mean_acc=statistics.mean(accs), min_acc=min(accs), max_acc=max(accs),
            seed_accs={r["seed"]: r["final_acc"] for r in rs},
            vs_plain_points=statistics.mean(diffs) if diffs and method != "plain" else None,
            paired_diffs_points={r["seed"]: 100 * (r["final_acc"] - plain[r["seed"]]) for r in rs
                                 if r["seed"] in plain} if method != "plain" else {},
            wire_kb_step_rank=statistics.mean(wires) if wires else None, wire_seeds=len(wires),
            payload_kb_step_rank=statistics.mean(payload_kb(r) for r in rs),
            conv_ratio=statistics.median(ratio) if ratio else None,
            rel_error=statistics.mean(errs) if errs else None,
            time_to_target_s=tta, steps=rs[0].get("steps") or len(rs[0]["rows"]),
            evals={r["seed"]: [[e["step"], e["acc"]] for e in r["evals"]] for r in rs})
    return out


def report(results, args):
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    target, target_source = time_target(by, args)
    summary = summarize(by, args, target)
    measured = [r.get("wire_bytes") is not None for r in results]
    if getattr(args, "wire_note", None) is None or args.report_only:  # report-only: what the pickles say
        args.wire_note = ("each (method, seed) run in its own network namespace; wire bytes = its loopback's "
                          "tx_bytes between a barrier before the first training step and one after the last"
                          + ("" if all(measured) else " (measured for some runs only; older runs: '-')")
                          if any(measured) else "wire bytes NOT measured for these runs (no network namespace: "
                                                "needs root and ip, or older runs): wire column '-'")
    measured = any(measured)
    psgd = sorted({r["powersgd_start_iter"] for r in results if r.get("powersgd_start_iter")})
    lines = [f"# Fashion-MNIST accuracy: {args.model}, 2 ranks (Gloo), {args.epochs} epoch(s), batch {args.batch}/rank, "
             f"seeds {','.join(map(str, args.seeds))}"
             + (f", link {args.bandwidth_mbit:g} Mbit/s" if args.bandwidth_mbit else "")
             + (" (QUICK: subset)" if args.quick else ""), "",
             f"Command: `{args.command}`  ",
             f"Data: Debian's dataset-fashion-mnist ({args.data}), {'subset' if args.train_subset else 'all'} train "
             f"images, {'subset' if args.test_subset else 'all 10,000'} test images. GradiVeQ schedule "
             f"{'/'.join(map(str, args.schedule))} (warm-up / sampling / compressed)"
             + (f"; PowerSGD error feedback and warm start on, start_powerSGD_iter {'/'.join(map(str, psgd))}"
                if psgd else "")
             + f". Date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}.  ",
             f"Wire: {args.wire_note}.  ",
             f"Time-to-accuracy target: {target:.4f} ({target_source}).", "",
             f"| method | test accuracy mean | min-max | vs plain (points, paired mean) | paired spread (points) | "
             f"wire KB/step/rank | payload KB/step/rank | conv ratio | held-out rel. error | "
             f"time to {target:.4f} (s per seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, sm in summary.items():
        diffs = list(sm["paired_diffs_points"].values())
        n_seeds = len(sm["seed_accs"])
        wire = ("-" if sm["wire_kb_step_rank"] is None else f"{sm['wire_kb_step_rank']:.1f}"
                + ("" if sm["wire_seeds"] == n_seeds else f" ({sm['wire_seeds']}/{n_seeds} seeds)"))
        tta = "/".join("-" if t is None else f"{t:.0f}" for t in sm["time_to_target_s"].values())
        vs = "-" if sm["vs_plain_points"] is None else f"{sm['vs_plain_points']:+.2f}"
        spread = f"{min(diffs):+.2f}..{max(diffs):+.2f}" if diffs else "-"
        ratio = "-" if sm["conv_ratio"] is None else f"{sm['conv_ratio']:.1f}"
        err = "-" if sm["rel_error"] is None else f"{sm['rel_error']:.3f}"
        lines.append(f"| {method} | {sm['mean_acc']:.4f} | {sm['min_acc']:.4f}-{sm['max_acc']:.4f} | {vs} | {spread} | "
                     f"{wire} | {sm['payload_kb_step_rank']:.1f} | {ratio} | {err} | {tta} |")
    bits = {m: statistics.mean(r["bits_per_element"] for r in by[m]) for m in args.methods
            if by.get(m) and all(r.get("bits_per_element") for r in by[m])}
    if bits:
        lines += ["", "Bits per encoded value (mean over steps and seeds): "
                  + ", ".join(f"{m} {b:.2f}" for m, b in bits.items())
                  + ". For these methods the rel. error column is the quantization error ||Q(v) - v|| / ||v|| of "
                    "the values rank 0 encoded (mean over steps), not a held-out error."]
    configs = "; ".join(f"{k} = {describe_config(c)}" for k, c in GRADIVEQ_CONFIGS.items() if k in args.methods)
    lines += [""] + ([f"Configurations: {configs}"] if configs else []) + [
              "Wire KB/step/rank: bytes the run's loopback transmitted (both ranks, TCP/IP headers included) from "
              "the first training step to the last, / steps / 2 ranks, mean over seeds; warm-up and sampling steps "
              "included, evaluation excluded (its broadcast of BatchNorm statistics is subtracted). "
              "Payload KB/step/rank: the bytes each method "
              "hands to its collectives per step by its own accounting (rank 0, mean over all steps and seeds; "
              "GradiVeQ's include the bases rank 0 broadcast). "
              "Vs plain: accuracy difference to plain all-reduce with the same seed, in points; paired spread: "
              "min..max of those per-seed differences.",
              "Conv ratio: the conv layers' uncompressed bytes over the bytes they sent in the last compressed step "
              "(rank 0). Time to accuracy: training wall-clock seconds (evaluation excluded) per seed, '-' = not "
              "reached."]
    lines += time_table(by, args, target)
    lines += layer_tables(by, args)
    meta = dict(model=args.model, epochs=args.epochs, batch=args.batch, seeds=args.seeds, schedule=list(args.schedule),
                powersgd_start_iter=psgd, bandwidth_mbit=args.bandwidth_mbit, quick=args.quick, target=target,
                target_source=target_source, wire_measured=measured, wire_note=args.wire_note, command=args.command,
                torch=torch.__version__)
    return "\n".join(lines) + "\n", by, dict(meta=meta, methods=summary)


def time_table(by, args, target):
    """Where each method's training time went (rank 0, means over seeds): the step that first evaluated at or
    above the target, the training wall clock, the step times, and the aggregation as the hooks measured it."""
    fine = (f"; every {args.fine_eval_every} from step {args.fine_eval_from}" if args.fine_eval_every else "")
    out = ["", f"#### Where the time went (rank 0, mean over seeds; evaluations every {args.eval_every} steps{fine} "
               f"and after the last)", "",
           "| method | first step at target | training s | median step s (p10-p90) | aggregating s | "
           "codec s | fits waited s | fit worker s |", "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        rs = by.get(method, [])
        if not rs:
            continue
        crossing = [str(e["step"]) if e else "-" for e in (first_eval_at_target(r, target) for r in rs)]
        steps = [b["wall"] - a["wall"] for r in rs for a, b in zip(r["rows"], r["rows"][1:])]
        deciles = statistics.quantiles(steps, n=10) if len(steps) >= 10 else [float("nan")] * 9

        def total(key):
            return statistics.mean(sum(row.get(key, 0.0) for row in r["rows"]) for r in rs)
        out.append(f"| {method} | {'/'.join(crossing)} | {statistics.mean(r['rows'][-1]['wall'] for r in rs):.0f} | "
                   f"{statistics.median(steps):.3f} ({deciles[0]:.3f}-{deciles[-1]:.3f}) | {total('agg'):.1f} | "
                   f"{total('codec'):.1f} | {total('fit'):.1f} | {total('fit_background'):.1f} |")
    out += ["", "Aggregating: the hooks' time from a bucket's hand-over to its future's completion, summed over "
                "steps (it overlaps the backward pass). Codec: GradiVeQ's compress + decompress time (torch's hooks: "
                "'-' as 0). Fits waited: what steps waited for bases (a synchronous fit, or the rest of a deferred "
                "one at its install). Fit worker: the deferred fits' worker time (idle priority, behind the steps)."]
    return out


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


def pareto_front(points):
    """The (x, y) points no other point dominates (no other has >= y with <= x, better in one), by ascending x."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(by, summary, args, prefix):
    if not summary:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    wire = all(sm["wire_kb_step_rank"] is not None for sm in summary.values())
    key = "wire_kb_step_rank" if wire else "payload_kb_step_rank"
    points = []
    for method, sm in summary.items():
        x, y = sm[key], sm["mean_acc"]
        if not x or x <= 0:
            continue
        ax1.errorbar([x], [y], yerr=[[y - sm["min_acc"]], [sm["max_acc"] - y]], fmt="o", capsize=3, label=method)
        ax1.annotate(method, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        points.append((x, y))
    front = pareto_front(points)
    if front:  # the best accuracy reached with at most x bytes: a step up at each front point, flat to the last x
        xs = [p[0] for p in front] + [max(p[0] for p in points)]
        ys = [p[1] for p in front] + [front[-1][1]]
        ax1.step(xs, ys, where="post", color="grey", ls="--", lw=1, label="Pareto front", zorder=0)
        ax1.scatter([p[0] for p in front], [p[1] for p in front], s=120, facecolors="none", edgecolors="grey",
                    zorder=0)
    ax1.set_xscale("log")
    ax1.set_xlabel("wire KB/step/rank (log)" if wire else "payload KB/step/rank (log; wire bytes not measured)")
    ax1.set_ylabel("test accuracy (mean over seeds, min-max bars)")
    ax1.legend(fontsize=7)
    for method in summary:
        r0 = by[method][0]
        ax2.plot([e["wall"] for e in r0["evals"]], [e["acc"] for e in r0["evals"]], marker="o", ms=3, label=method)
    ax2.set_xlabel("training wall-clock, s (first seed)")
    ax2.set_ylabel("test accuracy")
    ax2.legend(fontsize=7)
    fig.suptitle(f"Fashion-MNIST, {args.model}, 2 ranks: accuracy vs {'wire' if wire else 'payload'} bytes, "
                 "and vs time")
    fig.tight_layout()
    path = prefix + ".png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="cnn", choices=["cnn", "resnet32"])
    ap.add_argument("--methods", default=None,
                    help=f"comma list (default: {DEFAULT_METHODS}; with --quick: {QUICK_METHODS}); powersgdR for "
                         "any rank R")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                    help='extra GradiVeQ configuration, e.g. gradiveq-r16=\'{"fit_on": "all_slices", "target_ratio": 16}\' '
                         '(repeatable; then name it in --methods)')
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="batch per rank")
    ap.add_argument("--schedule", default="100,50,50",
                    help="GradiVeQ warm-up,sampling,compressed iterations (the library's 2500/100/100 scaled to the "
                         "run)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--fine-eval-every", type=int, default=0,
                    help="also evaluate every this many steps from --fine-eval-from on (0: off)")
    ap.add_argument("--fine-eval-from", type=int, default=0, help="first step of the finer evaluations")
    ap.add_argument("--target", type=float, default=None,
                    help="test accuracy for the time-to-accuracy column (default: plain's mean final accuracy minus "
                         "1 point when plain runs, else 0.80)")
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
    ap.add_argument("--run-timeout", type=float, default=None,
                    help="seconds one (method, seed) run in its network namespace may take (default: 600 with "
                         "--quick, else 21600)")
    # Internal: what the parent runs inside each run's network namespace.
    ap.add_argument("--run-one", nargs=2, metavar=("METHOD", "SEED"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for spec in args.config:
        try:
            add_gradiveq_config(spec)
        except ValueError as e:
            ap.error(f"argument --config: {e}")
    if args.methods is None:
        args.methods = QUICK_METHODS if args.quick else DEFAULT_METHODS
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods + ([args.run_one[0]] if args.run_one else []):
        if not is_known(m):
            ap.error(f"argument --methods: unknown method {m!r}; choose from {known_methods()} or powersgdR")
    if args.eval_every < 1:
        ap.error(f"argument --eval-every must be >= 1, got {args.eval_every}")
    if args.fine_eval_every < 0 or args.fine_eval_from < 0:
        ap.error("arguments --fine-eval-every and --fine-eval-from must be >= 0")
    if args.fine_eval_from and not args.fine_eval_every:
        ap.error("argument --fine-eval-from needs --fine-eval-every > 0 (it does nothing alone)")
    if args.run_one and not args.run_out:
        ap.error("--run-one needs --run-out")
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
    if args.run_timeout is None:
        args.run_timeout = 600 if args.quick else 21600
    return args


def run_one(args):
    """--run-one METHOD SEED: train that run here (the parent put this process in the run's network namespace) and
    write rank 0's result to --run-out."""
    method, seed = args.run_one[0], int(args.run_one[1])
    args.netns = os.environ.get("GRADIVEQ_NETNS")  # set by the parent: count the wire bytes
    train_here(args, method, seed, args.run_out)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = list(argv)
    args.netns = None
    if args.run_one:
        return run_one(args)
    # Shell-quoted, and without --report-only: the command that trains these runs.
    args.command = "python benchmarks/ddp/accuracy.py " + " ".join(shlex.quote(a) for a in argv if a != "--report-only")
    args.wire, args.wire_note = False, None
    if not args.report_only:
        choose_process_model(args)
    print(f"Fashion-MNIST accuracy: {args.model}, methods {','.join(args.methods)}, seeds {args.seeds}", flush=True)
    try:
        results = run_all(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    text, by, data = report(results, args)
    print()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, args.tag or f"accuracy_fashion_mnist_{args.model}")
    pngs = plot(by, data["methods"], args, prefix)
    with open(prefix + ".md", "w") as f:
        f.write(text)
        for p in pngs:
            f.write(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n")
    with open(prefix + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print(f"results: {prefix}.md, {prefix}.json" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
