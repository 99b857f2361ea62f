"""The FFCV grayscale and blur operations against torchvision's, on the same images."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from paco_ray.data.ffcv_ops import RandomGaussianBlur, RandomGrayscale


def run(op, images):
    """Run an FFCV operation's generated code (uncompiled) on an N x H x W x 3 batch."""
    from ffcv.pipeline.compiler import Compiler
    Compiler.set_enabled(False)
    try:
        return op.generate_code()(images.copy(), None)
    finally:
        Compiler.set_enabled(True)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 17, 20, 3), dtype=np.uint8)


def test_grayscale_matches_torchvision(images):
    got = run(RandomGrayscale(p=1.0), images)
    want = TF.rgb_to_grayscale(torch.from_numpy(images).permute(0, 3, 1, 2), num_output_channels=3)
    assert np.abs(got.astype(int) - want.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    assert np.array_equal(run(RandomGrayscale(p=0.0), images), images)


@pytest.mark.parametrize("kernel,sigma", [(3, 0.8), (7, 1.7)])
def test_blur_matches_torchvision(images, kernel, sigma):
    got = run(RandomGaussianBlur(kernel, (sigma, sigma), p=1.0), images)
    want = TF.gaussian_blur(torch.from_numpy(images).permute(0, 3, 1, 2), [kernel, kernel], [sigma, sigma])
    assert np.abs(got.astype(int) - want.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    assert not np.array_equal(got, images)
