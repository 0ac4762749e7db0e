"""Cluttered digits: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download)
enlarged and pasted at a random position on a larger noisy canvas full of distracting strokes and
blobs, some brighter than the digit, so that "the brightest region" is not the answer. The digit's
bounding box is known, which gives the pointing game a ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Canvases:
    images: torch.Tensor  # (B, 1, S, S) float32, roughly in [0, 1.3]
    labels: torch.Tensor  # (B,) int64
    boxes: torch.Tensor  # (B, 4) int64: top, left, bottom, right (exclusive) of the digit's ink


def load_digit_arrays():
    """(images (n, 8, 8) float32 in [0, 1], labels (n,)) from scikit-learn's bundled dataset."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'brnpa-triton[demo]'") from e
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int):
    """A stratified, seeded train/test split of the digit indices."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def enlarge(digits: np.ndarray, size: int) -> np.ndarray:
    """(n, 8, 8) -> (n, size, size), bilinear, clipped to [0, 1]."""
    t = torch.from_numpy(digits)[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()


def _stroke(canvas: np.ndarray, rng: np.random.Generator, brightness: float) -> None:
    S = canvas.shape[0]
    y0, x0 = rng.uniform(0, S, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(5, 14)
    width = rng.uniform(0.7, 1.6)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    dy, dx = np.sin(angle), np.cos(angle)
    t = np.clip((yy - y0) * dy + (xx - x0) * dx, 0, length)
    dist = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
    np.maximum(canvas, brightness * np.clip(1.0 - (dist - width) , 0, 1), out=canvas)


def _blob(canvas: np.ndarray, rng: np.random.Generator, brightness: float) -> None:
    S = canvas.shape[0]
    y0, x0 = rng.uniform(0, S, size=2)
    sigma = rng.uniform(1.0, 3.0)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    np.maximum(canvas, brightness * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * sigma**2)), out=canvas)


def make_canvases(
    digits: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    canvas: int = 48,
    digit_size: int = 16,
    strokes: int = 6,
    blobs: int = 4,
    noise: float = 0.08,
) -> Canvases:
    """One canvas per digit: clutter (``strokes`` line segments and ``blobs`` Gaussian spots, on
    average, brightness 0.6-1.3, anywhere outside the digit's square), the digit (ink in [0, 1]) at
    a uniformly random position, and Gaussian noise. Deterministic given ``rng``'s state."""
    n = len(digits)
    big = enlarge(digits, digit_size)
    images = np.zeros((n, canvas, canvas), np.float32)
    boxes = np.zeros((n, 4), np.int64)
    for i in range(n):
        img = images[i]
        top, left = rng.integers(0, canvas - digit_size + 1, size=2)
        for _ in range(rng.poisson(strokes)):
            _stroke(img, rng, rng.uniform(0.6, 1.3))
        for _ in range(rng.poisson(blobs)):
            _blob(img, rng, rng.uniform(0.6, 1.3))
        # the digit's square is its own: clutter is cleared there, then the digit drawn
        img[top : top + digit_size, left : left + digit_size] = big[i]
        ink = np.argwhere(big[i] > 0.2)
        (r0, c0), (r1, c1) = ink.min(0), ink.max(0) + 1
        boxes[i] = (top + r0, left + c0, top + r1, left + c1)
        img += rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return Canvases(torch.from_numpy(images)[:, None], torch.from_numpy(labels.copy()), torch.from_numpy(boxes))
