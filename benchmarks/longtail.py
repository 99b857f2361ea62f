"""CE, Balanced Softmax, PaCo and GPaCo on Fashion-MNIST-LT (imbalance factor 100 and 10), same
backbone, epochs and schedule, several seeds: a table of test top-1, balanced, many/medium/few
(mean ± std over seeds) and a PNG of per-class test accuracy against training-class frequency.

python benchmarks/longtail.py [--epochs 6] [--seeds 3] [--parallel 2] [--out benchmarks/results] [--quick]
python benchmarks/longtail.py --set paco.alpha=0.01 --set paco.temperature=0.1 ...   # a variant

Every run trains in its own process with one thread (--parallel runs at once), validates every
epoch, and its best epoch by validation balanced accuracy is evaluated once on the test split.
--quick: imbalance factor 100 only, 1 seed, 2 epochs, 1000 images in the head class (a few minutes).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOSSES = ("ce", "balanced_softmax", "paco", "gpaco")
COLUMNS = ("top1", "balanced_acc", "many", "medium", "few")


def run_one(job: dict) -> dict:
    """Train one (loss, imbalance factor, seed) in this process and evaluate its best epoch on test."""
    import torch

    from paco_ray.config import load_config
    from paco_ray.evaluate import evaluate_checkpoint
    from paco_ray.session import LocalSession
    from paco_ray.loop import train
    from pipelines.default_data import with_prepared_data

    torch.set_num_threads(1)
    cfg = load_config(None, [f"loss={job['loss']}", f"seed={job['seed']}", "workers=1", "cpus_per_worker=1",
                             f"optim.epochs={job['epochs']}", f"default_data.imbalance_factor={job['imbalance_factor']}",
                             f"default_data.max_per_class={job['max_per_class']}", *job["overrides"]])
    cfg = with_prepared_data(cfg)  # already prepared by main: a fingerprint check
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        session = LocalSession(out)
        train(cfg, session)
        best = max(session.reports, key=lambda r: r["val_balanced_acc"])
        results, classes = evaluate_checkpoint(best["checkpoint_path"], ["test"])
    return {**job, "best_epoch": best["epoch"], "test": results["test"], "train_counts": list(classes.train_counts),
            "names": list(classes.names), "seconds": time.perf_counter() - started}


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(runs: list[dict], imbalance_factor: float) -> str:
    lines = [f"imbalance factor {imbalance_factor:g}:",
             f"| loss | {' | '.join(COLUMNS)} |", "|---|" + "---|" * len(COLUMNS)]
    for loss in LOSSES:
        mine = [r for r in runs if r["loss"] == loss and r["imbalance_factor"] == imbalance_factor]
        if mine:
            cells = [mean_std([r["test"][c] for r in mine]) for c in COLUMNS]
            lines.append(f"| {loss} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(runs: list[dict], imbalance_factor: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mine = [r for r in runs if r["imbalance_factor"] == imbalance_factor]
    counts, names = mine[0]["train_counts"], mine[0]["names"]
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    figure = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for loss, marker in zip(LOSSES, "osD^"):
        per_run = [r["test"]["per_class"] for r in mine if r["loss"] == loss]
        if per_run:
            mean = [statistics.mean(run[c] for run in per_run) for c in order]
            axes.plot(range(len(order)), mean, marker=marker, label=loss)
    axes.set_xticks(range(len(order)), [f"{names[c][:10]}\n{counts[c]}" for c in order], fontsize=7)
    axes.set_xlabel("class (training images), head to tail")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    axes.set_title(f"Fashion-MNIST-LT, imbalance factor {imbalance_factor:g}: per-class test accuracy")
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--imbalance-factors", type=float, nargs="+", default=[100.0, 10.0])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--max-per-class", type=int, default=5000)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory for the PNGs and runs.json")
    parser.add_argument("--quick", action="store_true", help="IF 100, 1 seed, 2 epochs, 1000 head images")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.imbalance_factors, args.max_per_class = 2, 1, [100.0], 1000

    jobs = [dict(loss=loss, imbalance_factor=factor, seed=seed, epochs=args.epochs, max_per_class=args.max_per_class,
                 overrides=args.set)
            for factor in args.imbalance_factors for seed in range(args.seeds) for loss in args.losses]
    from paco_ray.config import load_config
    from pipelines.default_data import with_prepared_data

    for factor in args.imbalance_factors:  # prepare each dataset once, before the workers race for it
        with_prepared_data(load_config(None, [f"default_data.imbalance_factor={factor}",
                                              f"default_data.max_per_class={args.max_per_class}"]))
    started = time.perf_counter()
    runs = []
    with mp.get_context("spawn").Pool(args.parallel) as pool:
        for run in pool.imap_unordered(run_one, jobs):
            runs.append(run)
            print(f"done: {run['loss']} IF {run['imbalance_factor']:g} seed {run['seed']}: "
                  f"test balanced {run['test']['balanced_acc']:.2f} (best epoch {run['best_epoch']}, "
                  f"{run['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longtail_runs.json").write_text(json.dumps(runs, indent=1))
    print(f"\n{len(jobs)} runs, {args.epochs} epochs each, {args.seeds} seeds, overrides {args.set or 'none'}: "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    for factor in args.imbalance_factors:
        print("\n" + table(runs, factor))
        plot(runs, factor, out / f"longtail_if{factor:g}.png")
        print(f"plot: {out / f'longtail_if{factor:g}.png'}")
    for factor in args.imbalance_factors:
        means = {loss: statistics.mean(r["test"]["balanced_acc"] for r in runs
                                       if r["loss"] == loss and r["imbalance_factor"] == factor)
                 for loss in args.losses}
        best_baseline = max(v for k, v in means.items() if k in ("ce", "balanced_softmax"))
        if "paco" in means:
            print(f"IF {factor:g} PaCo balanced accuracy minus the best baseline: {means['paco'] - best_baseline:+.2f}")


if __name__ == "__main__":
    main()
