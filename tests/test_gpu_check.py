"""benchmarks/gpu_check.py runs where only PyTorch is: its loop and loss checks import none of
Ray, FFCV, tensorboardX or matplotlib (run here on CPU with those modules made unimportable)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, tempfile
from pathlib import Path
for name in ("ray", "ffcv", "tensorboardX", "matplotlib"):
    sys.modules[name] = None  # import fails as on the bare GPU machine
sys.path.insert(0, "benchmarks")
import torch
import gpu_check
ok, figure = gpu_check.loss_agreement(torch.device("cpu"))
assert ok, figure
with tempfile.TemporaryDirectory() as tmp:
    rows = gpu_check.loop_check(torch.device("cpu"), 2, Path(tmp))
assert [ok for _, ok, _ in rows][1] and "max weight difference to the uninterrupted run 0.0e+00" in rows[1][2], rows
print("bare path ok")
"""


def test_gpu_check_runs_without_ray_ffcv_or_tensorboardx():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bare path ok" in done.stdout
