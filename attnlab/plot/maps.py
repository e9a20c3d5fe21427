"""The numbers behind every picture (numpy only, no matplotlib).

A trace holds, for every decoder layer, head and decoding step, a map over the
image's ``(H, W)`` patch grid that sums to 1. This module turns those maps into
what the figures, the explorer and the HTML page show, so that each number on
screen is computed in exactly one place:

* :func:`grid_map`: one step's patch map (one head or the mean over heads),
  optionally blurred; :func:`resize` stretches a patch map over the image
  (``"bilinear"``, ``"bicubic"`` or ``"nearest"`` = flat patches);
  :func:`attention_map` does both.
* :func:`word_matrix`: the words-to-patches matrix ``(words, S)``.
* :func:`head_entropy`, :func:`head_peak`: how focused every map is.
* :class:`Scale`: what a colour means (``"shared"``, ``"panel"`` or ``"uniform"``).
* :func:`patch_edges`, :func:`layer_label`, :func:`head_label`, :func:`word_label`,
  :func:`source_label`, :func:`quantity`: geometry and wording shared by every view
  (an explanation trace, :func:`attnlab.explain`, is named by its method, not by
  a layer and head).

The patch grid is stretched over the whole image: patch ``(r, c)`` covers rows
``[r * height / H, (r + 1) * height / H)`` and columns ``[c * width / W, (c + 1) * width / W)``;
nothing assumes ``H == W``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import AttnlabError
from ..util import is_real
from ..resample import axis_matrix

END_TOKEN = "[SEP]"
INTERP_MODES = ("bilinear", "bicubic", "nearest")
SCALES = ("shared", "panel", "uniform")
MAX_SMOOTH = 50.0  # grid cells: far beyond any grid's size, a blur this wide is already flat

__all__ = [
    "END_TOKEN",
    "INTERP_MODES",
    "SCALES",
    "Scale",
    "attention_map",
    "build_scale",
    "check_interp",
    "check_smooth",
    "default_steps",
    "figure_maps",
    "grid_map",
    "head_entropy",
    "head_label",
    "head_peak",
    "explanation_label",
    "layer_label",
    "patch_edges",
    "quantity",
    "resize",
    "source_label",
    "word_label",
    "word_matrix",
]


# ---------------------------------------------------------------- checks
def check_smooth(smooth: Any) -> float:
    """A Gaussian sigma in grid cells, ``0 <= smooth <= MAX_SMOOTH``, or a one-line error."""
    if not is_real(smooth) or not 0.0 <= float(smooth) <= MAX_SMOOTH:
        raise AttnlabError(
            f"smooth={smooth!r} is not a Gaussian sigma: use a number from 0 (no blur) to {MAX_SMOOTH:g} grid cells"
        )
    return float(smooth)


def check_interp(interp: Any) -> str:
    """One of :data:`INTERP_MODES`, or a one-line error."""
    if not isinstance(interp, str) or interp not in INTERP_MODES:
        raise AttnlabError(f"interp={interp!r} is not supported: use 'bilinear', 'bicubic' or 'nearest' (flat patches)")
    return interp


def default_steps(trace: Any) -> list[int]:
    """Every step except a trailing end token (``[SEP]``, or the model's own, as the trace's
    ``meta["end_token"]`` records it; kept when it is the only step)."""
    n = trace.steps
    end = getattr(trace, "meta", {}).get("end_token")
    last_is_end = trace.words[-1] == END_TOKEN or (end is not None and int(trace.token_ids[-1]) == end)
    if n > 1 and last_is_end:
        return list(range(n - 1))
    return list(range(n))


# ------------------------------------------------------------------ maps
def grid_map(trace: Any, step: int, layer: int = -1, head: int | str = "mean", smooth: float = 0.0) -> np.ndarray:
    """One step's patch map ``(H, W)`` float64: one head's, or the mean over heads (``head="mean"``).

    ``smooth`` > 0 blurs it with a Gaussian of that sigma (in grid cells; the
    border reflects, so the total weight stays 1).
    """
    ca = trace.require_attention()  # (layers, heads, steps, H, W)
    t, li, hi = trace.check_step(step), trace.check_layer(layer), trace.check_head(head)
    sigma = check_smooth(smooth)
    if hi is None:
        out = ca[li, :, t].astype(np.float64).mean(axis=0)  # (H, W)
    else:
        out = ca[li, hi, t].astype(np.float64)  # (H, W)
    if sigma > 0:
        H, W = out.shape
        out = axis_matrix(H, H, "bilinear", sigma) @ out @ axis_matrix(W, W, "bilinear", sigma).T  # (H, W)
    return out


def resize(grid: np.ndarray, size: tuple[int, int], interp: str = "bilinear") -> np.ndarray:
    """A patch map ``(H, W)`` stretched over an image of ``size = (height, width)`` pixels: ``(height, width)``.

    ``"bilinear"`` and ``"bicubic"`` sample like ``torch.nn.functional.interpolate``
    with ``align_corners=False`` (cubic overshoot below 0 is clipped: it is not a
    weight); ``"nearest"`` paints each pixel with the patch its centre lies in
    (``interpolate(mode="nearest-exact")``), so every patch is a flat box.
    """
    mode = check_interp(interp)
    H, W = grid.shape
    height, width = int(size[0]), int(size[1])
    if mode == "nearest":
        rows = np.minimum(((np.arange(height) + 0.5) * H / height).astype(np.int64), H - 1)  # (height,)
        cols = np.minimum(((np.arange(width) + 0.5) * W / width).astype(np.int64), W - 1)  # (width,)
        return np.asarray(grid, dtype=np.float64)[np.ix_(rows, cols)]  # (height, width)
    my = axis_matrix(H, height, mode, 0.0)  # (height, H)
    mx = axis_matrix(W, width, mode, 0.0)  # (width, W)
    out = my @ grid @ mx.T  # (height, width)
    if mode == "bicubic":
        np.maximum(out, 0.0, out=out)
    return out


def attention_map(
    trace: Any,
    step: int,
    layer: int = -1,
    head: int | str = "mean",
    smooth: float = 0.0,
    interp: str = "bilinear",
) -> np.ndarray:
    """One step's attention stretched over the image the model saw: ``(height, width)`` float64.

    Values stay in patch-weight units (a map with all its weight on one patch
    peaks near 1; a uniform map is ``1/S`` everywhere). See :func:`grid_map` and
    :func:`resize`.
    """
    mode = check_interp(interp)
    return resize(grid_map(trace, step, layer, head, smooth), trace.image.shape[:2], mode)  # (height, width)


def word_matrix(trace: Any, layer: int = -1, head: int | str = "mean", steps: Sequence[int] | None = None) -> np.ndarray:
    """The words-to-patches weights ``(len(steps), S)`` float64, patches in row-major ``(r, c)`` order.

    Row ``i`` is the map of ``steps[i]`` flattened (``S = H * W``); every row sums to 1.
    """
    ca = trace.require_attention()  # (layers, heads, steps, H, W)
    li, hi = trace.check_layer(layer), trace.check_head(head)
    chosen = list(range(trace.steps)) if steps is None else [trace.check_step(t) for t in steps]
    layer_maps = ca[li][:, chosen].astype(np.float64)  # (heads, n, H, W)
    maps = layer_maps.mean(axis=0) if hi is None else layer_maps[hi]  # (n, H, W)
    return maps.reshape(len(chosen), -1)  # (n, S)


def head_entropy(trace: Any) -> np.ndarray:
    """Entropy (nats) of every map: ``(layers, heads, steps)``.

    0 = all weight on one patch; ``log(H * W)`` = spread evenly over the image.
    """
    ca = trace.require_attention()  # (layers, heads, steps, H, W)
    p = ca.reshape(*ca.shape[:3], -1).astype(np.float64)  # (layers, heads, steps, S)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # (layers, heads, steps, S)
    return -plogp.sum(axis=-1)  # (layers, heads, steps)


def head_peak(trace: Any) -> np.ndarray:
    """Largest patch weight of every map: ``(layers, heads, steps)`` (1 = one patch, 1/S = uniform)."""
    ca = trace.require_attention()  # (layers, heads, steps, H, W)
    return ca.reshape(*ca.shape[:3], -1).astype(np.float64).max(axis=-1)  # (layers, heads, steps)


def patch_edges(grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of the patch borders: rows ``(H + 1,)`` and columns ``(W + 1,)``, from 0 to the image size."""
    H, W = grid
    height, width = size
    return np.arange(H + 1) * height / H, np.arange(W + 1) * width / W  # (H + 1,), (W + 1,)


