"""TensorBoard output of a training run and the per-class figure (no Ray)."""
import math
import struct
import threading

import numpy as np

from conftest import event_tags
from paco_ray import telemetry
from paco_ray.data.longtail import ClassInfo, exponential_profile, scaled_shot_thresholds
from paco_ray.plots import per_class_bars
from paco_ray.storage import filesystem
from paco_ray.telemetry import FIGURE_TAG, GAUGES, TensorBoard, per_class_figure
from paco_ray.loop import train
from paco_ray.session import LocalSession


def tag_steps(event_file, tag):
    """The steps at which ``tag`` was written, in file order (TFRecord framing, tensorboardX protobufs)."""
    from tensorboardX.proto import event_pb2

    steps, data, offset = [], event_file.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        steps += [event.step for v in event.summary.value if v.tag == tag]
        offset += 12 + length + 4
    return steps


def test_training_writes_scalars_and_the_per_class_figure_each_epoch(tiny_config, tmp_path):
    session = LocalSession(tmp_path / "out")
    train(tiny_config("loss=paco"), session)
    (event_file,) = (tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*")
    tags = event_tags(event_file)
    assert {"train/train_loss", "train/lr", "train/images_per_s", "train/queue_fill", "val/top1",
            "val/balanced_acc", "val/medium", "val/few", "val/per_class_accuracy"} <= tags
    assert tag_steps(event_file, FIGURE_TAG) == [1, 2]  # one figure per epoch, under its own epoch
    # every metric Ray exports as a gauge is in TensorBoard too, unless undefined (no many-shot class here)
    last = session.reports[-1]
    assert math.isnan(last["val_many"]) and "val/many" not in tags
    assert {f"{'val' if k.startswith('val_') else 'train'}/{k.removeprefix('val_')}"
            for k in GAUGES if k != "epoch" and not math.isnan(last[k])} <= tags


def legend_labels(figure):
    return [t.get_text() for t in figure.axes[0].get_legend().get_texts()]


def test_per_class_figure_draws_accuracy_against_frequency():
    classes = ClassInfo(("head", "mid", "tail"), (500, 60, 5), 100, 20)
    perfect = per_class_figure([100.0, 100.0, 100.0], classes)
    assert perfect.dtype == np.uint8 and perfect.shape == (360, 800, 3)
    worse = per_class_figure([100.0, 50.0, float("nan")], classes)  # a class absent from val draws as 0
    assert perfect.shape == worse.shape and (perfect != worse).any()
    # bars are coloured by shot group: blue (many), orange (medium) and red (few) pixels all appear
    colours = {tuple(c) for c in perfect.reshape(-1, 3)}
    assert {(0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52), (0xC4, 0x4E, 0x52)} <= colours
    assert legend_labels(per_class_bars([100.0] * 3, classes)) == ["many", "medium", "few"]
    no_head = ClassInfo(("mid", "tail"), (60, 5), 100, 20)
    assert legend_labels(per_class_bars([50.0, 50.0], no_head)) == ["medium", "few"]


def test_an_inaturalist_sized_figure_keeps_its_size_bins_classes_and_labels_the_shot_groups():
    num = 8142
    many, few = scaled_shot_thresholds(1000)
    classes = ClassInfo(tuple(f"c{i}" for i in range(num)), tuple(exponential_profile(1000, num, 500)), many, few)
    accuracy = np.random.default_rng(0).uniform(0, 100, num).tolist()
    image = per_class_figure(accuracy, classes)
    assert image.shape == (360, 800, 3)
    figure = per_class_bars(accuracy, classes)
    assert legend_labels(figure) == ["many", "medium", "few"]
    bars = figure.axes[0].patches
    assert 98 <= len(bars) <= 102  # binned, one bar per bin
    colours = {tuple(round(255 * x) for x in bar.get_facecolor()[:3]) for bar in bars}
    assert colours == {(0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52), (0xC4, 0x4E, 0x52)}  # every shot group shows


def test_the_figure_is_drawn_in_the_background_and_flushed_with_its_epoch(tmp_path, monkeypatch):
    release = threading.Event()

    def slow_figure(per_class, classes):
        release.wait(30)
        return np.full((4, 4, 3), 255, dtype=np.uint8)

    monkeypatch.setattr(telemetry, "per_class_figure", slow_figure)
    classes = ClassInfo(("a", "b"), (50, 5), 20, 10)
    board = TensorBoard(*filesystem(str(tmp_path / "tb")))
    board.log({"epoch": 1, "val_top1": 10.0}, [10.0, 20.0], classes)  # returns while the figure is drawing
    assert board.pending is not None and not board.pending[1].done()
    release.set()
    board.flush()  # what training calls before each report: a barrier, without close
    (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert tag_steps(event_file, FIGURE_TAG) == [1] and tag_steps(event_file, "val/top1") == [1]
    board.log({"epoch": 2, "val_top1": 20.0}, [30.0, 40.0], classes)
    board.close()
    assert tag_steps(event_file, FIGURE_TAG) == [1, 2]
    assert tag_steps(event_file, "val/top1") == [1, 2]


def test_a_figure_that_fails_to_draw_is_a_warning_not_the_end_of_training(tmp_path, monkeypatch, capsys):
    def broken_figure(per_class, classes):
        raise ValueError("no room for bars")

    monkeypatch.setattr(telemetry, "per_class_figure", broken_figure)
    board = TensorBoard(*filesystem(str(tmp_path / "tb")))
    board.log({"epoch": 1, "val_top1": 10.0}, [10.0], ClassInfo(("a",), (5,)))
    board.close()
    (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert tag_steps(event_file, "val/top1") == [1] and tag_steps(event_file, FIGURE_TAG) == []
    assert ("warning: per-class figure of epoch 1 not drawn: ValueError: no room for bars"
            in capsys.readouterr().err)
