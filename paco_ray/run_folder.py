"""What a run folder holds: one ``checkpoint_epoch_NNNN/state.pt`` per kept epoch, and for people
and scripts to read ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per
epoch) and, written by the command at the end, ``results.json`` (the best checkpoint and its
validation/test table)."""
from __future__ import annotations

import json
import math
from typing import Any

import yaml

from .migrations import legacy_checkpoint_epoch

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
STATE_FILE = "state.pt"  # inside each checkpoint folder
CHECKPOINT_PREFIX = "checkpoint_"  # every checkpoint folder's name starts so (Ray Train's own names too)


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of the checkpoint taken after ``epoch`` (1-based), in every session."""
    return f"{CHECKPOINT_PREFIX}epoch_{epoch:04d}"


def checkpoint_epoch(name: str) -> int | None:
    """The epoch a checkpoint folder's name says, or None when it says none."""
    if name.startswith(f"{CHECKPOINT_PREFIX}epoch_") and name[len(CHECKPOINT_PREFIX) + 6:].isdigit():
        return int(name[len(CHECKPOINT_PREFIX) + 6:])
    return legacy_checkpoint_epoch(name)


def is_checkpoint_dir(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX) or legacy_checkpoint_epoch(name) is not None


def to_json(value: Any) -> str:
    """Strict JSON (NaN, e.g. the accuracy of a shot group without classes, becomes null)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), sort_keys=False)


def config_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def trial_run_name(search: str, trial_id: str) -> str:
    """The name of the Train run of a search's trial (its folder under the experiment)."""
    return f"{search}/train/{trial_id}"


def trial_id_of(run_name: str) -> str:
    """The Tune trial id of a Train run named by ``trial_run_name``; "" for a plain run."""
    return run_name.rsplit("/", 1)[-1] if "/train/" in run_name else ""


class MetricsLog:
    """``metrics.jsonl`` of a run through its session; a resumed run keeps the lines of the epochs
    its checkpoint holds and rewrites the rest."""

    def __init__(self, session, start_epoch: int):
        self.session = session
        old = session.read_run_file(METRICS) or ""
        self.lines = [line for line in old.splitlines()
                      if line.strip() and json.loads(line).get("epoch", math.inf) <= start_epoch]

    def append(self, metrics: dict[str, Any]) -> None:
        self.lines.append(to_json(metrics))
        self.session.write_run_file(METRICS, "\n".join(self.lines) + "\n")
