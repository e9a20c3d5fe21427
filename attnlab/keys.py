"""The key layout of an attention row: the ONE place that says which keys are the image's patches.

A captioner's row over ``K`` keys holds the prefix keys first (a ViT's CLS token and
its registers), then the ``h * w`` patches row by row, then (in a batch of mixed
sizes) zero-weight padding. :class:`KeyLayout` splits such rows, NumPy arrays
or torch tensors alike, into the prefix part and the ``(h, w)`` patch map;
decoding, explanations, ``CaptionTrace.from_attention`` and the encoder rows of
:mod:`attnlab.rollout` all split rows here.

A vision-language prompt is laid out differently: one photo gives several *views*
(:class:`View`: a grid and the box of the photo it covers) whose tokens sit anywhere
among the prompt's keys, and every other key has a *kind* (``"prefix"``, ``"prompt"``,
``"special"``, ``"newline"``, ``"padding"``, ...). :meth:`KeyLayout.of_views` holds such a
layout (which keys are each view's cells, row-major, and which keys are of each kind) and
:meth:`KeyLayout.split_views` splits rows into every view's map and every kind's share;
it works on the simple layout too (one view ``"image"``, the prefix as kind ``"prefix"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import AttnlabError

__all__ = ["COMPOSED", "KeyLayout", "View"]

Box = tuple[float, float, float, float]
COMPOSED = "composed: "  # a view whose name starts so holds a composed map; the name says through what (BLIP-2's queries)


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

    @property
    def composed(self) -> bool:
        """Whether the map is composed through tokens that are no patches (the name, from :data:`COMPOSED` on, says
        the path: ``"composed: language model -> 32 queries -> patches"``), not a row's weights on patch keys."""
        return self.name.startswith(COMPOSED)

    @classmethod
    def whole(cls, grid: tuple[int, int], image: Any, name: str = "image") -> "View":
        """The one view of a single-view trace: ``grid`` over the whole ``image`` ``(height, width, 3)``."""
        height, width = np.shape(image)[:2]
        return cls(name, (int(grid[0]), int(grid[1])), (0.0, 0.0, float(width), float(height)))



@dataclass(frozen=True, eq=False)
class KeyLayout:
    """``prefix`` leading non-patch keys, then a ``grid = (h, w)`` of patches (row-major).

    A layout of several views (:meth:`of_views`) also holds ``views``, ``view_keys[i]``
    (the ``h * w`` key indices of view ``i``, row-major), ``kinds`` (kind -> key indices)
    and ``length`` (the keys of a row); then ``grid`` is the first view's grid and
    ``prefix`` the number of ``"prefix"`` keys.
    """

    prefix: int
    grid: tuple[int, int]
    views: tuple[View, ...] = ()
    view_keys: tuple[np.ndarray, ...] = ()
    kinds: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0

    @classmethod
    def of_views(cls, views: Any, view_keys: Any, kinds: dict[str, Any], length: int) -> "KeyLayout":
        """A layout of ``views`` whose cells are the keys ``view_keys[i]`` (row-major) among ``length``
        keys, every other key listed under its kind; a one-line error unless every key
        ``0 .. length - 1`` is in exactly one view cell or kind."""
        views = tuple(views)
        keys = tuple(np.asarray(k, dtype=np.int64).reshape(-1) for k in view_keys)
        kinds = {str(k): np.asarray(v, dtype=np.int64).reshape(-1) for k, v in kinds.items()}
        if not views or len(keys) != len(views) or any(len(k) != v.grid[0] * v.grid[1] for k, v in zip(keys, views)):
            raise AttnlabError(f"{len(keys)} key lists for {len(views)} views: give each view its h * w keys, row-major")
        every = np.concatenate([*keys, *kinds.values()]) if keys or kinds else np.zeros(0, np.int64)
        if len(every) != length or not np.array_equal(np.sort(every), np.arange(length)):
            raise AttnlabError(f"the views and kinds place {len(every)} keys, not each of the {length} keys of the row exactly once")
        return cls(len(kinds.get("prefix", ())), views[0].grid, views, keys, kinds, int(length))

    def boxed(self, view: View) -> "KeyLayout":
        """This prefix + grid layout as one view ``view`` (its box placed on the photo), the prefix as kind ``"prefix"``."""
        n = self.prefix + self.grid[0] * self.grid[1]
        return KeyLayout.of_views((view,), (np.arange(self.prefix, n),), {"prefix": np.arange(self.prefix)}, n)

    def split_views(self, rows: Any, *, padded: bool = False) -> tuple[list[Any], dict[str, Any]]:
        """Rows ``(..., K)`` -> every view's maps ``(..., h, w)`` and every kind's share ``(...)``.

        The simple layout gives one map and, with prefix keys, the share ``"prefix"``.
        ``padded``: keys after the layout's are batch padding and are dropped.
        """
        if not self.views:
            prefix, patches = self.split(rows, padded=padded)
            return [patches], ({"prefix": prefix.sum(-1)} if self.prefix else {})  # (..., h, w), {kind: (...)}
        if rows.shape[-1] != self.length and not (padded and rows.shape[-1] > self.length):
            raise AttnlabError(f"rows of {rows.shape[-1]} keys do not fit the layout's {self.length} keys")
        lead = tuple(rows.shape[:-1])
        maps = [rows[..., k].reshape(*lead, *v.grid) for v, k in zip(self.views, self.view_keys)]  # (..., h, w) each
        return maps, {kind: rows[..., k].sum(-1) for kind, k in self.kinds.items()}  # kind -> (...)

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
        """The keys that carry weight: prefix + patches (padding after them excluded), or ``length``."""
        return self.length if self.views else self.prefix + self.grid[0] * self.grid[1]

    def split(self, rows: Any, *, padded: bool = False) -> tuple[Any, Any]:
        """Rows ``(..., K)`` -> prefix part ``(..., prefix)`` and patch maps ``(..., h, w)``.

        ``padded``: keys after prefix + patches are batch padding and are dropped;
        otherwise ``K`` must be exactly prefix + patches (one line if not).
        """
        if self.views:
            raise AttnlabError("this layout has several views: split its rows with split_views")
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
