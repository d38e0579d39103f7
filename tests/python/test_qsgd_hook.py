"""The 4-bit QSGD baseline hook on real 2-rank Gloo DDP."""
import pytest
import torch

import gradiveq
from ddp_harness import run_ranks
from ddp_workers import train
from test_ddp_hook import no_errors


def test_qsgd_hook_is_unbiased_and_sends_what_its_formula_says():
    steps = 60
    cfg = dict(steps=steps, lr=0.0, fixed_batch=True, bucket_cap_mb=0.02)
    plain = no_errors(run_ranks(train, 2, dict(cfg, hook="plain", steps=1)))
    ours = no_errors(run_ranks(train, 2, dict(cfg, hook="qsgd", state=dict(min_numel=1000))))
    exact = plain[0]["grads"][0]
    for name, g in exact.items():
        draws = torch.stack([ours[0]["grads"][s][name] for s in range(steps)])
        assert torch.equal(draws[0], ours[1]["grads"][0][name])  # both ranks decode the same average
        if g.numel() < 1000:
            torch.testing.assert_close(draws[0], g, rtol=1e-5, atol=1e-7)  # small tensors travel exactly
            continue
        single = ((draws[0] - g).norm() / g.norm()).item()
        mean = ((draws.mean(0) - g).norm() / g.norm()).item()
        assert single > 0.01, f"{name}: quantisation should perturb a single step"
        # Unbiased: averaging 60 independent draws shrinks the error by about sqrt(60) ~ 7.7.
        assert mean < single / 4, (name, single, mean)
    # Bytes: each quantised tensor is 4 bytes per 512-value bucket plus 4 bits per value; the rest float32.
    codec = gradiveq.QsgdCodec(levels=7, bucket_size=512)
    expected = sum(codec.packed_bytes(g.numel()) if g.numel() >= 1000 else 4 * g.numel() for g in exact.values())
    assert ours[0]["step_stats"][-1]["bytes_payload"] == expected
    assert ours[0]["step_stats"][-1]["bytes_uncompressed"] == sum(4 * g.numel() for g in exact.values())


@pytest.mark.parametrize("kwargs, words", [
    (dict(levels=0), ["levels"]),
    (dict(bucket_size=0), ["bucket_size"]),
    (dict(norm="l1"), ["norm"]),
    (dict(min_numel=-1), ["min_numel"]),
    (dict(levels=4.0), ["levels", "int"]),
])
def test_qsgd_state_rejects_bad_options(kwargs, words):
    with pytest.raises(ValueError) as err:
        gradiveq.QsgdState(**kwargs)
    for w in words:
        assert w in str(err.value)
