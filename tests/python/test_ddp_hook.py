"""The DDP hook on real multi-process Gloo DDP (127.0.0.1), 2 and 4 ranks."""
import os

import pytest
import torch

import gradiveq
from ddp_harness import run_ranks
from ddp_workers import load_damaged_state_dicts, train

# 2 warm-up, 3 sampling, 4 compressed iterations per window: 13 steps cover every phase and a re-fit.
SHORT = dict(warmup_iters=2, sample_iters=3, compress_iters=4, min_numel=100)
EXACT = dict(SHORT, energy=1.0, min_ratio=0, max_components=0, sample_quantizer="none", coeff_dtype=torch.float32,
             uncompressed_dtype=torch.float32)
PHASES = ["warmup"] * 2 + ["sampling"] * 3 + ["compressed"] * 4 + ["sampling"] * 3 + ["compressed"]


def no_errors(results):
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res.get('error')}\n{res.get('traceback', '')}"
    return results


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)).item() for n in b)


@pytest.mark.parametrize("world_size", [2, 4])
def test_full_rank_equals_plain_allreduce_in_every_phase(world_size):
    # lr 0: the weights never move, so each step compares the hook's average with plain DDP's on equal inputs.
    cfg = dict(steps=13, lr=0.0, bucket_cap_mb=0.02)
    plain = no_errors(run_ranks(train, world_size, dict(cfg, hook="plain")))
    ours = no_errors(run_ranks(train, world_size, dict(cfg, hook="cpp", state=EXACT)))
    assert ours[0]["phases"] == PHASES
    for step in range(13):
        for r in range(world_size):
            assert max_rel_diff(ours[r]["grads"][step], plain[r]["grads"][step]) < 1e-5, (step, r)
    conv = {n: s for n, s in ours[0]["stats"]["layers"].items() if s["compressible"]}
    assert set(conv) == {"conv2.weight", "conv3.weight", "conv1.weight"}  # min_numel=100 includes conv1
    assert all(s["d"] == s["K"] and s["fits"] == 2 for s in conv.values())


def test_cpp_and_python_hooks_give_identical_results():
    cfg = dict(steps=13, state=dict(SHORT, energy=0.95), bucket_cap_mb=0.02, keep_grads=True)
    cpp = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp")))
    py = no_errors(run_ranks(train, 2, dict(cfg, hook="py")))
    for r in range(2):
        for step in range(13):
            for n, g in cpp[r]["grads"][step].items():
                assert torch.equal(g, py[r]["grads"][step][n]), (r, step, n)


def test_ranks_hold_identical_parameters_after_50_steps_and_loss_falls_like_plain():
    state = dict(warmup_iters=5, sample_iters=10, compress_iters=15, energy=0.99)  # default min_numel
    ours = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=50, keep_grads=False)))
    plain = no_errors(run_ranks(train, 2, dict(hook="plain", steps=50, keep_grads=False)))
    for n, p in ours[0]["params"].items():
        assert torch.equal(p, ours[1]["params"][n]), n
    layers = ours[0]["stats"]["layers"]
    conv = [s for s in layers.values() if s["compressible"]]
    assert {n for n, s in layers.items() if s["compressible"]} == {"conv2.weight", "conv3.weight"}
    assert all(s["ratio"] >= 8 for s in conv), [(s["K"], s["d"]) for s in conv]
    summary = ours[0]["stats"]["summary"]
    assert summary["conv_ratio"] >= 8
    # Loss falls like the uncompressed run's: the mean of the last 10 steps is far below the start (ln 10 = 2.3
    # for 10 classes) and within 0.25 of plain all-reduce's.
    def tail(res):
        return sum(res[0]["losses"][-10:]) / 10
    assert tail(ours) < 0.5 * ours[0]["losses"][0], ours[0]["losses"]
    assert tail(ours) < tail(plain) + 0.25, (tail(ours), tail(plain))


