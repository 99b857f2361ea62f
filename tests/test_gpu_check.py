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
