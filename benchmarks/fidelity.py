"""CE, Balanced Softmax, PaCo and GPaCo on Fashion-MNIST-LT under one tuning budget.

python benchmarks/fidelity.py [--out benchmarks/results/fidelity] [--quick]

For each imbalance factor (100, then 10):
1. tune: each loss gets the same paco_ray.tune search (ASHA, same trials, same trial-epochs) on
   the validation split: PaCo and GPaCo search temperature, alpha and queue size; CE and Balanced
   Softmax search learning rate and weight decay. All use the same recipe (RECIPE: pad-crop +
   flip on both views, each loss's published projector; the baselines train on the query view);
2. retrain: each winner trains to the full budget with 3 seeds; its best validation epoch is
   evaluated once on the test split (mean ± std of balanced / many / medium / few);
3. ablations (IF 100): the PaCo winner with one recipe element changed at a time (ABLATIONS), among
   them the published CIFAR views, which need far more epochs than this budget.

Resumable: a finished search leaves best_config.yaml in its experiment folder and every finished
run is appended to runs.json; a rerun skips both (an interrupted search resumes through Tune).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtail import COLUMNS, LOSSES, mean_std, plot, run_one  # noqa: E402

RECIPE = ["data.query_view=crop_flip", "data.key_view=crop_flip", "data.crop_padding=2", "optim.warmup_epochs=1"]
# model.projector is the loss's published head (the default): Linear-BN-ReLU-Linear for PaCo, GPaCo's own for GPaCo
SEARCH = {
    "paco": {"paco": {"temperature": {"loguniform": [0.05, 0.5]}, "alpha": {"loguniform": [0.001, 0.05]},
                      "queue_size": {"choice": [500, 1000, 3000]}}},
    "balanced_softmax": {"optim": {"lr": {"loguniform": [0.02, 0.3]}, "weight_decay": {"loguniform": [1e-4, 2e-3]}}},
}
SEARCH["gpaco"], SEARCH["ce"] = SEARCH["paco"], SEARCH["balanced_softmax"]
ABLATIONS = {  # name -> overrides on top of the PaCo winner (IF 100)
    "key view sim_cifar (the published CIFAR key)": ["data.key_view=sim_cifar"],
    "published CIFAR views (AutoAugment + Cutout 14 / sim_cifar)": [
        "data.query_view=autoaugment_cutout", "data.cutout=14", "data.key_view=sim_cifar"],
    "query view timm RandAugment n2 m10": ["data.query_view=randaugment", "data.randaugment_ops=2"],
    "projector without BN (mlp)": ["model.projector=mlp"],
}


def budget(args) -> dict:
    return {"trials": args.trials, "max_t": args.tune_epochs, "grace": args.grace, "epochs": args.epochs,
            "max_per_class": args.max_per_class}  # more seeds or ablations may be added to finished results


def search_space(loss: str, factor: float, args) -> dict:
    base = {"loss": loss, "default_data": {"imbalance_factor": factor, "max_per_class": args.max_per_class},
            "optim": {"epochs": args.epochs}}
    for override in RECIPE:
        key, value = override.split("=")
        section, name = key.split(".")
        base.setdefault(section, {})[name] = yaml.safe_load(value)
    return {"base": base, "search": SEARCH[loss],
            "scheduler": {"metric": "val_balanced_acc", "max_t": args.tune_epochs, "grace_period": args.grace,
                          "reduction_factor": 3},
            "num_samples": args.trials, "max_concurrent_trials": 2, "search_seed": 0,
            "resources": {"workers": 1, "cpus_per_worker": 0.9, "use_gpu": False, "trial_driver_cpus": 0.1},
            "checkpoints": {"keep_per_trial": 1, "keep_trials": 1},
            "storage_path": str(Path(args.out).resolve() / "tune"), "name": f"if{factor:g}-{loss}"}


def tune_one(loss: str, factor: float, args) -> list[str]:
    """The winner's searched values as overrides, from best_config.yaml (tuning first if absent)."""
    from paco_ray import tune
    from paco_ray.schema import flatten
    from paco_ray.search_space import parse

    space = parse(search_space(loss, factor, args), "fidelity search")
    best = Path(space.experiment_path) / tune.BEST_CONFIG
    if not best.exists():
        log = Path(args.out) / f"tune_if{factor:g}_{loss}.log"
        print(f"tuning {loss} at IF {factor:g}: {args.trials} trials up to {args.tune_epochs} epochs (log: {log})",
              flush=True)
        with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = tune.run(space, resume=Path(space.experiment_path).exists(), then_train=False)
        if code or not best.exists():
            raise SystemExit(f"error: the {loss} search at IF {factor:g} failed; see {log}")
    chosen = flatten(yaml.safe_load(best.read_text()))
    return [f"{key}={chosen[key]}" for key in searched_keys(SEARCH[loss])]


def recorded_winner(runs_path: Path, loss: str, factor: float) -> list[str]:
    """A loss's winner as its finished runs recorded it (their overrides past the recipe's)."""
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    mine = [r for r in runs if r["name"] == loss and r["imbalance_factor"] == factor]
    if not mine:
        raise SystemExit(f"error: no recorded {loss} runs at IF {factor:g} in {runs_path}; run it with --losses {loss}")
    keys = searched_keys(SEARCH[loss])
    return [o for o in mine[0]["overrides"] if o.split("=", 1)[0] in keys]