@pytest.mark.parametrize("basis_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_halve_basis_memory_and_keep_ranks_identical(basis_dtype):
    cfg = dict(steps=13, bucket_cap_mb=0.02, keep_grads=True)
    shared = dict(SHORT, energy=0.95, basis_sync="broadcast")  # the broadcast's bytes are counted below
    full = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=shared)))
    half = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=dict(shared, basis_dtype=basis_dtype))))
    assert half[0]["stats"]["options"]["basis_dtype"] == str(basis_dtype).replace("torch.", "")
    for n, p in half[0]["params"].items():
        assert torch.equal(p, half[1]["params"][n]), n
    for name, s in half[0]["stats"]["layers"].items():
        if s["compressible"]:
            assert s["d"] > 0 and s["basis_bytes"] == s["K"] * s["d"] * 2 + s["K"] * 4, (name, s)
            f = full[0]["stats"]["layers"][name]
            assert f["basis_bytes"] == f["K"] * f["d"] * 4 + f["K"] * 4, (name, f)
    # The bases travel in their own dtype. The first fit (step 5: same samples, so the same d) broadcasts,
    # summed over the fitting ranks, per layer a 36-byte header, mu and the eigenvalues (8 K bytes), an 8-byte
    # size, and U: 4 K d bytes in float32, 2 K d in half precision. Nothing is broadcast in steps that do not fit.
    def broadcast(run, step):
        return sum(r["step_stats"][step]["bytes_bases"] for r in run)
    conv = [s for s in full[0]["stats"]["layers"].values() if s["compressible"]]
    fixed = sum(36 + 8 * s["K"] + 8 for s in conv)
    assert broadcast(full, 5) > fixed
    assert broadcast(full, 5) - broadcast(half, 5) == (broadcast(full, 5) - fixed) // 2
    assert all(broadcast(run, step) == 0 for run in (full, half) for step in (0, 4, 6, 8)), "only fits broadcast"
    # Same samples until the first compressed step (step 5); from there the rounded basis changes the
    # reconstruction slightly (measured at step 5: 1.8e-3 relative for bfloat16, 2.4e-4 for float16).
    for step in range(5):
        assert max_rel_diff(half[0]["grads"][step], full[0]["grads"][step]) == 0.0, step
    assert 0 < max_rel_diff(half[0]["grads"][5], full[0]["grads"][5]) < 2e-2


@pytest.mark.parametrize("coeff_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_coefficients_halve_their_bytes_and_keep_ranks_identical(coeff_dtype):
    # lr 0: both runs see the same gradients, so they fit the same bases and differ only by the rounding.
    # Uncompressed values stay float32, so only the coefficients' dtype differs.
    cfg = dict(steps=13, lr=0.0, bucket_cap_mb=0.02, keep_grads=True)
    # Error feedback off: it would carry each step's rounding into the next and compound the difference.
    base = dict(SHORT, energy=0.95, uncompressed_dtype=torch.float32, error_feedback="off")
    full = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=dict(base, coeff_dtype=torch.float32))))
    state = base if coeff_dtype == torch.float16 else dict(base, coeff_dtype=coeff_dtype)
    half = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=state)))  # float16 is the default
    assert half[0]["stats"]["options"]["coeff_dtype"] == str(coeff_dtype).replace("torch.", "")
    for step in range(13):
        for n, g in half[0]["grads"][step].items():
            assert torch.equal(g, half[1]["grads"][step][n]), (step, n)
    coeffs = sum(s["d"] * s["slices"] for s in full[0]["stats"]["layers"].values() if s["compressible"])
    for step, phase in enumerate(PHASES):
        h, f = half[0]["step_stats"][step], full[0]["step_stats"][step]
        if phase == "compressed":  # 2 bytes saved per coefficient; the coefficients take their own all-reduce
            assert f["bytes_payload"] > h["bytes_payload"], step
            assert h["collectives"] > f["collectives"], step
        else:
            assert h["bytes_payload"] == f["bytes_payload"], step
    # The layer statistics describe the second window's bases, those of the last step.
    assert full[0]["step_stats"][12]["bytes_payload"] - half[0]["step_stats"][12]["bytes_payload"] == 2 * coeffs
    # Identical until the first compressed step (step 5), where the rounded coefficients change the average
    # slightly (float16 keeps 11 significant bits, bfloat16 8).
    for step in range(5):
        assert max_rel_diff(half[0]["grads"][step], full[0]["grads"][step]) == 0.0, step
    tolerance = 2e-3 if coeff_dtype == torch.float16 else 1e-2
    for step in (5, 12):
        assert 0 < max_rel_diff(half[0]["grads"][step], full[0]["grads"][step]) < tolerance, step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_uncompressed_values_halve_their_bytes_and_keep_ranks_identical(dtype):
    # lr 0: every run sees the same gradients. Coefficients are float16 (the default) in both runs.
    cfg = dict(steps=13, lr=0.0, bucket_cap_mb=0.02, keep_grads=True)
    plain = no_errors(run_ranks(train, 2, dict(cfg, hook="plain")))
    base = dict(SHORT, energy=0.95, sample_quantizer="none")  # sampling windows in the raw all-reduce
    full = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=dict(base, uncompressed_dtype=torch.float32))))
    half = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=dict(base, uncompressed_dtype=dtype))))
    assert half[0]["stats"]["options"]["uncompressed_dtype"] == str(dtype).replace("torch.", "")
    for step in range(13):
        for n, g in half[0]["grads"][step].items():
            assert torch.equal(g, half[1]["grads"][step][n]), (step, n)
    for step, phase in enumerate(PHASES):
        h, f = half[0]["step_stats"][step], full[0]["step_stats"][step]
        if phase != "compressed":  # everything travels uncompressed: half the bytes, bar the verification code
            assert h["bytes_payload"] < 0.52 * f["bytes_payload"], (step, h["bytes_payload"], f["bytes_payload"])
        else:  # the layers left uncompressed and the slice tails halve
            assert h["bytes_payload"] < f["bytes_payload"], step
        if phase == "compressed" and dtype == torch.float16:  # the coefficients share the raw all-reduce
            assert h["collectives"] < f["collectives"], step
    # Warm-up: the average of half-precision values, within their rounding of plain all-reduce's.
    tolerance = 2e-3 if dtype == torch.float16 else 1e-2
    for step in range(2):
        assert 0 < max_rel_diff(half[0]["grads"][step], plain[0]["grads"][step]) < tolerance, step
        assert max_rel_diff(full[0]["grads"][step], plain[0]["grads"][step]) < 1e-6, step


