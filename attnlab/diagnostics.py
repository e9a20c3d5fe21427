"""Sanity diagnostics of a trace's maps: weight that sits somewhere other than on the picture's content.

Attention maps have known failure modes that look like meaning when drawn:
a ViT parks weight on its CLS or register tokens (not drawn on the image at
all), a padded input parks it on the padding, and many models park it on one
border patch ("attention sinks"). :func:`diagnose` (``trace.diagnostics()``)
measures, for every decoder layer, head (and the head mean) and step:

* ``prefix``: the share of the row on the prefix keys (CLS, registers), from
  ``trace.prefix_share``;
* ``padding``: the share on padding, for ``resize="pad"`` captioners (each
  patch counts with the fraction of its pixels that are padding; the trace
  records those fractions in ``meta["padding_fraction"]``);
* ``border``: the share on the patches of the grid's outer ring;
* ``entropy``: the entropy of the patch map (made a distribution over the
  patches), divided by that of a uniform map, ``log S``: 1 = spread evenly,
  0 = one patch; ``nan`` for a map that is all zero;
* ``steady``: the weight that stays on the same keys whatever the word: for
  each layer and head, the sum over keys (every patch, and the prefix keys as
  one) of the smallest weight that key gets at any step of the caption. It is
  one number per layer and head (the same at every step); ``nan`` for a
  caption of fewer than :data:`MIN_SINK_STEPS` steps, where it cannot be told.
* ``sink``: True where ``steady`` is at least :data:`SINK_SHARE` (half the
  row): most of the weight sits on keys that do not depend on the word, so
  the map says little about the word. Weight on a border patch or on CLS is
  *not* by itself a sink: a word naming an object at the border rightly peaks
  there (the shares above report it).

Index ``heads`` (the last) of the head axis is the mean over heads, the map the
default figures draw. Shares are of the whole row (patches and prefix), as
recorded: nothing is renormalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import AttnlabError

PADDING_KEY = "padding_fraction"
SINK_SHARE = 0.5  # steady weight from this share of the row on is a sink
MIN_SINK_STEPS = 3  # fewer steps than this: too few words to tell weight that stays from weight that agrees

__all__ = ["Diagnostics", "diagnose", "mark_padding", "padding_fraction", "patch_share"]


def patch_share(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(h, w)``: the fraction of each patch's pixels that lie in ``mask`` ``(height, width)`` bool
    (the grid stretched over the image; each pixel belongs to the patch its centre lies in)."""
    gh, gw = grid
    height, width = mask.shape
    rows = np.minimum(((np.arange(height) + 0.5) * gh / height).astype(np.int64), gh - 1)  # (height,) patch row
    cols = np.minimum(((np.arange(width) + 0.5) * gw / width).astype(np.int64), gw - 1)  # (width,)
    total = np.zeros(grid)
    inside = np.zeros(grid)
    np.add.at(total, (rows[:, None], cols[None, :]), 1.0)
    np.add.at(inside, (rows[:, None], cols[None, :]), mask.astype(np.float64))
    return inside / np.maximum(total, 1.0)  # (h, w)


def padding_fraction(grid: tuple[int, int], shown: tuple[int, int], content: tuple[int, int]) -> np.ndarray:
    """``(h, w)``: the fraction of each patch's pixels that are padding, for an image of ``content``
    ``(height, width)`` pixels at the top left of a shown image of ``shown`` pixels."""
    height, width = shown
    padded = (np.arange(height) >= content[0])[:, None] | (np.arange(width) >= content[1])[None, :]  # (height, width)
    return patch_share(padded, grid)


def mark_padding(traces: list[Any], content: list[tuple[int, int]], spec: Any) -> None:
    """For a ``resize="pad"`` captioner, record in each trace's ``meta`` which patches are padding
    (``meta["padding_fraction"]``: ``(h, w)`` fractions as nested lists)."""
    if getattr(spec, "resize", None) != "pad":
        return
    for trace, inside in zip(traces, content):
        frac = padding_fraction(trace.grid, trace.image.shape[:2], inside)  # (h, w)
        trace.meta[PADDING_KEY] = np.round(frac, 4).tolist()


