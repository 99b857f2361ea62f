"""The batched RandAugment against timm's per-sample ops: op by op within one grey level, the
per-image draws' distribution, seeded repeatability, and the same distribution of views."""
import math
import statistics

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from paco_ray.data.augment_ops import TIMM_RAND_OPS, TimmRandAugment
from paco_ray.data.batched_augment import BatchedRandAugment, apply_op
from test_augment import FILL, smooth_image


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
    ops, applied, level, sign = BatchedRandAugment(2, 10, 0.5, FILL).draw(30000)
    n = ops.numel()
    for k in range(len(TIMM_RAND_OPS)):  # uniform over the 15 ops, with replacement
        share = (ops == k).float().mean().item()
        assert abs(share - 1 / 15) < 4 * math.sqrt(1 / 15 * 14 / 15 / n)
    assert abs(applied.float().mean().item() - 0.5) < 0.01 and abs((sign > 0).float().mean().item() - 0.5) < 0.01
    assert level.max() <= 10 and abs(level.mean().item() - (10 - 0.5 / math.sqrt(2 * math.pi))) < 0.01
    assert (ops[0] != ops[1]).any() and (ops[0] == ops[1]).any()  # per image, not per batch


def test_the_drawn_op_is_applied_to_exactly_its_images(monkeypatch):
    images = torch.stack([smooth_image(i) for i in range(6)])
    augment = BatchedRandAugment(1, 10, 0.0, FILL)
    invert = TIMM_RAND_OPS.index("Invert")
    applied = torch.tensor([[True, False, True, True, False, True]])
    monkeypatch.setattr(augment, "draw", lambda b: (torch.full((1, b), invert), applied, torch.full((1, b), 10.0),
                                                     torch.ones(1, b)))
    out = augment(images)
    assert torch.equal(out[applied[0]], 255 - images[applied[0]]) and torch.equal(out[~applied[0]], images[~applied[0]])


def test_seeded_batches_repeat_and_differ_across_seeds():
    images = torch.stack([smooth_image(i) for i in range(16)])
    augment = BatchedRandAugment(2, 10, 0.5, FILL)
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
    batched = BatchedRandAugment(2, 10, 0.5, FILL)(batch).float()
    per_sample = torch.stack([TimmRandAugment(2, 10, 0.5, FILL)(image) for _ in range(600)]).float()
    for stat in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3)), lambda x: (x == image).float().mean((1, 2, 3))):
        a, b = stat(batched).tolist(), stat(per_sample).tolist()
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        assert abs(statistics.mean(a) - statistics.mean(b)) < 4 * se
