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

from .errors import AttnlabError

__all__ = ["KeyLayout"]


@dataclass(frozen=True)
class KeyLayout:
    """``prefix`` leading non-patch keys, then a ``grid = (h, w)`` of patches (row-major)."""

    prefix: int
    grid: tuple[int, int]

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
