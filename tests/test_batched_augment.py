"""The batched photometric ops against their per-sample references (timm's RandAugment,
torchvision's ColorJitter, RandomGrayscale, GaussianBlur and AutoAugment, Cutout): op by op
within one grey level, the per-image draws' distribution, seeded repeatability, and whole views
drawing the same distribution as the per-sample reference."""
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from paco_ray.config import DataConfig
from paco_ray.data.augment import VIEWS, batched_photometric
from paco_ray.data.batched_augment import TIMM_RAND_OPS
from paco_ray.data.reference_augment import TimmRandAugment, photometric
from paco_ray.data.batched_augment import (AUTOAUGMENT_COLOUR, AutoAugmentStage, BatchedAugment, BlurStage,
                                           ColorJitterStage, CutoutStage, RandAugmentStage, autoaugment_op,
                                           timm_op)
from test_augment import FILL, smooth_image


def apply_op(name, images, level, sign, fill):
    """One timm op on a batch, each image at its own level and sign (parameters on the CPU)."""
    fn, params = timm_op(name, level, sign, *images.shape[-2:], fill.expand(len(level), -1))
    return fn(images, **params)


def batched_randaugment(num_ops, magnitude, magnitude_std, fill):
    return BatchedAugment([RandAugmentStage(num_ops, magnitude, magnitude_std, fill)])


def timm_reference(name, images, level, sign, monkeypatch):
    """timm's op applied image by image at exactly ``level`` and ``sign``, bilinear."""
    op = next(o for o in TimmRandAugment(2, 10, 0.5, FILL[:images.shape[1]]).transform.ops if o.name == name)
    op.prob, op.magnitude_std, op.magnitude = 1.0, 0.0, level
    op.kwargs["resample"] = Image.BILINEAR
    monkeypatch.setattr("timm.data.auto_augment._randomly_negate", (lambda v: v) if sign > 0 else (lambda v: -v))
    return torch.stack([F.pil_to_tensor(op(F.to_pil_image(image))) for image in images])


@pytest.mark.parametrize("name", TIMM_RAND_OPS)
@pytest.mark.parametrize("channels", [3, 1])
def test_each_batched_op_equals_timms_per_sample_op(name, channels, monkeypatch):
    images = torch.stack([smooth_image(i) for i in range(4)])[:, :channels]
    fill = torch.tensor(FILL[:channels], dtype=torch.float32)
    for level, sign in ((10.0, 1.0), (7.3, -1.0), (2.6, 1.0)):  # below 2.5 PIL refuses to posterize to 0 bits
        want = timm_reference(name, images, level, sign, monkeypatch).int()
        got = apply_op(name, images, torch.full((4,), level), torch.full((4,), sign), fill).int()
        assert got.shape == want.shape and got.dtype == torch.int32
        assert (got - want).abs().max() <= 1, (name, level, sign)


def test_each_image_draws_its_own_ops_with_timms_probabilities():
    torch.manual_seed(0)
    ops, applied, level, sign = RandAugmentStage(2, 10, 0.5, FILL).draw(30000)
    n = ops.numel()
    for k in range(len(TIMM_RAND_OPS)):  # uniform over the 15 ops, with replacement
        share = (ops == k).float().mean().item()
        assert abs(share - 1 / 15) < 4 * math.sqrt(1 / 15 * 14 / 15 / n)
    assert abs(applied.float().mean().item() - 0.5) < 0.01 and abs((sign > 0).float().mean().item() - 0.5) < 0.01
    assert level.max() <= 10 and abs(level.mean().item() - (10 - 0.5 / math.sqrt(2 * math.pi))) < 0.01
    assert (ops[0] != ops[1]).any() and (ops[0] == ops[1]).any()  # per image, not per batch


def test_the_drawn_op_is_applied_to_exactly_its_images(monkeypatch):
    images = torch.stack([smooth_image(i) for i in range(6)])
    augment = batched_randaugment(1, 10, 0.0, FILL)
    invert = TIMM_RAND_OPS.index("Invert")
    applied = torch.tensor([[True, False, True, True, False, True]])
    monkeypatch.setattr(augment.stages[0], "draw", lambda b, g=None: (torch.full((1, b), invert), applied, torch.full((1, b), 10.0),
                                                     torch.ones(1, b)))
    out = augment(images)
    assert torch.equal(out[applied[0]], 255 - images[applied[0]]) and torch.equal(out[~applied[0]], images[~applied[0]])


def test_seeded_batches_repeat_and_differ_across_seeds():
    images = torch.stack([smooth_image(i) for i in range(16)])
    augment = batched_randaugment(2, 10, 0.5, FILL)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(augment(images))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].dtype == torch.uint8 and runs[0].shape == images.shape


