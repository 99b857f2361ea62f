"""What a finished search leaves: one row per trial (its sampled values, epochs, best validation
metric and the epoch it was reached, status, error file), the trial table, the best trial by a
stated rule, the checkpoint policy applied, and a search that was interrupted told apart from a
finished one."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .best_checkpoint import best_checkpoint
from .errors import CheckpointError
from .schema import flatten
from .search_space import SearchSpace
from .run_folder import trial_run_name
from .storage import exists, filesystem, subdirectories

STATUSES = ("completed", "stopped early", "error")


@dataclass
class TrialSummary:
    trial_id: str
    config: dict[str, Any]     # the sampled values, dotted keys
    epochs: int
    best: float                # best validation metric over the trial's epochs (nan: none)
    status: str                # one of STATUSES
    checkpoints: list[tuple[float, str]]  # (metric, path) of every reported checkpoint, best first
    best_epoch: int = 0        # the first epoch that reached ``best`` (0: none)
    error_path: str = ""       # the trial's error file, for an errored trial


def rank_key(t: TrialSummary) -> tuple:
    """Best first: the higher metric; on a tie the trial that reached it in fewer epochs, then the
    trial generated first (its id)."""
    return (-t.best if math.isfinite(t.best) else math.inf, t.best_epoch or math.inf, t.trial_id)


def summarize(results, space: SearchSpace) -> list[TrialSummary]:
    """One row per trial from a Tune ResultGrid, in rank order (``rank_key``)."""
    metric, rows = space.scheduler.metric, []
    for result in results:
        frame = result.metrics_dataframe
        records = [] if frame is None else frame.to_dict("records")
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        epochs = int(max((r.get("epoch", 0) for r in records), default=0))
        scored = [(r[metric], int(r.get("epoch", 0))) for r in records
                  if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        best = max((s for s, _ in scored), default=math.nan)
        best_epoch = min((e for s, e in scored if s == best), default=0)
        checkpoints = sorted(((r[metric], r["checkpoint_path"]) for r in records
                              if isinstance(r.get("checkpoint_path"), str)), key=lambda mp: -mp[0])
        if result.error is not None:
            status, error_path = "error", f"{result.path}/error.txt"
        else:
            status, error_path = ("stopped early" if epochs < space.scheduler.max_t else "completed"), ""
        rows.append(TrialSummary(trial_id, flatten(result.config or {}), epochs, best, status, checkpoints,
                                 best_epoch, error_path))
    rows.sort(key=rank_key)
    return rows


def selectable(rows: list[TrialSummary]) -> list[TrialSummary]:
    """The trials a search may select, best first: those that did not error and reported the
    metric. An errored trial is never selected, however well it scored before it failed (its
    last epochs, or its weights, may be what failed)."""
    return sorted((t for t in rows if t.status != "error" and math.isfinite(t.best)), key=rank_key)


def best_trial(rows: list[TrialSummary], space: SearchSpace) -> tuple[TrialSummary, str | None]:
    """The best selectable trial and its best checkpoint still stored (None: none left)."""
    candidates = selectable(rows)
    if not candidates:
        errored = sum(t.status == "error" for t in rows)
        raise CheckpointError(f"{space.experiment_path}: no trial without an error reported {space.scheduler.metric}"
                              + (f" ({errored} errored)" if errored else ""))
    best = candidates[0]
    return best, best_checkpoint(best.checkpoints, space.experiment_path)


def prune_checkpoints(rows: list[TrialSummary], space: SearchSpace) -> tuple[int, int]:
    """Apply the checkpoint policy: the best ``keep_per_trial`` checkpoints of the best
    ``keep_trials`` selectable trials survive; every other checkpoint directory is deleted, except
    those of errored trials (``--resume --retry-errored`` continues them from their last one).
    Returns (kept, deleted)."""
    fs, root = filesystem(space.experiment_path)
    kept = deleted = 0
    survivors = {t.trial_id for t in selectable(rows)[:space.checkpoints.keep_trials]}
    for t in rows:
        keep: set[str] = set()
        if t.trial_id in survivors:
            present = [p for _, p in t.checkpoints if exists(fs, p)]
            keep = set(present[:space.checkpoints.keep_per_trial])
        run_dir = trial_run_name(root, t.trial_id)
        if t.status == "error" or not exists(fs, run_dir):
            continue
        for path in subdirectories(fs, run_dir):
            if not path.rsplit("/", 1)[-1].startswith("checkpoint_"):
                continue
            if path in keep:
                kept += 1
            else:
                fs.delete_dir(path)
                deleted += 1
    return kept, deleted


def saved_statuses(space: SearchSpace) -> list[str]:
    """Each trial's status as the experiment saved it last: what ``--resume`` will see. (After an
    interruption Tune saves the experiment, then stops the running trials, so the statuses of the
    ResultGrid it returns no longer tell an interrupted trial from a finished one.)"""
    from ray.tune import ExperimentAnalysis

    return [trial.status for trial in ExperimentAnalysis(space.experiment_path).trials]


def unfinished_trials(statuses: list[str], space: SearchSpace) -> int:
    """Trials the search generates that neither finished nor failed: still running when the search
    was interrupted, or never started (``num_samples`` times every grid: a grid of 3 with
    ``num_samples: 1`` is 3 trials)."""
    return max(0, space.trial_count() - sum(s in ("TERMINATED", "ERROR") for s in statuses))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_trials(rows: list[TrialSummary], space: SearchSpace) -> str:
    """The trial table: sampled values, epochs run, best metric and its epoch, status."""
    keys = list(space.search)
    widths = [max(len(k), 10) for k in keys]
    header = f"{'trial':<14}" + "".join(f"{k:>{w + 2}}" for k, w in zip(keys, widths)) + \
        f"{'epochs':>8}{space.scheduler.metric:>18}{'at epoch':>10}  status"
    lines = [header]
    for t in rows:
        cells = "".join(f"{format_value(t.config.get(k)):>{w + 2}}" for k, w in zip(keys, widths))
        best = "-" if math.isnan(t.best) else f"{t.best:.2f}"
        at = str(t.best_epoch) if t.best_epoch else "-"
        status = f"error ({t.error_path})" if t.status == "error" else t.status
        lines.append(f"{t.trial_id:<14}{cells}{t.epochs:>8}{best:>18}{at:>10}  {status}")
    return "\n".join(lines)
