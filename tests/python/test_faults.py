"""Faults on real multi-process Gloo DDP: a rank killed mid-step in every phase must make the survivors fail with
an error, never hang."""
import time

import pytest

from ddp_harness import run_ranks
from ddp_workers import train

# 2 warm-up, 3 sampling, 4 compressed iterations: step 5 is the first compressed step, whose hook fits and
# broadcasts the bases.
SHORT = dict(warmup_iters=2, sample_iters=3, compress_iters=4, min_numel=100, energy=0.95)
PG_TIMEOUT_S = 15


@pytest.mark.parametrize("phase,step", [("warm-up", 1), ("sampling", 3), ("basis fit and broadcast", 5),
                                        ("compressed", 7)])
@pytest.mark.parametrize("hook", ["cpp", "py"])
def test_a_rank_killed_mid_step_makes_the_others_fail_not_hang(phase, step, hook):
    world = 3
    start = time.monotonic()
    res = run_ranks(train, world, dict(hook=hook, state=SHORT, steps=12, die_at=step, die_rank=1, keep_grads=False),
                    timeout=120, pg_timeout=PG_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert res[1]["error"].startswith("rank 1 died"), res[1]
    for r in (0, 2):
        assert "error" in res[r], f"rank {r} finished training although rank 1 died in the {phase} phase"
        # Gloo names the lost peer or the timeout; either way an error, not a hang.
        msg = res[r]["error"]
        assert any(s in msg for s in ("Connection closed by peer", "Connection reset", "Timed out", "timeout",
                                      "Broken pipe")), msg
    print(f"{hook} hook, rank 1 killed at step {step} ({phase}): survivors raised after {elapsed:.1f} s "
          f"(incl. start-up): {res[0]['error'][:120]!r}")
    assert elapsed < 120


# At 8 ranks: a rank killed (SIGKILL) or stalled (SIGSTOP) mid-step. A killed rank closes its sockets, so its
# peers see the connection drop; a stopped one keeps them open, so the others can only notice through the process
# group's timeout. Either way every other rank must raise, within about that timeout, not hang.
@pytest.mark.parametrize("signal_name,step", [("kill", 7), ("stop", 3)])
def test_eight_ranks_raise_when_one_is_killed_or_stalled_mid_step(signal_name, step):
    world, victim = 8, 5
    start = time.monotonic()
    res = run_ranks(train, world, dict(hook="cpp", state=SHORT, steps=10, die_at=step, die_rank=victim,
                                       die_signal=signal_name, keep_grads=False),
                    timeout=240, pg_timeout=PG_TIMEOUT_S, stalled=(victim,) if signal_name == "stop" else ())
    elapsed = time.monotonic() - start
    assert res[victim]["error"].startswith(f"rank {victim} died"), res[victim]
    for r in set(range(world)) - {victim}:
        assert "error" in res[r], f"rank {r} finished although rank {victim} got SIG{signal_name.upper()}"
        msg = res[r]["error"]
        assert any(s in msg for s in ("Connection closed by peer", "Connection reset", "Timed out", "timeout",
                                      "Broken pipe")), (r, msg)
    print(f"8 ranks, rank {victim} SIG{signal_name.upper()} at step {step}: survivors raised after {elapsed:.1f} s "
          f"(incl. start-up of 8 processes)")
    assert elapsed < 240