@pytest.mark.parametrize("coeff_dtype", [torch.float32, torch.float16])
def test_pipelined_groups_give_bit_identical_results_on_two_ranks(coeff_dtype):
    # One bucket holds conv1..conv3 (all compressible with min_numel=100): 3 groups, 3 all-reduces per bucket
    # with float32 coefficients (float16 ones add an all-reduce of their own per group).
    cfg = dict(steps=13, keep_grads=True)
    state = dict(SHORT, energy=0.95, coeff_dtype=coeff_dtype, uncompressed_dtype=torch.float32,
                 sample_quantizer="none")  # sampling in the all-reduce too: no all-gather to count
    one = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=state)))
    three = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=dict(state, pipeline_chunks=3))))
    for step, phase in enumerate(PHASES):
        for r in range(2):
            for n, g in one[r]["grads"][step].items():
                assert torch.equal(g, three[r]["grads"][step][n]), (step, r, n)
        # verify_bases rides in the first group: compressed steps issue one all-reduce per group.
        if coeff_dtype == torch.float32:
            assert three[0]["step_stats"][step]["collectives"] == (3 if phase == "compressed" else 1), step
            assert one[0]["step_stats"][step]["collectives"] == 1, step
        elif phase == "compressed":
            assert three[0]["step_stats"][step]["collectives"] > one[0]["step_stats"][step]["collectives"] == 2
        assert three[0]["step_stats"][step]["buckets"] == one[0]["step_stats"][step]["buckets"] == 1
    assert three[0]["step_stats"][-1]["relative_error"] == one[0]["step_stats"][-1]["relative_error"]