# ---------------------------------------------------------------- scales
@dataclass(frozen=True)
class Scale:
    """What a colour means in a figure; every panel of the figure uses the same :class:`Scale`.

    * ``"shared"``: the attention weight of a patch, 0 to ``vmax`` (the largest
      patch weight in the figure), the same for every panel: panels compare at a glance.
    * ``"panel"``: each panel from 0 to its own peak (a panel's brightest patch
      is always the top colour; print the peak beside it).
    * ``"uniform"``: the weight relative to ``1/S`` (an even spread over the
      ``S`` patches), on a log scale from ``2**-k`` to ``2**k``: "no preference"
      is 1, the middle colour, flat over the whole image.

    :meth:`values` maps patch weights to the numbers that are coloured;
    ``limits`` are those numbers' colour range.
    """

    kind: str
    vmax: float  # "shared": the top of the scale (patch weight); "uniform": 2**k; "panel": 1
    patches: int  # S = H * W
    quantity: str = "attention weight"  # what a map's numbers are (an explanation's: "share of relevance", ...)

    @property
    def limits(self) -> tuple[float, float]:
        if self.kind == "uniform":
            k = math.log2(self.vmax)
            return -k, k
        return 0.0, self.vmax

    def values(self, amap: np.ndarray, peak: float | None = None) -> np.ndarray:
        """Patch weights (any shape) -> the numbers to colour, float32 (fast to draw).

        ``peak``: for ``"panel"``, the panel's own peak patch weight (default: ``amap.max()``).
        """
        if self.kind == "shared":
            return np.asarray(amap, dtype=np.float32)
        if self.kind == "panel":
            top = float(np.max(amap)) if peak is None else float(peak)
            return (np.asarray(amap) / top if top > 0 else np.asarray(amap)).astype(np.float32)
        lo, hi = self.limits
        ratio = np.maximum(np.asarray(amap, dtype=np.float64) * self.patches, 2.0**lo)
        return np.clip(np.log2(ratio), lo, hi).astype(np.float32)

    @property
    def label(self) -> str:
        """The colour bar's label: what a colour reads as."""
        if self.kind == "shared":
            return f"{self.quantity} of a patch"
        if self.kind == "panel":
            return "fraction of the panel's own peak"
        what = "weight" if self.quantity == "attention weight" else self.quantity
        return f"{what} / uniform (1/{self.patches}), log scale"

    def ticks(self) -> tuple[list[float], list[str]] | None:
        """Colour-bar ticks of the ``"uniform"`` scale: positions (log2 units) and labels (``1/4``, ``1x``, ``4x``).

        ``None`` for the linear scales (any plotting library's own ticks are right there).
        """
        if self.kind != "uniform":
            return None
        lo, hi = (int(v) for v in self.limits)
        step = max(1, math.ceil((hi - lo) / 8))
        positions = [e for e in range(lo, hi + 1) if e % step == 0]
        return [float(e) for e in positions], [f"{2**e:g}x" if e >= 0 else f"1/{2**-e:g}" for e in positions]