def searched_keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a search tree: {"paco": {"alpha": {"loguniform": ...}}} -> ["paco.alpha"]."""
    keys = []
    for k, v in tree.items():
        leaf = not (isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()))
        keys += [f"{prefix}{k}"] if leaf else searched_keys(v, f"{prefix}{k}.")
    return keys


def run_jobs(jobs: list[dict], path: Path, parallel: int) -> list[dict]:
    """Run the jobs not yet in runs.json, appending each result as it finishes."""
    runs = json.loads(path.read_text()) if path.exists() else []
    done = {r["job"] for r in runs}
    todo = [j for j in jobs if j["job"] not in done]
    with mp.get_context("spawn").Pool(parallel) as pool:
        for run in pool.imap_unordered(run_one, todo):
            runs.append(run)
            path.write_text(json.dumps(runs, indent=1))
            print(f"done: {run['job']}: test balanced {run['test']['balanced_acc']:.2f} "
                  f"(best epoch {run['best_epoch']}, {run['seconds']:.0f} s)", flush=True)
    return runs


def job(name: str, loss: str, factor: float, seed: int, overrides: list[str], args) -> dict:
    return dict(job=f"{name} IF {factor:g} seed {seed}", name=name, loss=loss, imbalance_factor=factor, seed=seed,
                epochs=args.epochs, max_per_class=args.max_per_class, overrides=[*RECIPE, *overrides])


def table(runs: list[dict], names: list[str], factor: float) -> str:
    lines = [f"| IF {factor:g} | {' | '.join(COLUMNS)} |", "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        mine = [r for r in runs if r["name"] == name and r["imbalance_factor"] == factor]
        if mine:
            lines.append(f"| {name} | {' | '.join(mean_std([r['test'][c] for r in mine]) for c in COLUMNS)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imbalance-factors", type=float, nargs="+", default=[100.0, 10.0])
    parser.add_argument("--max-per-class", type=int, default=2500, help="training images of the head class")
    parser.add_argument("--trials", type=int, default=6, help="Tune trials per loss")
    parser.add_argument("--tune-epochs", type=int, default=8, help="ASHA max_t: epochs of a full trial")
    parser.add_argument("--grace", type=int, default=2, help="ASHA grace period (rungs at grace x 3^k)")
    parser.add_argument("--epochs", type=int, default=24, help="the full budget of the retrained winners")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="retraining runs at once, one thread each")
    parser.add_argument("--ablation-seeds", type=int, default=1, help="seeds per ablation (0: none)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity"))
    parser.add_argument("--quick", action="store_true", help="IF 100, 2 trials of 2 epochs, 1 seed of 2 epochs")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                        help="tune and retrain these losses; the others' winners and runs are read from runs.json")
    args = parser.parse_args()
    if args.quick:
        args.imbalance_factors, args.trials, args.tune_epochs, args.grace, args.epochs, args.seeds = [100.0], 2, 2, 1, 2, 1
        args.max_per_class, args.ablation_seeds = 300, 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "budget.json"
    if settings.exists() and json.loads(settings.read_text()) != budget(args):
        raise SystemExit(f"error: {out} holds results of another budget ({settings}); pass a new --out")
    settings.write_text(json.dumps(budget(args)))
    started, runs_path = time.perf_counter(), out / "runs.json"
    winners: dict = {}
    for factor in args.imbalance_factors:
        for loss in LOSSES:
            winners[(loss, factor)] = tune_one(loss, factor, args) if loss in args.losses else \
                recorded_winner(runs_path, loss, factor)
            print(f"IF {factor:g} {loss} winner: {' '.join(winners[(loss, factor)])}", flush=True)
        jobs = [job(loss, loss, factor, seed, winners[(loss, factor)], args)
                for seed in range(args.seeds) for loss in args.losses]
        if factor == 100 and "paco" in args.losses:
            jobs += [job(name, "paco", factor, seed, [*winners[("paco", factor)], *extra], args)
                     for seed in range(args.ablation_seeds) for name, extra in ABLATIONS.items()]
        runs = run_jobs(jobs, runs_path, args.parallel)
    report(runs, winners, args, time.perf_counter() - started)


def report(runs: list[dict], winners: dict, args, elapsed: float) -> None:
    out = Path(args.out)
    lines = [f"Fashion-MNIST-LT (head class {args.max_per_class} training images), recipe: {' '.join(RECIPE)}",
             f"tuning: {args.trials} trials per loss, ASHA max_t {args.tune_epochs}, grace {args.grace}; "
             f"winners retrained {args.epochs} epochs x {args.seeds} seeds; test split, mean ± std", ""]
    for factor in args.imbalance_factors:
        lines += [table(runs, list(LOSSES), factor), ""]
        lines += [f"- {loss}: {' '.join(winners[(loss, factor)])}" for loss in LOSSES] + [""]
        mine = [r for r in runs if r["imbalance_factor"] == factor and r["name"] in LOSSES]
        plot([{**r, "loss": r["name"]} for r in mine], factor, out / f"fidelity_if{factor:g}.png")
        means = {loss: statistics.mean(r["test"]["balanced_acc"] for r in mine if r["name"] == loss) for loss in LOSSES}
        lines.append(f"IF {factor:g}: PaCo - Balanced Softmax = {means['paco'] - means['balanced_softmax']:+.2f} "
                     "balanced accuracy points\n")
    if any(r["name"] in ABLATIONS for r in runs):
        seed0 = [r for r in runs if r["seed"] < args.ablation_seeds]
        lines += [f"ablations (PaCo winner, IF 100, seeds < {args.ablation_seeds}, the same seeds of the winner first):",
                  table(seed0, ["paco", *ABLATIONS], 100.0)]
    lines.append(f"\nwall time of this invocation: {elapsed / 60:.1f} min")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
