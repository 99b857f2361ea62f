"""Figures of per-class results against training frequency (matplotlib's Agg backend, no pyplot):
the TensorBoard bar chart, evaluate's per-class scatter and its confusion matrix. Each figure has
a fixed pixel size whatever the number of classes: past a hundred or so, classes are binned into
consecutive groups from head to tail that never mix shot groups."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .data.longtail import ClassInfo
from .errors import InputError

SHOT_GROUPS = ("many", "medium", "few")
SHOT_COLOURS = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52"}
DPI = 100
BAR_SIZE = (8.0, 3.6)       # inches at DPI: 800 x 360 pixels
SCATTER_SIZE = (8.0, 5.0)   # 800 x 500
CONFUSION_SIZE = (8.0, 7.0)  # 800 x 700
MAX_BARS = 100              # more classes than this are binned in the bar chart
MAX_CONFUSION_CLASSES = 100  # ... and in the confusion matrix
NAMED_TICKS = 30            # classes named on the axis up to this many


def frequency_order(classes: ClassInfo) -> list[int]:
    """Class ids from most to fewest training images (ties by id)."""
    return sorted(range(classes.num_classes), key=lambda c: (-classes.train_counts[c], c))


def frequency_bins(classes: ClassInfo, max_bins: int) -> list[np.ndarray]:
    """Class ids from head to tail in consecutive groups: one class each when there are at most
    ``max_bins`` classes, else about ``max_bins`` groups of similar size, none mixing shot groups
    (each shot group gets bins in proportion to its classes, at least one)."""
    order = frequency_order(classes)
    if len(order) <= max_bins:
        return [np.array([c]) for c in order]
    groups = classes.shot_groups()
    bins: list[np.ndarray] = []
    for group in SHOT_GROUPS:  # many, medium, few: the frequency order itself
        members = np.array([c for c in order if groups[c] == group], dtype=np.int64)
        if len(members):
            pieces = max(1, min(len(members), round(max_bins * len(members) / len(order))))
            bins.extend(np.array_split(members, pieces))
    return bins


def new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def shot_legend(axes, groups_present, **options) -> None:
    """A legend with one colour patch per shot group present, labelled by the group's name."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=SHOT_COLOURS[g], label=g) for g in SHOT_GROUPS if g in groups_present]
    axes.legend(handles=handles, **options)