@pytest.mark.parametrize("bucket_cap_mb", [25, 0.005])  # one bucket of 3 groups; one bucket per layer
def test_pipelined_groups_with_jittered_ranks_match_plain_on_four_ranks(bucket_cap_mb):
    # Each rank sleeps a random time before every forward: buckets and groups reach the hook at different times
    # on different ranks, yet every rank issues the same collectives in the same order.
    cfg = dict(steps=13, lr=0.0, bucket_cap_mb=bucket_cap_mb, jitter_ms=30)
    plain = no_errors(run_ranks(train, 4, dict(cfg, hook="plain")))
    ours = no_errors(run_ranks(train, 4, dict(cfg, hook="cpp", state=dict(EXACT, pipeline_chunks=3))))
    assert ours[0]["phases"] == PHASES
    for step in range(13):
        for r in range(4):
            assert max_rel_diff(ours[r]["grads"][step], plain[r]["grads"][step]) < 1e-5, (step, r)
            for n, g in ours[0]["grads"][step].items():
                assert torch.equal(g, ours[r]["grads"][step][n]), (step, r, n)


def test_phases_switch_at_configured_iterations():
    res = no_errors(run_ranks(train, 2, dict(hook="cpp", state=dict(SHORT, energy=0.9, sample_quantizer="qsgd4"),
                                             steps=13, lr=0.0)))
    assert res[0]["phases"] == PHASES and res[1]["phases"] == PHASES
    stats = res[0]["stats"]
    assert stats["iteration"] == 13 and stats["layers"]["conv2.weight"]["fits"] == 2
    assert stats["step"]["sampling_aggregation"].startswith("all-gather of 4-bit QSGD")


@pytest.mark.parametrize("uncompressed_dtype", [torch.float32, torch.float16])
def test_corrupted_basis_on_one_rank_is_detected_on_every_rank(uncompressed_dtype):
    # Bases are fitted after step 4; before step 6 rank 1 silently changes one bit of conv2's basis. With float16
    # uncompressed values the verification code travels in float16 chunks too.
    state = dict(SHORT, energy=0.95, uncompressed_dtype=uncompressed_dtype)
    res = run_ranks(train, 2, dict(hook="cpp", state=state, steps=9, lr=0.0, corrupt_at=6, keep_grads=False))
    for r in range(2):
        assert "error" in res[r], f"rank {r} did not detect the corrupted basis"
        assert "ranks disagree" in res[r]["error"] and "iteration 6" in res[r]["error"]


@pytest.mark.parametrize("differs", [dict(min_numel=200), dict(include="conv2.*"), dict(coeff_dtype=torch.bfloat16),
                                     dict(sample_quantizer="none")])
def test_rank_with_other_layer_policy_or_wire_dtypes_raises_on_every_rank_in_the_first_step(differs):
    # min_numel=200 leaves conv1 (144 values) uncompressed on rank 1 only. Without the policy and dtypes in the
    # verification code this diverged silently after the sampling window and
    # then hung until the process group's timeout (or aborted in Gloo's "collective mismatch").
    res = run_ranks(train, 2, dict(hook="cpp", state=SHORT, state_rank1=differs, steps=3, lr=0.0, keep_grads=False))
    for r in range(2):
        assert "error" in res[r], f"rank {r} did not detect that rank 1 runs {differs}"
        assert "ranks disagree on GradiVeQ state at iteration 0" in res[r]["error"], res[r]["error"]
        assert "layer policy" in res[r]["error"]


@pytest.mark.parametrize("rewind", [(3, 1), (8, 6)])  # in warm-up/sampling, in a compressed window
def test_iteration_counter_diverged_on_one_rank_is_detected_on_every_rank(rewind):
    # Uncompressed sampling: with QSGD sampling a rank still in warm-up issues no all-gather, so the collectives
    # no longer line up and Gloo aborts before the verification code can be compared.
    state = dict(SHORT, energy=0.95, sample_quantizer="none")
    res = run_ranks(train, 2, dict(hook="cpp", state=state, steps=10, lr=0.0, rewind=rewind, keep_grads=False))
    for r in range(2):
        assert "error" in res[r], f"rank {r} did not detect that rank 1's iteration counter fell behind"
        assert "ranks disagree" in res[r]["error"], res[r]["error"]


def expect_resume_matches(full, state, k, tmp_path):
    """Saves after step k, resumes in new processes to step 16 and expects `full`'s parameters bit for bit."""
    path = str(tmp_path / f"ckpt{k}_rank{{rank}}.pt")
    no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=k, save_at=k, save_path=path, keep_grads=False)))
    resumed = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=16 - k, load_path=path,
                                                 keep_grads=False)))
    for r in range(2):
        for n, p in full[r]["params"].items():
            torch.testing.assert_close(resumed[r]["params"][n], p, rtol=0, atol=0, msg=f"k={k} rank {r} {n}")
    return resumed


