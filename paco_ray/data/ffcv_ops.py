"""FFCV operations missing from ffcv 1.0.2, compiled with numba like its own colour ops:
random grayscale and random Gaussian blur on HxWx3 uint8 batches (in place, parallel over images)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation


class RandomGrayscale(Operation):
    """With probability p, replace each channel by the luma 0.299 R + 0.587 G + 0.114 B."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p

    def generate_code(self):
        my_range, p = Compiler.get_iterator(), self.p

        def grayscale(images, *_):
            apply = np.random.rand(images.shape[0]) < p
            for i in my_range(images.shape[0]):
                if apply[i]:
                    img = images[i].astype(np.float32)
                    luma = 0.299 * img[:, :, 0] + 0.587 * img[:, :, 1] + 0.114 * img[:, :, 2]
                    for c in range(3):
                        images[i, :, :, c] = (luma + 0.5).astype(np.uint8)
            return images

        grayscale.is_parallel = True
        return grayscale

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class RandomGaussianBlur(Operation):
    """With probability p, a separable Gaussian blur with sigma ~ U(sigma_min, sigma_max) and a
    fixed odd kernel size and reflected borders, as torchvision's GaussianBlur."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5):
        super().__init__()
        self.radius, self.sigma, self.p = kernel_size // 2, sigma, p

    def generate_code(self):
        my_range, p, radius = Compiler.get_iterator(), self.p, self.radius
        low, high = self.sigma

        def blur(images, *_):
            n, h, w, channels = images.shape
            apply = np.random.rand(n) < p
            sigmas = np.random.uniform(low, high, n)
            for i in my_range(n):
                if not apply[i]:
                    continue
                offsets = np.arange(-radius, radius + 1).astype(np.float32)
                kernel = np.exp(-0.5 * (offsets / sigmas[i]) ** 2)
                kernel = kernel / kernel.sum()
                src = images[i].astype(np.float32)
                tmp = np.zeros_like(src)
                for y in range(h):
                    for x in range(w):
                        for k in range(2 * radius + 1):
                            xx = abs(x + k - radius)
                            if xx > w - 1:
                                xx = 2 * (w - 1) - xx
                            tmp[y, x, :] += kernel[k] * src[y, xx, :]
                out = np.zeros_like(src)
                for y in range(h):
                    for k in range(2 * radius + 1):
                        yy = abs(y + k - radius)
                        if yy > h - 1:
                            yy = 2 * (h - 1) - yy
                        out[y, :, :] += kernel[k] * tmp[yy, :, :]
                images[i] = (out + 0.5).astype(np.uint8)
            return images

        blur.is_parallel = True
        return blur

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)
