"""Runs a function on W real processes joined by a Gloo process group on 127.0.0.1, and collects results.

Each rank runs ``fn(rank, world_size, cfg)`` after ``init_process_group("gloo")``; what it returns is pickled
to a file and returned in rank order. A rank that raises returns ``{"error": message}`` so tests can check
failures on every rank. The whole run is bounded by ``timeout`` seconds.
"""
import datetime
import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, cfg, out_dir, pg_timeout):
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, cfg)
    except Exception as e:  # noqa: BLE001  (reported to the test)
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_ranks(fn, world_size: int, cfg: dict = None, timeout: float = 240, pg_timeout: float = 60,
              stalled=()) -> list:
    """`stalled`: ranks expected to stop (SIGSTOP) and never finish; they are killed once the others have ended
    (or the timeout has passed) and are not counted as hung."""
    cfg = cfg or {}
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, cfg, out_dir, pg_timeout))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for r, p in enumerate(procs):
            if r in stalled:
                continue
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            p.join(max(remaining, 0.1))
        for r in stalled:
            procs[r].kill()
            procs[r].join()
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout} s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                results.append({"error": f"rank {r} died with exit code {procs[r].exitcode}"})
                continue
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results
