"""What Ray Train costs and what it buys on this machine: the same epochs of the embedded default
job (PaCo, Fashion-MNIST-LT) in a plain in-process loop vs a 1-worker Ray Train run, and a 2-worker
run vs the 1-worker run. Every worker (and the in-process loop) uses one thread.

python benchmarks/ray_overhead.py [--epochs 3] [--loader ffcv|torch]

Per-epoch figures are medians over the epochs after the first (which pays FFCV compilation and,
under Ray, worker start-up); end-to-end wall times include starting the Ray workers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paco_ray.config import load_config  # noqa: E402
from paco_ray.session import LocalSession  # noqa: E402
from paco_ray.loop import train  # noqa: E402
from paco_ray.train import fit  # noqa: E402
from pipelines.default_data import with_prepared_data  # noqa: E402


def steady(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loader", default="ffcv", choices=("ffcv", "torch"))
    args = parser.parse_args()
    storage = tempfile.mkdtemp(prefix="paco_ray_bench_")

    def config(workers: int, name: str):
        cfg = load_config(None, [f"workers={workers}", "cpus_per_worker=1", f"optim.epochs={args.epochs}",
                                 f"data.loader={args.loader}", f"storage_path={storage}", f"name={name}"])
        return with_prepared_data(cfg)

    started = time.perf_counter()
    session = LocalSession(Path(storage) / "local")
    train(config(1, "local"), session)
    local_wall = time.perf_counter() - started
    local_epoch = steady([r["epoch_time_s"] for r in session.reports])
    local_ips = steady([r["images_per_s"] for r in session.reports])

    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", configure_logging=False, log_to_driver=False)
    runs = {}
    for workers in (1, 2):
        started = time.perf_counter()
        result = fit(config(workers, f"ray-{workers}"))
        wall = time.perf_counter() - started
        rows = result.metrics_dataframe.sort_values("epoch")
        runs[workers] = (wall, steady(list(rows["epoch_time_s"])), steady(list(rows["images_per_s"])))
    ray.shutdown()

    print(f"epochs: {args.epochs} ({args.loader} loader, one thread per worker)")
    print(f"in-process epoch s: {local_epoch:.2f}")
    print(f"in-process images/s: {local_ips:.0f}")
    print(f"in-process wall s: {local_wall:.1f}")
    for workers, (wall, epoch, ips) in runs.items():
        print(f"ray {workers} worker epoch s: {epoch:.2f}")
        print(f"ray {workers} worker images/s: {ips:.0f}")
        print(f"ray {workers} worker wall s (incl. start-up): {wall:.1f}")
    print(f"ray 1 worker wall / in-process wall: {runs[1][0] / local_wall:.2f}x")
    print(f"2 workers / 1 worker images/s (goal >= 1.6x): {runs[2][2] / runs[1][2]:.2f}x")
    print(f"ray 1 worker epoch / in-process epoch (goal <= 1.10x): {runs[1][1] / local_epoch:.2f}x")


if __name__ == "__main__":
    main()
