"""What a new user hit in the first hour (the package issue's findings), each pinned by a test that failed before
its fix. One real Gloo rank (a DDP model needs a process group); the multi-rank findings are in test_ddp_hook.py
(policy and dtypes in the verification) and the C++ suite."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

import gradiveq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)   # 432 values
        self.conv1d = torch.nn.Conv1d(3, 64, 9)  # 1728 values, 3-D
        self.fc = torch.nn.Linear(16, 4)


def ddp_model():
    torch.manual_seed(0)
    return torch.nn.parallel.DistributedDataParallel(Cnn())


def test_options_of_a_state_rebuild_the_same_state():
    state = gradiveq.GradiVeQState(coeff_dtype=torch.bfloat16, include="conv*", warmup_iters=10)
    again = gradiveq.GradiVeQState(**state.options)  # dtypes recorded as "bfloat16" are accepted
    assert again.options == state.options
    assert gradiveq.GradiVeQState(basis_dtype="float16").options["basis_dtype"] == "float16"
    with pytest.raises(ValueError, match="'coeff_dtype' names no torch dtype"):
        gradiveq.GradiVeQState(coeff_dtype="float17")


@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_verify_bases_must_be_a_bool(value):
    with pytest.raises(ValueError, match="'verify_bases' must be True or False"):
        gradiveq.GradiVeQState(verify_bases=value)


def test_register_hook_with_no_state_says_so(group):
    with pytest.raises(ValueError, match="argument 'state' must be a GradiVeQState"):
        gradiveq.register_hook(ddp_model(), None)


@pytest.mark.parametrize("make", [gradiveq.GradiVeQState, gradiveq.QsgdState, gradiveq.CO3State])
def test_one_state_on_a_second_model_is_refused_at_registration(group, make):
    state = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gradiveq.register_hook(ddp_model(), state)
        with pytest.raises(ValueError, match="already attached to another model; create one state per model"):
            gradiveq.register_hook(ddp_model(), state)


def test_state_dict_saved_with_other_options_is_refused(group):
    saved = gradiveq.GradiVeQState(min_numel=100, model=ddp_model()).state_dict()
    other = gradiveq.GradiVeQState(min_numel=100, energy=0.9, model=ddp_model())
    with pytest.raises(ValueError, match=r"saved with other options \(energy: saved 0.995, here 0.9\)"):
        other.load_state_dict(saved)
    gradiveq.GradiVeQState(**saved["options"], model=ddp_model()).load_state_dict(saved)  # the way to resume
    co3 = gradiveq.CO3State(model=ddp_model()).state_dict()
    with pytest.raises(ValueError, match="gamma: saved 0.9, here 0.5"):
        gradiveq.CO3State(gamma=0.5, model=ddp_model()).load_state_dict(co3)


def test_qsgd_state_has_a_state_dict(group):
    state = gradiveq.QsgdState(min_numel=100)
    gradiveq.register_hook(ddp_model(), state)
    saved = state.state_dict()
    assert saved["format"] == "gradiveq.QsgdState" and saved["options"]["levels"] == 7
    again = gradiveq.QsgdState(min_numel=100, model=ddp_model())
    again.load_state_dict(saved)
    assert again.iteration == saved["iteration"]


def test_a_configuration_that_compresses_nothing_warns_once_and_says_why(group):
    with pytest.warns(UserWarning) as caught:
        state = gradiveq.GradiVeQState(include=["conv1d.*", "missing.*"], model=ddp_model())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "include pattern 'missing.*' matches no parameter" in messages[0]
    assert "no parameter is compressed" in messages[0]
    layers = state.stats()["layers"]
    assert layers["conv1d.weight"]["not_compressed_because"] == "a 3-D parameter: only 4-D (Conv2d) and, with linear_weights, 2-D (Linear) weights are compressed"
    assert layers["conv.weight"]["not_compressed_because"] == "matches no include pattern"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the measured defaults compress conv.weight: no warning
        fine = gradiveq.GradiVeQState(min_numel=100, model=ddp_model())
    assert fine.stats()["layers"]["conv.weight"]["not_compressed_because"] == ""
    assert fine.stats()["summary"]["first_compressed_iteration"] == 2600  # the default schedule, said


@pytest.mark.parametrize("script", ["resnet32_cifar100.py", "accuracy.py", "soak.py"])
def test_benchmarks_write_under_build_by_default_and_help_shows_defaults(script):
    # A wide terminal: argparse wraps long help lines, also inside a path with a hyphen ("fresh-clone- check").
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ddp", script), "--help"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="10000"))
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert f"(default: {os.path.join(ROOT, 'build', 'benchmark-results')})" in text, text


class HalfNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)  # 432 + 16 values
        self.fc = torch.nn.Linear(16, 4)       # 64 + 4 values

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_send_their_own_dtype_and_the_stats_count_real_bytes(group, dtype):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(HalfNet().to(dtype))
    state = gradiveq.GradiVeQState(warmup_iters=2, sample_iters=3, compress_iters=3, min_numel=100)
    gradiveq.register_hook(model, state)
    numel = sum(p.numel() for p in model.parameters())
    phases = []
    for step in range(8):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
        model.zero_grad()
        model(x).sum().backward()
        phases.append(state.stats()["step"]["phase"])
        if step == 0:
            step_stats = state.stats()["step"]
            # Raw values in the model's dtype (2 bytes, as DDP's own bucket), and the verification code in the
            # same all-reduce, cut into chunks whose sums over the ranks stay exact in that dtype. Before,
            # everything went as float32 (4 bytes a value), then the code as float32 in an all-reduce of its own.
            bits = 16  # the widest chunk whose sum over the ranks stays an exact integer in the dtype
            while (2 ** bits - 1) * dist.get_world_size() > (2048 if dtype == torch.float16 else 256):
                bits -= 1
            chunks = -(-64 // bits)
            assert step_stats["bytes_uncompressed"] == 2 * numel
            assert step_stats["bytes_payload"] == 2 * numel + 2 * chunks, step_stats
            assert step_stats["collectives"] == 1
    assert phases == ["warmup", "warmup", "sampling", "sampling", "sampling", "compressed", "compressed",
                      "compressed"], phases
    stats = state.stats()
    conv = stats["layers"]["conv.weight"]
    assert conv["bytes_in"] == 2 * 432 and conv["phase"] == "compressed" and conv["fits"] == 1
    # ratio is K / d; wire_ratio is the byte ratio the summary's conv_ratio sums (they disagreed unexplained).
    assert conv["ratio"] == conv["K"] / conv["d"]
    assert conv["wire_ratio"] == conv["bytes_in"] / conv["bytes_out"] == stats["summary"]["conv_ratio"]
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())


def test_quantizer_states_send_small_half_precision_parameters_in_their_own_dtype(group):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(HalfNet().to(torch.bfloat16))
    state = gradiveq.QsgdState(min_numel=100)
    gradiveq.register_hook(model, state)
    model(torch.randn(4, 3, 8, 8).to(torch.bfloat16)).sum().backward()
    step = state.stats()["step"]
    assert step["bytes_uncompressed"] == 2 * (432 + 16 + 64 + 4)
    small = 16 + 64 + 4
    assert step["bytes_payload"] == 2 * small + gradiveq.QsgdCodec().packed_bytes(432), step
