"""Times a bare Gloo all-reduce of ResNet-32's whole gradient (0.46M float32 values) between W local ranks, for
comparing the codec's cost with the communication it saves (benchmarks/results/cpu_codec.md).

    python benchmarks/ddp/allreduce_time.py --bandwidth-mbit 1000 [--world-size 2 --reps 30]
"""
import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from methods import HelpFormatter, free_port, shaped_rerun  # noqa: E402


def worker(rank, world, port, reps, numel, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    t = torch.randn(numel)
    times = []
    for _ in range(reps + 3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(times[3:])
    dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--bandwidth-mbit", type=float, default=0)
    ap.add_argument("--burst-kb", type=int, default=256)
    ap.add_argument("--mtu", type=int, default=0)
    args = ap.parse_args(argv)
    if args.bandwidth_mbit and not os.environ.get("GRADIVEQ_NETNS"):
        rc = shaped_rerun(os.path.abspath(__file__), argv, args.bandwidth_mbit, args.burst_kb, args.mtu)
        if rc is not None:
            return rc
        args.bandwidth_mbit = 0
    from models import resnet32
    numel = sum(p.numel() for p in resnet32().parameters())
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, args.world_size, port, args.reps, numel, q))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    times = q.get()
    for p in procs:
        p.join()
    ms = sorted(1e3 * t for t in times)
    link = f"{args.bandwidth_mbit:g} Mbit/s (shared loopback)" if args.bandwidth_mbit else "unshaped loopback"
    floor = (2 * (args.world_size - 1) * numel * 4 * 8 / (args.bandwidth_mbit * 1e6) * 1e3
             if args.bandwidth_mbit else float("nan"))
    print(f"all-reduce of {numel} float32 ({numel * 4 / 1e6:.2f} MB), {args.world_size} ranks, {link}: median "
          f"{statistics.median(ms):.1f} ms, p10 {ms[len(ms) // 10]:.1f}, p90 {ms[(9 * len(ms)) // 10]:.1f}; "
          f"shared-link floor {floor:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
