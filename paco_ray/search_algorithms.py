"""The search algorithms and the scheduler of a search, made right under ``--resume``.

- ``ResumableASHA``: Tune saves no scheduler state, so a restored experiment starts with empty
  rungs: a resumed trial that had passed a rung is judged there again (against whatever
  later-epoch scores the rung then holds), and new trials are compared with those later-epoch
  scores. This ASHA rebuilds every rung's records from the trials' own reported results
  (``run_trial_*/result.json``, local or in object storage) the first time a trial is added,
  exactly as ASHA recorded them: each trial's metric at the first result at or past the milestone.
- ``searcher``: ``random`` (Tune's BasicVariantGenerator: random samples and grids, seeded) or
  ``optuna`` (Optuna's TPE under a ConcurrencyLimiter, seeded); both keep the number of trials at
  once that the resumed search computed (Tune restores the searcher's old value otherwise).
"""
from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from .schema import ConfigError

from .storage import exists, filesystem, read_text, subdirectories


def reported_results(experiment_path: str) -> dict[str, list[dict[str, Any]]]:
    """Every result Tune recorded in an experiment folder, per trial id, in the order reported."""
    fs, root = filesystem(experiment_path)
    if not exists(fs, root):
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for folder in subdirectories(fs, root):
        path = f"{folder}/result.json"
        if not folder.rsplit("/", 1)[-1].startswith("run_trial_") or not exists(fs, path):
            continue
        for line in read_text(fs, path).splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short when the driver died
                continue
            if isinstance(row, dict) and row.get("trial_id"):
                out.setdefault(row["trial_id"], []).append(row)
    return out


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` (one bracket) that restores its rung records from ``experiment_path``."""

    def __init__(self, experiment_path: str, **kwargs):
        super().__init__(**kwargs)
        self.experiment_path = experiment_path
        self._rungs_restored = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._rungs_restored:
            self._rungs_restored = True
            self.restore_rungs(reported_results(self.experiment_path))
        super().on_trial_add(tune_controller, trial)

    def restore_rungs(self, results: dict[str, list[dict[str, Any]]]) -> int:
        """Record each trial's metric at every rung it reached; returns how many records."""
        restored = 0
        for bracket in self._brackets:
            for milestone, recorded in bracket._rungs:
                for trial_id, rows in results.items():
                    row = next((r for r in rows if r.get(self._time_attr, 0) >= milestone
                                and isinstance(r.get(self._metric), (int, float))), None)
                    if row is not None and trial_id not in recorded:
                        recorded[trial_id] = self._metric_op * row[self._metric]
                        restored += 1
        return restored

    def rungs(self) -> list[float]:
        """The milestones at which trials can be stopped (``max_t`` is not one: trials end there)."""
        return sorted(m for m, _ in self._brackets[0]._rungs if m < self._max_t)


class Variants(BasicVariantGenerator):
    """Random samples and grids; a restored state keeps the current ``max_concurrent``."""

    def set_state(self, state) -> None:
        keep = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = keep


class Limited(ConcurrencyLimiter):
    """A ConcurrencyLimiter whose restored state keeps the current ``max_concurrent``."""

    def set_state(self, state) -> None:
        keep = self.max_concurrent
        super().set_state(state)
        self.set_max_concurrency(keep)


def searcher(search_alg: str, seed: int, max_concurrent: int, tpe_startup_trials: int = 10):
    """The search algorithm named by a space's ``search_alg``, seeded, at most ``max_concurrent``
    at once; TPE samples ``tpe_startup_trials`` at random before it models the results."""
    if search_alg == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search_alg: optuna needs Optuna: pip install 'paco_ray[search]'")
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        sampler = TPESampler(seed=seed, n_startup_trials=tpe_startup_trials)
        return Limited(OptunaSearch(sampler=sampler), max_concurrent=max_concurrent)
    return Variants(random_state=seed, max_concurrent=max_concurrent)


def set_concurrency(search_alg, max_concurrent: int) -> None:
    """Run at most ``max_concurrent`` trials at once from now on (a restored search's searcher)."""
    if isinstance(search_alg, ConcurrencyLimiter):
        search_alg.set_max_concurrency(max_concurrent)
    else:
        search_alg.max_concurrent = max_concurrent
