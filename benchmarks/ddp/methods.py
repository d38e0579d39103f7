"""What the benchmarks share: the aggregation methods as DDP hooks with their measurements, and link shaping.

Methods: "nocomm" (a no-op hook: the compute floor), "plain" (all-reduce), "fp16", "bf16" (torch's compressing
all-reduce hooks), "powersgdR" for any rank R >= 1, e.g. "powersgd1" / "powersgd2" / "powersgd4" (torch's PowerSGD
hook with error feedback and warm start; plain all-reduce for its first `powersgd_start_iter` steps), "qsgd4"
(gradiveq.QsgdState), "co3" (gradiveq.CO3State: fp4, gamma 0.9), "casq2"/"casq3" (gradiveq.CASQState at 2 / 3
bits) and GradiVeQ configurations ("gradiveq" = the library's defaults, "gradiveq-paper" = the paper's method; see
GRADIVEQ_CONFIGS). torch's hooks are wrapped to measure the time from a bucket's hand-over to its future's
completion and the bytes their collectives carry; ours report the same from C++ (state.stats()).

network_namespace() makes a throw-away network namespace (loopback up, optionally shaped with tc tbf) and always
removes it again; shaped_rerun() re-runs a whole script inside one.
"""

import argparse
import contextlib
import datetime
import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

import gradiveq

TORCH_METHODS = ["nocomm", "plain", "fp16", "bf16", "powersgd1", "powersgd2", "powersgd4"]

# The quantizer baselines of this library, by name: (state class, its keyword arguments besides the seed).
QUANTIZER_METHODS = {
    "qsgd4": (gradiveq.QsgdState, dict(levels=7, bucket_size=512)),
    "co3": (gradiveq.CO3State, dict(format="fp4", gamma=0.9)),
    "casq2": (gradiveq.CASQState, dict(bits=2)),
    "casq3": (gradiveq.CASQState, dict(bits=3)),
}
# GradiVeQ configurations, by name: keyword arguments of GradiVeQState besides the schedule.
GRADIVEQ_CONFIGS = {
    "gradiveq": dict(),  # the library's defaults: GradiVeQState() with the run's schedule
    # the paper exactly (GradiVeQState.paper()): first-slice fit, K = one kernel row, energy 0.99, 4-bit QSGD sampling
    "gradiveq-paper": dict(paper=True),
}


def powersgd_rank(name: str):
    """The matrix approximation rank R of a "powersgdR" or "powersgdR-fp16" method name (R >= 1), else None.
    The -fp16 form is torch's own fp16_compress_wrapper(powerSGD_hook): P and Q travel in float16."""
    match = re.fullmatch(r"powersgd([1-9][0-9]*)(-fp16)?", name)
    return int(match.group(1)) if match else None


def add_gradiveq_config(spec: str) -> str:
    """Registers a named configuration from 'NAME=JSON' (GradiVeQState keyword arguments; "paper": true starts
    from the paper's options), e.g. 'gradiveq-r16={"fit_on": "all_slices", "target_ratio": 16}'."""
    import json
    name, _, text = spec.partition("=")
    if not name.startswith("gradiveq-") or not text:
        raise ValueError(f"configuration {spec!r}: expected NAME=JSON with NAME starting with 'gradiveq-'")
    options = json.loads(text)
    if not isinstance(options, dict):
        raise ValueError(f"configuration {spec!r}: the JSON must be an object of GradiVeQState arguments")
    # JSON names a dtype as a string: "float16", "bfloat16", "float32".
    for key in ("coeff_dtype", "basis_dtype", "uncompressed_dtype"):
        if isinstance(options.get(key), str):
            dtype = getattr(torch, options[key], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"configuration {spec!r}: {key} {options[key]!r} is not a torch dtype name")
            options[key] = dtype
    GRADIVEQ_CONFIGS[name] = options
    return name


