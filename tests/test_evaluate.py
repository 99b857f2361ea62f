"""Metrics from per-class counts against a direct computation on predictions; the evaluate command
on checkpoints and run folders, a moved dataset, figures, JSON and broken checkpoints."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import RunsCode
from paco_ray import evaluate as evaluate_cli
from paco_ray.checkpoint import load_state
from paco_ray.config import load_config
from paco_ray.data.longtail import ClassInfo, exponential_profile, scaled_shot_thresholds
from paco_ray.best_checkpoint import resolve_checkpoint
from paco_ray.loop import train
from paco_ray.metrics import TABLE_COLUMNS, format_table, metrics_from_counts, per_class_counts, prediction_counts
from paco_ray.model import PaCoOutput
from paco_ray.plots import SHOT_GROUPS, binned_confusion, confusion_figure, frequency_bins, per_class_scatter, save_png
from paco_ray.session import LocalSession


class FixedLogits(torch.nn.Module):
    """A model whose output (a PaCoOutput, as PaCoModel's) is a fixed logit row per input index."""

    def __init__(self, logits):
        super().__init__()
        self.table = logits

    def forward(self, index):
        return PaCoOutput(self.table[index.view(-1).long()])


def random_predictions(n=400, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c - 1, (n,), generator=g)  # class c-1 absent from the split
    logits[torch.arange(n), labels] += torch.rand(n, generator=g) * 2
    batches = [(torch.arange(i, i + 50).float(), labels[i:i + 50]) for i in range(0, n, 50)]
    return logits, labels, batches


def test_metrics_match_direct_computation():
    n, c = 400, 7
    logits, labels, batches = random_predictions(n, c)
    classes = ClassInfo(tuple("abcdefg"), (900, 500, 300, 150, 60, 30, 5), many_threshold=400, few_threshold=100)
    counts = per_class_counts(FixedLogits(logits), batches, lambda x: x, c, torch.device("cpu"))
    m = metrics_from_counts(counts, classes)

    pred = logits.argmax(1)
    assert math.isclose(m["top1"], 100 * (pred == labels).float().mean().item(), rel_tol=1e-6)
    top5 = logits.topk(5, 1).indices
    assert math.isclose(m["top5"], 100 * (top5 == labels[:, None]).any(1).float().mean().item(), rel_tol=1e-6)
    per_class = [((pred == labels) & (labels == k)).sum().item() / (labels == k).sum().item() for k in range(6)]
    assert math.isclose(m["balanced_acc"], 100 * sum(per_class) / 6, rel_tol=1e-6)
    assert math.isclose(m["many"], 100 * (per_class[0] + per_class[1]) / 2, rel_tol=1e-6)
    assert math.isclose(m["medium"], 100 * (per_class[2] + per_class[3]) / 2, rel_tol=1e-6)
    assert math.isclose(m["few"], 100 * (per_class[4] + per_class[5]) / 2, rel_tol=1e-6)  # class 6 left out
    assert math.isnan(m["per_class"][6])
    table = format_table({"test": m})
    assert "balanced_acc" in table and f"{m['top1']:.2f}" in table


def test_confusion_counts_match_the_predictions():
    n, c = 400, 7
    logits, labels, batches = random_predictions(n, c, seed=1)
    counts, confusion = prediction_counts(FixedLogits(logits), batches, lambda x: x, c, torch.device("cpu"),
                                          confusion=True)
    expected = np.zeros((c, c), dtype=np.int64)
    np.add.at(expected, (labels.numpy(), logits.argmax(1).numpy()), 1)
    assert confusion.dtype == torch.long and np.array_equal(confusion.numpy(), expected)
    assert torch.equal(counts, per_class_counts(FixedLogits(logits), batches, lambda x: x, c, torch.device("cpu")))
    assert prediction_counts(FixedLogits(logits), batches, lambda x: x, c, torch.device("cpu"))[1] is None


def many_classes(num=8142, max_per_class=1000, imbalance=500):
    """An iNaturalist-sized long tail (8,142 classes, 1000 down to 2 training images)."""
    counts = exponential_profile(max_per_class, num, imbalance)
    many, few = scaled_shot_thresholds(max_per_class)
    return ClassInfo(tuple(f"c{i}" for i in range(num)), tuple(counts), many, few)


def test_frequency_bins_cover_every_class_once_head_to_tail_without_mixing_shot_groups():
    classes = many_classes()
    bins = frequency_bins(classes, 100)
    assert 98 <= len(bins) <= 102
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(classes.num_classes))
    counts = np.array(classes.train_counts)[flat]
    assert (np.diff(counts) <= 0).all()  # head to tail
    groups = classes.shot_groups()
    assert all(len({groups[c] for c in b}) == 1 for b in bins)
    assert {groups[b[0]] for b in bins} == set(SHOT_GROUPS)
    small = ClassInfo(("a", "b", "c"), (5, 50, 20))
    assert [b.tolist() for b in frequency_bins(small, 100)] == [[1], [2], [0]]


