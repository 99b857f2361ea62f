"""What a training run shows while it runs: Ray custom metrics from every worker (Ray dashboard,
Prometheus at each node's metrics export port) and TensorBoard event files from rank 0 (tensorboardX),
with a per-class accuracy vs class-frequency figure at every evaluation, drawn in a background
thread while the epoch's checkpoint is built."""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .data.longtail import ClassInfo
from .plots import per_class_bars, to_image
from .storage import copy_dir, is_local

FIGURE_TAG = "val/per_class_accuracy"

# reported metric -> (Ray gauge name, description); exported to Prometheus as ray_<name>
GAUGES = {
    "epoch": ("paco_epoch", "last finished epoch"),
    "images_per_s": ("paco_images_per_s", "training images per second on this worker"),
    "train_loss": ("paco_train_loss", "mean training loss of the last epoch (all workers)"),
    "lr": ("paco_lr", "learning rate at the end of the last epoch"),
    "queue_fill": ("paco_queue_fill", "fraction of the PaCo key queue holding keys"),
    "val_top1": ("paco_val_top1", "validation top-1 accuracy (%)"),
    "val_balanced_acc": ("paco_val_balanced_acc", "validation mean per-class accuracy (%)"),
    "val_many": ("paco_val_many", "validation accuracy of many-shot classes (%)"),
    "val_medium": ("paco_val_medium", "validation accuracy of medium-shot classes (%)"),
    "val_few": ("paco_val_few", "validation accuracy of few-shot classes (%)"),
    "skipped_steps": ("paco_skipped_steps", "steps of the last epoch skipped for a non-finite loss or gradient"),
}
TAG_KEYS = ("trial", "worker")


class RayMetrics:
    """Ray ``Gauge``s tagged by trial (the run name, or the Tune trial id) and worker rank."""

    def __init__(self, trial: str, worker: int):
        from ray.util.metrics import Gauge

        self.tags = {"trial": trial, "worker": str(worker)}
        self.gauges = {key: Gauge(name, description=text, tag_keys=TAG_KEYS) for key, (name, text) in GAUGES.items()}

    def record(self, metrics: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)


def per_class_figure(per_class: list[float], classes: ClassInfo) -> np.ndarray:
    """Per-class accuracy (bars, coloured by shot group) against training images per class (line,
    log scale), classes from head to tail, binned past plots.MAX_BARS classes; an (H, W, 3) uint8
    image of a fixed size whatever the number of classes."""
    return to_image(per_class_bars(per_class, classes))


class TensorBoard:
    """TensorBoard event files in ``path`` on ``filesystem`` (a pyarrow filesystem; remote storage
    is written through a local directory that is copied after every flush), written synchronously
    with tensorboardX's event-file writer, so ``flush`` is a barrier (``SummaryWriter.flush`` is
    not: its queue drains on a thread of its own). ``log`` writes an epoch's scalars and starts
    drawing its per-class figure in a background thread; ``flush`` (before the epoch's report)
    writes the figure and the file, so the drawing overlaps building the checkpoint. A figure
    that fails to draw is skipped with a warning: it never stops training."""

    def __init__(self, filesystem, path: str):
        from tensorboardX.event_file_writer import EventsWriter

        self.fs, self.path = filesystem, path
        self.local = is_local(filesystem)
        self.dir = path if self.local else tempfile.mkdtemp(prefix="paco_tb_")
        os.makedirs(self.dir, exist_ok=True)
        self.events = EventsWriter(os.path.join(self.dir, "events"))
        self.drawing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paco_tb_figure")
        self.pending: tuple[int, Future] | None = None  # (epoch, its figure being drawn)

    def _write(self, summary, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.events.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def log(self, metrics: dict[str, Any], per_class: list[float] | None, classes: ClassInfo) -> None:
        from tensorboardX import summary

        step = int(metrics["epoch"])
        self._write_pending_figure()
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                section = "val" if key.startswith("val_") else "train"
                self._write(summary.scalar(f"{section}/{key.removeprefix('val_')}", float(value)), step)
        if per_class is not None:
            self.pending = (step, self.drawing.submit(per_class_figure, list(per_class), classes))

    def _write_pending_figure(self) -> None:
        from tensorboardX import summary

        if self.pending is None:
            return
        step, figure = self.pending
        self.pending = None
        try:
            image = figure.result()
        except Exception as err:  # a figure is worth a warning, not the run
            sys.stderr.write(f"warning: per-class figure of epoch {step} not drawn: {type(err).__name__}: {err}\n")
            return
        self._write(summary.image(FIGURE_TAG, image, dataformats="HWC"), step)

    def flush(self) -> None:
        """Everything logged so far, figure included, on disk (and copied to remote storage)."""
        self._write_pending_figure()
        self.events.flush()
        if not self.local:
            copy_dir(self.dir, self.path, destination_fs=self.fs)

    def close(self) -> None:
        self.flush()
        self.drawing.shutdown()
        self.events.close()
        if not self.local:
            shutil.rmtree(self.dir, ignore_errors=True)


def write_hparams(filesystem, path: str, sessions: list[tuple[str, dict[str, Any], dict[str, float]]]) -> None:
    """TensorBoard HParams for a search: under ``path``, one folder per session (trial) with its
    hyperparameters (scalars: numbers, strings, booleans) and final metrics, so TensorBoard's
    HParams view compares the trials (``tensorboard --logdir <experiment>/hparams``)."""
    from tensorboardX import summary
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event

    local = path if is_local(filesystem) else tempfile.mkdtemp(prefix="paco_hparams_")
    for name, hparams, metrics in sessions:
        folder = os.path.join(local, name)
        os.makedirs(folder, exist_ok=True)
        events = EventsWriter(os.path.join(folder, "events"))
        values = {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for part in summary.hparams(values, finite):
            events.write_event(Event(wall_time=time.time(), summary=part))
        for key, value in finite.items():
            events.write_event(Event(wall_time=time.time(), step=0, summary=summary.scalar(key, value)))
        events.close()
    if not is_local(filesystem):
        copy_dir(local, path, destination_fs=filesystem)
        shutil.rmtree(local, ignore_errors=True)
