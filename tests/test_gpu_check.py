"""benchmarks/gpu_check.py runs where only PyTorch is: its checks import none of Ray, FFCV, timm,
tensorboardX or matplotlib (run here on CPU, small, with those modules made unimportable)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, tempfile
from pathlib import Path
for name in ("ray", "ffcv", "timm", "tensorboardX", "matplotlib"):
    sys.modules[name] = None  # import fails as on the bare GPU machine
sys.path.insert(0, "benchmarks")
import torch
import gpu_check
ok, figure = gpu_check.loss_agreement(torch.device("cpu"))
assert ok, figure
from step import SETUPS
ok, figure = gpu_check.step_ratio(torch.device("cpu"), SETUPS["fashion_mnist_lt resnet_small28"], repeats=2)
assert "PaCo / CE" in figure, figure
rows = gpu_check.augment_rates(torch.device("cpu"), batch=8, repeats=1)
assert [r[0].split()[1] for r in rows] == ["sim", "autoaugment_cutout", "randcls", "randaugment"], rows
assert "per sample on cpu" in rows[0][2] and "per sample" not in rows[2][2], rows  # no timm: batched only
with tempfile.TemporaryDirectory() as tmp:
    rows = gpu_check.loop_check(torch.device("cpu"), 2, Path(tmp))
assert rows[0][1] and "batches and steps under (no CUDA" in rows[0][2], rows
assert rows[2][1] and "max weight difference to the uninterrupted run 0.0e+00" in rows[2][2], rows
print("bare path ok")
"""


def test_gpu_check_runs_without_ray_ffcv_or_tensorboardx():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bare path ok" in done.stdout


def test_the_ray_wheel_for_the_gpu_machine_loses_its_jars_and_their_record_lines(tmp_path):
    import zipfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_stack import strip_jars

    source = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(source, "w") as wheel:
        wheel.writestr("ray/__init__.py", "x = 1\n")
        wheel.writestr("ray/jars/ray_dist.jar", b"\0" * 4096)
        wheel.writestr("ray-2.60.0.dist-info/RECORD",
                       "ray/__init__.py,sha256=a,6\nray/jars/ray_dist.jar,sha256=b,4096\nray-2.60.0.dist-info/RECORD,,\n")
    target = tmp_path / "stripped" / source.name
    target.parent.mkdir()
    assert strip_jars(source, target) == 1
    with zipfile.ZipFile(target) as wheel:
        assert wheel.namelist() == ["ray/__init__.py", "ray-2.60.0.dist-info/RECORD"]
        assert wheel.read("ray/__init__.py") == b"x = 1\n"
        assert "jars" not in wheel.read("ray-2.60.0.dist-info/RECORD").decode()