def test_binned_confusion_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    classes = many_classes(250, 500, 100)
    confusion = torch.from_numpy(rng.integers(0, 4, (250, 250)))
    confusion[7] = 0  # a class without images
    bins = frequency_bins(classes, 20)
    got = binned_confusion(confusion, bins)

    counts = confusion.numpy().astype(float)
    expected = np.full((len(bins), len(bins)), np.nan)
    for i, rows in enumerate(bins):
        rows = [r for r in rows if counts[r].sum() > 0]
        per_class = [[counts[r, cols].sum() / counts[r].sum() for cols in bins] for r in rows]
        expected[i] = np.mean(per_class, axis=0)
    assert np.allclose(got, expected)
    assert np.allclose(got.sum(1), 1.0)
    singletons = frequency_bins(many_classes(30, 500, 100), 100)
    small = confusion[:30, :30]
    order = np.concatenate(singletons)
    direct = small.numpy()[np.ix_(order, order)] / np.maximum(small.numpy()[order].sum(1, keepdims=True), 1)
    assert np.allclose(np.nan_to_num(binned_confusion(small, singletons), nan=0.0), direct)


def png_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.format, image.size


@pytest.mark.parametrize("num", [10, 8142])
def test_figures_have_a_fixed_pixel_size_whatever_the_number_of_classes(num, tmp_path):
    classes = many_classes(num, 1000, 500)
    rng = np.random.default_rng(num)
    accuracy = rng.uniform(0, 100, num).tolist()
    scatter = per_class_scatter(accuracy, classes)
    save_png(scatter, tmp_path / "plot.png")
    assert png_size(tmp_path / "plot.png") == ("PNG", (800, 500))
    present = {g for g in classes.shot_groups()}
    assert [t.get_text() for t in scatter.axes[0].get_legend().get_texts()] == [g for g in SHOT_GROUPS if g in present]
    confusion = torch.zeros(num, num, dtype=torch.long)
    confusion[torch.arange(num), torch.from_numpy(rng.integers(0, num, num))] += 3
    confusion[torch.arange(num), torch.arange(num)] += 5
    save_png(confusion_figure(confusion, classes), tmp_path / "confusion.png")
    assert png_size(tmp_path / "confusion.png") == ("PNG", (800, 700))


# ----------------------------------------------------------------------------- the command on a real run


@pytest.fixture(scope="module")
def run(easy_dataset, tmp_path_factory):
    """Two epochs trained in-process on a copy of a tiny dataset that is then moved elsewhere:
    (run folder, the new place of the dataset, the recorded metrics of each checkpoint)."""
    root = tmp_path_factory.mktemp("evaluate")
    original = shutil.copytree(easy_dataset, root / "original")
    cfg = load_config(None, [f"data.path={original}", "data.loader=torch", "data.batch_size=16", "workers=1",
                             "optim.epochs=2", "paco.queue_size=37"])
    session = LocalSession(root / "run", tensorboard=False)
    train(cfg, session)
    moved = shutil.move(original, root / "moved")
    recorded = {r["checkpoint_path"]: r for r in session.reports}
    values = [r["val_balanced_acc"] for r in session.reports]
    assert len(set(values)) == 2, values  # the pick below is only meaningful between different metrics
    return root / "run", str(moved), recorded