def test_checkpoint_and_resume_in_new_processes_reproduces_the_run(tmp_path):
    state = dict(SHORT, energy=0.95)
    full = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=16, keep_grads=False)))
    # warm-up; mid sampling window (samples saved); the step before the fit; mid compressed window (bases saved)
    for k in (1, 3, 5, 7):
        resumed = expect_resume_matches(full, state, k, tmp_path)
        assert resumed[0]["stats"]["iteration"] == 16


def test_replicated_fits_train_bit_for_bit_like_broadcast_ones_without_basis_bytes():
    # Every rank fits every layer from the QSGD window it decoded: the same bases as the broadcast run (so the
    # same parameters, bit for bit, through three refits), and no basis byte sent.
    state = dict(SHORT, energy=0.95)
    broadcast = no_errors(run_ranks(train, 2, dict(hook="cpp", state=dict(state, basis_sync="broadcast"), steps=16,
                                                   keep_grads=False)))
    replicated = no_errors(run_ranks(train, 2, dict(hook="cpp", state=dict(state, basis_sync="replicated"), steps=16,
                                                    keep_grads=False)))
    assert sum(s["bytes_bases"] for r in broadcast for s in r["step_stats"]) > 0
    for r in range(2):
        assert sum(s["bytes_bases"] for s in replicated[r]["step_stats"]) == 0
        assert replicated[r]["stats"]["options"]["basis_sync"] == "replicated"
        assert replicated[r]["stats"]["layers"]["conv2.weight"]["fits"] == 2
        for n, p in broadcast[r]["params"].items():
            assert torch.equal(replicated[r]["params"][n], p), (r, n)


def test_deferred_fits_keep_ranks_identical_and_resume_bit_for_bit_on_real_ddp(tmp_path):
    # fit_delay_iters=2: each window's fits run on a worker while 2 compressed steps go on with the old bases
    # (the first window's with none: uncompressed), and land at steps 7 and 14 on both ranks alike.
    state = dict(SHORT, energy=0.95, fit_delay_iters=2)
    full = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=16, keep_grads=False)))
    steps = full[0]["step_stats"]
    assert steps[5]["bytes_payload"] > steps[7]["bytes_payload"], (steps[5], steps[7])  # no basis at 5, 6
    assert [i for i, s in enumerate(steps) if s["fit_background_ms"] > 0] == [7, 14]
    for r in range(2):
        assert full[r]["stats"]["options"]["fit_delay_iters"] == 2
        assert full[r]["stats"]["layers"]["conv2.weight"]["fits"] == 2
        for n, p in full[0]["params"].items():
            assert torch.equal(full[r]["params"][n], p), (r, n)
    for k in (5, 6):  # the window just ended (fit pending); the worker's fit in flight
        expect_resume_matches(full, state, k, tmp_path)


FOLLOW = dict(SHORT, energy=0.9, sample_source="local", error_feedback=True, linear_weights=True)


def test_local_samples_compress_every_step_after_warmup_on_real_ddp():
    res = no_errors(run_ranks(train, 2, dict(hook="cpp", state=FOLLOW, steps=16, keep_grads=False)))
    # With local samples the first window is the warm-up's last 3 steps: compressed from step 3 on, sampling
    # windows included (the schedule still names them), and the bases are refitted after every window.
    assert res[0]["phases"][:3] == ["sampling"] * 3  # warm-up 2 - 3 < 0: the whole warm-up samples
    # ... and travels uncompressed in the all-reduce, whatever sample_quantizer (QSGD by default) says.
    assert res[0]["step_stats"][0]["sampling_aggregation"] == "all-reduce (uncompressed)"
    assert res[0]["step_stats"][0]["collectives"] == 1
    conv = {n: s for n, s in res[0]["stats"]["layers"].items() if s["compressible"]}
    assert set(conv) == {"conv2.weight", "conv3.weight", "conv1.weight", "fc.weight"}
    assert conv["fc.weight"]["K"] == 288  # one output row of the linear head per slice
    for step_stats in res[0]["step_stats"][3:]:
        assert step_stats["bytes_payload"] < step_stats["bytes_uncompressed"] / 3, step_stats
    assert all(s["fits"] >= 2 and s["fit_status"] == "ok" for s in conv.values())
    for n, p in res[0]["params"].items():
        assert torch.equal(p, res[1]["params"][n]), n