def test_batched_and_per_sample_randaugment_draw_the_same_views():
    image = smooth_image(9)
    batch = image.expand(600, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    batched = batched_randaugment(2, 10, 0.5, FILL)(batch).float()
    per_sample = torch.stack([TimmRandAugment(2, 10, 0.5, FILL)(image) for _ in range(600)]).float()
    for stat in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3)), lambda x: (x == image).float().mean((1, 2, 3))):
        a, b = stat(batched).tolist(), stat(per_sample).tolist()
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        assert abs(statistics.mean(a) - statistics.mean(b)) < 4 * se


# ----------------------------------------------------------------------------- torchvision's ops


def test_colour_jitter_ops_equal_torchvisions_per_image():
    from paco_ray.data import batched_ops as ops
    images = torch.stack([smooth_image(i) for i in range(6)])
    factors = torch.tensor([0.6, 0.75, 0.9, 1.1, 1.25, 1.4])
    shifts = torch.tensor([-0.1, -0.05, -0.01, 0.02, 0.07, 0.1])
    cases = [(ops.tv_brightness, F.adjust_brightness, factors), (ops.tv_contrast, F.adjust_contrast, factors),
             (ops.tv_saturation, F.adjust_saturation, factors), (ops.tv_hue, F.adjust_hue, shifts)]
    for channels in (3, 1):
        x = images[:, :channels]
        for batched, reference, values in cases:
            want = torch.stack([reference(image, float(v)) for image, v in zip(x, values)]).int()
            got = batched(x, values).int()
            assert got.shape == want.shape and (got - want).abs().max() <= 1, (batched.__name__, channels)
            assert channels == 1 and batched in (ops.tv_saturation, ops.tv_hue) or not torch.equal(got, x.int())


def test_grayscale_and_blur_equal_torchvisions_per_image():
    from paco_ray.data import batched_ops as ops
    images = torch.stack([smooth_image(i) for i in range(4)])
    assert torch.equal(ops.to_grayscale(images), F.rgb_to_grayscale(images, num_output_channels=3))
    stage = BlurStage(13, (0.1, 2.0), p=1.0)
    group = stage.plan(4, 32, 32, 3, torch.Generator().manual_seed(0))[0][0]
    sigmas = torch.empty(4).uniform_(0.1, 2.0, generator=_skip(torch.Generator().manual_seed(0), 4))
    got = group.fn(images, **group.params).int()
    want = torch.stack([F.gaussian_blur(image, [13, 13], [float(s), float(s)]) for image, s in zip(images, sigmas)])
    assert (got - want.int()).abs().max() <= 1 and not torch.equal(got, images.int())


def _skip(generator, n):
    """The generator after the n uniform draws a stage makes for its p (here 1: every image)."""
    torch.rand(n, generator=generator)
    return generator


AUTOAUGMENT_OPS = sorted(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._AUGMENTATION_SPACE)


@pytest.mark.parametrize("name", AUTOAUGMENT_OPS)
@pytest.mark.parametrize("channels", [3, 1])
def test_each_autoaugment_op_equals_torchvisions(name, channels):
    reference = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128)
    images = torch.stack([smooth_image(i) for i in range(4)])[:, :channels]
    magnitudes, signed = reference._AUGMENTATION_SPACE[name]
    values = magnitudes(10, 32, 32)
    ms = [0.0] * 4 if values is None else [float(values[9]), float(values[4]) * (-1 if signed else 1),
                                           float(values[2]), float(values[7])]
    fn, params = autoaugment_op(name, ms, 32, 32, torch.tensor([128.0]).expand(channels))
    got = fn(images, **params).int()
    want = torch.stack([reference._apply_image_or_video_transform(image, name, m, InterpolationMode.NEAREST,
                                                                  reference._fill) for image, m in zip(images, ms)])
    assert (got - want.int()).abs().max() <= 1, name


def test_autoaugment_draws_sub_policies_and_ops_with_torchvisions_frequencies():
    stage = AutoAugmentStage(v2.AutoAugmentPolicy.CIFAR10, 128)
    n = 20000
    steps = stage.plan(n, 32, 32, 3, torch.Generator().manual_seed(1))
    for slot, step in enumerate(steps):
        counts = {}
        for group in step:
            name = {**{fn: k for k, (fn, _) in AUTOAUGMENT_COLOUR.items()}}.get(group.fn, "affine")
            counts[name] = counts.get(name, 0) + len(group.rows)
        expected = {}
        for policy in stage.policies:
            name, p, _ = policy[slot]
            name = name if name in AUTOAUGMENT_COLOUR else "affine"
            expected[name] = expected.get(name, 0) + p / len(stage.policies)
        for name, share in expected.items():
            assert abs(counts.get(name, 0) / n - share) < 4 * math.sqrt(share * (1 - share) / n) + 1e-9, (slot, name)
        rows = torch.cat([g.rows for g in step])
        assert len(rows) == len(set(rows.tolist()))  # an image gets at most one op per slot


