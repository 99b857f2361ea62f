"""What the timing benchmarks share: their command line (--repeats, --device, --threads) and a
clock that waits for the GPU."""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def device_args(description: str, repeats: int, extra: list[tuple[str, dict]] = ()) -> tuple[argparse.Namespace, torch.device]:
    """Parse --repeats/--device/--threads (and ``extra`` options), apply the thread count and
    print the device line."""
    parser = argparse.ArgumentParser(description=description)
    for flag, options in extra:
        parser.add_argument(flag, **options)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} threads'})")
    return args, device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of ``fn``, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start