def build_scale(kind: str, maps: Sequence[np.ndarray], patches: int, quantity: str = "attention weight") -> Scale:
    """The :class:`Scale` of ``kind`` for a figure that draws ``maps`` (patch maps, any shapes) over ``patches``
    patches; ``quantity`` names the numbers (see :func:`quantity`)."""
    if kind not in SCALES:
        raise AttnlabError(f"scale={kind!r} is not supported: use 'shared', 'panel' or 'uniform'")
    if kind == "panel":
        return Scale("panel", 1.0, patches, quantity)
    peak = max((float(np.max(m)) for m in maps), default=0.0)
    if kind == "shared":
        return Scale("shared", peak if peak > 0 else 1.0, patches, quantity)
    k = max(1, math.ceil(math.log2(max(peak * patches, 2.0)) - 1e-9))  # the strongest map reaches the top colour
    return Scale("uniform", float(2**k), patches, quantity)


def figure_maps(
    trace: Any,
    panels: Sequence[tuple[int, int, int | str | None]],
    scale: str = "shared",
    smooth: float = 0.0,
    interp: str = "bilinear",
) -> tuple[list[np.ndarray], list[float], Scale]:
    """Everything a figure needs to colour its panels, one panel per ``(step, layer, head)`` (head ``None`` = mean).

    Returns the values to colour (``(H, W)`` flat patches for ``interp="nearest"``,
    else ``(height, width)``), each map's peak patch weight, and the figure's
    :class:`Scale` (built from all panels together).
    """
    grids = [grid_map(trace, t, li, "mean" if h is None else h, smooth) for t, li, h in panels]  # each (H, W)
    sc = build_scale(scale, grids, int(trace.grid[0] * trace.grid[1]), quantity(trace))
    peaks = [float(g.max()) for g in grids]
    size = trace.image.shape[:2]
    values = [sc.values(g if interp == "nearest" else resize(g, size, interp), peak) for g, peak in zip(grids, peaks)]
    return values, peaks, sc


