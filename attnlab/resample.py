"""Resizing and blurring a patch grid, written as matrices.

A ``(H, W)`` map becomes ``My @ map @ Mx.T`` with one ``(n_out, n_in)`` matrix
per axis, so the same few numbers serve every word of a trace (the matrices
are cached). Bilinear and bicubic follow ``torch.nn.functional.interpolate``
with ``align_corners=False``; the Gaussian blur reflects at the border and
keeps the total weight.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear resize as a matrix ``(n_out, n_in)``, same as torch ``interpolate(align_corners=False)``."""
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)  # (n_out,)
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)  # (n_out,) source coordinate, clamped like torch
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)  # (n_out,)
    i1 = np.minimum(i0 + 1, n_in - 1)  # (n_out,)
    w1 = src - i0  # (n_out,)
    m = np.zeros((n_out, n_in), dtype=np.float64)  # (n_out, n_in)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """Bicubic resize (Keys, a=-0.75) as a matrix ``(n_out, n_in)``, same as torch ``align_corners=False``."""
    a = -0.75
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)  # (n_out,)
    src = (dst + 0.5) * scale - 0.5  # (n_out,) not clamped for cubic (as torch)
    base = np.floor(src).astype(np.int64)  # (n_out,)
    t = src - base  # (n_out,)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    coeffs = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # (n_out, 4)
    m = np.zeros((n_out, n_in), dtype=np.float64)  # (n_out, n_in)
    rows = np.arange(n_out)
    for k in range(4):
        idx = np.clip(base - 1 + k, 0, n_in - 1)  # (n_out,) border pixels repeat
        np.add.at(m, (rows, idx), coeffs[:, k])
    return m


def _gaussian_weights(n: int, sigma: float) -> np.ndarray:
    """Gaussian blur along one axis as a matrix ``(n, n)``; the border reflects (d c b a | a b c d).

    The matrix is symmetric with unit row and column sums, so blurring keeps the total weight.
    """
    if sigma <= 0:
        return np.eye(n)
    radius = int(math.ceil(4.0 * sigma))
    offsets = np.arange(-radius, radius + 1)  # (2r+1,)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)  # (2r+1,)
    kernel /= kernel.sum()
    m = np.zeros((n, n), dtype=np.float64)  # (n, n)
    rows = np.arange(n)
    for off, w in zip(offsets, kernel):
        idx = np.mod(rows + off, 2 * n)  # (n,) position in the period-2n mirrored signal
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
        np.add.at(m, (rows, idx), w)
    return m


@functools.lru_cache(maxsize=128)
def axis_matrix(n_in: int, n_out: int, mode: str, sigma: float) -> np.ndarray:
    """Blur then resize along one axis: ``(n_out, n_in)`` (read-only, cached)."""
    resize = _linear_weights(n_in, n_out) if mode == "bilinear" else _cubic_weights(n_in, n_out)  # (n_out, n_in)
    m = resize @ _gaussian_weights(n_in, sigma)  # (n_out, n_in)
    m.setflags(write=False)
    return m
