"""The Fashion-MNIST accuracy harness runs end to end on a tiny subset (--quick), with real data."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_accuracy_quick_run_reports_every_method(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks/ddp/accuracy.py"), "--quick",
           "--methods", "plain,qsgd4,gradiveq,gradiveq-paper", "--out", str(tmp_path), "--tag", "quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    md = (tmp_path / "quick.md").read_text()
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ("plain", "qsgd4", "gradiveq", "gradiveq-paper"):
            rows[cells[0]] = cells
    assert set(rows) == {"plain", "qsgd4", "gradiveq", "gradiveq-paper"}
    for method, cells in rows.items():
        acc = float(cells[1])
        assert 0.5 < acc <= 1.0, (method, acc)  # 2 epochs on 8192 images learn far above chance (0.1)
    assert float(rows["gradiveq"][4]) > 1 and float(rows["gradiveq-paper"][4]) > 1  # conv ratio
    assert 0.0 <= float(rows["gradiveq"][6]) < 1.5  # held-out relative error
    assert "QUICK" in md and (tmp_path / "quick.png").stat().st_size > 1000
