"""The Python face of the core: bindings behave like the C++ API, bad input raises ValueError naming the argument."""
import os
import subprocess
import sys

import pytest
import torch

import gradiveq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_layout_round_trip_matches_permute():
    g = torch.randn(32, 16, 3, 3)
    layout = gradiveq.ConvSliceLayout.for_weight(list(g.shape))
    flat = layout.to_paper_order(g)
    assert torch.equal(flat, g.permute(2, 3, 1, 0).reshape(-1))
    assert torch.equal(layout.from_paper_order(flat), g)
    assert (layout.slice_len, layout.num_slices, layout.tail_len) == (3 * 16 * 32, 3, 0)


def test_fit_compress_decompress_and_linearity():
    torch.manual_seed(0)
    samples = torch.randn(100, 6) @ torch.randn(6, 768) + 0.01 * torch.randn(100, 768)
    pca = gradiveq.PcaCompressor.fit(samples, energy=0.99)
    assert 1 <= pca.num_components <= 6
    assert pca.compression_ratio == 768 / pca.num_components
    g = [torch.randn(3, 768) for _ in range(3)]
    summed = sum(pca.compress(x, world_size=3) for x in g)
    torch.testing.assert_close(summed, pca.compress(sum(g), world_size=1), rtol=1e-4, atol=1e-4)
    restored = gradiveq.PcaCompressor.deserialize(pca.serialize())
    assert restored.checksum() == pca.checksum()


def test_qsgd_bytes_and_round_trip():
    codec = gradiveq.QsgdCodec(levels=7, bucket_size=512)
    assert codec.bits_per_value == 4
    v = torch.randn(1000)
    packed = codec.encode(v, seed=3)
    assert packed.dtype == torch.uint8 and packed.numel() == codec.packed_bytes(1000) == 4 * 2 + 500
    out = codec.decode(packed, 1000)
    assert out.shape == v.shape and (out - v).abs().max() <= v.abs().max() / 7 + 1e-6


def test_schedule_phases():
    s = gradiveq.Schedule(warmup_iters=2, sample_iters=1, compress_iters=2)
    assert [s.phase(i) for i in range(6)] == [gradiveq.Phase.warmup] * 2 + [
        gradiveq.Phase.sampling, gradiveq.Phase.compressed, gradiveq.Phase.compressed, gradiveq.Phase.sampling]


@pytest.mark.parametrize("call, words", [
    (lambda: gradiveq.PcaCompressor.fit(torch.randn(10, 8), energy=1.5), ["energy", "(0, 1]"]),
    (lambda: gradiveq.PcaCompressor.fit(torch.randn(10, 8, dtype=torch.float64)), ["samples", "float32"]),
    (lambda: gradiveq.PcaCompressor.fit(torch.randn(1, 8)), ["samples", "at least 2"]),
    (lambda: gradiveq.PcaCompressor().compress(torch.randn(2, 8)), ["not fitted"]),
    (lambda: gradiveq.ConvSliceLayout.for_weight([16, 16, 3, 3], 100), ["slice_len", "multiple of F*D"]),
    (lambda: gradiveq.QsgdCodec(levels=0), ["levels"]),
    (lambda: gradiveq.QsgdCodec(norm="l1"), ["norm", "'l1'"]),
    (lambda: gradiveq.Schedule(sample_iters=0), ["sample_iters"]),
])
def test_bad_input_raises_value_error_naming_the_argument(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value)


def test_demo_runs_on_real_resnet32_gradients():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if os.environ.get("GRADIVEQ_SOURCE_TREE") == "1":
        env["PYTHONPATH"] = os.path.join(ROOT, "python")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples/python/compressor_demo.py"),
                          "--warmup", "2", "--window", "6", "--holdout", "2", "--batch", "8"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [l for l in out.stdout.splitlines() if l.startswith(("conv1.weight", "layers."))]
    assert len(rows) == 31  # every conv layer of ResNet-32
    assert "SYNTHETIC" in out.stdout
    for row in rows:
        k, d, ratio, expl, err = row.split()[2:]
        assert int(k) % int(d) >= 0 and 1 <= int(d) <= 5  # at most samples - 1 = 5 components
        assert 0.0 <= float(err) < 1.5 and 0.9 <= float(expl) <= 1.0 + 1e-6


def test_python_defaults_and_paper_options_are_read_from_the_cpp_structs():
    import inspect

    from gradiveq import state as st

    cpp_defaults, cpp_paper = gradiveq._C.GradiVeQOptions(), gradiveq._C.GradiVeQOptions.paper()
    # Every C++ option is a keyword of GradiVeQState, and nothing else is an option.
    signature = inspect.signature(gradiveq.GradiVeQState).parameters
    assert set(st.OPTION_NAMES) == set(signature) - {"process_group", "model"}
    assert "min_ratio" in st.OPTION_NAMES and "fit_delay_iters" in st.OPTION_NAMES and len(st.OPTION_NAMES) == 27
    for name in st.OPTION_NAMES:
        value = getattr(cpp_defaults, name)
        value = value.name if name in st._ENUM_OPTIONS else value
        default = signature[name].default
        assert default == (value if name not in ("include", "exclude") else None) or (default is None and value == []), name
        assert st.DEFAULT_OPTIONS[name] == value and st.PAPER_OPTIONS[name] == (
            getattr(cpp_paper, name).name if name in st._ENUM_OPTIONS else getattr(cpp_paper, name)), name
    for py_state, cpp in ((gradiveq.GradiVeQState(), cpp_defaults), (gradiveq.GradiVeQState.paper(), cpp_paper)):
        for name in st.OPTION_NAMES:  # the options a state hands to C++ are the C++ ones, field by field
            assert getattr(py_state._cpp_options, name) == getattr(cpp, name), name
    # The quantizer states read theirs from the C++ codec option structs.
    assert inspect.signature(gradiveq.QsgdState).parameters["levels"].default == gradiveq._C.QsgdOptions().levels
    assert inspect.signature(gradiveq.CO3State).parameters["gamma"].default == gradiveq._C.Co3Options().gamma
    assert inspect.signature(gradiveq.CASQState).parameters["bits"].default == gradiveq._C.CasqOptions().bits
    paper = gradiveq.GradiVeQState.paper(warmup_iters=10).options
    assert (paper["fit_on"], paper["slice_layout"], paper["energy"], paper["sample_quantizer"]) == (
        "first_slice", "kernel_row", 0.99, "qsgd4")
    assert (paper["warmup_iters"], paper["sample_iters"], paper["compress_iters"]) == (10, 100, 400)
