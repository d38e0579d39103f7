"""The scaling harness (benchmarks/ddp/scaling.py) runs end to end at 2 ranks (--quick), on the emulated cluster as
root, else on the loopback: replayed real gradients through real DDP and hooks, each row with its step time, CPU
time per rank, machine busy share and link bytes, the bare-collective probe, and a JSON file that agrees; then the
scaling model (scaling_model.py) fits those numbers and writes its report."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AS_ROOT = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
METHODS = ("plain", "powersgd2", "gradiveq")


def _table_rows(md, first_cell_in):
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in first_cell_in:
            rows[cells[0]] = cells
    return rows


def test_scaling_quick_run_measures_every_method_and_the_collectives(tmp_path):
    gradients = tmp_path / "gradients.pt"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks/ddp/scaling.py"), "--quick", "--out", str(tmp_path),
           "--tag", "quick", "--gradients", str(gradients)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert gradients.stat().st_size > 1e6  # the short recording: 13 batches of ResNet-32's 0.46M gradients
    md = (tmp_path / "quick.md").read_text()
    rows = _table_rows(md, METHODS)
    assert set(rows) == set(METHODS), md
    for method, cells in rows.items():
        assert cells[1] == "2" and float(cells[2]) > 0, cells
        assert float(cells[4]) > 0, cells  # CPU ms per rank
        assert 0 < float(cells[5].rstrip("%")) <= 100, cells  # machine busy share
    data = json.loads((tmp_path / "quick.json").read_text())
    (probe,) = data["probes"]
    assert probe["world"] == 2
    # A 1 MiB all-reduce moves far more than a 4-byte one: it must take longer.
    assert probe["all_reduce_1MiB"] > probe["all_reduce_4B"] > 0, probe
    by = {r["method"]: r for r in data["rows"]}
    if AS_ROOT:
        # Each node's link carried the gradients once (N = 2) for plain; GradiVeQ and PowerSGD far less.
        assert 0.9 * 4 * 463_866 < 1e3 * by["plain"]["tx_kb_mean"] < 1.6 * 4 * 463_866, by["plain"]
        assert by["gradiveq"]["tx_kb_mean"] < by["powersgd2"]["tx_kb_mean"] < by["plain"]["tx_kb_mean"]
    else:
        assert "UNSHAPED" in out.stdout
    assert by["gradiveq"]["conv_ratio"] > 1  # it reached the compressed phase

    out = tmp_path / "model" / "out"  # not there yet: the model makes it, as scaling.py makes its --out
    model = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/ddp/scaling_model.py"),
                            str(tmp_path / "quick.json"), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert model.returncode == 0, model.stdout[-3000:] + model.stderr[-3000:]
    report = (out / "quick_model.md").read_text()
    assert set(_table_rows(report, METHODS)) == set(METHODS), report
    assert (out / "quick_model_regions.png").stat().st_size > 1000


def test_scaling_training_steps_report_the_exposed_aggregation(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks/ddp/scaling.py"), "--quick", "--train", "--methods",
           "nocomm,plain", "--out", str(tmp_path), "--tag", "train"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    md = (tmp_path / "train.md").read_text()
    assert md.startswith("# Training steps of ResNet-32 at 2 ranks"), md[:200]
    by = {r["method"]: r for r in json.loads((tmp_path / "train.json").read_text())["rows"]}
    # A real forward and backward of ResNet-32 on 64 images costs CPU time; nocomm sends nothing over the link.
    assert by["nocomm"]["cpu_ms"] > 20 and by["plain"]["cpu_ms"] > 20, by
    if AS_ROOT:
        assert by["nocomm"]["tx_kb_mean"] < 20 < 0.9 * 4 * 463_866 / 1e3 < by["plain"]["tx_kb_mean"], by
    exposed = _table_rows(md.split("Exposed aggregation")[1], ("plain",))
    assert abs(float(exposed["plain"][2]) - (by["plain"]["median_ms"] - by["nocomm"]["median_ms"])) < 0.06


def test_scaling_refuses_a_probe_without_repeats():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/ddp/scaling.py"), "--probe-repeats", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "argument --probe-repeats: must be >= 1, got 0" in out.stderr, out.stderr
