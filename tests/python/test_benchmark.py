"""The ResNet-32 benchmark runs end to end in a tiny configuration (every method, unshaped) with sane output."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("nocomm", "plain", "fp16", "powersgd1", "powersgd2", "qsgd4", "co3", "casq2", "casq3", "gradiveq",
           "gradiveq-paper")


def test_benchmark_tiny_run_reports_every_method(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks/ddp/resnet32_cifar100.py"), "--iters", "3", "--warmup-steps",
           "1", "--schedule", "1,2,3", "--batch", "8", "--no-progress", "--out", str(tmp_path), "--tag", "tiny",
           "--bucket-cap-mb", "0.25"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SYNTHETIC" in out.stdout
    md = (tmp_path / "tiny.md").read_text()
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0] in METHODS:
            rows[cells[0]] = cells
    assert set(rows) == set(METHODS)
    for method, cells in rows.items():
        assert float(cells[1]) > 0, method  # median step ms
        assert float(cells[3 + 4]) >= 0  # KB/step/rank
        assert float(cells[11]) >= 0, method  # backward tail ms
    # 0.25 MB buckets: ResNet-32's 1.9 MB of gradients arrive in several buckets, except for PowerSGD, which the
    # benchmark keeps to one bucket (its second all-reduce, issued from a callback, races between buckets on Gloo).
    buckets = {m: int(c[10]) for m, c in rows.items()}
    assert buckets["powersgd2"] == 1 and all(buckets[m] >= 4 for m in ("plain", "fp16", "qsgd4", "co3", "gradiveq"))
    ratio = {m: float(c[8]) for m, c in rows.items() if m != "nocomm"}
    assert ratio["plain"] == 1.0 and ratio["fp16"] == 2.0
    assert 7.0 < ratio["qsgd4"] < 8.0  # 4 bits + a float32 scale per 512 values on the big tensors
    # CASQ: 2.25 / 3.5 bits per value on the big tensors; CO3 fp4: about 3 bits (Huffman, data-dependent).
    assert ratio["casq2"] > ratio["casq3"] > 6 and ratio["co3"] > 4
    for name, low, high in (("co3", 2.0, 4.5), ("casq2", 2.2, 2.6), ("casq3", 3.4, 3.9)):
        bits = float(re.search(rf"^{name}: ([0-9.]+) bits per encoded value", md, re.M).group(1))
        assert low < bits < high, (name, bits)
    # 2 of the 3 measured steps sample (uncompressed by default, 4-bit QSGD for the paper), 1 is compressed.
    assert ratio["powersgd2"] > 8 and ratio["gradiveq"] > 1.4
    kb = {m: float(c[7]) for m, c in rows.items()}
    assert abs(kb["plain"] - 4 * sum_params() / 1e3) < 0.2
    assert re.search(r"gradiveq: schedule warm-up 1 / sampling 2 / compressed 3", md)
    assert ratio["gradiveq-paper"] > 1.5
    # The per-layer table after the first fit lists ResNet-32's compressible conv layers (30 with >= 1000 values).
    # The ten 16->16 convs: K = W*D*F = 768 in the paper's layout, K = D*F = 256 in the default one.
    assert len(re.findall(r"^\| layers\.\d+\.conv[12]\.weight \| 768 \| \d+ \|", md, re.M)) == 10
    assert len(re.findall(r"^\| layers\.\d+\.conv[12]\.weight \| 256 \| \d+ \|", md, re.M)) == 10
    for png in ("tiny_steptime.png", "tiny_loss.png"):
        assert (tmp_path / png).stat().st_size > 1000


def sum_params():
    from models import resnet32  # benchmarks/ddp, on sys.path (conftest.py)
    return sum(p.numel() for p in resnet32().parameters())


def test_soak_smoke_run_keeps_ranks_identical(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks/ddp/soak.py"), "--steps", "60", "--report-every", "20",
           "--out", str(tmp_path), "--tag", "smoke"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    md = (tmp_path / "smoke.md").read_text()
    rows = [line.split("|") for line in md.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [int(r[1]) for r in rows] == [20, 40, 60]
    assert all(float(r[4]) == 0.0 for r in rows)  # parameters bit-identical across ranks
    assert int(rows[-1][5]) > int(rows[0][5])  # re-fits happened
    assert "All losses and errors finite: True" in md
