"""Long-tailed profile and splits, the IDX reader, Fashion-MNIST-LT and the torch two-view loader."""
import gzip

import numpy as np
import pytest
import torch

from paco_ray.config import DataConfig
from paco_ray.data.idx import read_idx, write_idx
from paco_ray.data.loaders import build_loaders
from paco_ray.data.prepared import PreparedDataset
from conftest import make_fashion_root
from pipelines.fashion_mnist import fashion_mnist_lt
from paco_ray.data.longtail import ClassInfo, exponential_profile, longtail_split, scaled_shot_thresholds

REAL_ROOT = "/usr/share/datasets/fashion-mnist"


def test_exponential_profile_follows_the_cifar_lt_formula():
    counts = exponential_profile(5000, 10, 100)
    assert counts[0] == 5000 and counts[-1] == 50
    for c, n in enumerate(counts):
        assert n == int(5000 * (0.01 ** (c / 9)))
    assert sum(counts) == 12406
    assert exponential_profile(500, 100, 100)[-1] == 5 and exponential_profile(7, 1, 10) == [7]


def test_shot_groups_and_scaled_thresholds():
    assert scaled_shot_thresholds(500) == (100, 20) and scaled_shot_thresholds(1280) == (256, 51)
    assert scaled_shot_thresholds(200) == (100, 20)
    info = ClassInfo(tuple("abcde"), (5000, 1001, 1000, 200, 199), *scaled_shot_thresholds(5000))
    assert info.shot_groups() == ["many", "many", "medium", "medium", "few"]
    assert ClassInfo.from_dict(info.to_dict()) == info


def test_longtail_split_takes_first_images_for_train_and_last_for_val():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 0])
    train, val = longtail_split(labels, [3, 1], val_per_class=2)
    assert train.tolist() == [0, 1, 2, 4] and val.tolist() == [5, 7, 8, 9]
    assert not set(train) & set(val)
    with pytest.raises(ValueError, match="class 1 has 4 images"):
        longtail_split(labels, [3, 3], val_per_class=2)


def test_idx_round_trip_gzip_and_raw(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name), array)


def test_idx_errors_name_the_file(tmp_path):
    good = tmp_path / "x-idx3-ubyte"
    write_idx(good, np.zeros((3, 4, 4), dtype=np.uint8))
    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated-idx3-ubyte: IDX payload has 43 bytes, header promises 48"):
        read_idx(truncated)
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="junk.gz: cannot read IDX file"):
        read_idx(junk)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(magic)


def test_fashion_mnist_lt_on_generated_idx_files(tmp_path):
    root, train_labels, train_images = make_fashion_root(tmp_path)
    splits = fashion_mnist_lt(root, imbalance_factor=10, max_per_class=20, val_per_class=5)
    expected = exponential_profile(20, 10, 10)
    assert splits.classes.train_counts == tuple(expected)
    assert torch.bincount(splits.train.labels, minlength=10).tolist() == expected
    assert torch.bincount(splits.val.labels, minlength=10).tolist() == [5] * 10
    assert len(splits.test) == 40 and splits.train.images.shape[1:] == (1, 28, 28)
    for part in (splits.train, splits.val, splits.test):  # pixels stay aligned with labels
        assert torch.equal(part.images[:, 0, 0, 0].long(), part.labels)
    # train takes the first n_c images of each class in file order
    first = np.sort(np.concatenate([np.flatnonzero(train_labels == c)[:n] for c, n in enumerate(expected)]))
    assert np.array_equal(splits.train.images[:, 0].numpy(), train_images[first])


def test_fashion_mnist_lt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--src: .*train-images-idx3-ubyte"):
        fashion_mnist_lt(tmp_path)
    root, *_ = make_fashion_root(tmp_path)
    with pytest.raises(ValueError, match="--max-per-class/--val-per-class: class 0 has 30 images"):
        fashion_mnist_lt(root, max_per_class=28, val_per_class=5)
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (300).to_bytes(4, "big") + bytes([12] * 300))
    with pytest.raises(ValueError, match="train labels outside 0..9"):
        fashion_mnist_lt(root, max_per_class=20, val_per_class=5)


@pytest.mark.skipif(not __import__("os").path.isdir(REAL_ROOT), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_lt_default_split():
    splits = fashion_mnist_lt(REAL_ROOT)
    assert len(splits.train) == 12406 and len(splits.val) == 5000 and len(splits.test) == 10000
    assert splits.classes.shot_groups() == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("loader", ["ffcv", "torch"])
def test_two_view_loader_shards_are_disjoint_and_views_differ(loader, tiny_dataset, ffcv_uncompiled):
    data = PreparedDataset.open(tiny_dataset)
    cfg = DataConfig(path=str(tiny_dataset), batch_size=8, loader=loader, num_workers=1, eval_batch_size=7)
    labels = torch.tensor(data.labels["train"])
    seen = []
    for rank in (0, 1):
        loaders = build_loaders(data, cfg, rank=rank, world_size=2, seed=3, device=torch.device("cpu"))
        indices = []
        for x_q, x_k, y, index in loaders.train(epoch=0):
            assert x_q.shape == x_k.shape and x_q.shape[0] == 4 and x_q.shape[-2:] == (28, 28)
            assert x_q.dtype == torch.uint8
            assert torch.equal(y, labels[index])  # labels aligned with both views
            assert not torch.equal(x_q, x_k)  # two independent augmentations
            indices += index.tolist()
        assert len(indices) == len(set(indices))  # each sample at most once per epoch
        seen.append(set(indices))
        again = [i for *_, index in loaders.train(epoch=0) for i in index.tolist()]
        assert again == indices  # the order of epoch e is a function of (seed, e, rank)
        assert [i for *_, index in loaders.train(epoch=1) for i in index.tolist()] != indices
        assert loaders.normalize(x_q).shape == (4, 1, 28, 28)  # grayscale back to 1 channel
        eval_labels = torch.cat([y for _, y in loaders.eval("test")])
        assert torch.equal(eval_labels, torch.tensor(data.labels["test"][rank::2]))
    assert not seen[0] & seen[1]
    n = data.size("train")
    assert len(seen[0] | seen[1]) == (n // 2 // 4) * 4 * 2  # everything but the drop_last remainder


def test_ffcv_and_torch_decode_the_same_pixels(tiny_dataset, ffcv_uncompiled):
    data = PreparedDataset.open(tiny_dataset)
    batches = {}
    for loader in ("ffcv", "torch"):
        cfg = DataConfig(path=str(tiny_dataset), loader=loader, num_workers=1, eval_batch_size=100)
        loaders = build_loaders(data, cfg, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
        batches[loader] = torch.cat([loaders.normalize(x) for x, _ in loaders.eval("val")])
    assert torch.equal(batches["ffcv"], batches["torch"])  # raw .beton round-trips the pixels