def test_colour_jitter_orders_each_image_on_its_own_and_applies_with_p():
    stage = ColorJitterStage(0.4, 0.4, 0.4, 0.1, p=0.8)
    n = 6000
    steps = stage.plan(n, 8, 8, 3, torch.Generator().manual_seed(2))
    assert len(steps) == 4
    first = {}
    for group in steps[0]:
        first[group.fn.__name__] = len(group.rows)
        values = next(iter(group.params.values()))
        low, high = (-0.1, 0.1) if group.fn.__name__ == "tv_hue" else (0.6, 1.4)
        assert low <= values.min() and values.max() <= high and values.std() > (high - low) / 4
    applied = sum(first.values()) / n
    assert abs(applied - 0.8) < 0.02
    for count in first.values():  # each adjustment first for a quarter of the jittered images
        assert abs(count / sum(first.values()) - 0.25) < 0.03
    for step in steps:  # every applied image gets each adjustment exactly once
        assert sum(len(g.rows) for g in step) == sum(first.values())


def test_cutout_zeroes_the_official_square():
    images = torch.full((3, 3, 20, 24), 200, dtype=torch.uint8)
    stage = CutoutStage(16)
    group = stage.plan(3, 20, 24, 3, torch.Generator().manual_seed(5))[0][0]
    out = group.fn(images, **group.params)
    g = torch.Generator().manual_seed(5)
    ys, xs = torch.randint(20, (3,), generator=g), torch.randint(24, (3,), generator=g)
    for image, y, x in zip(out, ys.tolist(), xs.tolist()):
        mask = np.zeros((20, 24), bool)
        mask[max(0, y - 8):min(20, y + 8), max(0, x - 8):min(24, x + 8)] = True
        assert np.array_equal(image.numpy() == 0, np.broadcast_to(mask, (3, 20, 24)))


# ----------------------------------------------------------------------------- whole views


@pytest.mark.parametrize("view", [v for v in VIEWS if v != "crop_flip"])
def test_batched_view_draws_the_same_views_as_the_per_sample_reference(view):
    cfg = DataConfig(randaugment_ops=2, cutout=16)
    image = smooth_image(9)
    n = 500
    batched = batched_photometric(view, cfg, FILL)(image.expand(n, -1, -1, -1).contiguous(),
                                                  torch.Generator().manual_seed(0)).float()
    torch.manual_seed(0)
    reference = v2.Compose(photometric(view, cfg, FILL))
    per_sample = torch.stack([reference(image) for _ in range(n)]).float()
    stats = {"mean": lambda x: x.mean((1, 2, 3)), "std": lambda x: x.std((1, 2, 3)),
             "unchanged": lambda x: (x == image).float().mean((1, 2, 3)),
             "gray": lambda x: ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1).float(),
             "zeros": lambda x: (x == 0).all(1).float().mean((1, 2))}
    for name, stat in stats.items():
        a, b = stat(batched).tolist(), stat(per_sample).tolist()
        se = math.sqrt(statistics.variance(a) / n + statistics.variance(b) / n) + 1e-6
        assert abs(statistics.mean(a) - statistics.mean(b)) < 4.5 * se, (view, name, statistics.mean(a),
                                                                          statistics.mean(b))


@pytest.mark.parametrize("view", [v for v in VIEWS if v != "crop_flip"])
def test_batched_views_repeat_per_seed_and_leave_the_global_rng_alone(view):
    augment = batched_photometric(view, DataConfig(randaugment_ops=2), FILL)
    images = torch.stack([smooth_image(i) for i in range(16)])
    state = torch.get_rng_state()
    runs = [augment(images, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].dtype == torch.uint8 and runs[0].shape == images.shape and images.min() >= 0


def test_batched_and_per_sample_views_name_the_same_ops_in_the_same_order():
    cfg = DataConfig(randaugment_ops=2)
    names = {"ColorJitter": "ColorJitterStage", "RandomGrayscale": "GrayscaleStage", "GaussianBlur": "BlurStage",
             "TimmRandAugment": "RandAugmentStage", "AutoAugment": "AutoAugmentStage", "Cutout": "CutoutStage"}
    for view in VIEWS:
        reference = [type(op.transforms[0] if isinstance(op, v2.RandomApply) else op).__name__
                     for op in photometric(view, cfg, FILL)]
        assert [names[n] for n in reference] == [type(s).__name__ for s in batched_photometric(view, cfg, FILL).stages]
