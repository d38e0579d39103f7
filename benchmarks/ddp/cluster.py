"""An emulated cluster on one machine: one network namespace per node, each with its own shaped link to a switch.

    with EmulatedCluster(nodes=8, mbit=100, delay_ms=0.5) as cluster:
        subprocess.run(cluster.exec_argv(3, [sys.executable, "rank.py"]), env=cluster.env(3))

Each node r lives in namespace ``<prefix>n<r>`` with one interface, eth0, address 10.77.<r // 250>.<r % 250 + 1>/16,
joined by a veth pair to a Linux bridge in namespace ``<prefix>sw``: a switch with one port per node. Each link
is shaped in both directions with tc tbf to ``mbit`` Mbit/s (the node's eth0 egress is its upload, the switch
port's egress its download), so a ring all-reduce and an all-gather see per-node bandwidth as on a real switch,
not one shared loopback. ``delay_ms`` adds a one-way netem delay on each node's upload (where the kernel has
sch_netem; this project's CI machines do not, and say so). The addresses exist only
inside these namespaces: no route leads out of them. On leaving the context, also on an error, Ctrl-C or SIGTERM,
the processes left inside are killed and every namespace (and with it every veth) is deleted.

Needs root and iproute2 (``ip``, ``tc``); ``unavailable()`` says why not otherwise, and callers fall back to the
shared loopback.
"""

import os
import signal
import subprocess
import threading

from methods import NetnsError, _netns_kill_and_delete, netns_env, netns_unavailable

__all__ = ["EmulatedCluster", "unavailable", "node_address"]


def unavailable():
    """Why an emulated cluster cannot be built here (not root, no ip / tc), or None."""
    return netns_unavailable(shape=True)


def node_address(rank: int) -> str:
    return f"10.77.{rank // 250}.{rank % 250 + 1}"


def _run(cmd):
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def _netem_missing(ns, dev):
    return NetnsError(f"tc netem is not available in this kernel (no sch_netem module), so the links of {ns} cannot "
                      f"be given a delay: run with delay_ms=0")


def _shape(ns, dev, mbit, delay_ms=0.0):
    """tbf at `mbit` on `dev`'s egress (burst 64 KB: well above the 1500-byte MTU; at most 20 ms queued), behind
    a netem delay when delay_ms > 0."""
    tbf = ["tbf", "rate", f"{mbit:g}mbit", "burst", "64kb", "latency", "20ms"]
    if delay_ms > 0:
        _add_delay(ns, dev, delay_ms, ["handle", "1:"])
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:"] + tbf)
    else:
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"] + tbf)


def _add_delay(ns, dev, delay_ms, handle=()):
    cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *handle, "netem", "delay",
           f"{delay_ms:g}ms", "limit", "100000"]
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if "unknown" in done.stderr:
        raise _netem_missing(ns, dev)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


class EmulatedCluster:
    def __init__(self, nodes: int, mbit: float = 0.0, delay_ms: float = 0.0, prefix: str = None):
        if nodes < 1:
            raise ValueError(f"EmulatedCluster: argument 'nodes' must be >= 1, got {nodes}")
        if mbit < 0 or delay_ms < 0:
            raise ValueError(f"EmulatedCluster: 'mbit' and 'delay_ms' must be >= 0, got {mbit}, {delay_ms}")
        self.nodes, self.mbit, self.delay_ms = nodes, mbit, delay_ms
        self.prefix = prefix or f"gvq{os.getpid()}"
        self.switch = f"{self.prefix}sw"
        self._made = []
        self._old_sigterm = None

    def node(self, rank: int) -> str:
        return f"{self.prefix}n{rank}"

    def exec_argv(self, rank: int, argv: list) -> list:
        return ["ip", "netns", "exec", self.node(rank)] + list(argv)

    def env(self, rank: int) -> dict:
        # Gloo binds to the address the host name resolves to, 127.0.0.1 inside a namespace: name the link instead.
        return dict(netns_env(self.node(rank)), GLOO_SOCKET_IFNAME="eth0")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            def on_sigterm(*_):
                raise SystemExit(143)
            self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _build(self):
        self._add_namespace(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for r in range(self.nodes):
            self._add_node(r)

    def _add_namespace(self, name):
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _add_node(self, r):
        ns, port = self.node(r), f"p{r}"
        self._add_namespace(ns)
        _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{node_address(r)}/16", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if self.mbit > 0:
            _shape(ns, "eth0", self.mbit, self.delay_ms)  # upload
            _shape(self.switch, port, self.mbit)  # download
        elif self.delay_ms > 0:
            _add_delay(ns, "eth0", self.delay_ms)

    def __exit__(self, *exc):
        for name in reversed(self._made):
            _netns_kill_and_delete(name)
        self._made.clear()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        return False


def link_bytes(dev: str = "eth0") -> tuple:
    """(tx, rx) bytes of `dev` as seen from inside the calling process's network namespace."""
    base = f"/sys/class/net/{dev}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())
