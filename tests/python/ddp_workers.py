"""Training loops run by the multi-process tests (importable, so spawned ranks can pickle them by name)."""
import contextlib
import os
import random
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# benchmarks/ddp/ (models.py): conftest.py puts it on sys.path and spawned ranks inherit it; adding it here too
# lets this module import on its own. gradiveq is the installed package (see conftest.py).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_p = os.path.join(_ROOT, "benchmarks", "ddp")
if _p not in sys.path:
    sys.path.insert(0, _p)

import gradiveq  # noqa: E402
from models import SmallCNN  # noqa: E402  (benchmarks/ddp/models.py)


class CnnWithUnusedBranch(nn.Module):
    """SmallCNN plus a conv that never takes part in forward (needs find_unused_parameters)."""

    def __init__(self):
        super().__init__()
        self.body = SmallCNN()
        self.unused = nn.Conv2d(16, 16, 3)

    def forward(self, x):
        return self.body(x)


def make_data(rank: int, step: int, batch: int = 16):
    """Learnable synthetic 1x28x28 data: the label picks one of 10 fixed templates, plus noise. Depends only on
    (rank, step), so a resumed run sees the same batches."""
    coarse = torch.randn(10, 1, 7, 7, generator=torch.Generator().manual_seed(1234))
    templates = 2.0 * F.interpolate(coarse, size=28, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(10_000 * rank + step)
    y = torch.randint(0, 10, (batch,), generator=g)
    x = templates[y] + 0.8 * torch.randn(batch, 1, 28, 28, generator=g)
    return x, y


def train(rank: int, world_size: int, cfg: dict) -> dict:
    """Trains for cfg["steps"] synchronised steps and returns per-step losses, gradients and phases, the final
    parameters and the hook's stats.

    cfg keys: hook ("plain" | "cpp" | "py" | "qsgd" | "co3" | "co3-py" | "casq" | "casq-py"), state (the hook
    state's kwargs), steps, lr, bucket_cap_mb,
    static_graph, unused_branch, accumulate (micro-batches per step, all but the last under no_sync),
    inf_at (step at which rank 0's conv2 gradient gets an inf), noise_at (step at which rank 1's conv2 and conv3
    gradients are replaced by large noise), corrupt_at (step before which rank 1 replaces
    conv2's basis), rewind = (from, to) (before step `from`, rank 1 alone loads the state it saved before step `to`:
    its iteration counter falls behind), save_at / save_path (checkpoint after that step), load_path (resume from a checkpoint),
    state_rank1 (options rank 1 alone overrides), grad_scaler (use torch.amp.GradScaler("cpu")), die_at / die_rank / die_signal (that rank sends itself SIGKILL, or
    SIGSTOP with die_signal="stop", in the middle of that step's backward, once the last layer's gradient exists and before any bucket is reduced), jitter_ms
    (each rank sleeps a random 0..jitter_ms before every forward, seeded by rank and step, so the ranks hand
    their buckets to the hook at different times).
    """
    torch.manual_seed(cfg.get("model_seed", 0))
    model = CnnWithUnusedBranch() if cfg.get("unused_branch") else SmallCNN()
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=cfg.get("bucket_cap_mb", 25), static_graph=cfg.get("static_graph", False),
        find_unused_parameters=cfg.get("unused_branch", False))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.get("lr", 0.01), momentum=0.9)
    state = None
    hook = cfg.get("hook", "plain")
    if hook == "qsgd":
        state = gradiveq.QsgdState(**cfg.get("state", {}))
        gradiveq.register_hook(ddp, state)
    elif hook in ("co3", "co3-py", "casq", "casq-py"):  # "-py": the Python-callable hook
        make = gradiveq.CO3State if hook.startswith("co3") else gradiveq.CASQState
        py_hook = gradiveq.co3_hook if hook.startswith("co3") else gradiveq.casq_hook
        state = make(**cfg.get("state", {}), model=ddp if hook.endswith("-py") else None)
        if hook.endswith("-py"):
            ddp.register_comm_hook(state, py_hook)
        else:
            gradiveq.register_hook(ddp, state)
    elif hook != "plain":
        options = dict(cfg.get("state", {}), **(cfg.get("state_rank1", {}) if rank == 1 else {}))
        state = gradiveq.GradiVeQState(**options, model=ddp if hook == "py" else None)
        if hook == "py":
            ddp.register_comm_hook(state, gradiveq.hook)
        else:
            gradiveq.register_hook(ddp, state)
    start = 0
    if cfg.get("load_path"):
        ckpt = torch.load(cfg["load_path"].format(rank=rank), weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["gradiveq"])
        start = ckpt["step"]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if cfg.get("grad_scaler") else None
    conv2 = model.body.conv2 if cfg.get("unused_branch") else model.conv2

    out = {"losses": [], "grads": [], "phases": [], "finite": [], "scales": []}
    accumulate = cfg.get("accumulate", 1)
    for step in range(start, start + cfg.get("steps", 10)):
        if cfg.get("rewind") and rank == 1:  # (from, to): rank 1 alone reloads its own state of step `to`
            if step == cfg["rewind"][1]:
                rewound = state.state_dict()
            if step == cfg["rewind"][0]:
                state.load_state_dict(rewound)
        if cfg.get("corrupt_at") == step and rank == 1:
            state._engine.set_basis("conv2.weight", perturbed(state._engine.basis("conv2.weight")))
        handle = None
        if cfg.get("inf_at") == step and rank == 0:
            handle = conv2.weight.register_hook(lambda g: g + float("inf"))
        noise_handles = []
        if cfg.get("noise_at") == step and rank == 1:
            # A gradient unlike anything in the window: the basis explains little of it (eq. 7 loss near 1).
            for conv in (model.conv2, model.conv3):
                noise_handles.append(conv.weight.register_hook(
                    lambda g: torch.randn(g.shape, generator=torch.Generator().manual_seed(7)) * 10 * g.norm()
                    / g.numel() ** 0.5))
        if cfg.get("die_at") == step and rank == cfg.get("die_rank", 1):
            # Mid-step: the head's gradient is the first one backward produces.
            (model.body if cfg.get("unused_branch") else model).fc.weight.register_hook(
                lambda g: os.kill(os.getpid(), signal.SIGSTOP if cfg.get("die_signal") == "stop" else signal.SIGKILL))
        if cfg.get("jitter_ms"):
            time.sleep(random.Random(1000 * rank + step).uniform(0, cfg["jitter_ms"]) / 1000)
        opt.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            x, y = make_data(rank, 0 if cfg.get("fixed_batch") else step * accumulate + micro)
            # DDP decides at forward time whether the backward synchronises: no_sync wraps both.
            with ddp.no_sync() if micro < accumulate - 1 else contextlib.nullcontext():
                loss = F.cross_entropy(ddp(x), y)
                if scaler is not None:
                    loss = scaler.scale(loss)
                loss.backward()
        if handle is not None:
            handle.remove()
        for h in noise_handles:
            h.remove()
        out["losses"].append(loss.item())
        out["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        out["finite"].append(all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None))
        if state is not None:
            out["phases"].append(state.stats()["step"]["phase"])
            out.setdefault("step_stats", []).append(state.stats()["step"])
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            out["scales"].append(scaler.get_scale())
        else:
            opt.step()
        if cfg.get("save_at") == step + 1:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "gradiveq": state.state_dict()}, cfg["save_path"].format(rank=rank))
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    if state is not None:
        out["stats"] = state.stats()
    if not cfg.get("keep_grads", True):
        out.pop("grads")
    if cfg.get("return_state"):  # only for callers in the same process (not picklable)
        out["state"] = state
    return out


