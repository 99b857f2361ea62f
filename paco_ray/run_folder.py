"""The files a run folder holds besides its checkpoints, for people and scripts to read:
``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per epoch) and, written by
the command at the end, ``results.json`` (the best checkpoint and its validation/test table)."""
from __future__ import annotations

import json
import math
from typing import Any

import yaml

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"


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
