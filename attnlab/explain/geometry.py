"""Grounding geometry: object masks and boxes carried to the shown image, patch regions, scores.

Geometry. Objects are given in the source image's pixels; they are carried to
the image the model saw (the "shown" image of :func:`attnlab.preprocess.prepare_for`:
resized, maybe padded) by pixel centres: shown pixel ``(i, j)`` of the image
content is the source point ``((j + 0.5) W0 / w, (i + 0.5) H0 / h)``. A box
``[x, y, width, height]`` (COCO's order, in pixel edges) covers the source
points ``x <= X < x + width``, ``y <= Y < y + height``. The patch grid is
stretched over the shown image.

Scores of a map against a region (:func:`scores`: hit, touch, mass) and their chance level
(:func:`chance`) are what :func:`attnlab.explain.grounding.ground` averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..diagnostics import patch_share

__all__ = ["PatchRegion", "box_to_shown", "chance", "mask_to_shown", "patch_overlap", "patch_region", "peak_hits", "scores"]


def patch_overlap(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(gh, gw)`` bool: which grid patches overlap a ``(H, W)`` pixel mask.

    The grid is stretched over the image: patch ``(r, c)`` covers rows
    ``floor(r H / gh) .. ceil((r + 1) H / gh) - 1`` and likewise columns.
    """
    gh, gw = grid
    h, w = mask.shape
    out = np.zeros(grid, dtype=bool)
    for r in range(gh):
        y0, y1 = (r * h) // gh, -(-((r + 1) * h) // gh)
        for c in range(gw):
            x0, x1 = (c * w) // gw, -(-((c + 1) * w) // gw)
            out[r, c] = mask[y0:y1, x0:x1].any()
    return out


@dataclass
class PatchRegion:
    """An object seen on the patch grid: ``inside`` (centre pixel in the object), ``touch``
    (overlaps it) and ``share`` (the fraction of the patch's pixels in it), each ``(h, w)``."""

    inside: np.ndarray
    touch: np.ndarray
    share: np.ndarray


def patch_region(mask: np.ndarray, grid: tuple[int, int]) -> PatchRegion:
    """The :class:`PatchRegion` of a pixel mask ``(H, W)`` (of the shown image) on ``grid``."""
    gh, gw = grid
    h, w = mask.shape
    rows = np.minimum(((np.arange(gh) + 0.5) * h / gh).astype(np.int64), h - 1)  # (gh,) centre pixel rows
    cols = np.minimum(((np.arange(gw) + 0.5) * w / gw).astype(np.int64), w - 1)  # (gw,)
    return PatchRegion(mask[np.ix_(rows, cols)], patch_overlap(mask, grid), patch_share(mask, grid))


def peak_hits(maps: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Whether the peak patch of each map ``(..., h, w)`` lies in ``where`` ``(h, w)`` bool: ``(...)`` bool
    (the first patch, row by row, of equal peaks)."""
    flat = maps.reshape(*maps.shape[:-2], -1)  # (..., S)
    return where.reshape(-1)[flat.argmax(axis=-1)]


def scores(grid_map: np.ndarray, region: PatchRegion) -> tuple[float, float, float]:
    """``(hit, touch, mass)`` of one map ``(h, w)`` (non-negative) against ``region``; an all-zero map scores 0."""
    total = float(grid_map.sum())
    if total <= 0:
        return 0.0, 0.0, 0.0
    hit = float(peak_hits(grid_map, region.inside))
    touch = float(peak_hits(grid_map, region.touch))
    return hit, touch, float((grid_map * region.share).sum() / total)


def chance(region: PatchRegion) -> tuple[float, float, float]:
    """``(hit, touch, mass)`` expected of a map that knows nothing: a uniformly random peak, the uniform map."""
    return float(region.inside.mean()), float(region.touch.mean()), float(region.share.mean())


def _source_points(shown: tuple[int, int], content: tuple[int, int], source: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates ``(Y, X)`` of the shown pixels' centres ``(h,)``, ``(w,)`` (NaN on padding)."""
    ys = (np.arange(shown[0]) + 0.5) * source[0] / content[0]  # (H,)
    xs = (np.arange(shown[1]) + 0.5) * source[1] / content[1]  # (W,)
    ys[np.arange(shown[0]) >= content[0]] = np.nan
    xs[np.arange(shown[1]) >= content[1]] = np.nan
    return ys, xs


def mask_to_shown(mask: np.ndarray, shown: tuple[int, int], content: tuple[int, int]) -> np.ndarray:
    """A source pixel mask ``(H0, W0)`` on the shown image ``(H, W)`` bool (by pixel centres; padding is outside)."""
    ys, xs = _source_points(shown, content, mask.shape)
    ok_y, ok_x = ~np.isnan(ys), ~np.isnan(xs)
    out = np.zeros(shown, dtype=bool)
    iy = np.floor(ys[ok_y]).astype(np.int64)
    ix = np.floor(xs[ok_x]).astype(np.int64)
    out[np.ix_(ok_y, ok_x)] = mask[np.ix_(iy, ix)]
    return out


def box_to_shown(box: Sequence[float], source: tuple[int, int], shown: tuple[int, int], content: tuple[int, int]) -> np.ndarray:
    """A box ``[x, y, width, height]`` in source pixels (edges) on the shown image ``(H, W)`` bool."""
    x, y, w, h = (float(v) for v in box)
    ys, xs = _source_points(shown, content, source)
    with np.errstate(invalid="ignore"):
        rows = (ys >= y) & (ys < y + h)  # (H,), NaN compares False
        cols = (xs >= x) & (xs < x + w)  # (W,)
    return rows[:, None] & cols[None, :]
