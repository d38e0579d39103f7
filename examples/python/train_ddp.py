"""Data-parallel training with a GradiVeQ hook (or a baseline) under torchrun.

    torchrun --standalone --nproc_per_node=2 examples/python/train_ddp.py --method gradiveq --steps 200
    torchrun --standalone --nproc_per_node=2 examples/python/train_ddp.py --steps 100 --save ckpt
    torchrun --standalone --nproc_per_node=2 examples/python/train_ddp.py --steps 100 --resume ckpt

A small CNN on Fashion-MNIST (Debian's dataset-fashion-mnist, or --data DIR with the four idx files); without the
files it says so and trains on synthetic images. Every rank reads its own shard. Checkpoints hold the model, the
optimizer and the hook state: GradiVeQ's state is identical on all ranks, CO3's error memory is per rank, so each
rank writes its own file (CKPT.rank<r>.pt).

Gloo sometimes aborts at interpreter exit after a run that succeeded (torch's own, reproducible without this
library); the script destroys the process group before it exits, which avoids it.
"""

import argparse
import gzip
import os
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import gradiveq

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
METHODS = ("gradiveq", "gradiveq-paper", "qsgd", "co3", "casq", "plain", "fp16", "bf16")


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*shape)


def load_data(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(data_dir, f"{prefix}-{kind}-idx{n}-ubyte.gz") for kind, n in (("images", 3), ("labels", 1))]
    if not all(os.path.exists(p) for p in paths):
        return None
    images, labels = (read_idx(p) for p in paths)
    return (images.float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)), labels.long()


def synthetic(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    templates = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    return templates[labels] + 0.5 * torch.randn(n, 1, 28, 28, generator=g), labels


def make_state(method, steps, schedule, saved_options=None):
    """The hook state of `method` (None: a torch hook or plain all-reduce). A resumed run takes the checkpoint's
    options (a state refuses a state dict saved with other options). GradiVeQ's schedule is scaled to the run,
    since the default 2,500 warm-up steps would compress nothing in a short one."""
    kinds = dict(gradiveq=gradiveq.GradiVeQState, qsgd=gradiveq.QsgdState, co3=gradiveq.CO3State,
                 casq=gradiveq.CASQState)
    if saved_options is not None:
        return kinds["gradiveq" if method.startswith("gradiveq") else method](**saved_options)
    if schedule is None:
        warmup, sample = max(steps // 10, 1), max(steps // 20, 2)
        schedule = (warmup, sample, 4 * sample)
    schedule = dict(zip(("warmup_iters", "sample_iters", "compress_iters"), schedule))
    if method == "gradiveq":
        return gradiveq.GradiVeQState(**schedule)
    if method == "gradiveq-paper":
        return gradiveq.GradiVeQState.paper(**schedule)
    if method == "qsgd":
        return gradiveq.QsgdState()
    if method == "co3":
        return gradiveq.CO3State()
    if method == "casq":
        return gradiveq.CASQState()
    return None


def checkpoint_path(prefix, rank):
    return f"{prefix}.rank{rank}.pt"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="process group backend")
    ap.add_argument("--method", default="gradiveq", choices=METHODS, help="gradient aggregation")
    ap.add_argument("--steps", type=int, default=300, help="training steps (this run)")
    ap.add_argument("--batch", type=int, default=64, help="batch per rank")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    ap.add_argument("--data", default=FASHION_MNIST_DIR, help="folder with the Fashion-MNIST idx files")
    ap.add_argument("--save", default="", help="checkpoint prefix to write at the end")
    ap.add_argument("--resume", default="", help="checkpoint prefix to resume from")
    ap.add_argument("--schedule", default="", help="GradiVeQ's W,S,C (warm-up, sampling, compressed steps); "
                                                   "default: scaled to --steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1:
        ap.error("arguments --steps and --batch must be >= 1")
    schedule = None
    if args.schedule:
        try:
            schedule = tuple(int(v) for v in args.schedule.split(","))
            assert len(schedule) == 3
        except (ValueError, AssertionError):
            ap.error(f"argument --schedule must be W,S,C (three integers), got {args.schedule!r}")

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else "cpu"
    torch.manual_seed(args.seed)
    model = SmallCNN().to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    ckpt = torch.load(checkpoint_path(args.resume, rank), weights_only=False) if args.resume else None
    if ckpt is not None and ckpt["method"] != args.method:
        ap.error(f"argument --resume: the checkpoint is of --method {ckpt['method']}, not {args.method}")
    state = make_state(args.method, args.steps, schedule, ckpt["hook"]["options"] if ckpt and ckpt["hook"] else None)
    if state is not None:
        gradiveq.register_hook(ddp, state)
    elif args.method in ("fp16", "bf16"):
        ddp.register_comm_hook(None, getattr(default_hooks, f"{args.method}_compress_hook"))

    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if state is not None:
            state.load_state_dict(ckpt["hook"])
        start = ckpt["step"]

    train = load_data(args.data, "train")
    test = load_data(args.data, "test")
    if train is None:
        print(f"[rank {rank}] no Fashion-MNIST files in {args.data}: training on SYNTHETIC images", flush=True)
        train, test = synthetic(20000, 1), synthetic(2000, 2)
    images, labels = train
    g = torch.Generator()
    t0 = time.time()
    for step in range(start, start + args.steps):
        g.manual_seed((args.seed * 1000 + rank) * 1000003 + step)  # by step: a resumed run sees the same batches
        idx = torch.randint(0, images.shape[0], (args.batch,), generator=g)
        x, y = images[idx].to(device), labels[idx].to(device)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        if rank == 0 and ((step + 1) % 50 == 0 or step + 1 == start + args.steps):
            phase = state.stats()["step"]["phase"] if state is not None else args.method
            print(f"step {step + 1:5d}  loss {loss.item():.3f}  phase {phase}  {time.time() - t0:.1f} s", flush=True)

    model.eval()
    with torch.no_grad():
        x, y = test
        correct = sum(int((model(x[i:i + 1000].to(device)).argmax(1).cpu() == y[i:i + 1000]).sum())
                      for i in range(0, len(y), 1000))
    if rank == 0:
        print(f"test accuracy {correct / len(y):.4f} after {start + args.steps} steps ({args.method}, {world} ranks)",
              flush=True)
    if args.save:
        torch.save(dict(method=args.method, step=start + args.steps, model=model.state_dict(),
                        optimizer=opt.state_dict(), hook=state.state_dict() if state is not None else None),
                   checkpoint_path(args.save, rank))
        if rank == 0:
            print(f"saved {checkpoint_path(args.save, 0)} (one file per rank)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
