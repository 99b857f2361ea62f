"""What a training run shows while it runs: Ray custom metrics from every worker (Ray dashboard,
Prometheus at each node's metrics export port) and TensorBoard event files from rank 0 (tensorboardX),
with a per-class accuracy vs class-frequency figure at every evaluation."""
from __future__ import annotations

import math
import shutil
import tempfile
from typing import Any

import numpy as np

from .data.longtail import ClassInfo
from .storage import copy_dir, is_local

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
    log scale), classes from head to tail; an (H, W, 3) uint8 image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = sorted(range(classes.num_classes), key=lambda c: -classes.train_counts[c])
    groups = classes.shot_groups()
    colours = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52"}
    figure = Figure(figsize=(max(6.0, 0.12 * len(order)), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    accuracy = [0.0 if math.isnan(per_class[c]) else per_class[c] for c in order]
    axes.bar(range(len(order)), accuracy, color=[colours[groups[c]] for c in order], width=0.9)
    axes.set_ylim(0, 100)
    axes.set_ylabel("val accuracy (%)")
    axes.set_xlabel("classes, most to fewest training images")
    if len(order) <= 30:
        axes.set_xticks(range(len(order)), [classes.names[c][:12] for c in order], rotation=60, fontsize=7)
    counts = axes.twinx()
    counts.plot(range(len(order)), [classes.train_counts[c] for c in order], color="black", linewidth=1.2)
    counts.set_yscale("log")
    counts.set_ylabel("training images")
    handles = [axes.bar([0], [0], color=colour, label=group)[0] for group, colour in colours.items()]
    axes.legend(handles=handles, loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


class TensorBoard:
    """tensorboardX event files in ``path`` on ``filesystem`` (a pyarrow filesystem; remote storage
    is written through a local directory that is copied after every flush)."""

    def __init__(self, filesystem, path: str):
        from tensorboardX import SummaryWriter

        self.fs, self.path = filesystem, path
        self.local = is_local(filesystem)
        self.dir = path if self.local else tempfile.mkdtemp(prefix="paco_tb_")
        self.writer = SummaryWriter(self.dir)

    def log(self, metrics: dict[str, Any], per_class: list[float] | None, classes: ClassInfo) -> None:
        step = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                section = "val" if key.startswith("val_") else "train"
                self.writer.add_scalar(f"{section}/{key.removeprefix('val_')}", value, step)
        if per_class is not None:
            self.writer.add_image("val/per_class_accuracy", per_class_figure(per_class, classes), step,
                                  dataformats="HWC")
        self.writer.flush()
        if not self.local:
            copy_dir(self.dir, self.path, destination_fs=self.fs)

    def close(self) -> None:
        self.writer.close()
        if not self.local:
            shutil.rmtree(self.dir, ignore_errors=True)
