"""``compile: true`` (torch.compile of the query and key encoders) against eager: the first step
(compilation included) and then the median step, same model, batch and optimizer as step.py.

python benchmarks/compile.py [--repeats 15] [--device cpu|cuda] [--threads N] [--losses paco,ce]

CPU: Fashion-MNIST-LT resnet_small28 and CIFAR resnet32, batch 128; CUDA adds ResNet-50 at
224 px, batch 128, bf16, channels_last. Eager and compiled steps are interleaved step by step.
Compilation starts cold (inductor's and triton's on-disk caches in a fresh temporary directory),
but is cached within the process, so the first step of the second loss on the same backbone
reuses most of the first one's work; a later run of the same job on a machine reuses the disk
cache and compiles in a few seconds.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_CACHE = tempfile.mkdtemp(prefix="compile_bench_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHE, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_CACHE, "triton")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.cpu_allocator import keep_freed_memory  # noqa: E402
from step import GPU_SETUPS, SETUPS, make_step  # noqa: E402
from timing import device_args, timed  # noqa: E402


def main() -> None:
    args, device = device_args(__doc__.split("\n\n")[0], repeats=15,
                               extra=[("--losses", dict(default="paco,ce", help="comma-separated"))])
    keep_freed_memory()  # as paco_ray.train does on the CPU
    setups = {**SETUPS, **(GPU_SETUPS if device.type == "cuda" else {})}
    for name, setup in setups.items():
        for loss in args.losses.split(","):
            steps, first = {}, {}
            for compiled in (False, True):
                steps[compiled], _ = make_step(loss, *setup, device, compile_encoders=compiled)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                steps[compiled]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first[compiled] = time.perf_counter() - started
            for _ in range(2):  # warm-up (a recompile for the second step's inputs is included here)
                for step in steps.values():
                    step()
            times = {False: [], True: []}
            for _ in range(args.repeats):
                for compiled, step in steps.items():
                    times[compiled].append(timed(step, device))
            eager, comp = statistics.median(times[False]), statistics.median(times[True])
            print(f"{name} {loss}: first step eager {first[False]:.1f} s, compiled {first[True]:.1f} s; "
                  f"step eager {1000 * eager:.1f} ms, compiled {1000 * comp:.1f} ms, compiled / eager {comp / eager:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
