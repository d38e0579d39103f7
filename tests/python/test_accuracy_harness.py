"""The Fashion-MNIST accuracy harness runs end to end on a tiny subset (--quick), with real data: every method's row
has the accuracy, paired, wire and payload columns, the JSON file agrees, and each run's network namespace (as root)
is gone afterwards."""
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("plain", "powersgd2", "qsgd4", "gradiveq", "gradiveq-paper")
AS_ROOT = os.geteuid() == 0 and shutil.which("ip") is not None


def test_accuracy_quick_run_reports_every_method(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks/ddp/accuracy.py"), "--quick",
           "--methods", ",".join(METHODS), "--out", str(tmp_path), "--tag", "quick",
           "--fine-eval-every", "8", "--fine-eval-from", "100"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    md = (tmp_path / "quick.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in header.strip().strip("|").split("|")][3:7] == [
        "vs plain (points, paired mean)", "paired spread (points)", "wire KB/step/rank", "payload KB/step/rank"]
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] in METHODS:
            rows[cells[0]] = cells
    assert set(rows) == set(METHODS)
    for method, cells in rows.items():
        acc = float(cells[1])
        # 2 epochs on 8192 images learn far above chance (0.1). Each rank evaluates half the test set and rank 0
        # adds the counts: without rank 1's half the accuracy could not exceed 0.5.
        assert 0.5 < acc <= 1.0, (method, acc)
        assert float(cells[6]) > 0, method  # payload KB/step/rank
        if method != "plain":
            float(cells[3])  # paired difference to plain, one seed: spread = that difference twice
            assert re.fullmatch(r"[+-]\d+\.\d\d\.\.[+-]\d+\.\d\d", cells[4]), cells[4]
    assert float(rows["gradiveq"][7]) > 1 and float(rows["gradiveq-paper"][7]) > 1  # conv ratio
    assert 0.0 <= float(rows["gradiveq"][8]) < 1.5  # held-out relative error
    # Plain all-reduce hands the small CNN's float32 gradients to the collective each step.
    assert 50 < float(rows["plain"][6]) < 90
    data = json.loads((tmp_path / "quick.json").read_text())
    assert set(data["methods"]) == set(METHODS) and data["meta"]["wire_measured"] == AS_ROOT
    assert abs(data["methods"]["plain"]["mean_acc"] - float(rows["plain"][1])) < 1e-4
    # The default target: plain's mean final accuracy minus 1 point.
    assert abs(data["meta"]["target"] - (data["methods"]["plain"]["mean_acc"] - 0.01)) < 1e-9
    if AS_ROOT:
        wire = {m: float(c[5]) for m, c in rows.items()}
        assert all(w > 0 for w in wire.values()), wire
        # N = 2: each rank sends its gradients once (2 (N-1) / N = 1) plus TCP/IP overhead.
        assert 0.9 * float(rows["plain"][6]) < wire["plain"] < 1.6 * float(rows["plain"][6]), wire
        assert wire["powersgd2"] < wire["plain"] and wire["gradiveq"] < wire["plain"], wire
        prefix = re.search(r"network namespaces (gvqacc\d+_)", out.stdout).group(1)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in listed, listed
    else:
        assert all(c[5] == "-" for c in rows.values())
        assert "wire bytes NOT measured" in out.stdout and "wire bytes NOT measured" in md
    assert "QUICK" in md and (tmp_path / "quick.png").stat().st_size > 1000
    # 128 steps: evaluations every 16 (--quick), every 8 from step 100, and after the last.
    for method in METHODS:
        assert [step for step, _ in data["methods"][method]["evals"]["0"]] == \
            [16, 32, 48, 64, 80, 96, 104, 112, 120, 128], method
    section = md.split("#### Where the time went")[1].split("####")[0]
    time_rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")][1:]  # after the header
    assert {cells[1].strip() for cells in time_rows} == set(METHODS)
    assert all(float(cells[3]) > 0 for cells in time_rows)  # training seconds
    assert "every 8 from step 100" in md

