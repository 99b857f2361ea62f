"""Pipelines on small files in the real formats: manifests, LT counts, .beton round trips, bad input."""
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import RunsCode, make_fashion_root, write_cifar
from paco_ray.config import DataConfig
from paco_ray.data.loaders import build_loaders
from paco_ray.data.longtail import exponential_profile
from paco_ray.data.prepared import DatasetError, PreparedDataset
from paco_ray.data.sources import read_source
from pipelines import cifar, fashion_mnist, txt_list
from pipelines.writer import PipelineError


def eval_pixels(out, split):
    """All images of a split as the FFCV eval loader decodes them, in .beton order (N, C, H, W uint8)."""
    data = PreparedDataset.open(out)
    loaders = build_loaders(data, DataConfig(path=str(out), num_workers=1, eval_batch_size=64),
                            rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loaders.eval(split)])
    return torch.cat(images), torch.cat(labels), data


def assert_round_trip(out, split):
    """Every .beton row holds exactly the pixels and label of the manifest source it names."""
    images, labels, data = eval_pixels(out, split)
    assert labels.tolist() == data.labels[split]
    for i, source in enumerate(data.sources[split]):
        original = torch.from_numpy(read_source(source)).permute(2, 0, 1)
        assert torch.equal(images[i, :original.shape[0]], original), source


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_manifest_classes_and_round_trip(tmp_path, ffcv_uncompiled):
    root, _, _ = make_fashion_root(tmp_path / "src")
    out = tmp_path / "out"
    assert fashion_mnist.main(["--src", str(root), "--out", str(out), "--imbalance-factor", "10",
                               "--max-per-class", "20", "--val-per-class", "5"]) == 0
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    expected = exponential_profile(20, 10, 10)
    train_labels = [y for y, s in zip(manifest["label"], manifest["split"]) if s == "train"]
    assert np.bincount(train_labels).tolist() == expected
    assert manifest["split"].count("val") == 50 and manifest["split"].count("test") == 40
    classes = pq.read_table(out / "classes.parquet").to_pydict()
    assert classes["train_count"] == expected and classes["name"][9] == "Ankle boot"
    assert set(classes["many_threshold"]) == {100} and set(classes["few_threshold"]) == {20}
    assert PreparedDataset.open(out).image_size == 28  # recorded: loaders never read the raw source
    for split in ("train", "val", "test"):
        assert_round_trip(out, split)



def test_a_shot_group_edited_by_hand_is_refused(tiny_dataset, tmp_path):
    import shutil

    import pyarrow as pa

    copy = tmp_path / "edited"
    shutil.copytree(tiny_dataset, copy)
    table = pq.read_table(copy / "classes.parquet")
    groups = table.column("shot_group").to_pylist()
    assert groups == PreparedDataset.open(tiny_dataset).classes.shot_groups()  # what the writer recorded
    groups[0] = "few" if groups[0] != "few" else "many"
    table = table.set_column(table.schema.get_field_index("shot_group"), "shot_group", pa.array(groups))
    pq.write_table(table, copy / "classes.parquet")
    with pytest.raises(DatasetError, match=r"classes.parquet: class 'T-shirt/top' is recorded as '(few|many)' but"):
        PreparedDataset.open(copy)

