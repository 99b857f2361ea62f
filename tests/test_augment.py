"""The view recipes: timm's RandAugment op by op against torchvision's own ops, Cutout against an
independent computation, every view's shape/dtype/determinism, and the FFCV and torch loaders
drawing the same distribution of views."""
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from conftest import write_cifar
from paco_ray.config import DataConfig, load_config
from paco_ray.data.augment import VIEWS, view_names
from paco_ray.data.batched_augment import TIMM_RAND_OPS
from paco_ray.data.reference_augment import Cutout, TimmRandAugment, photometric, view_transform
from paco_ray.data.loaders import build_loaders
from paco_ray.data.prepared import PreparedDataset
from paco_ray.schema import ConfigError

FILL = (124, 116, 104)


def smooth_image(seed: int, size: int = 32) -> torch.Tensor:
    """A colour image with gradients and a bright square: crops, shears and colour ops all move it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([(xx * 255 // size), (yy * 255 // size), ((xx + yy) * 127 // size)]).astype(np.uint8)
    y, x = rng.integers(0, size - 10, 2)
    image[:, y:y + 10, x:x + 10] = rng.integers(0, 256, (3, 1, 1))
    return torch.from_numpy(image)


def timm_op(name: str) -> "object":
    """timm's op of that name, as TimmRandAugment builds it, made deterministic: applied always,
    at exactly magnitude 10, positive sign, bilinear."""
    op = next(o for o in TimmRandAugment(2, 10, 0.5, FILL).transform.ops if o.name == name)
    op.prob, op.magnitude_std = 1.0, 0.0
    op.kwargs["resample"] = Image.BILINEAR
    return op


def timm_apply(name: str, image: torch.Tensor, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr("timm.data.auto_augment._randomly_negate", lambda v: v)
    return F.pil_to_tensor(timm_op(name)(F.to_pil_image(image)))


def test_randaugment_is_timms_published_configuration():
    ra = TimmRandAugment(2, 10, 0.5, FILL).transform
    assert ra.num_layers == 2
    assert tuple(op.name for op in ra.ops) == TIMM_RAND_OPS  # the official op set
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 10, 0.5)
        assert op.hparams["translate_pct"] == 0.45
    assert ra.ops[3].kwargs["fillcolor"] == FILL  # geometric ops fill with the mean colour


# timm op at m 10 -> torchvision's own op with the parameter timm's scale gives it
COLOUR_OPS = {
    "AutoContrast": F.autocontrast, "Equalize": F.equalize, "Invert": F.invert,
    "Posterize": lambda x: F.posterize(x, 4),          # m 10: keep 4 bits
    "Solarize": lambda x: x,                           # m 10: threshold 256, nothing inverted (timm's scale)
    "Color": lambda x: F.adjust_saturation(x, 1.9),    # enhance ops: 0.1 + 1.8 m / 10
    "Contrast": lambda x: F.adjust_contrast(x, 1.9),
    "Brightness": lambda x: F.adjust_brightness(x, 1.9),
    "Sharpness": lambda x: F.adjust_sharpness(x, 1.9),
}


@pytest.mark.parametrize("name", sorted(COLOUR_OPS))
def test_timm_colour_op_matches_torchvision_tensor_op(name, monkeypatch):
    image = smooth_image(0)
    got = timm_apply(name, image, monkeypatch).int()
    want = COLOUR_OPS[name](image).int()
    assert (got - want).abs().max() <= 1, name


def test_solarize_add_matches_an_independent_computation(monkeypatch):
    image = smooth_image(1)
    want = torch.where(image < 128, (image.int() + 110).clamp(max=255), image.int())  # m 10: +110 below 128
    assert torch.equal(timm_apply("SolarizeAdd", image, monkeypatch).int(), want)


def affine(image, **kw):
    pil = F.to_pil_image(image)
    out = F.affine(pil, **{"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0], **kw},
                   interpolation=InterpolationMode.BILINEAR, fill=list(FILL), center=[0, 0])
    return F.pil_to_tensor(out)


GEOMETRIC_OPS = {  # at m 10: shear 0.3 (not torchvision RandAugment's ~0.1), rotate 30, translate 45%
    "ShearX": lambda x: affine(x, shear=[math.degrees(math.atan(0.3)), 0.0]),
    "ShearY": lambda x: affine(x, shear=[0.0, math.degrees(math.atan(0.3))]),
    "TranslateXRel": lambda x: affine(x, translate=[-0.45 * x.shape[-1], 0]),
    "TranslateYRel": lambda x: affine(x, translate=[0, -0.45 * x.shape[-2]]),
    "Rotate": lambda x: F.pil_to_tensor(F.rotate(F.to_pil_image(x), 30.0, InterpolationMode.BILINEAR, fill=list(FILL))),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC_OPS))
def test_timm_geometric_op_matches_torchvision_at_the_published_scale(name, monkeypatch):
    image = smooth_image(2)
    got = timm_apply(name, image, monkeypatch).int()
    want = GEOMETRIC_OPS[name](image).int()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1, name
    assert not torch.equal(got, image.int())


def test_cutout_zeroes_a_clipped_square_at_a_seeded_centre():
    image = torch.full((3, 20, 24), 200, dtype=torch.uint8)
    torch.manual_seed(5)
    out = Cutout(16)(image)
    torch.manual_seed(5)
    y, x = int(torch.randint(20, ())), int(torch.randint(24, ()))
    mask = np.zeros((20, 24), bool)
    mask[max(0, y - 8):min(20, y + 8), max(0, x - 8):min(24, x + 8)] = True
    assert np.array_equal(out.numpy() == 0, np.broadcast_to(mask, (3, 20, 24)))
    assert (out.numpy()[:, ~mask] == 200).all() and image.min() == 200  # input untouched


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_view_keeps_shape_dtype_and_is_a_function_of_the_seed(view, channels):
    cfg = DataConfig(randaugment_ops=2, crop_padding=4)
    transform = view_transform(view, cfg, 32, FILL[:channels])
    image = smooth_image(3)[:channels]
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(torch.stack([transform(image) for _ in range(8)]))
    assert outs[0].shape == (8, channels, 32, 32) and outs[0].dtype == torch.uint8
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_sim_cifar_grays_a_fifth_of_the_views_and_sim_never_keeps_colour_untouched():
    image = smooth_image(4)
    cfg = DataConfig()
    torch.manual_seed(0)
    gray = [bool((v[0] == v[1]).all() and (v[1] == v[2]).all())
            for v in (view_transform("sim_cifar", cfg, 32, FILL)(image) for _ in range(400))]
    assert 0.14 < sum(gray) / len(gray) < 0.26  # RandomGrayscale p 0.2
    ops = photometric("randcls", DataConfig(randaugment_ops=2), FILL)
    assert ops[0].brightness == (0.6, 1.4) and ops[0].hue is None  # official query jitter: no hue


def test_views_default_to_the_measured_recipe_the_old_rule_by_name_and_bad_names_are_refused(tiny_config):
    assert view_names(DataConfig()) == ("crop_flip", "crop_flip")  # the best measured here (fidelity.py)
    assert view_names(DataConfig(randaugment_ops=2, augment="imagenet")) == ("crop_flip", "crop_flip")
    # empty names: 0.1's rule, by the family and RandAugment
    assert view_names(DataConfig(randaugment_ops=2, augment="imagenet", query_view="", key_view="")) == \
        ("randaugment", "sim")
    assert view_names(DataConfig(query_view="randcls", key_view="sim_cifar")) == ("randcls", "sim_cifar")
    with pytest.raises(ConfigError, match="data.key_view: must be one of crop_flip, randaugment"):
        tiny_config("data.key_view=simclr")
    with pytest.raises(ConfigError, match="data.randaugment_ops: must be > 0 with data.query_view=randcls"):
        tiny_config("data.query_view=randcls")
    with pytest.raises(ConfigError, match=r"data.randaugment_magnitude: must be in \[0, 10\]"):
        tiny_config("data.randaugment_magnitude=15")


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory):
    """A prepared CIFAR-10 of smooth colour images (the real pipeline)."""
    from pipelines import cifar
    tmp = tmp_path_factory.mktemp("colour")
    data = torch.stack([smooth_image(i) for i in range(10 * 40)]).reshape(400, -1).numpy()
    write_cifar(tmp / "src", "cifar10", 40, np.random.default_rng(0), data=data)
    assert cifar.main(["--src", str(tmp / "src"), "--out", str(tmp / "out"), "--imbalance-factor", "1",
                       "--val-per-class", "1"]) == 0
    return tmp / "out"


def view_statistics(dataset, loader: str, query: str, key: str) -> dict[str, list[float]]:
    """Per-view, per-image mean brightness and spread, and the share of gray images, over 3 epochs."""
    cfg = load_config(None, [f"data.path={dataset}", f"data.loader={loader}", f"data.query_view={query}",
                             f"data.key_view={key}", "data.randaugment_ops=2", "data.batch_size=50",
                             "data.crop_padding=4", "data.num_workers=1"]).data
    loaders = build_loaders(PreparedDataset.open(dataset), cfg, rank=0, world_size=1, seed=7, device=torch.device("cpu"))
    stats = {f"{v}_{s}": [] for v in ("q", "k") for s in ("mean", "std", "gray")}
    for epoch in range(3):
        for x_q, x_k, _, _ in loaders.train(epoch):
            for v, x in (("q", x_q), ("k", x_k)):
                x = x.float()
                stats[f"{v}_mean"] += x.mean((1, 2, 3)).tolist()
                stats[f"{v}_std"] += x.std((1, 2, 3)).tolist()
                stats[f"{v}_gray"] += ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1).float().tolist()
    return stats


@pytest.mark.parametrize("query,key", [("randcls", "sim_cifar"), ("autoaugment_cutout", "sim")])
def test_ffcv_and_torch_loaders_draw_the_same_view_distribution(colour_dataset, query, key, ffcv_uncompiled):
    ffcv, torch_ = (view_statistics(colour_dataset, loader, query, key) for loader in ("ffcv", "torch"))
    plain = view_statistics(colour_dataset, "torch", "crop_flip", "crop_flip")
    for name in ffcv:
        a, b = ffcv[name], torch_[name]
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) + 1e-9
        assert abs(statistics.mean(a) - statistics.mean(b)) < 4 * se, (name, statistics.mean(a), statistics.mean(b))
    # and the recipes do something the plain crop does not: the test can tell views apart
    assert abs(statistics.mean(torch_["k_std"]) - statistics.mean(plain["k_std"])) > 4 * se or \
        statistics.mean(torch_["k_gray"]) > 0.1