@dataclass
class Diagnostics:
    """Per ``(layer, head or mean, step)``: see the module docstring. Arrays are ``(layers, heads + 1, steps)``."""

    prefix: np.ndarray
    padding: np.ndarray
    border: np.ndarray
    entropy: np.ndarray
    sink: np.ndarray
    prefix_tokens: int
    has_padding: bool
    steady: np.ndarray | None = None  # (layers, heads + 1): weight on the same keys at every step; nan: too few steps

    def line(self, step: int, layer: int = -1, head: int | str = "mean") -> str:
        """One line for one map, e.g. ``"CLS 12% · border 31% · entropy 0.84 of uniform · steady 8%"``
        (``· sink!`` when the steady weight is at least half the row)."""
        h = self.prefix.shape[1] - 1 if head == "mean" else int(head)
        at = (layer, h, step)
        parts = []
        if self.prefix_tokens:
            parts.append(f"{'CLS' if self.prefix_tokens == 1 else 'CLS + registers'} {self.prefix[at]:.0%}")
        if self.has_padding:
            parts.append(f"padding {self.padding[at]:.0%}")
        parts.append(f"border {self.border[at]:.0%}")
        e = self.entropy[at]
        parts.append("entropy n/a (empty map)" if math.isnan(e) else f"entropy {e:.2f} of uniform")
        if self.steady is not None and not math.isnan(self.steady[layer, h]):
            parts.append(f"steady {self.steady[layer, h]:.0%}")
        if self.sink[at]:
            parts.append("sink!")
        return " \u00b7 ".join(parts)


def diagnose(trace: Any) -> Diagnostics:
    """The diagnostics of ``trace``'s maps (it must hold attention and have one view)."""
    if len(trace.views) > 1:
        raise AttnlabError(
            f"diagnose covers traces of one view; this one has {len(trace.views)}: call trace.diagnostics() (attnlab.sinks) for its views"
        )
    ca = trace.require_attention().astype(np.float64)  # (layers, heads, steps, h, w)
    maps = np.concatenate([ca, ca.mean(axis=1, keepdims=True)], axis=1)  # (layers, heads + 1, steps, h, w)
    layers, heads1, steps, gh, gw = maps.shape
    flat = maps.reshape(layers, heads1, steps, -1)  # (..., S)
    share = trace.prefix_share
    prefix = np.zeros((layers, heads1, steps))
    if share is not None:
        share = np.asarray(share, dtype=np.float64)  # (layers, heads, steps)
        prefix = np.concatenate([share, share.mean(axis=1, keepdims=True)], axis=1)
    frac = trace.meta.get(PADDING_KEY)
    pad = np.zeros((gh, gw)) if frac is None else np.asarray(frac, dtype=np.float64).reshape(gh, gw)
    padding = (maps * pad).sum(axis=(-2, -1))  # (layers, heads + 1, steps)
    ring = np.ones((gh, gw), dtype=bool)
    ring[1:-1, 1:-1] = False
    border = maps[..., ring].sum(axis=-1)  # (layers, heads + 1, steps)
    total = flat.sum(axis=-1, keepdims=True)  # (..., 1)
    p = flat / np.where(total > 0, total, 1.0)
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)  # nats
    s = gh * gw
    entropy = np.where(total[..., 0] > 0, ent / math.log(s) if s > 1 else 1.0, np.nan)
    steady = steady_share(np.concatenate([prefix[..., None], flat], axis=-1))  # (layers, heads + 1)
    sink = np.broadcast_to((np.nan_to_num(steady) >= SINK_SHARE)[..., None], prefix.shape).copy()  # (layers, heads + 1, steps)
    return Diagnostics(prefix, padding, border, entropy, sink, int(trace.prefix_tokens), frac is not None, steady)


def steady_share(rows: np.ndarray) -> np.ndarray:
    """``rows`` ``(..., steps, keys)`` -> ``(...)``: ``sum_k min_t rows[..., t, k]``, the weight every step puts
    on the same keys; ``nan`` with fewer than :data:`MIN_SINK_STEPS` steps."""
    if rows.shape[-2] < MIN_SINK_STEPS:
        return np.full(rows.shape[:-2], np.nan)
    return rows.min(axis=-2).sum(axis=-1)
