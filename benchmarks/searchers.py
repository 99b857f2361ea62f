"""TPE (search_alg: optuna) against random search on the shipped Fashion-MNIST-LT space, at the
same budget (the same trials, the same ASHA schedule), two search seeds each.

python benchmarks/searchers.py [--out benchmarks/results/searchers] [--trials 8] [--seeds 0 1]

Each search is search_spaces/fashion_mnist_lt.yaml as shipped but for search_alg, search_seed
and (TPE) tpe_startup_trials; the table gives the best validation balanced accuracy each found,
the trial-epochs it used, and the training time those epochs took (summed over trials, so that
searches run on a busy machine or read back compare). Resumable: a finished search (its summary.txt) is
read back, not run again.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def search(alg: str, seed: int, args) -> dict:
    """Run (or read back) one search; its best val balanced accuracy and trial-epochs."""
    from paco_ray import tune
    from paco_ray.search_algorithms import reported_results
    from paco_ray.search_space import load_space

    name = f"{alg}-seed{seed}"
    overrides = [f"search_alg={alg}", f"search_seed={seed}", f"num_samples={args.trials}",
                 f"tpe_startup_trials={args.startup}", f"storage_path={Path(args.out).resolve() / 'tune'}",
                 f"name={name}"]
    space = load_space(REPO / "search_spaces" / "fashion_mnist_lt.yaml", overrides)
    summary = Path(space.experiment_path) / tune.SUMMARY
    if not summary.exists():
        log = Path(args.out) / f"tune_{name}.log"
        print(f"searching {name}: {args.trials} trials (log: {log})", flush=True)
        with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = tune.run(space, resume=Path(space.experiment_path).exists(), then_train=False)
        if code or not summary.exists():
            raise SystemExit(f"error: the {name} search failed; see {log}")
    results = reported_results(space.experiment_path)
    epochs = [r for rows in results.values() for r in {r["epoch"]: r for r in rows}.values()]  # a resumed epoch once
    best = max(r["val_balanced_acc"] for r in epochs)
    seconds = sum(r["epoch_time_s"] for r in epochs)
    return {"search": name, "alg": alg, "seed": seed, "best": best, "trials": len(results),
            "trial_epochs": len(epochs), "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "searchers"))
    parser.add_argument("--trials", type=int, default=8, help="trials per search (the shipped space's num_samples)")
    parser.add_argument("--startup", type=int, default=3, help="TPE's random trials before it models the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = [search(alg, seed, args) for seed in args.seeds for alg in ("random", "optuna")]
    (Path(args.out) / "runs.json").write_text(json.dumps(rows, indent=1))
    lines = [f"search_spaces/fashion_mnist_lt.yaml, {args.trials} trials per search, ASHA as shipped; "
             f"TPE: {args.startup} random trials first", "",
             "| search | best val balanced acc | trials | trial-epochs | training time (min) |", "|---|---|---|---|---|"]
    lines += [f"| {r['search']} | {r['best']:.2f} | {r['trials']} | {r['trial_epochs']} | {r['train_seconds'] / 60:.1f} |"
              for r in rows]
    for alg in ("random", "optuna"):
        mine = [r["best"] for r in rows if r["alg"] == alg]
        lines.append(f"\n{alg}: mean best {statistics.mean(mine):.2f} over seeds {args.seeds}")
    text = "\n".join(lines)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