def to_image(figure) -> np.ndarray:
    """The figure drawn as an (H, W, 3) uint8 array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_png(figure, path: str | Path) -> None:
    """Write ``figure`` as a PNG of exactly its pixel size."""
    try:
        figure.savefig(path, dpi=DPI, format="png")
    except OSError as err:
        raise InputError(f"{path}: cannot write the figure ({err.strerror or err})") from None


def bin_means(values: np.ndarray, bins: list[np.ndarray]) -> np.ndarray:
    """Mean of the finite ``values`` in each bin; NaN for a bin with none."""
    out = np.full(len(bins), np.nan)
    for i, members in enumerate(bins):
        finite = values[members][np.isfinite(values[members])]
        if len(finite):
            out[i] = finite.mean()
    return out


def per_class_bars(per_class: list[float], classes: ClassInfo, label: str = "val accuracy (%)"):
    """Per-class accuracy as bars coloured by shot group (a class absent from the split draws as 0),
    against training images per class (black line, log scale), head to tail; binned past MAX_BARS
    classes (a bar: the mean accuracy of its classes, the line: their mean training images)."""
    bins = frequency_bins(classes, MAX_BARS)
    groups = classes.shot_groups()
    heights = np.nan_to_num(bin_means(np.asarray(per_class, dtype=float), bins), nan=0.0)
    counts = bin_means(np.asarray(classes.train_counts, dtype=float), bins)
    figure = new_figure(BAR_SIZE)
    axes = figure.add_subplot()
    x = np.arange(len(bins))
    axes.bar(x, heights, color=[SHOT_COLOURS[groups[b[0]]] for b in bins], width=0.9)
    axes.set_xlim(-0.6, len(bins) - 0.4)
    axes.set_ylim(0, 100)
    axes.set_ylabel(label)
    if len(bins) < classes.num_classes:
        axes.set_xlabel(f"{classes.num_classes} classes in {len(bins)} bins, most to fewest training images")
        axes.set_xticks([])
    else:
        axes.set_xlabel("classes, most to fewest training images")
        if len(bins) <= NAMED_TICKS:
            axes.set_xticks(x, [classes.names[b[0]][:12] for b in bins], rotation=60, fontsize=7)
    twin = axes.twinx()
    twin.plot(x, counts, color="black", linewidth=1.2)
    twin.set_yscale("log")
    twin.set_ylabel("training images")
    shot_legend(axes, set(groups), loc="upper right", fontsize=7)
    figure.tight_layout()
    return figure


def per_class_scatter(per_class: list[float], classes: ClassInfo, title: str = ""):
    """Top-1 accuracy of each class (y) against its training images (x, log scale), one point per
    class coloured by shot group, with the shot thresholds drawn; classes absent from the split
    are left out."""
    accuracy = np.asarray(per_class, dtype=float)
    counts = np.asarray(classes.train_counts, dtype=float)
    groups = np.asarray(classes.shot_groups())
    figure = new_figure(SCATTER_SIZE)
    axes = figure.add_subplot()
    size = float(np.clip(3000 / max(classes.num_classes, 1), 2, 30))
    for group in SHOT_GROUPS:
        chosen = (groups == group) & np.isfinite(accuracy)
        if chosen.any():
            axes.scatter(counts[chosen], accuracy[chosen], s=size, color=SHOT_COLOURS[group], label=group,
                         alpha=0.8 if classes.num_classes <= 1000 else 0.5, edgecolors="none")
    if classes.num_classes <= NAMED_TICKS:
        for c in np.flatnonzero(np.isfinite(accuracy)):
            axes.annotate(classes.names[c][:12], (counts[c], accuracy[c]), xytext=(4, 3), textcoords="offset points",
                          fontsize=6)
    axes.set_xscale("log")
    axes.set_ylim(-3, 103)
    for threshold, text in ((classes.many_threshold, f"many > {classes.many_threshold}"),
                            (classes.few_threshold, f"few < {classes.few_threshold}")):
        axes.axvline(threshold, color="grey", linestyle="--", linewidth=1)
        axes.annotate(text, (threshold, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                      textcoords="offset points", fontsize=8, color="grey")
    axes.set_xlabel("training images of the class (log scale)")
    axes.set_ylabel("top-1 accuracy of the class (%)")
    axes.set_title(title or f"per-class accuracy ({classes.num_classes} classes)", fontsize=10)
    axes.legend(loc="lower right", fontsize=8, title="shot group", title_fontsize=8, markerscale=math.sqrt(30 / size))
    figure.tight_layout()
    return figure


def binned_confusion(confusion: torch.Tensor, bins: list[np.ndarray]) -> np.ndarray:
    """(B, B) row-normalised confusion between groups of classes: each true class's counts become
    fractions of its images, summed over the predicted classes of each group, then averaged over
    the group's true classes that have images (each class weighs the same, as in balanced
    accuracy); NaN rows for a group with no image. Singleton groups: the plain row-normalised
    confusion matrix in the groups' order."""
    num = confusion.shape[0]
    group_of = torch.empty(num, dtype=torch.long)
    for i, members in enumerate(bins):
        group_of[torch.from_numpy(members)] = i
    totals = confusion.sum(1)
    by_group = torch.zeros(num, len(bins), dtype=torch.float64)
    for start in range(0, num, 1024):  # a float copy of 1024 rows at a time, not of the whole matrix
        by_group[start:start + 1024].index_add_(1, group_of, confusion[start:start + 1024].double())
    fractions = by_group / totals.clamp(min=1).double()[:, None]
    matrix = np.full((len(bins), len(bins)), np.nan)
    for i, members in enumerate(bins):
        present = members[(totals[torch.from_numpy(members)] > 0).numpy()]
        if len(present):
            matrix[i] = fractions[torch.from_numpy(present)].mean(0).numpy()
    return matrix


def confusion_figure(confusion: torch.Tensor, classes: ClassInfo, title: str = ""):
    """The row-normalised confusion matrix (rows: true class, columns: predicted), classes from
    most to fewest training images, binned past MAX_CONFUSION_CLASSES; lines between shot groups."""
    bins = frequency_bins(classes, MAX_CONFUSION_CLASSES)
    matrix = binned_confusion(confusion, bins)
    figure = new_figure(CONFUSION_SIZE)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                        aspect="auto")
    figure.colorbar(image, ax=axes, label="fraction of the true class's images")
    groups = classes.shot_groups()
    for i in range(1, len(bins)):
        if groups[bins[i][0]] != groups[bins[i - 1][0]]:
            axes.axhline(i - 0.5, color="white", linewidth=1)
            axes.axvline(i - 0.5, color="white", linewidth=1)
    binned = len(bins) < classes.num_classes
    what = f"{len(bins)} bins of classes" if binned else "classes"
    axes.set_xlabel(f"predicted ({what}, most to fewest training images)")
    axes.set_ylabel(f"true ({what})")
    if not binned and len(bins) <= NAMED_TICKS:
        names = [classes.names[b[0]][:12] for b in bins]
        axes.set_xticks(range(len(bins)), names, rotation=60, fontsize=7)
        axes.set_yticks(range(len(bins)), names, fontsize=7)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    axes.set_title(title or f"confusion ({classes.num_classes} classes, rows sum to 1)", fontsize=10)
    figure.tight_layout()
    return figure
