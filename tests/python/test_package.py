"""The package as a user installs it: `pip install --no-build-isolation` (make test does it), a wheel installed
into another venv with the same torch, imported from outside the repository, the torch-version check, and the
torchrun example with a checkpoint save and resume."""

import glob
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

import gradiveq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "python", "train_ddp.py")
SOURCE_TREE = os.environ.get("GRADIVEQ_SOURCE_TREE") == "1"


def run(cmd, cwd, env=None, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.skipif(SOURCE_TREE, reason="GRADIVEQ_SOURCE_TREE=1 imports python/ in place")
def test_tests_import_the_installed_package_which_does_not_depend_on_the_build_tree():
    package = os.path.dirname(gradiveq.__file__)
    assert not package.startswith(os.path.join(ROOT, "python")), package
    assert package.startswith(sysconfig.get_paths()["platlib"]), package
    (module,) = glob.glob(os.path.join(package, "_C*.so"))
    dynamic = run(["readelf", "-d", module], cwd=package)
    assert "build" not in dynamic and ROOT not in dynamic, dynamic  # no RUNPATH into build/ or the checkout
    assert os.path.exists(os.path.join(package, "py.typed")) and os.path.exists(os.path.join(package, "_C.pyi"))


def test_import_refuses_a_torch_other_than_the_one_it_was_built_against(tmp_path):
    code = "import torch; torch.__version__ = '2.10.0'; import gradiveq"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")) if SOURCE_TREE else None)
    assert out.returncode != 0
    assert f"built against torch {torch.__version__.split('+')[0]}, but torch 2.10.0 is installed" in out.stderr


def torchrun(python, cwd, *args):
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EXAMPLE, *args]
    return run(cmd, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def test_wheel_installs_into_another_venv_and_the_torchrun_example_trains_saves_and_resumes(tmp_path):
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels), ROOT],
        cwd=ROOT, timeout=1500)
    (wheel,) = glob.glob(str(wheels / "gradiveq-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--no-index", "--no-deps", "-q", wheel], cwd=tmp_path)
    # The same torch: the new venv then sees this one's site-packages behind its own (a .pth line), so it gets
    # torch without a download while gradiveq comes from the wheel (installed first: pip would otherwise take
    # this venv's gradiveq for an installed one).
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    with open(os.path.join(site, "same_torch.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    where = run([python, "-c", "import gradiveq; print(gradiveq.__file__)"], cwd=tmp_path).strip()
    assert where.startswith(site), where

    common = ["--method", "gradiveq", "--batch", "32", "--schedule", "3,2,8"]
    first = torchrun(python, tmp_path, *common, "--steps", "30", "--save", "ckpt")
    assert "step    30" in first and "phase compressed" in first and "test accuracy" in first, first
    assert os.path.exists(tmp_path / "ckpt.rank0.pt") and os.path.exists(tmp_path / "ckpt.rank1.pt")
    resumed = torchrun(python, tmp_path, *common, "--steps", "20", "--resume", "ckpt")
    straight = torchrun(python, tmp_path, *common, "--steps", "50")
    last = [line for line in straight.splitlines() if line.startswith("test accuracy")]
    assert last and last[0] in resumed, (straight, resumed)  # resuming reproduces the uninterrupted run
    quantized = torchrun(python, tmp_path, "--method", "co3", "--steps", "10", "--batch", "32", "--save", "co3")
    assert "test accuracy" in quantized and "phase co3" in quantized, quantized
