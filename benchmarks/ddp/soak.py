"""Soak: thousands of GradiVeQ hook steps with a short schedule (many re-fits) on 2 real Gloo ranks.

Trains the small CNN on Fashion-MNIST with the C++ DDP hook and a schedule of a few steps per window, so the run
goes through hundreds of sampling windows, fits and basis broadcasts. Every `--report-every` steps it records each
rank's resident memory (VmRSS), the largest parameter difference between ranks (they must stay bit-identical),
the hook's stats (held-out relative error, ratio, fits) and the loss. Writes benchmarks/results/<tag>.md.

    python benchmarks/ddp/soak.py --steps 5000                 # the reported run
    python benchmarks/ddp/soak.py --steps 120 --out /tmp/soak  # smoke run (CI)
"""

import argparse
import datetime
import math
import os
import pickle
import shlex
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

import gradiveq  # noqa: E402
from datasets import FASHION_MNIST_DIR, load_fashion_mnist  # noqa: E402
from models import SmallCNN  # noqa: E402
from methods import HelpFormatter, free_port, run_rank_process  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def train_rank(rank, world, args, out_path):
    torch.set_num_threads(1)
    (images, labels), _ = load_fashion_mnist(args.data)
    torch.manual_seed(0)
    model = SmallCNN()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = gradiveq.GradiVeQState(warmup_iters=args.schedule[0], sample_iters=args.schedule[1],
                                   compress_iters=args.schedule[2])
    gradiveq.register_hook(ddp, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)
    rows, errors = [], []
    start = time.monotonic()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(labels), (args.batch,), generator=gen)
        loss = F.cross_entropy(ddp(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        st = state.stats()
        err = st["step"].get("relative_error")
        if st["step"]["phase"] == "compressed" and err is not None and err >= 0:
            errors.append(err)
        if step % args.report_every == 0 or step == args.steps:
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            other = flat.clone()
            dist.broadcast(other, src=0)
            layers = [v for v in st["layers"].values() if v["compressible"]]
            rows.append(dict(step=step, rss=rss_mb(), drift=float((flat - other).abs().max()),
                             loss=loss.item(), fits=sum(v["fits"] for v in layers),
                             err_max=max(errors) if errors else float("nan"),
                             err_mean=sum(errors) / len(errors) if errors else float("nan"),
                             restarts=st["step"].get("window_restarts", 0), seconds=time.monotonic() - start,
                             finite=all(math.isfinite(v) for v in (loss.item(),) + tuple(errors))))
            errors = []
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows)
    if rank == 0:
        with open(out_path, "wb") as f:
            pickle.dump(all_rows, f)


def _entry(rank, world, port, args, out_path):
    run_rank_process(rank, world, port, 300, lambda: train_rank(rank, world, args, out_path))


def report(all_rows, args, command):
    r0, r1 = all_rows[0], all_rows[1]
    first, last = r0[0], r0[-1]
    lines = [f"# Soak: {args.steps} GradiVeQ hook steps, 2 ranks (Gloo), small CNN on Fashion-MNIST, schedule "
             f"{'/'.join(map(str, args.schedule))}", "",
             f"Command: `{command}`  ",
             f"Date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}. Defaults "
             f"of `GradiVeQState()` except the schedule; batch {args.batch}/rank.", "",
             "| step | RSS rank 0 MB | RSS rank 1 MB | max param diff between ranks | fits (all layers) | "
             "held-out rel. error mean / max | window restarts | loss | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, b in zip(r0, r1):
        lines.append(f"| {a['step']} | {a['rss']:.1f} | {b['rss']:.1f} | {a['drift']:.1e} | {a['fits']} | "
                     f"{a['err_mean']:.3f} / {a['err_max']:.3f} | {a['restarts']} | {a['loss']:.3f} | "
                     f"{a['seconds']:.0f} |")
    growth = [rows[-1]["rss"] - rows[len(rows) // 5]["rss"] for rows in all_rows]
    lines += ["", f"RSS growth from step {r0[len(r0) // 5]['step']} to the end: rank 0 {growth[0]:+.1f} MB, "
              f"rank 1 {growth[1]:+.1f} MB (from step {first['step']}: {last['rss'] - first['rss']:+.1f} MB on "
              f"rank 0). Largest parameter difference between the ranks at any report: "
              f"{max(a['drift'] for a in r0):.1e}. All losses and errors finite: "
              f"{all(a['finite'] for rows in all_rows for a in rows)}."]
    return "\n".join(lines) + "\n", growth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--schedule", default="5,5,10", help="warm-up,sampling,compressed iterations")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--report-every", type=int, default=500)
    ap.add_argument("--data", default=FASHION_MNIST_DIR)
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "benchmark-results"))
    ap.add_argument("--tag", default="soak")
    args = ap.parse_args()
    args.schedule = [int(v) for v in args.schedule.split(",")]
    args.report_every = min(args.report_every, args.steps)
    command = "python benchmarks/ddp/soak.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pkl")
        mp.start_processes(_entry, args=(2, free_port(), args, out), nprocs=2, start_method="spawn")
        with open(out, "rb") as f:
            all_rows = pickle.load(f)
    md, growth = report(all_rows, args, command)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.md")
    with open(path, "w") as f:
        f.write(md)
    print(md)
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())