# ---------------------------------------------------------------- labels
def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def layer_label(layer: int, layers: int) -> str:
    """``"layer 2 (3rd of 3, last)"``: the index to pass as ``layer=``, and where it sits in the decoder."""
    last = ", last" if layer == layers - 1 else ""
    return f"layer {layer} ({_ordinal(layer + 1)} of {layers}{last})"


def head_label(head: int | None, heads: int) -> str:
    """``"head 3"`` or ``"mean of 8 heads"``."""
    return f"mean of {heads} heads" if head is None else f"head {head}"


def explanation_label(trace: Any) -> str | None:
    """The method's name of an explanation trace (:func:`attnlab.explain`), e.g. ``"rollout"``; ``None`` for attention."""
    meta = getattr(trace, "meta", None) or {}
    return str(meta.get("method_label", meta["method"])) if meta.get("method") else None


def source_label(trace: Any, layer: int, head: int | None) -> str:
    """What a map shows: ``"layer 2 (3rd of 3, last) \u00b7 mean of 4 heads"``, or an explanation's method name."""
    return explanation_label(trace) or f"{layer_label(layer, trace.num_layers)} \u00b7 {head_label(head, trace.num_heads)}"


def quantity(trace: Any) -> str:
    """What the numbers of ``trace``'s maps are: ``"attention weight"``, or an explanation's (``"share of relevance"``)."""
    meta = getattr(trace, "meta", None) or {}
    return str(meta.get("quantity", "attention weight"))


def word_label(trace: Any, step: int, probabilities: np.ndarray | None = None) -> str:
    """``"red (p=0.98)"``: the word and the probability the model gave it (just the word when the trace has no scores)."""
    word = trace.words[step]
    if probabilities is None:
        return word
    return f"{word} (p={float(probabilities[step]):.2f})"