def test_error_feedback_checkpoint_is_per_rank_and_resumes_bit_for_bit(tmp_path):
    full = no_errors(run_ranks(train, 2, dict(hook="cpp", state=FOLLOW, steps=16, keep_grads=False)))
    for k in (6, 9):  # mid compressed window (memory saved); mid sampling window (memory and local samples)
        expect_resume_matches(full, FOLLOW, k, tmp_path)
    # Each rank holds its own memory: rank 0's state dict does not load on rank 1.
    swapped = str(tmp_path / "ckpt6_rank{rank}.pt").replace("{rank}", "0")
    res = run_ranks(train, 2, dict(hook="cpp", state=FOLLOW, steps=1, load_path=swapped, keep_grads=False))
    assert "error" in res[1] and "saved on rank 0" in res[1]["error"], res[1].get("error")


def test_error_feedback_is_on_by_default_where_something_is_lost_and_its_checkpoint_is_per_rank(tmp_path):
    assert gradiveq.GradiVeQState().options["error_feedback"] == "auto"
    assert gradiveq.GradiVeQState(error_feedback=True).options["error_feedback"] == "on"
    assert gradiveq.GradiVeQState(error_feedback=False).options["error_feedback"] == "off"
    assert gradiveq.GradiVeQState.paper().options["error_feedback"] == "off"
    lossy = dict(SHORT, energy=0.9)
    assert no_errors(run_ranks(train, 2, dict(hook="cpp", state=EXACT, steps=1)))[0]["stats"]["summary"][
        "error_feedback"] is False  # auto: a lossless basis loses nothing
    for ef, per_rank in (("auto", True), ("off", False)):
        state, path = dict(lossy, error_feedback=ef), str(tmp_path / f"{ef}_rank{{rank}}.pt")
        saved = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=7, save_at=7, save_path=path,
                                                   keep_grads=False)))
        assert saved[0]["stats"]["summary"]["error_feedback"] is per_rank
        res = run_ranks(train, 2, dict(hook="cpp", state=state, steps=1, load_path=path.replace("{rank}", "0"),
                                       keep_grads=False))
        if per_rank:  # rank 1 would add rank 0's residual a second time
            assert "saved on rank 0" in res[1].get("error", ""), res[1].get("error")
        else:  # bases and samples are the same on every rank: one rank's state dict serves all
            no_errors(res)


def test_damaged_state_dicts_raise_and_leave_the_state_untouched():
    res = no_errors(run_ranks(load_damaged_state_dicts, 2, dict(hook="cpp", state=dict(SHORT, energy=0.95), steps=7)))
    for r in range(2):
        msgs = res[r]["messages"]
        assert all(m is not None for m in msgs.values()), msgs
        assert "checksum" in msgs["bit flip"] and "checksum" in msgs["truncated"], msgs
        assert "version" in msgs["wrong version"] and "world size" in msgs["other world size"], msgs


def test_kernel_position_pooled_layout_equals_plain_at_full_rank():
    cfg = dict(steps=13, lr=0.0, bucket_cap_mb=0.02)
    plain = no_errors(run_ranks(train, 2, dict(cfg, hook="plain")))
    ours = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=dict(
        EXACT, slice_layout="kernel_position", fit_on="all_slices"))))
    conv2 = ours[0]["stats"]["layers"]["conv2.weight"]
    assert (conv2["K"], conv2["slices"], conv2["tail"]) == (16 * 32, 9, 0)
    for step in range(13):
        assert max_rel_diff(ours[0]["grads"][step], plain[0]["grads"][step]) < 1e-5, step


