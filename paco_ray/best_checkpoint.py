"""Which checkpoint of a run is its best: the one named metric every command selects by
(validation balanced accuracy), over the checkpoints a Ray Train result still holds, among those
that still exist in storage."""
from __future__ import annotations

import math
from typing import Iterable

from .storage import exists, filesystem

SELECTION_METRIC = "val_balanced_acc"  # what a run keeps and picks its checkpoints by


def result_checkpoints(result, metric: str = SELECTION_METRIC) -> list[tuple[float, str]]:
    """(metric, path) of every checkpoint a Ray Train Result still holds."""
    return [(m.get(metric, -math.inf), c.path) for c, m in (result.best_checkpoints or [])]


def best_checkpoint(candidates: Iterable[tuple[float, str]], storage: str) -> str | None:
    """The path with the highest metric among ``candidates`` that still exist under ``storage``
    (a local path or URI), or None."""
    fs, _ = filesystem(storage)
    for _, path in sorted(candidates, key=lambda mp: -mp[0]):
        if exists(fs, path):
            return path
    return None