class _CountingDist:
    """Stands in for torch.distributed inside torch's hook modules and counts the all-reduces and their bytes."""

    def __init__(self, real):
        self._real = real
        self.bytes = 0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def all_reduce(self, tensor, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1
        return self._real.all_reduce(tensor, *args, **kwargs)


def _timed(hook_fn, record):
    def wrapper(state, bucket):
        start = time.perf_counter()
        fut = hook_fn(state, bucket)

        def done(f):
            record.append(time.perf_counter() - start)
            return f.value()
        return fut.then(done)
    return wrapper


def _noop_hook(_, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def ddp_kwargs(method, bucket_cap_mb=None) -> dict:
    kwargs = {}
    if bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = bucket_cap_mb
    if powersgd_rank(method):
        # torch's PowerSGD hook issues its second all-reduce from a future's callback; with several buckets those
        # race on Gloo and the ranks' collective order diverges. One bucket avoids it.
        kwargs["bucket_cap_mb"] = 1024
    return kwargs


class Method:
    """A method attached to one DDP model; `measure()` after each step returns that step's aggregation numbers.

    `schedule` is GradiVeQ's (warm-up, sampling, compressed) iterations; `powersgd_start_iter` is PowerSGD's
    start_powerSGD_iter: the steps it all-reduces uncompressed first. torch requires it to be > 1 with error
    feedback or warm start (both on here), so it must be >= 2."""

    def __init__(self, ddp, model, name, seed=0, schedule=(2500, 100, 400), coeff_dtype=None,
                 gradiveq_kwargs=None, powersgd_start_iter=2):
        self.name, self.model, self.state, self.counter = name, model, None, None
        self.hook_times = []
        self.warmup_steps = 0  # steps before the method is in its steady state
        if name == "nocomm":
            ddp.register_comm_hook(None, _timed(_noop_hook, self.hook_times))
        elif name in ("plain", "fp16", "bf16"):
            self.counter = _CountingDist(dist)
            default_hooks.dist = self.counter
            hook = {"plain": default_hooks.allreduce_hook, "fp16": default_hooks.fp16_compress_hook,
                    "bf16": default_hooks.bf16_compress_hook}[name]
            ddp.register_comm_hook(None, _timed(hook, self.hook_times))
        elif powersgd_rank(name):
            if powersgd_start_iter < 2:
                raise ValueError(f"{name}: powersgd_start_iter must be >= 2 with error feedback / warm start "
                                 f"(torch's PowerSGDState), got {powersgd_start_iter}")
            self.counter = _CountingDist(dist)
            powerSGD_hook.dist = self.counter
            default_hooks.dist = self.counter
            self.state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank(name),
                                                     start_powerSGD_iter=powersgd_start_iter,
                                                     use_error_feedback=True, warm_start=True)
            hook = powerSGD_hook.powerSGD_hook
            if name.endswith("-fp16"):
                hook = default_hooks.fp16_compress_wrapper(hook)
            ddp.register_comm_hook(self.state, _timed(hook, self.hook_times))
            self.warmup_steps = powersgd_start_iter + 1
        elif name in QUANTIZER_METHODS:
            make, kwargs = QUANTIZER_METHODS[name]
            if make is not gradiveq.CO3State:  # CO3 rounds deterministically: no seed
                kwargs = dict(kwargs, seed=seed)
            self.state = make(**kwargs)
            gradiveq.register_hook(ddp, self.state)
        elif name in GRADIVEQ_CONFIGS or (gradiveq_kwargs is not None and name.startswith("gradiveq")):
            kwargs = dict(GRADIVEQ_CONFIGS.get(name, {}))
            kwargs.update(gradiveq_kwargs or {})
            make = gradiveq.GradiVeQState.paper if kwargs.pop("paper", False) else gradiveq.GradiVeQState
            warm, sample, compress = schedule
            # A configuration may name its own schedule (e.g. a longer sampling window); the run's is the default.
            options = dict(warmup_iters=warm, sample_iters=sample, compress_iters=compress, seed=seed)
            if coeff_dtype is not None:  # else the configuration's (the library's default, or the paper's float32)
                options["coeff_dtype"] = coeff_dtype
            options.update(kwargs)
            self.state = make(**options)
            gradiveq.register_hook(ddp, self.state)
            self.warmup_steps = warm
        else:
            raise ValueError(f"unknown method {name!r}")
        self._bytes_before = 0
        self._uncompressed = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)

    @property
    def ours(self) -> bool:
        return isinstance(self.state, (gradiveq.GradiVeQState, gradiveq.QsgdState, gradiveq.CO3State,
                                       gradiveq.CASQState))

    def before_step(self):
        self.hook_times.clear()
        self._bytes_before = self.counter.bytes if self.counter else 0
        self._calls_before = self.counter.calls if self.counter else 0

    def measure(self, world_size) -> dict:
        if self.ours:
            st = self.state.stats()["step"]
            # A new basis counts where it is sent: the fitting rank's broadcasts of that step.
            row = dict(agg=st["aggregation_ms"] / 1e3, bytes=st["bytes_payload"] + st.get("bytes_bases", 0),
                       wire=st["bytes_wire"], uncompressed=st["bytes_uncompressed"], phase=st["phase"],
                       fit=st["fit_ms"] / 1e3, fit_background=st.get("fit_background_ms", 0.0) / 1e3, codec=(st["compress_ms"] + st["decompress_ms"]) / 1e3,
                       compress=st["compress_ms"] / 1e3, decompress=st["decompress_ms"] / 1e3, buckets=st["buckets"],
                       collectives=st["collectives"])
            if st["values_encoded"]:  # CO3 / CASQ: bits per encoded value and this rank's quantization error
                row["bits_per_element"] = 8.0 * st["bytes_encoded"] / st["values_encoded"]
                row["relative_error"] = st["relative_error"]
            return row
        sent = (self.counter.bytes - self._bytes_before) if self.counter else 0
        return dict(agg=sum(self.hook_times), bytes=sent, wire=sent * 2 * (world_size - 1) / world_size,
                    uncompressed=self._uncompressed, phase="", buckets=len(self.hook_times),
                    collectives=(self.counter.calls - self._calls_before) if self.counter else 0)

    def close(self):
        default_hooks.dist = dist
        powerSGD_hook.dist = dist