def test_fit_options_set_d_as_they_claim():
    # 3 sampled iterations; conv2 is 32x16x3x3, conv3 32x32x3x3.
    def layers(**state):
        res = no_errors(run_ranks(train, 2, dict(hook="cpp", state=dict(SHORT, **state), steps=6, keep_grads=False)))
        return {n: v for n, v in res[0]["stats"]["layers"].items() if v["compressible"]}

    # Samples span at most (samples - 1) directions: first slice -> 3 samples, pooled -> 3 x slices.
    exact = dict(energy=0.999999, min_ratio=0, sample_quantizer="none", uncompressed_dtype=torch.float32)
    first = layers(fit_on="first_slice", slice_layout="kernel_row", **exact)
    pooled = layers(fit_on="all_slices", slice_layout="kernel_row", **exact)
    pooled_kp = layers(fit_on="all_slices", slice_layout="kernel_position", **exact)
    for name in ("conv2.weight", "conv3.weight"):
        assert first[name]["d"] <= 2, first[name]
        assert pooled[name]["slices"] == 3 and 2 < pooled[name]["d"] <= 3 * 3 - 1, pooled[name]
        assert pooled_kp[name]["slices"] == 9 and 8 < pooled_kp[name]["d"] <= 3 * 9 - 1, pooled_kp[name]
    # A target ratio sets d = ceil(K / ratio) (here below the samples' rank); a minimum ratio caps the energy rule.
    target = layers(fit_on="all_slices", slice_layout="kernel_position", target_ratio=64, min_ratio=0)
    capped = layers(fit_on="all_slices", slice_layout="kernel_position", energy=0.999999, min_ratio=100)
    for name in ("conv2.weight", "conv3.weight"):
        K = target[name]["K"]
        assert target[name]["d"] == -(-K // 64), target[name]
        assert capped[name]["d"] == K // 100 and capped[name]["ratio"] >= 100, capped[name]


def test_adaptive_window_restarts_on_every_rank_at_the_same_iteration():
    # 2 warm-up, 10 sampling, then up to 20 compressed steps (12, 13, 14 set each rank's baseline error). At step
    # 15 rank 1's conv gradients turn to noise; only rank 1's loss jumps, yet both ranks sample again from step 16.
    state = dict(warmup_iters=2, sample_iters=10, compress_iters=20, min_numel=100, fit_on="all_slices",
                 slice_layout="kernel_position", energy=0.99, restart_error_growth=1.6)
    quiet = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=28, keep_grads=False)))
    noisy = no_errors(run_ranks(train, 2, dict(hook="cpp", state=state, steps=28, noise_at=15, keep_grads=False)))
    assert quiet[0]["phases"] == ["warmup"] * 2 + ["sampling"] * 10 + ["compressed"] * 16
    expected = ["warmup"] * 2 + ["sampling"] * 10 + ["compressed"] * 4 + ["sampling"] * 10 + ["compressed"] * 2
    errors = [[round(s["relative_error"], 3) for s in r["step_stats"]] for r in noisy]
    for r in range(2):
        assert noisy[r]["phases"] == expected, (r, noisy[r]["phases"], errors)
        assert noisy[r]["stats"]["step"]["window_restarts"] == 1
        assert quiet[r]["stats"]["step"]["window_restarts"] == 0
    baseline = [sum(e[12:15]) / 3 for e in errors]
    assert errors[1][15] > 1.6 * baseline[1] and errors[0][15] < 1.6 * baseline[0], errors
    assert noisy[0]["stats"]["layers"]["conv2.weight"]["fits"] == 2


@pytest.mark.parametrize("variant", ["no_sync", "static_graph", "unused_parameters"])
def test_ddp_variants_match_plain_at_full_rank(variant):
    cfg = dict(steps=13, lr=0.0, bucket_cap_mb=0.02)
    if variant == "no_sync":
        cfg["accumulate"] = 3
    elif variant == "static_graph":
        cfg["static_graph"] = True
    else:
        cfg["unused_branch"] = True
    plain = no_errors(run_ranks(train, 2, dict(cfg, hook="plain")))
    ours = no_errors(run_ranks(train, 2, dict(cfg, hook="cpp", state=EXACT)))
    assert ours[0]["phases"] == PHASES  # no_sync micro-steps do not advance the schedule
    for step in range(13):
        assert max_rel_diff(ours[0]["grads"][step], plain[0]["grads"][step]) < 1e-5, step


