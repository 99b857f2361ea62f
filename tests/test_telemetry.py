"""TensorBoard output of a training run and the per-class figure (no Ray)."""
import math

import numpy as np

from conftest import event_tags
from paco_ray.data.longtail import ClassInfo
from paco_ray.telemetry import GAUGES, per_class_figure
from paco_ray.train import LocalSession, train


def test_training_writes_scalars_and_the_per_class_figure_each_epoch(tiny_config, tmp_path):
    session = LocalSession(tmp_path / "out")
    train(tiny_config("loss=paco"), session)
    (event_file,) = (tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*")
    tags = event_tags(event_file)
    assert {"train/train_loss", "train/lr", "train/images_per_s", "train/queue_fill", "val/top1",
            "val/balanced_acc", "val/medium", "val/few", "val/per_class_accuracy"} <= tags
    # every metric Ray exports as a gauge is in TensorBoard too, unless undefined (no many-shot class here)
    last = session.reports[-1]
    assert math.isnan(last["val_many"]) and "val/many" not in tags
    assert {f"{'val' if k.startswith('val_') else 'train'}/{k.removeprefix('val_')}"
            for k in GAUGES if k != "epoch" and not math.isnan(last[k])} <= tags


def test_per_class_figure_draws_accuracy_against_frequency():
    classes = ClassInfo(("head", "mid", "tail"), (500, 60, 5), 100, 20)
    perfect = per_class_figure([100.0, 100.0, 100.0], classes)
    assert perfect.dtype == np.uint8 and perfect.ndim == 3 and perfect.shape[2] == 3
    worse = per_class_figure([100.0, 50.0, float("nan")], classes)  # a class absent from val draws as 0
    assert perfect.shape == worse.shape and (perfect != worse).any()
    # bars are coloured by shot group: blue (many), orange (medium) and red (few) pixels all appear
    colours = {tuple(c) for c in perfect.reshape(-1, 3)}
    assert {(0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52), (0xC4, 0x4E, 0x52)} <= colours
