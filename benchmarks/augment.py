"""Images/s of timm's RandAugment (rand-n2-m10-mstd0.5) image by image (``TimmRandAugment``, the
reference) against the batched implementation (``BatchedRandAugment``), batch 128 of uint8 RGB
images at 32 and 224 px, on the CPU (one thread) and on CUDA when present.

python benchmarks/augment.py [--batch 128] [--repeats 5]

Prints the median images/s of each over --repeats batches and their ratio (goal: batched >= 10x).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.data.augment_ops import TimmRandAugment  # noqa: E402
from paco_ray.data.batched_augment import BatchedRandAugment  # noqa: E402

FILL = (124, 116, 104)  # ImageNet's mean colour


def images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth random colour images (upsampled noise), uint8."""
    low = torch.randint(0, 256, (batch, 3, size // 4 + 1, size // 4 + 1), dtype=torch.float32)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").to(torch.uint8).to(device)


def rate(fn, batch: torch.Tensor, repeats: int, device: torch.device) -> float:
    fn(batch)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    per_sample, batched = TimmRandAugment(2, 10, 0.5, FILL), BatchedRandAugment(2, 10, 0.5, FILL)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (1 thread)"
        for size in (32, 224):
            batch = images(args.batch, size, device)
            loop = rate(lambda b: torch.stack([per_sample(x) for x in b.cpu()]).to(device), batch, args.repeats, device)
            fast = rate(batched, batch, args.repeats, device)
            print(f"{name} {size}px: per-sample {loop:,.0f} img/s, batched {fast:,.0f} img/s, ratio {fast / loop:.1f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
