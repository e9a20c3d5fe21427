"""The key layout of an attention row: the ONE place that says which keys are the image's patches.

A row over ``K`` keys holds the prefix keys first (a ViT's CLS token and its
registers), then the ``h * w`` patches row by row, then (in a batch of mixed
sizes) zero-weight padding. :class:`KeyLayout` splits such rows, NumPy arrays
or torch tensors alike, into the prefix part and the ``(h, w)`` patch map;
decoding, explanations, ``CaptionTrace.from_attention`` and the encoder rows of
:mod:`attnlab.rollout` all split rows here. A later layout (several views of one
image, other kinds of keys) changes this class, not its callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import AttnlabError

__all__ = ["KeyLayout", "View"]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class View:
    """One view of the photo: its ``name``, its token ``grid = (h, w)`` (row-major as it sits on the
    photo) and the ``box = (x0, y0, x1, y1)`` of the photo it covers, in pixels of the photo as given
    (``trace.image``); floats, and it may overhang the photo where the processor padded."""

    name: str
    grid: tuple[int, int]
    box: Box

    @classmethod
    def checked(cls, name: Any, grid: Any, box: Any) -> "View":
        """A view from plain values (a one-line error naming what is wrong)."""
        if not isinstance(name, str) or not name:
            raise AttnlabError(f"a view's name must be a non-empty string, not {name!r}")
        try:
            h, w = (int(v) for v in grid)
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise AttnlabError(f"view {name!r}: grid must be (rows, columns) and box (x0, y0, x1, y1), not {grid!r}, {box!r}") from None
        if h < 1 or w < 1 or not np.isfinite([x0, y0, x1, y1]).all() or x1 <= x0 or y1 <= y0:
            raise AttnlabError(f"view {name!r}: grid {grid!r} needs rows, columns >= 1 and box {box!r} finite with x0 < x1, y0 < y1")
        return cls(name, (h, w), (x0, y0, x1, y1))

    @classmethod
    def whole(cls, grid: tuple[int, int], image: Any, name: str = "image") -> "View":
        """The one view of a single-view trace: ``grid`` over the whole ``image`` ``(height, width, 3)``."""
        height, width = np.shape(image)[:2]
        return cls(name, (int(grid[0]), int(grid[1])), (0.0, 0.0, float(width), float(height)))



@dataclass(frozen=True)
class KeyLayout:
    """``prefix`` leading non-patch keys, then a ``grid = (h, w)`` of patches (row-major)."""

    prefix: int
    grid: tuple[int, int]

    @classmethod
    def checked(cls, prefix_tokens: Any, grid: Any) -> "KeyLayout":
        """A layout from a user's ``prefix_tokens`` and ``grid = (rows, columns)`` (one line if they are not)."""
        try:
            h, w = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise AttnlabError(f"grid={grid!r} is not (rows, columns)") from None
        if h < 1 or w < 1:
            raise AttnlabError(f"grid={grid!r} must have at least one row and one column")
        if not isinstance(prefix_tokens, (int, np.integer)) or isinstance(prefix_tokens, bool) or prefix_tokens < 0:
            raise AttnlabError(f"prefix_tokens={prefix_tokens!r} must be an integer >= 0")
        return cls(int(prefix_tokens), (h, w))

    @property
    def keys(self) -> int:
        """The keys that carry weight: prefix + patches (padding after them excluded)."""
        return self.prefix + self.grid[0] * self.grid[1]

    def split(self, rows: Any, *, padded: bool = False) -> tuple[Any, Any]:
        """Rows ``(..., K)`` -> prefix part ``(..., prefix)`` and patch maps ``(..., h, w)``.

        ``padded``: keys after prefix + patches are batch padding and are dropped;
        otherwise ``K`` must be exactly prefix + patches (one line if not).
        """
        k = self.keys
        if rows.shape[-1] != k and not (padded and rows.shape[-1] > k):
            h, w = self.grid
            raise AttnlabError(f"rows of {rows.shape[-1]} keys do not fit {self.prefix} prefix tokens + a {h} x {w} grid")
        lead = tuple(rows.shape[:-1])
        return rows[..., : self.prefix], rows[..., self.prefix : k].reshape(*lead, *self.grid)  # (..., p), (..., h, w)

    def share(self, rows: Any, *, padded: bool = False) -> Any:
        """Each row's total weight on the prefix keys ``(...)``, or ``None`` when there are none."""
        if not self.prefix:
            return None
        return self.split(rows, padded=padded)[0].sum(-1)  # (...)

    def rows_of(self, weights: Any, steps: int) -> np.ndarray:
        """Your weights as checked rows ``(layers, heads, steps, K)`` float32 (one line if they are not).

        Accepts ``(layers, heads, steps, K)``, ``(heads, steps, K)``, ``(steps, K)``, or
        ``(layers, heads, steps, h, w)`` when there are no prefix keys.
        """
        a = np.asarray(weights.detach().cpu() if hasattr(weights, "detach") else weights, dtype=np.float32)
        (h, w), k = self.grid, self.keys
        if a.ndim == 5:
            if self.prefix or tuple(a.shape[3:]) != (h, w):
                raise AttnlabError(
                    f"cross_attention {a.shape}: a 5-D array must be (layers, heads, steps, {h}, {w}) with prefix_tokens=0"
                )
            a = a.reshape(*a.shape[:3], h * w)  # (layers, heads, steps, S)
        elif 2 <= a.ndim <= 4:
            a = a.reshape((1,) * (4 - a.ndim) + a.shape)  # (layers, heads, steps, K)
        else:
            raise AttnlabError(f"cross_attention has shape {a.shape}: expected (layers, heads, steps, K) or (steps, K)")
        if a.shape[2] != steps or a.shape[3] != k:
            raise AttnlabError(
                f"cross_attention has shape {a.shape} but {steps} steps and {self.prefix} prefix + "
                f"{h}x{w} patches = {k} keys were given: row i must be step i's weights over all keys"
            )
        if not np.isfinite(a).all() or (a < 0).any():
            raise AttnlabError("cross_attention holds negative, NaN or infinite values: pass softmax weights")
        return a