def best_of(recorded):
    return max(recorded, key=lambda path: recorded[path]["val_balanced_acc"])


def test_a_run_folder_with_checkpoints_named_by_epoch_is_ranked_from_its_metrics_file(run, tmp_path, monkeypatch):
    import json

    from paco_ray import best_checkpoint

    run_dir, _, recorded = run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    worst = min(lines, key=lambda m: m["val_balanced_acc"])["epoch"]
    for m in lines:  # the metrics file alone says which epoch was best: here the worse one
        m["val_balanced_acc"] = 99.0 if m["epoch"] == worst else 1.0
    (copy / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    monkeypatch.setattr(best_checkpoint, "recorded_metric", lambda *_: pytest.fail("a checkpoint was read to rank it"))
    checkpoint, picked = resolve_checkpoint(str(copy))
    assert checkpoint == str(copy / f"checkpoint_epoch_{worst:04d}") and picked.value == 99.0

    for folder in copy.glob("checkpoint_epoch_*"):  # a run folder written by 0.2's in-process runs
        folder.rename(copy / folder.name.removeprefix("checkpoint_"))
    checkpoint, picked = resolve_checkpoint(str(copy))
    assert checkpoint == str(copy / f"epoch_{worst:04d}") and picked.value == 99.0 and picked.candidates == 2


def test_a_run_folder_picks_the_checkpoint_with_the_best_recorded_val_metric(run, tmp_path):
    run_dir, _, recorded = run
    assert sorted(p.name for p in run_dir.glob("*epoch_*")) == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    checkpoint, picked = resolve_checkpoint(str(run_dir))
    assert checkpoint == best_of(recorded)
    assert picked.value == recorded[checkpoint]["val_balanced_acc"] and picked.candidates == 2
    assert resolve_checkpoint(checkpoint) == (checkpoint, None)

    # a Ray Train run folder (checkpoint_<time> names), the best checkpoint listed first where it
    # was last and last where it was first: neither position alone passes both
    ray_run = tmp_path / "ray_run"
    worse = next(p for p in recorded if p != checkpoint)
    listed = [checkpoint, worse] if checkpoint.endswith("epoch_0002") else [worse, checkpoint]
    for i, path in enumerate(listed):
        shutil.copytree(path, ray_run / f"checkpoint_2026-01-01_00-00-0{i}.000000")
    (ray_run / "tensorboard").mkdir()
    ray_checkpoint, ray_picked = resolve_checkpoint(str(ray_run))
    assert load_state(ray_checkpoint)["epoch"] == load_state(checkpoint)["epoch"]
    assert ray_checkpoint == str(ray_run / f"checkpoint_2026-01-01_00-00-0{listed.index(checkpoint)}.000000")
    assert ray_picked.describe().startswith(f"checkpoint {ray_checkpoint}: best val_balanced_acc")


def test_json_equals_the_table_and_the_recorded_metrics(run, capsys):
    run_dir, moved, recorded = run
    assert evaluate_cli.main([str(run_dir), "--data-path", moved, "--split", "val", "--per-class", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    best = best_of(recorded)
    assert result["checkpoint"] == best and result["picked"]["value"] == recorded[best]["val_balanced_acc"]
    assert f"checkpoint {best}: best val_balanced_acc" in err
    val = result["splits"]["val"]
    for column in ("top1", "top5", "balanced_acc", "medium", "few"):  # evaluating the saved model again
        assert math.isclose(val[column], recorded[best][f"val_{column}"], abs_tol=1e-9), column
    assert val["many"] is None and math.isnan(recorded[best]["val_many"])  # no many-shot class here
    per_class = result["per_class"]["val"]
    assert [p["group"] for p in per_class].count("few") > 0 and len(per_class) == 10
    assert math.isclose(np.mean([p["top1"] for p in per_class]), val["balanced_acc"], rel_tol=1e-9)

    assert evaluate_cli.main([str(run_dir), "--data-path", moved, "--split", "val"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    cells = dict(zip(header.split()[1:], row.split()[1:]))
    assert row.split()[0] == "val"
    assert cells == {c: "-" if val[c] is None else f"{val[c]:.2f}" for c in TABLE_COLUMNS}


def test_a_moved_dataset_is_found_with_data_path_and_another_dataset_is_refused(run, tmp_path, capsys):
    run_dir, moved, recorded = run
    checkpoint = best_of(recorded)
    assert evaluate_cli.main([checkpoint, "--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.path: ") and "/original" in err and "--data-path" in err and "\n" not in err

    results, classes = evaluate_cli.evaluate_checkpoint(checkpoint, ["val"], data_path=moved)
    assert math.isclose(results["val"]["balanced_acc"], recorded[checkpoint]["val_balanced_acc"], abs_tol=1e-9)

    other = cifar10_dataset(tmp_path)
    assert evaluate_cli.main([checkpoint, "--data-path", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --data-path {other}: holds other classes than the checkpoint "
                   f"(its class 0 is 'class0', the checkpoint's {classes.names[0]!r})")
    fewer = ClassInfo(classes.names[:9], classes.train_counts[:9])
    with pytest.raises(evaluate_cli.InputError, match=r"holds other classes than the checkpoint \(it has 10 "
                                                      r"classes, the checkpoint 9\)"):
        evaluate_cli.open_checkpoint_dataset(load_config(None, []), fewer, moved)


def cifar10_dataset(tmp_path):
    """A real CIFAR-10 layout through the real pipeline: ten classes named class0..class9."""
    from conftest import write_cifar
    from pipelines.cifar import prepare

    write_cifar(tmp_path / "cifar-10-batches-py", "cifar10", 6, np.random.default_rng(0))
    return prepare(tmp_path / "cifar-10-batches-py", tmp_path / "cifar10", imbalance_factor=2, max_per_class=4,
                   val_per_class=1)


def test_plot_and_confusion_write_fixed_size_pngs_of_the_model_predictions(run, tmp_path, capsys):
    run_dir, moved, recorded = run
    plot, confusion = tmp_path / "acc.png", tmp_path / "confusion.png"
    argv = [str(run_dir), "--data-path", moved, "--split", "val", "--plot", str(plot), "--confusion", str(confusion)]
    assert evaluate_cli.main(argv) == 0
    assert png_size(plot) == ("PNG", (800, 500)) and png_size(confusion) == ("PNG", (800, 700))
    assert f"wrote {plot}" in capsys.readouterr().err
    two = tmp_path / "two.png"
    assert evaluate_cli.main([str(run_dir), "--data-path", moved, "--split", "val", "--split", "test",
                              "--plot", str(two)]) == 0
    assert png_size(tmp_path / "two-val.png") == png_size(tmp_path / "two-test.png") == ("PNG", (800, 500))

    checkpoint = best_of(recorded)
    results, classes = evaluate_cli.evaluate_checkpoint(checkpoint, ["val"], data_path=moved, confusion=True)
    predicted, truth = model_predictions(checkpoint, moved)
    expected = np.zeros((10, 10), dtype=np.int64)
    np.add.at(expected, (truth, predicted), 1)
    assert np.array_equal(results["val"]["confusion"].numpy(), expected)
    diagonal = np.diag(expected) / expected.sum(1)
    assert np.allclose(results["val"]["per_class"], 100 * diagonal)


def model_predictions(checkpoint, dataset):
    """Top-1 predictions of a checkpoint's model on the val split, computed here step by step."""
    from paco_ray.config import TrainConfig
    from paco_ray.data.loaders import build_loaders
    from paco_ray.data.prepared import PreparedDataset
    from paco_ray.model import PaCoModel

    state = load_state(checkpoint)
    cfg = TrainConfig.from_dict(state["config"])
    data = PreparedDataset.open(dataset)
    model = PaCoModel.from_config(cfg, data.classes.num_classes, data.channels)
    model.load_state_dict(state["model"])
    model.eval()
    loaders = build_loaders(data, cfg.data, rank=0, world_size=1, seed=cfg.seed, device=torch.device("cpu"))
    predicted, truth = [], []
    with torch.no_grad():
        for images, labels in loaders.eval("val"):
            predicted.append(model(loaders.normalize(images)).logits.argmax(1))
            truth.append(labels)
    return torch.cat(predicted).numpy(), torch.cat(truth).numpy()


def test_a_truncated_checkpoint_names_the_file_and_the_reason_on_one_line(run, tmp_path, capsys):
    _, moved, recorded = run
    broken = shutil.copytree(best_of(recorded), tmp_path / "broken")
    data = (broken / "state.pt").read_bytes()
    (broken / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as raised:  # the reason, as torch gives it: its first sentence
        torch.load(broken / "state.pt", weights_only=True)
    reason = str(raised.value).splitlines()[0].split(". ")[0]
    assert evaluate_cli.main([str(broken), "--data-path", moved]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: checkpoint '{broken / 'state.pt'}' is unreadable ({raised.type.__name__}): {reason}"

    hostile = tmp_path / "hostile"  # a pickle that would run code: the refused global is named
    hostile.mkdir()
    torch.save({**load_state(best_of(recorded)), "metrics": RunsCode(tmp_path / "code-ran")}, hostile / "state.pt")
    assert evaluate_cli.main([str(hostile)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is unreadable (UnpicklingError): WeightsUnpickler error: Unsupported global" in err and "\n" not in err
    assert "\x1b" not in err and not (tmp_path / "code-ran").exists()

    run_dir = tmp_path / "run"
    shutil.copytree(broken, run_dir / "checkpoint_epoch_0003")
    assert evaluate_cli.main([str(run_dir)]) == 2  # a run holding it names it too
    assert f"'{run_dir / 'checkpoint_epoch_0003' / 'state.pt'}' is unreadable" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (lambda t: [str(t)], "neither a checkpoint (no state.pt) nor a run folder"),
    (lambda t: [str(t / "nowhere")], "does not exist"),
    (lambda t: [str(t), "--plot", str(t / "acc.pdf")], "acc.pdf: the figure is written as PNG"),
    (lambda t: [str(t), "--confusion", str(t / "no" / "c.png")], "does not exist"),
])
def test_bad_arguments_give_one_line_before_anything_is_evaluated(argv, message, tmp_path, capsys):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "checkpoint_epoch_0001").mkdir()  # no state.pt in it
    assert evaluate_cli.main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_evaluating_a_run_folder_never_imports_ray(run):
    run_dir, moved, _ = run
    code = ("import sys; from paco_ray.evaluate import main; "
            f"code = main([{str(run_dir)!r}, '--data-path', {moved!r}, '--split', 'val', '--json']); "
            "assert code == 0; assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["checkpoint"].startswith(str(run_dir))


def test_a_run_folder_in_object_storage_is_evaluated_from_its_best_checkpoint(run, s3, capsys):
    import pyarrow.fs

    run_dir, moved, recorded = run
    pyarrow.fs.copy_files(str(run_dir), f"{s3.bucket}/runs/tiny", destination_filesystem=s3.fs)
    uri = s3.uri("runs/tiny")
    best = best_of(recorded)
    checkpoint, picked = resolve_checkpoint(uri)
    assert checkpoint == f"{uri}/{best.rsplit('/', 1)[-1]}" and picked.value == recorded[best]["val_balanced_acc"]
    assert evaluate_cli.main([uri, "--data-path", moved, "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == checkpoint
    assert math.isclose(result["splits"]["val"]["top1"], recorded[best]["val_top1"], abs_tol=1e-9)
