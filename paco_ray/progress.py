"""What rank 0 prints while it trains: a progress line every few seconds within an epoch, and one
line per epoch with the numbers a long-tailed run is judged by. Both go to the ``paco_ray``
logger (``setup_logging``), which writes plain lines to stdout (warnings to stderr)."""
from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

LOGGER = "paco_ray"


class _StdStream(logging.StreamHandler):
    """Bare messages to ``sys.<name>`` as it is at each line (it may be replaced, e.g. by pytest)."""

    def __init__(self, name: str, below_warning: bool):
        super().__init__()
        self.stream_name = name
        self.setFormatter(logging.Formatter("%(message)s"))
        if below_warning:
            self.addFilter(lambda record: record.levelno < logging.WARNING)
        else:
            self.setLevel(logging.WARNING)

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int | str = logging.INFO) -> logging.Logger:
    """The ``paco_ray`` logger: information to stdout, warnings and errors to stderr (handlers
    added once per process)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StdStream) for h in logger.handlers):
        logger.addHandler(_StdStream("stdout", below_warning=True))
        logger.addHandler(_StdStream("stderr", below_warning=False))
    logger.setLevel(level)
    logger.propagate = False
    return logger


def labelled(trial_id: str, line: str) -> str:
    """``[trial_id] line`` (a Tune trial's lines), or the line itself outside a search."""
    return f"[{trial_id}] {line}" if trial_id else line


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class EpochProgress:
    """Every ``every_s`` seconds (0: never) of an epoch, one line: step/total, images/s, loss,
    lr and the epoch's ETA. Rate and ETA leave out the first step (it may compile pipelines and
    kernels). Looking at the clock is free; reading the loss waits for the device once per line,
    not once per step. ``trial_id`` (of a Tune trial) starts each line."""

    def __init__(self, every_s: float, epoch: int, epochs: int, steps: int, trial_id: str = "",
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None):
        self.every_s, self.epoch, self.epochs, self.steps, self.trial_id = every_s, epoch, epochs, steps, trial_id
        self.clock, self.logger = clock, logger or logging.getLogger(LOGGER)
        self.last = clock()
        self.first: tuple[float, int] | None = None  # (time, images) when the first step ended

    def step(self, step: int, images: int, loss: "torch.Tensor", lr: float) -> bool:
        """After ``step`` (1-based) steps and ``images`` images this epoch (all workers); True when
        a line was written."""
        if self.every_s <= 0 or step >= self.steps:
            return False
        now = self.clock()
        if self.first is None:
            self.first = (now, images)
        if now - self.last < self.every_s or step == 1:
            return False
        self.last = now
        elapsed = now - self.first[0]
        self.logger.info(labelled(self.trial_id, f"epoch {self.epoch + 1}/{self.epochs}  step {step}/{self.steps}  "
                         f"{(images - self.first[1]) / elapsed:.0f} img/s  loss {float(loss):.4f}  lr {lr:.3g}  "
                         f"ETA {duration(elapsed / (step - 1) * (self.steps - step))}"))
        return True


def epoch_line(metrics: dict[str, Any], epochs: int, trial_id: str = "") -> str:
    """``epoch 3/15  loss 0.41  val balanced 83.16  many 90.1  medium 80.2  few 70.3  (21.0 s, 560 img/s)``;
    top-1 appears as well where it differs from balanced accuracy (an imbalanced validation split)."""
    val = f"val balanced {metrics['val_balanced_acc']:.2f}"
    if abs(metrics["val_top1"] - metrics["val_balanced_acc"]) >= 0.005:
        val += f"  top1 {metrics['val_top1']:.2f}"
    shots = "".join(f"  {g} {metrics[f'val_{g}']:.1f}" for g in ("many", "medium", "few")
                    if f"val_{g}" in metrics and metrics[f"val_{g}"] == metrics[f"val_{g}"])  # NaN: no class
    skipped = f"  skipped {metrics['skipped_steps']}" if metrics.get("skipped_steps") else ""
    return labelled(trial_id, f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  {val}{shots}"
                           f"{skipped}  ({metrics['epoch_time_s']:.1f} s, {metrics['images_per_s']:.0f} img/s)")
