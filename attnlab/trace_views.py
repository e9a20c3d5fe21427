"""The views of a trace and its key shares: checks, and how the file format stores them.

A trace's attention is split over *views* (:class:`attnlab.keys.View`: one grid per view,
placed on the photo by its box) and *key shares* (``kind -> (layers, heads, steps)``: the
weight on every key that is not an image patch: ``"prefix"``, ``"prompt"``,
``"special"``, ``"newline"``, ``"padding"``, ``"generated"``, ``"overhang"``, ...). The
views' maps plus the shares sum to 1 at every layer, head and step; nothing is
renormalised. :class:`~attnlab.trace.CaptionTrace` checks them here, and
:mod:`attnlab.trace_io` stores them here (version 3: a ``views`` list and a ``share_kinds``
list in the header, the views after the first in one ``view_maps`` member of shape
``(layers, heads, steps, sum of h * w)`` and the shares in one ``key_shares`` member of
shape ``(kinds, layers, heads, steps)``). This module imports neither the trace nor its
file module.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import AttnlabError
from .keys import View

__all__ = ["check_views", "check_shares", "views_header", "views_from_header", "pack", "unpack"]

MAX_VIEWS = 64
MAX_KINDS = 64


def check_views(views: Any, maps: Any, grid: tuple[int, int]) -> tuple[tuple[View, ...], tuple[np.ndarray, ...] | None]:
    """Views and (for several views) their maps ``(layers, heads, steps, h, w)`` each, checked.

    ``maps`` is ``None`` for a single-view trace (its map is ``cross_attention``) or when
    nothing was recorded. Raises ``ValueError`` (the trace's constructor's type).
    """
    views = tuple(views)
    if not views or not all(isinstance(v, View) for v in views):
        raise ValueError("views must be a non-empty sequence of attnlab.keys.View")
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ValueError(f"view names must differ: {names}")
    if views[0].grid != tuple(grid):
        raise ValueError(f"grid {tuple(grid)} must be the first view's grid {views[0].grid}")
    if maps is None:
        return views, None
    maps = tuple(maps)
    if len(views) == 1 or len(maps) != len(views):
        raise ValueError(f"view_maps holds {len(maps)} maps for {len(views)} views (give them only for several views)")
    lead = tuple(maps[0].shape[:3])
    for v, m in zip(views, maps):
        if m.ndim != 5 or tuple(m.shape[:3]) != lead or tuple(m.shape[3:]) != v.grid:
            raise ValueError(f"view {v.name!r} has maps of shape {tuple(m.shape)}, expected {(*lead, *v.grid)}")
    return views, maps


def check_shares(shares: dict[str, Any], lead: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    """Key shares ``kind -> (layers, heads, steps)`` checked against the maps' first three axes."""
    out = {}
    for kind, value in shares.items():
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"key_shares kinds must be non-empty strings, not {kind!r}")
        value = np.asarray(value)
        if lead is None or tuple(value.shape) != tuple(lead):
            raise ValueError(f"key_shares[{kind!r}] has shape {tuple(value.shape)}, expected (layers, heads, steps) = {lead}")
        out[kind] = value
    return out


def views_header(views: tuple[View, ...], shares: dict[str, np.ndarray]) -> dict[str, Any]:
    """The header entries of version 3: every view (name, grid, box) and the share kinds in order."""
    return {"views": [{"name": v.name, "grid": list(v.grid), "box": list(v.box)} for v in views], "share_kinds": list(shares)}


def views_from_header(header: dict[str, Any]) -> tuple[View, ...] | None:
    """The views a version-3 header lists (``None`` when it lists none); ``ValueError`` when damaged."""
    raw = header.get("views")
    if raw is None:
        return None
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_VIEWS:
        raise ValueError(f"views must be a list of 1 to {MAX_VIEWS} views")
    views = []
    for v in raw:
        ok = isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("grid"), list) and isinstance(v.get("box"), list)
        ok = ok and len(v["grid"]) == 2 and all(type(g) is int and 1 <= g <= 4096 for g in v["grid"])
        ok = ok and len(v["box"]) == 4 and all(type(b) in (int, float) and math.isfinite(b) for b in v["box"])
        if not ok:
            raise ValueError(f"view {ascii(v)[:80]} is not {{name, grid: [rows, columns], box: [x0, y0, x1, y1]}}")
        try:
            views.append(View.checked(v["name"], v["grid"], v["box"]))
        except AttnlabError as exc:
            raise ValueError(str(exc)) from None
    return tuple(views)


def share_kinds(header: dict[str, Any]) -> list[str]:
    """The share kinds a version-3 header lists, in the order of the ``key_shares`` member."""
    kinds = header.get("share_kinds", [])
    if not isinstance(kinds, list) or len(kinds) > MAX_KINDS or not all(isinstance(k, str) and k for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"share_kinds must be up to {MAX_KINDS} different names")
    return kinds


def pack(maps: tuple[np.ndarray, ...] | None, shares: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The members ``view_maps`` (views after the first, flattened and joined) and ``key_shares``."""
    out = {}
    if maps is not None:
        flat = [m.reshape(*m.shape[:3], -1) for m in maps[1:]]  # (layers, heads, steps, h * w) each
        out["view_maps"] = np.ascontiguousarray(np.concatenate(flat, axis=-1))  # (layers, heads, steps, sum h * w)
    if shares:
        out["key_shares"] = np.ascontiguousarray(np.stack([np.asarray(v) for v in shares.values()]))  # (kinds, layers, heads, steps)
    return out


def unpack(views: tuple[View, ...], first: np.ndarray | None, joined: np.ndarray | None) -> tuple[np.ndarray, ...] | None:
    """Every view's maps from the first view's ``(layers, heads, steps, h, w)`` and the joined rest."""
    if joined is None:
        return None
    maps, at = [first], 0
    for v in views[1:]:
        n = v.grid[0] * v.grid[1]
        maps.append(joined[..., at : at + n].reshape(*joined.shape[:3], *v.grid))  # (layers, heads, steps, h, w)
        at += n
    return tuple(maps)


def joined_width(views: tuple[View, ...]) -> int:
    """Keys of the ``view_maps`` member: the patches of every view after the first."""
    return sum(v.grid[0] * v.grid[1] for v in views[1:])