def test_non_finite_gradients_stay_non_finite_and_grad_scaler_skips():
    # inf injected into rank 0's conv2 gradient at a compressed step (6) and at a sampling step (9).
    for inf_at in (6, 9):
        res = no_errors(run_ranks(train, 2, dict(hook="cpp", state=dict(SHORT, energy=0.95), steps=13,
                                                 inf_at=inf_at, grad_scaler=True, keep_grads=False)))
        for r in range(2):
            assert res[r]["finite"][inf_at] is False, (inf_at, r)
            assert all(res[r]["finite"][s] for s in range(13) if s != inf_at)
            scales = res[r]["scales"]
            assert scales[inf_at] < scales[inf_at - 1], "GradScaler did not see the overflow"
        conv2 = res[0]["stats"]["layers"]["conv2.weight"]
        if inf_at == 9:
            assert conv2["skipped_samples"] == 1  # the non-finite aggregate never entered the fit
        assert conv2["fit_status"] == "ok"


@pytest.mark.parametrize("kwargs, words", [
    (dict(energy=0.0), ["energy", "(0, 1]"]),
    (dict(energy=1.2), ["energy"]),
    (dict(sample_iters=0), ["sample_iters"]),
    (dict(warmup_iters=-1), ["warmup_iters"]),
    (dict(sample_quantizer="qsgd8"), ["sample_quantizer", "qsgd8"]),
    (dict(coeff_dtype=torch.float64), ["coeff_dtype"]),
    (dict(basis_dtype=torch.int8), ["basis_dtype"]),
    (dict(uncompressed_dtype=torch.float64), ["uncompressed_dtype"]),
    (dict(pipeline_chunks=0), ["pipeline_chunks", ">= 1"]),
    (dict(fit_delay_iters=-1), ["fit_delay_iters", ">= 0"]),
    (dict(compress_iters=4, fit_delay_iters=4), ["fit_delay_iters", "compress_iters"]),
    (dict(fit_delay_iters=1.5), ["fit_delay_iters", "int"]),
    (dict(error_feedback=True, refit_threshold=1.0), ["error_feedback", "refit_threshold"]),
    (dict(error_feedback=True, compress_iters=0), ["error_feedback", "compress_iters"]),
    (dict(error_feedback=1), ["error_feedback", "True or False"]),
    (dict(error_budget=1.0), ["error_budget", "(0, 1)"]),
    (dict(error_budget=-0.1), ["error_budget"]),
    (dict(refit_threshold=2.0), ["refit_threshold", "[0, 1]"]),
    (dict(sample_source="remote"), ["sample_source", "remote"]),
    (dict(basis_sync="gossip"), ["basis_sync", "gossip"]),
    (dict(basis_sync="replicated", sample_source="local"), ["basis_sync", "sample_source"]),
    (dict(basis_sync="replicated", verify_bases=False), ["basis_sync", "verify_bases"]),
    (dict(basis_sync="broadcast", verify_bases="no"), ["verify_bases", "True or False"]),
    (dict(linear_weights="yes"), ["linear_weights"]),
    (dict(include=3), ["include"]),
    (dict(fit_on="middle"), ["fit_on"]),
    (dict(min_numel=-5), ["min_numel"]),
    (dict(warmup_iters=2.5), ["warmup_iters", "int"]),
    (dict(target_ratio=0.5), ["target_ratio", ">= 1"]),
    (dict(min_ratio=-1), ["min_ratio"]),
    (dict(restart_error_growth=0.9), ["restart_error_growth", "> 1"]),
    (dict(energy=1.0), ["energy", "min_ratio", "lossless"]),
    (dict(energy=1.0, min_ratio=0, max_components=192), ["energy", "max_components = 192", "lossless"]),
    (dict(target_ratio="8"), ["target_ratio", "number"]),
    (dict(slice_layout="row"), ["slice_layout", "row"]),
])
def test_bad_options_raise(kwargs, words):
    with pytest.raises(ValueError) as err:
        gradiveq.GradiVeQState(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_unattached_state_and_wrong_model_raise():
    state = gradiveq.GradiVeQState()
    with pytest.raises(RuntimeError, match="not attached"):
        state.stats()
    with pytest.raises(ValueError, match="ddp_model"):
        gradiveq.register_hook(torch.nn.Linear(2, 2), state)
