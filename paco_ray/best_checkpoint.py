"""Which checkpoint of a run is its best, by the one named metric every command selects by
(validation balanced accuracy): among the checkpoints a Ray Train result still holds
(``result_checkpoints``), or among the checkpoint folders of a run folder (``resolve_checkpoint``,
for ``paco-eval RUN``), always among those that still exist in storage."""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from typing import Iterable

from .errors import CheckpointError, InputError, MissingInputError
from .run_folder import METRICS, STATE_FILE, checkpoint_epoch, is_checkpoint_dir
from .storage import absolute_storage, exists, fetch_dir, filesystem, read_text, storage_error, subdirectories, to_uri

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


@dataclass
class Picked:
    """The checkpoint chosen from a run folder, and why."""
    checkpoint: str   # local path or URI
    run: str
    metric: str
    value: float
    candidates: int

    def describe(self) -> str:
        value = f"{self.value:.2f}" if math.isfinite(self.value) else "none recorded"
        return (f"checkpoint {self.checkpoint}: best {self.metric} ({value}) of the "
                f"{self.candidates} checkpoint(s) in {self.run}")


def run_checkpoints(path: str) -> list[str] | None:
    """Paths (inside ``path``'s filesystem) of the checkpoints of a run folder: its checkpoint
    folders (run_folder.is_checkpoint_dir) that hold state.pt. None when ``path`` is itself a
    checkpoint (a file, or a directory holding state.pt)."""
    import pyarrow.fs

    try:
        fs, root = filesystem(absolute_storage(path))
        kind = fs.get_file_info(root).type
    except OSError as err:  # object storage: no such bucket, no credentials
        raise InputError(f"{path}: {storage_error(err, path)}") from None
    if kind == pyarrow.fs.FileType.NotFound:
        raise MissingInputError(f"checkpoint or run folder {path!r} does not exist")
    if kind == pyarrow.fs.FileType.File or exists(fs, f"{root}/{STATE_FILE}"):
        return None
    found = sorted(d for d in subdirectories(fs, root)
                   if is_checkpoint_dir(d.rsplit("/", 1)[-1]) and exists(fs, f"{d}/{STATE_FILE}"))
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint (no {STATE_FILE}) nor a run folder (no checkpoint_*/ "
                              f"subfolder holding {STATE_FILE})")
    return found


def recorded_metric(checkpoint: str, metric: str = SELECTION_METRIC) -> float:
    """The validation ``metric`` a checkpoint recorded with its state (-inf when absent or NaN)."""
    from .checkpoint import load_state

    with tempfile.TemporaryDirectory() as local:
        state = load_state(fetch_dir(f"{checkpoint}/{STATE_FILE}", local))
    value = (state.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def epoch_scores(storage: str) -> dict[int, float]:
    """Epoch -> SELECTION_METRIC from a run folder's metrics.jsonl (empty when it has none): what
    each epoch's checkpoint recorded, without reading the checkpoints."""
    fs, file = filesystem(f"{storage}/{METRICS}")
    if not exists(fs, file):
        return {}
    lines = [json.loads(line) for line in read_text(fs, file).splitlines() if line.strip()]
    return {m["epoch"]: float(m[SELECTION_METRIC]) if isinstance(m.get(SELECTION_METRIC), (int, float))
            else -math.inf for m in lines if "epoch" in m}


def resolve_checkpoint(path: str) -> tuple[str, Picked | None]:
    """``path`` itself when it is a checkpoint; for a run folder, its checkpoint with the highest
    recorded SELECTION_METRIC (from metrics.jsonl for checkpoints named by epoch, else from the
    checkpoint itself), by the criterion the training command uses (``best_checkpoint``)."""
    found = run_checkpoints(path)
    if found is None:
        return path, None
    storage = absolute_storage(path)
    by_epoch = epoch_scores(storage)

    def score(directory: str) -> float:
        epoch = checkpoint_epoch(directory.rsplit("/", 1)[-1])
        if epoch in by_epoch:
            return by_epoch[epoch]
        return recorded_metric(to_uri(storage, directory))

    scored = [(score(d), d) for d in found]
    best = to_uri(storage, best_checkpoint(scored, storage))
    value = max(score for score, _ in scored)
    return best, Picked(best, path, SELECTION_METRIC, value, len(found))
