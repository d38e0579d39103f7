"""The CO3 and CASQ hooks (all-gather, decode, sum, average) on real multi-process Gloo DDP."""
import pytest
import torch

import gradiveq
from ddp_harness import run_ranks
from ddp_workers import plain_then_hook, train
from test_ddp_hook import no_errors

SMALL = 1000  # min_numel: SmallCNN's conv1 weight (144 values) and the biases travel uncompressed


@pytest.mark.parametrize("world, hook", [(2, "co3"), (4, "co3-py")])
def test_co3_fp8_without_memory_averages_like_plain_all_reduce(world, hook):
    cfg = dict(steps=1, lr=0.0, fixed_batch=True, bucket_cap_mb=0.02)  # several buckets
    both = no_errors(run_ranks(plain_then_hook, world, dict(cfg, hook=hook, state=dict(format="fp8", gamma=0.0))))
    plain, outs = both[0]["plain"]["grads"][0], [b["ours"] for b in both]
    for name, g in plain.items():
        ours = outs[0]["grads"][0][name]
        for r in range(1, world):
            assert torch.equal(outs[r]["grads"][0][name], ours), (name, r)  # every rank decodes the same average
        if g.numel() < SMALL:
            if world == 2:  # (a/2 + b/2) == (a + b)/2 exactly in float: powers of two scale exactly
                assert torch.equal(ours, g), name
            else:  # four summands: Gloo's order may differ from DDP's, so only up to rounding
                torch.testing.assert_close(ours, g, rtol=1e-6, atol=1e-9)
            continue
        # fp8 keeps 3 significant bits: every value within 1/16 relative, so the average too.
        err = ((ours - g).norm() / g.norm()).item()
        assert 0 < err < 1 / 16, (name, err)
    st = outs[0]["stats"]
    assert 0 < st["relative_error"] < 1 / 16
    assert 4.0 < st["bits_per_element"] < 8.0  # fp8 Huffman-coded, table included (small tensors here)
    assert st["step"]["collectives"] > 0 and st["bytes_payload"] > 0


def test_casq_hook_is_unbiased_identical_on_ranks_and_sends_its_formula(tmp_path):
    steps = 30
    path = str(tmp_path / "casq{rank}.pt")
    cfg = dict(steps=steps, lr=0.0, fixed_batch=True, bucket_cap_mb=0.02, save_at=steps, save_path=path)
    both = no_errors(run_ranks(plain_then_hook, 2, dict(cfg, hook="casq-py", state=dict(bits=2, seed=3))))
    plain, outs = both[0]["plain"]["grads"][0], [b["ours"] for b in both]
    encoded = 0
    for name, g in plain.items():
        draws = torch.stack([outs[0]["grads"][s][name] for s in range(steps)])
        assert torch.equal(draws, torch.stack([outs[1]["grads"][s][name] for s in range(steps)]))
        if g.numel() < SMALL:
            assert torch.equal(draws[0], g), name
            continue
        encoded += g.numel()
        single = ((draws[0] - g).norm() / g.norm()).item()
        mean = ((draws.mean(0) - g).norm() / g.norm()).item()
        assert single > 0.05, name
        assert mean < single / 3, (name, single, mean)  # 30 independent draws: about sqrt(30) = 5.5x smaller
    st = outs[0]["stats"]
    codec = gradiveq.CasqCodec(bits=2, clusters=4, bucket_size=512)
    assert st["step"]["values_encoded"] == encoded
    assert st["step"]["bytes_encoded"] == sum(codec.packed_bytes(g.numel()) for g in plain.values()
                                              if g.numel() >= SMALL)
    assert 2.0 < st["bits_per_element"] < 2.6  # 2 + 32 * 4 / 512 = 2.25 for whole buckets; partial ones cost more
    assert 0.3 < st["relative_error"] < 1.2  # measured 0.84 on Gaussian data
    sd = torch.load(path.format(rank=0), weights_only=False)["gradiveq"]  # stateless: options and iteration only
    assert sd["format"] == "gradiveq.CASQState" and sd["iteration"] == steps and sd["slot_states"] == {}
    assert sd["options"] == dict(bits=2, clusters=4, bucket_size=512, min_numel=1000, seed=3)


def test_co3_ranks_stay_identical_and_error_memory_round_trips(tmp_path):
    path = str(tmp_path / "ckpt{rank}.pt")
    cfg = dict(hook="co3-py", lr=0.05, state=dict(gamma=0.9))
    full = no_errors(run_ranks(train, 2, dict(cfg, steps=4, save_at=2, save_path=path)))
    for name, p in full[0]["params"].items():
        assert torch.equal(p, full[1]["params"][name]), name
    sd = torch.load(path.format(rank=1), weights_only=False)["gradiveq"]
    assert sd["format"] == "gradiveq.CO3State" and sd["rank"] == 1 and sd["iteration"] == 2
    assert set(sd["slot_states"]) == {"conv2.weight", "conv3.weight", "fc.weight"}  # the encoded ones
    assert all(t.norm() > 0 for t in sd["slot_states"].values())
    resumed = no_errors(run_ranks(train, 2, dict(cfg, steps=2, load_path=path)))
    for r in range(2):
        for name, p in full[r]["params"].items():
            assert torch.equal(resumed[r]["params"][name], p), (r, name)


def test_co3_overflow_stays_non_finite_and_grad_scaler_keeps_ranks_identical():
    # Rank 0's conv2 gradient (encoded) gets an inf at step 1: both ranks must see a non-finite average, so
    # GradScaler skips that step everywhere and the replicas stay equal.
    outs = no_errors(run_ranks(train, 2, dict(hook="co3", steps=3, lr=0.05, inf_at=1, grad_scaler=True)))
    for r in range(2):
        assert outs[r]["finite"] == [True, False, True], r
    for name, p in outs[0]["params"].items():
        assert torch.isfinite(p).all() and torch.equal(p, outs[1]["params"][name]), name


@pytest.mark.parametrize("make, kwargs, words", [
    (gradiveq.CO3State, dict(format="fp16"), ["format", "fp16"]),
    (gradiveq.CO3State, dict(gamma=1.5), ["gamma", "[0, 1]"]),
    (gradiveq.CO3State, dict(gamma=-0.1), ["gamma"]),
    (gradiveq.CO3State, dict(min_numel=-1), ["min_numel"]),
    (gradiveq.CASQState, dict(bits=4), ["bits", "2 or 3"]),
    (gradiveq.CASQState, dict(bits=2.0), ["bits"]),
    (gradiveq.CASQState, dict(clusters=0), ["clusters", ">= 1"]),
    (gradiveq.CASQState, dict(clusters=5, bits=2), ["clusters", "2^bits"]),
    (gradiveq.CASQState, dict(bucket_size=0), ["bucket_size"]),
    (gradiveq.CASQState, dict(seed=-1), ["seed"]),
])
def test_states_reject_bad_options(make, kwargs, words):
    with pytest.raises(ValueError) as err:
        make(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_hooks_check_their_state_type():
    with pytest.raises(ValueError, match="CO3State"):
        gradiveq.co3_hook(gradiveq.CASQState(), None)
    with pytest.raises(ValueError, match="CASQState"):
        gradiveq.casq_hook(gradiveq.CO3State(), None)