def run_rank_process(rank, world, port, timeout_s, body):
    """Body of one spawned rank: init Gloo on 127.0.0.1:port, run body(), destroy the group, then leave with
    os._exit(0) once the body has succeeded. Skipping interpreter finalisation avoids a torch/Gloo teardown race:
    Gloo's worker threads can still hold work objects with Python references when the interpreter is torn
    down, which aborts the process ("terminate called without an active exception", pytorch/pytorch#190489) and
    made a finished benchmark method fail at random (seen once in CI, after powersgd1). A failing body still
    raises, so torch.multiprocessing reports it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        body()
    finally:
        dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' docstrings as written and shows every option's default."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"  # argparse shows defaults only of options with a help text
        return super()._format_action(action)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NetnsError(RuntimeError):
    """A command setting up a network namespace failed."""


def netns_unavailable(shape=False):
    """Why network namespaces (and, with shape, tc shaping) cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in (("ip", "tc") if shape else ("ip",)) if not shutil.which(t)]
    return f"no {' / '.join(missing)}" if missing else None


def _pids_in_namespace(ns_id):
    """PIDs whose network namespace is `ns_id` ((st_dev, st_ino) of the namespace's nsfs inode)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:  # gone meanwhile, or not ours to see
                continue
            if (st.st_dev, st.st_ino) == ns_id:
                pids.append(int(entry))
    return pids


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _netns_kill_and_delete(name, quiet_s=0.5, limit_s=10.0):
    """Kills the processes left inside namespace `name` (only ours: it was made for them), then deletes it.

    An `ip netns exec` that opened the namespace just before the deletion enters it just after, where `ip netns pids`
    can no longer name it (seen on a loaded machine: a `sleep` outlived its deleted namespace). So after deleting the
    name, processes are found by the namespace's inode and killed until none has appeared for `quiet_s` seconds
    (at most `limit_s`)."""
    try:  # held open until the end, so that the namespace, and with it its inode number, cannot be reused
        ns_fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    except OSError:
        ns_fd = None
    try:
        _kill_all(subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split())
        subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
        if ns_fd is None:
            return
        st = os.fstat(ns_fd)
        ns_id = (st.st_dev, st.st_ino)
        start = last_seen = time.monotonic()
        while time.monotonic() - last_seen < quiet_s and time.monotonic() - start < limit_s:
            pids = _pids_in_namespace(ns_id)
            if pids:
                _kill_all(pids)
                last_seen = time.monotonic()
            time.sleep(0.02)
    finally:
        if ns_fd is not None:
            os.close(ns_fd)


@contextlib.contextmanager
def network_namespace(name, mbit=0, burst_kb=256, mtu=0):
    """Creates network namespace `name` with its loopback up (MTU `mtu` if given, shaped to `mbit` Mbit/s with tc tbf,
    burst `burst_kb` KB, when mbit > 0; the burst must exceed the loopback MTU, 64 KiB unless `mtu` lowers it) and
    yields its name. On leaving, also on an error, Ctrl-C or SIGTERM (turned into SystemExit(143) meanwhile), the
    processes still inside are killed and the namespace is deleted. Raises NetnsError when a set-up command fails."""
    cmds = [["ip", "netns", "add", name], ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    if mtu:
        cmds.append(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "mtu", str(mtu)])
    if mbit:
        cmds.append(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                     f"{mbit:g}mbit", "burst", f"{burst_kb}kb", "latency", "50ms"])

    def on_sigterm(*_):
        raise SystemExit(143)
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        for c in cmds:
            done = subprocess.run(c, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise NetnsError(f"{' '.join(c)} failed: {done.stderr.strip()}")
        yield name
    finally:
        _netns_kill_and_delete(name)
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def netns_env(name):
    """The environment for a process started in namespace `name`: c10d warns that it cannot resolve host names
    inside the namespace; that is expected there, so its log level defaults to ERROR."""
    return dict(os.environ, GRADIVEQ_NETNS=name, TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))


def shaped_rerun(script, argv, mbit, burst_kb=256, mtu=0):
    """Re-runs `script argv` inside a new network namespace whose loopback is shaped to `mbit` Mbit/s with tc tbf
    (burst `burst_kb` KB; it must exceed the loopback MTU, 64 KiB unless `mtu` lowers it).
    Returns the exit code, or None when shaping is impossible (not root, no ip/tc): the caller runs unshaped.
    The namespace is removed on exit, on Ctrl-C and on SIGTERM (see network_namespace)."""
    why = netns_unavailable(shape=True)
    if why:
        print(f"cannot shape the link to {mbit:g} Mbit/s (needs root, ip and tc: {why}): running UNSHAPED", flush=True)
        return None
    name = f"gvq{os.getpid()}"
    try:
        with network_namespace(name, mbit, burst_kb, mtu):
            return subprocess.run(["ip", "netns", "exec", name, sys.executable, script] + argv,
                                  env=netns_env(name)).returncode
    except NetnsError as e:
        print(f"cannot shape the link ({e}): running UNSHAPED", flush=True)
        return None
    except KeyboardInterrupt:
        return 130