def plain_then_hook(rank: int, world_size: int, cfg: dict) -> dict:
    """One plain all-reduce step (the reference), then train(cfg), in the same processes: one spawn for both."""
    plain = train(rank, world_size, dict(cfg, hook="plain", steps=1, save_at=None, load_path=None))
    return {"plain": plain, "ours": train(rank, world_size, cfg)}


def perturbed(pca: "gradiveq.PcaCompressor") -> "gradiveq.PcaCompressor":
    """The same basis with one value nudged: what a silently diverged rank would hold."""
    image = pca.serialize().clone()
    image[-8] ^= 1
    return gradiveq.PcaCompressor.deserialize(image)


def load_damaged_state_dicts(rank: int, world_size: int, cfg: dict) -> dict:
    """Trains into a compressed window, then loads damaged copies of its own state dict: each must raise
    ValueError and leave the running state as it was. Returns the messages."""
    out = train(rank, world_size, dict(cfg, keep_grads=False, return_state=True))
    state = out["state"]
    good = state.state_dict()
    iteration = state.stats()["iteration"]
    damaged = {}
    flipped = dict(good, engine_state=good["engine_state"].clone())
    flipped["engine_state"][len(flipped["engine_state"]) // 2] ^= 1  # one bit inside the bases or samples
    damaged["bit flip"] = flipped
    damaged["truncated"] = dict(good, engine_state=good["engine_state"][:-100].clone())
    damaged["wrong version"] = dict(good, version=good["version"] + 1)
    damaged["other world size"] = dict(good, world_size=world_size + 1)
    messages = {}
    for what, sd in damaged.items():
        try:
            state.load_state_dict(sd)
            messages[what] = None
        except ValueError as e:
            messages[what] = str(e)
        assert state.stats()["iteration"] == iteration
    state.load_state_dict(good)  # the intact one still loads
    return {"messages": messages}
