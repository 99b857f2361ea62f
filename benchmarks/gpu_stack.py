"""The stack users run, on a lent GPU machine (which has no Ray and no network): Ray Train with
NCCL on the GPU, a two-trial Tune search on GPU trials, and a max_failures restart.

python benchmarks/gpu_stack.py prepare        # here: .whl/ with Ray 2.60's cp312 wheel, its Java jars removed
python benchmarks/gpu_stack.py run [--cpu]    # there (carry .whl): install it, then the three checks

``prepare`` downloads the wheel (79 MB; over the 64 MiB a call carries) and writes a copy without
``ray/jars/`` (Java workers, unused here) and without those files' lines in ``RECORD`` (44.9 MiB).
``run`` installs it with ``pip install --no-deps --target .whl/site`` and runs, on the tiny
dataset gpu_check.py builds (torch loader: FFCV is not there): paco-train --gpu --workers 1,
paco-tune on a two-trial space with use_gpu, and paco-train with a worker killed once
(PACO_RAY_KILL_WORKER) and max_failures 1. Each check prints one line: name, PASS/FAIL, detail.
Ray's own requirements that the machine lacks are named by the import error of the first check.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
RAY = "ray==2.60.0"


def strip_jars(source: Path, target: Path) -> int:
    """Copy the wheel ``source`` to ``target`` without ray/jars/ and their RECORD lines; returns
    how many files were left out."""
    dropped = 0
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if info.filename.startswith("ray/jars/"):
                dropped += 1
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
            out.writestr(info, data)
    return dropped


def prepare() -> int:
    WHEELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                        "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64", RAY, "-d", tmp],
                       check=True)
        (wheel,) = Path(tmp).glob("ray-*.whl")
        target = WHEELS / wheel.name
        dropped = strip_jars(wheel, target)
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB ({dropped} jar files left out)")
    return 0


def check(name: str, command: list[str], env: dict, expect: str) -> bool:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    ok = done.returncode == 0 and expect in done.stdout + done.stderr
    detail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    print(f"{name:<32} {'PASS' if ok else 'FAIL'}  {detail[0][:160]}", flush=True)
    return ok


def run(cpu: bool) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import make_dataset

    site = WHEELS / "site"
    if not cpu and not (site / "ray").is_dir():
        (wheel,) = WHEELS.glob("ray-*.whl")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       check=True)
    root = Path(tempfile.mkdtemp(prefix="gpu_stack_"))
    data = make_dataset(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)]), "PYTHONUNBUFFERED": "1"}
    gpu = [] if cpu else ["--gpu"]
    common = ["--set", f"data.path={data}", "--set", "data.loader=torch", "--set", "data.batch_size=16",
              "--set", "optim.epochs=2", "--set", f"storage_path={root / 'runs'}"]
    results = [check("Ray Train, 1 worker, NCCL" if not cpu else "Ray Train, 1 worker",
                     [sys.executable, "-m", "paco_ray.train", "--workers", "1", *gpu, *common, "--set", "name=one"],
                     env, "best checkpoint")]
    space = root / "space.yaml"
    space.write_text(f"base: {{data: {{path: {data}, loader: torch, batch_size: 16}}, optim: {{epochs: 2}}}}\n"
                     "search: {optim: {lr: {grid: [0.02, 0.05]}}}\nscheduler: {max_t: 2, grace_period: 1}\n"
                     f"num_samples: 1\nmax_concurrent_trials: 1\nresources: {{workers: 1, cpus_per_worker: 2, "
                     f"use_gpu: {str(not cpu).lower()}}}\nstorage_path: {root / 'tune'}\nname: gpu\n")
    results.append(check("Tune, 2 GPU trials" if not cpu else "Tune, 2 trials",
                         [sys.executable, "-m", "paco_ray.tune", str(space)], env, "best trial"))
    kill = {**env, "PACO_RAY_KILL_WORKER": f"0:5:{root / 'killed'}"}
    results.append(check("max_failures restart", [sys.executable, "-m", "paco_ray.train", "--workers", "1", *gpu,
                                                  *common, "--set", "name=killed", "--set", "max_failures=1"],
                         kill, "best checkpoint") and (root / "killed").exists())
    return 0 if all(results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("prepare", "run"))
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU workers with the installed Ray")
    args = parser.parse_args()
    return prepare() if args.what == "prepare" else run(args.cpu)


if __name__ == "__main__":
    sys.exit(main())
