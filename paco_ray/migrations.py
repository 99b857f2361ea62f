"""What paco_ray still reads from 0.1 and 0.2 files, in one place, each with a deprecation line:
config keys that moved, search-space keys that were dropped and the checkpoint folders of 0.2's
in-process runs. All of it goes in 0.3."""
from __future__ import annotations

import re
from typing import Any

from .schema import ConfigError

DEFAULT_DATASET = "fashion_mnist_lt"  # the embedded default's name (and 0.2's only data.dataset value)
RENAMED_KEYS = {f"data.{key}": f"default_data.{key}"  # moved in 0.2
                for key in ("root", "imbalance_factor", "max_per_class", "val_per_class", "cache_dir")}
LEGACY_CHECKPOINT_DIR = re.compile(r"epoch_(\d+)")  # LocalSession's checkpoint folders before checkpoint_epoch_NNNN


def upgrade_renamed_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A training config ``raw`` with renamed keys moved to their new place, and one deprecation
    line per old key. ``data.dataset`` is dropped: its only value was the embedded default."""
    data = raw.get("data")
    if not isinstance(data, dict) or not any(f"data.{k}" in RENAMED_KEYS or k == "dataset" for k in data):
        return raw, []
    raw, data, notes = dict(raw), dict(data), []
    if not isinstance(raw.get("default_data") or {}, dict):
        raise ConfigError(f"default_data: expected a mapping, got {raw['default_data']!r}")
    if "dataset" in data:
        value = data.pop("dataset")
        if value != DEFAULT_DATASET:
            raise ConfigError(f"data.dataset: must be {DEFAULT_DATASET} (other datasets: prepare one with "
                              f"python -m pipelines... and set data.path), got {value!r}")
        notes.append("data.dataset is deprecated and ignored (an empty data.path means the embedded default)")
    for old, new in RENAMED_KEYS.items():
        key = old.split(".", 1)[1]
        if key in data:
            raw["default_data"] = {**(raw.get("default_data") or {}), key: data.pop(key)}
            notes.append(f"{old} is deprecated; use {new}")
    raw["data"] = data
    return raw, notes


def upgrade_space(raw: dict[str, Any], default_metric: str) -> tuple[dict[str, Any], list[str]]:
    """A search space ``raw`` without keys dropped in 0.2 (``scheduler.mode``: every metric is an
    accuracy, maximised), and one deprecation line per dropped key."""
    scheduler = raw.get("scheduler")
    if not isinstance(scheduler, dict) or "mode" not in scheduler:
        return raw, []
    scheduler = dict(scheduler)
    mode = scheduler.pop("mode")
    if mode != "max":
        raise ConfigError(f"scheduler.mode: {scheduler.get('metric', default_metric)} is an accuracy and is "
                          f"maximised, got {mode!r}")
    return {**raw, "scheduler": scheduler}, ["scheduler.mode is deprecated and ignored (metrics are maximised)"]


def legacy_checkpoint_epoch(name: str) -> int | None:
    """The epoch of a 0.2 in-process checkpoint folder (``epoch_NNNN``), or None for any other name."""
    match = LEGACY_CHECKPOINT_DIR.fullmatch(name)
    return int(match[1]) if match else None
