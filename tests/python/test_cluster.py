"""The emulated cluster of benchmarks/ddp/cluster.py: 3 nodes, each in its own network namespace with a shaped
link to a bridge, running a real 3-rank Gloo all-reduce; everything is removed afterwards, also on an error."""
import os
import json
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                     "ddp")
sys.path.insert(0, BENCH)

import cluster  # noqa: E402

pytestmark = pytest.mark.skipif(cluster.unavailable() is not None,
                                reason=f"no emulated cluster here: {cluster.unavailable()}")

RANK = """
import datetime, json, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {bench!r})
from cluster import link_bytes
rank, world, master, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://{{master}}:{{port}}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
t = torch.full((1 << 20,), float(rank + 1))  # 4 MB
dist.barrier()
before, start = link_bytes(), time.perf_counter()
dist.all_reduce(t)
dist.barrier()
after = link_bytes()
print(json.dumps(dict(sum=t[0].item(), ok=bool((t == t[0]).all()), seconds=time.perf_counter() - start,
                      tx=after[0] - before[0], rx=after[1] - before[1])))
dist.destroy_process_group()
"""


def namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_three_shaped_nodes_all_reduce_over_their_own_links_and_are_removed_afterwards():
    world, mbit, port = 3, 200, 29517
    c = cluster.EmulatedCluster(world, mbit=mbit, prefix=f"gvqt{os.getpid()}")
    with c:
        assert c.node(0) in namespaces() and c.switch in namespaces()
        procs = [subprocess.Popen(c.exec_argv(r, [sys.executable, "-c", RANK.format(bench=BENCH), str(r), str(world),
                                                  cluster.node_address(0), str(port)]),
                                  env=c.env(r), stdout=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
    res = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    ring_bytes = 2 * (world - 1) / world * 4 * (1 << 20)
    for r in res:
        assert r["ok"] and r["sum"] == 6.0
        # Every byte of the ring went over this node's own link, both ways.
        assert r["tx"] >= ring_bytes and r["rx"] >= ring_bytes, r
        # ... at no more than the shaped rate (10% slack for the bucket's burst).
        assert r["seconds"] >= 0.9 * ring_bytes * 8 / (mbit * 1e6), r
    assert c.prefix not in namespaces()


def test_the_cluster_is_removed_when_the_body_fails():
    c = cluster.EmulatedCluster(2, mbit=100, prefix=f"gvqf{os.getpid()}")
    with pytest.raises(RuntimeError, match="boom"):
        with c:
            sleeper = subprocess.Popen(c.exec_argv(1, ["sleep", "60"]))
            raise RuntimeError("boom")
    assert c.prefix not in namespaces()
    assert sleeper.wait(timeout=10) != 0  # the process left inside was killed


# Enters the namespace whose file it opened only once that file is gone: what a loaded machine did to an
# `ip netns exec` started just before the cluster was removed.
LATE_ENTRY = """
import ctypes, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
while os.path.exists(sys.argv[1]):
    time.sleep(0.005)
assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0  # CLONE_NEWNET
os.execvp("sleep", ["sleep", "60"])
"""


def test_a_process_entering_while_the_cluster_is_removed_is_killed_too():
    c = cluster.EmulatedCluster(2, mbit=100, prefix=f"gvql{os.getpid()}")
    with pytest.raises(RuntimeError, match="boom"):
        with c:
            late = subprocess.Popen([sys.executable, "-c", LATE_ENTRY, f"/run/netns/{c.node(1)}"],
                                    stdout=subprocess.PIPE, text=True)
            assert late.stdout.readline().strip() == "ready"
            raise RuntimeError("boom")
    try:
        assert late.wait(timeout=10) != 0  # killed, not left sleeping in a deleted namespace
    finally:
        late.kill()


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="nodes"):
        cluster.EmulatedCluster(0)
    with pytest.raises(ValueError, match="mbit"):
        cluster.EmulatedCluster(2, mbit=-1)