def test_rerun_is_a_noop_force_rebuilds_and_other_sources_are_refused(tmp_path, capsys):
    root, _, _ = make_fashion_root(tmp_path / "src")
    out = tmp_path / "out"
    args = ["--src", str(root), "--out", str(out), "--imbalance-factor", "10", "--max-per-class", "20", "--val-per-class", "5"]
    assert fashion_mnist.main(args) == 0
    stamp = (out / "train.beton").stat().st_mtime_ns
    assert fashion_mnist.main(args) == 0
    assert "already prepared" in capsys.readouterr().out
    assert (out / "train.beton").stat().st_mtime_ns == stamp
    assert fashion_mnist.main(args + ["--force"]) == 0
    assert (out / "train.beton").stat().st_mtime_ns != stamp
    capsys.readouterr()  # drop FFCV's progress bars
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert fashion_mnist.main(args[:-4] + ["--max-per-class", "15", "--val-per-class", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"was prepared from a different source or settings (max_per_class: 15 here, 20 in {out})" in err
    assert "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert fashion_mnist.main(args[:2] + ["--out", str(stranger)] + args[4:]) == 2
    assert "exists and is not a prepared dataset" in capsys.readouterr().err
    assert (stranger / "notes.txt").read_text() == "mine"


def test_a_rerun_with_other_settings_names_the_setting_that_differs(tmp_path, capsys):
    root, _, _ = make_fashion_root(tmp_path / "src")
    out = tmp_path / "out"
    args = ["--src", str(root), "--out", str(out), "--max-per-class", "20", "--val-per-class", "5"]
    assert fashion_mnist.main(args + ["--imbalance-factor", "10"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert fashion_mnist.main(args + ["--imbalance-factor", "5"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out}: was prepared from a different source or settings (imbalance_factor: "
                   f"5 here, 10 in {out}); pass --force to replace it\n")
    assert fashion_mnist.main(args[:4] + ["--max-per-class", "15", "--val-per-class", "4"]) == 2
    assert (f"(imbalance_factor: 100 here, 10 in {out} (and 2 more: max_per_class, val_per_class))"
            in capsys.readouterr().err)  # the first difference, then the names of the others
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused, nothing overwritten
    assert fashion_mnist.main(args + ["--imbalance-factor", "5", "--force"]) == 0
    assert PreparedDataset.open(out).classes.train_counts == tuple(exponential_profile(20, 10, 5))


def test_a_rerun_with_another_list_names_the_list(tmp_path, capsys):
    lists = make_image_tree(tmp_path)
    args = ["--root", str(tmp_path), "--val-list", str(lists["val"]), "--out", str(tmp_path / "o"),
            "--write-mode", "raw", "--max-resolution", "8"]
    assert txt_list.main(args + ["--train-list", str(lists["train"])]) == 0
    other = tmp_path / "train_copy.txt"
    other.write_text(lists["train"].read_text())
    assert txt_list.main(args + ["--train-list", str(other)]) == 2
    assert f"(lists.train: {other} here, {lists['train']} in {tmp_path / 'o'})" in capsys.readouterr().err
    assert txt_list.main(args[:-1] + ["16", "--train-list", str(lists["train"])]) == 2
    assert f"(max_resolution: 16 here, 8 in {tmp_path / 'o'})" in capsys.readouterr().err


@pytest.mark.parametrize("pipeline,option,value,shown", [
    ("txt_list", "--max-resolution", "0", "0"), ("txt_list", "--max-resolution", "-5", "-5"),
    ("txt_list", "--num-workers", "0", "0"), ("cifar", "--imbalance-factor", "0.5", "0.5"),
    ("cifar", "--imbalance-factor", "nan", "nan"), ("cifar", "--max-per-class", "0", "0"),
    ("cifar", "--val-per-class", "0", "0"), ("fashion_mnist", "--imbalance-factor", "0", "0.0"),
    ("fashion_mnist", "--max-per-class", "-1", "-1"), ("fashion_mnist", "--val-per-class", "0", "0"),
])
def test_numeric_options_out_of_range_are_refused_before_any_work(pipeline, option, value, shown, tmp_path, capsys):
    """Named in one line before any input is read: the sources given here are all broken, so any
    work done first would fail on them instead."""
    lists = make_image_tree(tmp_path)
    (tmp_path / "train/c0/img0.jpg").write_bytes(b"\xff\xd8 truncated")  # would stop the image checks
    sources = {"txt_list": ["--root", str(tmp_path), "--train-list", str(lists["train"]), "--val-list",
                            str(lists["val"])],
               "cifar": ["--src", str(tmp_path / "no-cifar")], "fashion_mnist": ["--src", str(tmp_path / "no-idx")]}
    module = {"txt_list": txt_list, "cifar": cifar, "fashion_mnist": fashion_mnist}[pipeline]
    assert module.main(sources[pipeline] + ["--out", str(tmp_path / "o"), option, value]) == 2
    assert capsys.readouterr().err == f"error: {option}: must be >= 1, got {shown}\n"
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_progress_is_one_labelled_line_per_split_when_not_a_terminal(tmp_path, capsys):
    root, _, _ = make_fashion_root(tmp_path / "src")
    assert fashion_mnist.main(["--src", str(root), "--out", str(tmp_path / "out"), "--imbalance-factor", "10",
                               "--max-per-class", "20", "--val-per-class", "5"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    lines = out.splitlines()
    sizes = {"train": sum(exponential_profile(20, 10, 10)), "val": 50, "test": 40}
    assert [line.split(" images written")[0] for line in lines[:3]] == [f"{s}.beton: {n}" for s, n in sizes.items()]
    assert lines[3] == f"{tmp_path / 'out'}: train {sizes['train']}, val 50, test 40" and len(lines) == 4


def test_progress_on_a_terminal_is_a_bar_labelled_with_the_file():
    import io

    from pipelines.beton_progress import BetonProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = BetonProgress("val.beton", 40, stream=terminal)
    progress.update(25)
    progress.update(40)
    progress.close(complete=True)
    assert terminal.getvalue().rsplit("\r", 1)[-1].startswith("val.beton: 100%") and "40/40" in terminal.getvalue()


# ----------------------------------------------------------------------------- CIFAR


def official_cifar_lt(labels: np.ndarray, num_classes: int, imb_factor: float) -> list[np.ndarray]:
    """The official dataset/imbalance_cifar.py, as written there: img_max = len / C,
    int(img_max * imb_factor ** (c / (C - 1.0))), np.random.seed(0), then per class in order
    np.random.shuffle(np.where(targets == c)[0]) and the first n_c."""
    np.random.seed(0)
    img_max = len(labels) / num_classes
    counts = [int(img_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    chosen = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        chosen.append(idx[:n])
    return chosen


def cifar_rows(prepared, variant: str, labels: np.ndarray, split: str) -> list[int]:
    """Row of the concatenated training batches that each sample of ``split`` came from."""
    parts = np.array_split(np.arange(len(labels)), 5)
    return [sum(len(p) for p in parts[:int(s.split("data_batch_")[1][0]) - 1]) + int(s.rsplit("#", 1)[1])
            if variant == "cifar10" else int(s.rsplit("#", 1)[1]) for s in prepared.sources[split]]


@pytest.mark.parametrize("variant,per_class,imbalance", [("cifar10", 30, 10), ("cifar100", 6, 5)])
def test_cifar_lt_is_the_published_split_and_round_trips(variant, per_class, imbalance, tmp_path, ffcv_uncompiled):
    labels, data = write_cifar(tmp_path / "src", variant, per_class, np.random.default_rng(1))
    out = tmp_path / "out"
    assert cifar.main(["--src", str(tmp_path / "src"), "--out", str(out), "--imbalance-factor", str(imbalance),
                       "--val-per-class", "1"]) == 0
    prepared = PreparedDataset.open(out)
    assert prepared.mean == (0.4914, 0.4822, 0.4465)  # the official CIFAR statistics
    num_classes = 10 if variant == "cifar10" else 100
    official = official_cifar_lt(labels, num_classes, 1.0 / imbalance)
    assert list(prepared.classes.train_counts) == [len(c) for c in official]
    rows = cifar_rows(prepared, variant, labels, "train")
    assert rows == [int(i) for c in official for i in c]  # the very images, in the official order
    images, got_labels, _ = eval_pixels(out, "train")
    assert torch.equal(images, torch.from_numpy(data[rows].reshape(-1, 3, 32, 32)))
    assert got_labels.tolist() == labels[rows].tolist() == prepared.labels["train"]
    # published shot thresholds, not scaled with the head class
    assert (prepared.classes.many_threshold, prepared.classes.few_threshold) == (100, 20)
    # validation: one image per class, from the images training leaves unused, except the head
    # class, which uses all of its own: its validation image is one of its training images
    val = cifar_rows(prepared, variant, labels, "val")
    assert sorted(labels[val].tolist()) == list(range(num_classes))
    in_both = set(val) & set(rows)
    assert {int(labels[r]) for r in in_both} == {0} and len(official[0]) == per_class
    assert prepared.size("test") == 2 * num_classes


def test_the_cifar_head_class_validation_images_are_its_last_training_images(tmp_path):
    from pipelines.cifar import published_split

    labels = np.repeat(np.arange(4), 10)
    train, val, shared = published_split(labels, 4, imbalance_factor=4.0, val_per_class=3, max_per_class=10.0)
    counts = [int(10 * 0.25 ** (c / 3.0)) for c in range(4)]  # 10, 6, 3, 2
    assert [int((labels[train] == c).sum()) for c in range(4)] == counts and shared == 3
    head_train = [int(i) for i in train if labels[i] == 0]
    assert sorted(int(i) for i in val if labels[i] == 0) == sorted(head_train[-3:])
    assert not set(val.tolist()) & set(i for i in train.tolist() if labels[i] != 0)  # other classes: disjoint


def test_cifar_errors(tmp_path, capsys):
    assert cifar.main(["--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither a cifar-10-batches-py nor a cifar-100-python directory" in capsys.readouterr().err
    write_cifar(tmp_path / "src", "cifar100", 4, np.random.default_rng(0))
    (tmp_path / "src" / "train").write_bytes(b"\x80\x04truncated")
    assert cifar.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert "train: not a CIFAR python batch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("file", ["train", "meta"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickles_that_would_run_code_are_refused_unrun(file, protocol, tmp_path, capsys):
    write_cifar(tmp_path / "src", "cifar100", 4, np.random.default_rng(0))
    marker = tmp_path / "code-ran"
    payload = {b"data": RunsCode(marker), b"fine_labels": [0]} if file == "train" else \
        {b"fine_label_names": [RunsCode(marker)]}
    (tmp_path / "src" / file).write_bytes(pickle.dumps(payload, protocol=protocol))
    assert cifar.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"src/{file}: not a CIFAR" in err and "refused global " in err
    assert not marker.exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- txt lists


def make_image_tree(root, per_class=(5, 3, 2), rng=None):
    rng = rng or np.random.default_rng(0)
    lines = {"train": [], "val": [], "test": []}
    for c, n in enumerate(per_class):
        for split, count in (("train", n), ("val", 1), ("test", 1)):
            for i in range(count):
                rel = f"{split}/c{c}/img{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / rel, quality=95)
                lines[split].append(f"{rel} {c}")
    paths = {}
    for split, split_lines in lines.items():
        paths[split] = root / f"{split}.txt"
        paths[split].write_text("\n".join(split_lines) + "\n")
    return paths


def test_txt_list_jpeg_and_raw(tmp_path, ffcv_uncompiled):
    lists = make_image_tree(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("0 tench\n1 goldfish\n2 great white shark\n")
    for mode in ("jpg", "raw"):
        out = tmp_path / f"out_{mode}"
        assert txt_list.main(["--root", str(tmp_path), "--train-list", str(lists["train"]), "--val-list",
                              str(lists["val"]), "--test-list", str(lists["test"]), "--class-names", str(names),
                              "--out", str(out), "--write-mode", mode, "--max-resolution", "64"]) == 0
        data = PreparedDataset.open(out)
        assert data.classes.names == ("tench", "goldfish", "great white shark")
        assert data.classes.train_counts == (5, 3, 2) and data.channels == 3
        assert data.sources["train"][0] == str(tmp_path / "train/c0/img0.jpg")
        assert data.image_size == 0  # sizes vary
        assert data.mean == (0.485, 0.456, 0.406) and data.normalization == ""  # ImageNet's by default
    with pytest.raises(DatasetError, match="data.image_size: images in .* vary in size"):
        build_loaders(data, DataConfig(path=str(out)), rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    # raw mode keeps exact pixels (no resize below 64 px)
    from ffcv.reader import Reader
    reader = Reader(str(tmp_path / "out_raw" / "train.beton"))
    assert reader.num_samples == 10
    cfg = DataConfig(path=str(tmp_path / "out_jpg"), augment="imagenet", image_size=16, num_workers=1, batch_size=2)
    loaders = build_loaders(PreparedDataset.open(cfg.path), cfg, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    x_q, x_k, y, index = next(iter(loaders.train(0)))
    assert x_q.shape == (2, 3, 16, 16) and x_k.shape == (2, 3, 16, 16)
    assert next(iter(loaders.eval("test")))[0].shape == (3, 3, 16, 16)


def test_normalization_is_recorded_per_dataset_and_used_by_the_loaders(tmp_path, capsys):
    lists = make_image_tree(tmp_path)
    common = ["--root", str(tmp_path), "--train-list", str(lists["train"]), "--val-list", str(lists["val"]),
              "--write-mode", "raw", "--max-resolution", "8"]
    assert txt_list.main([*common, "--out", str(tmp_path / "inat"), "--normalization", "inat"]) == 0
    data = PreparedDataset.open(tmp_path / "inat")
    assert (data.mean, data.std) == ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192))  # the official iNat statistics
    loaders = build_loaders(data, DataConfig(path=str(data.path), image_size=8, augment="imagenet"), rank=0,
                            world_size=1, seed=0, device=torch.device("cpu"))
    mean_image = torch.tensor([[[[round(255 * m)]] for m in data.mean]], dtype=torch.uint8).expand(1, 3, 4, 4)
    assert loaders.normalize(mean_image).abs().max() < 0.02  # the mean colour normalises to ~0
    with pytest.raises(PipelineError, match="--normalization: 'fashion_mnist' is not one of the 3-channel"):
        txt_list.prepare(tmp_path, tmp_path / "gray", train_list=lists["train"], val_list=lists["val"],
                         write_mode="raw", normalization="fashion_mnist")
    assert not (tmp_path / "gray").exists()
    # a classes.parquet naming statistics that do not exist is refused by name
    classes = pq.read_table(tmp_path / "inat" / "classes.parquet")
    pq.write_table(classes.replace_schema_metadata({**classes.schema.metadata, b"paco_ray.normalization": b"bogus"}),
                   tmp_path / "inat" / "classes.parquet")
    with pytest.raises(DatasetError, match="classes.parquet: normalization 'bogus'"):
        PreparedDataset.open(tmp_path / "inat")


@pytest.mark.parametrize("line,message", [
    ("train/c0/img0.jpg abc", "label 'abc' is not an integer"),
    ("train/c0/img0.jpg 7", "label 7 outside 0..2"),
    ("train/c0/img0.jpg -1", "label -1 outside 0..2"),
    ("../outside.jpg 0", "path '../outside.jpg' escapes the image root"),
    ("just-one-field", "expected 'path label'"),
    ("train/c0/missing.jpg 0", "missing.jpg: unreadable image (FileNotFoundError"),
])
def test_txt_list_bad_lines(line, message, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    lists = make_image_tree(root)
    names = root / "names.txt"
    names.write_text("a\nb\nc\n")
    lists["train"].write_text(lists["train"].read_text() + line + "\n")
    out = tmp_path / "out"
    assert txt_list.main(["--root", str(root), "--train-list", str(lists["train"]), "--val-list", str(lists["val"]),
                          "--class-names", str(names), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no partial output


def test_truncated_image_fails_or_is_recorded_with_skip_bad(tmp_path, capsys, ffcv_uncompiled):
    lists = make_image_tree(tmp_path)
    bad = tmp_path / "train/c0/img1.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    args = ["--root", str(tmp_path), "--train-list", str(lists["train"]), "--val-list", str(lists["val"])]
    assert txt_list.main(args + ["--out", str(tmp_path / "o1")]) == 2
    assert f"{bad}: unreadable image" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert txt_list.main(args + ["--out", str(tmp_path / "o2"), "--skip-bad"]) == 0
    manifest = pq.read_table(tmp_path / "o2" / "manifest.parquet").to_pydict()
    skipped = [(s, e) for s, k, e in zip(manifest["source"], manifest["skipped"], manifest["error"]) if k]
    assert len(skipped) == 1 and skipped[0][0] == str(bad) and skipped[0][1]
    assert PreparedDataset.open(tmp_path / "o2").size("train") == 9
    assert "1 bad images skipped" in capsys.readouterr().out


def test_class_without_training_images_and_missing_list(tmp_path, capsys):
    lists = make_image_tree(tmp_path)
    lists["train"].write_text("".join(l + "\n" for l in lists["train"].read_text().splitlines() if not l.endswith(" 1")))
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    args = ["--root", str(tmp_path), "--val-list", str(lists["val"]), "--class-names", str(names),
            "--out", str(tmp_path / "o")]
    assert txt_list.main(args + ["--train-list", str(lists["train"])]) == 2
    assert "class 'b' has no training images" in capsys.readouterr().err
    assert txt_list.main(args + ["--train-list", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt not found" in capsys.readouterr().err


def test_an_empty_split_is_refused_in_one_line(tmp_path, capsys):
    """FFCV cannot write an empty .beton: an empty list, or a split whose every image was skipped."""
    lists = make_image_tree(tmp_path)
    args = ["--root", str(tmp_path), "--train-list", str(lists["train"]), "--out", str(tmp_path / "o"), "--skip-bad"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert txt_list.main(args + ["--val-list", str(empty)]) == 2
    assert capsys.readouterr().err == f"error: {empty}: no 'path label' lines\n"
    for line in lists["val"].read_text().split():
        if line.endswith(".jpg"):
            (tmp_path / line).write_bytes(b"not an image")
    assert txt_list.main(args + ["--val-list", str(lists["val"])]) == 2
    assert capsys.readouterr().err == "error: the val split has no images (3 unreadable, skipped)\n"
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_truncated_beton_is_refused_at_load(tiny_dataset, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    beton = copy / "train.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"train.beton has \d+ bytes, the manifest records \d+"):
        PreparedDataset.open(copy)  # the size recorded in the manifest gives it away before FFCV reads it
    (copy / "manifest.parquet").unlink()
    with pytest.raises(DatasetError, match="manifest.parquet missing"):
        PreparedDataset.open(copy)
