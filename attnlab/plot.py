"""Static views of a :class:`~attnlab.trace.CaptionTrace`: where the model looked for each word.

Every view takes a trace plus keyword options, checks its inputs first (raising
:class:`~attnlab.errors.AttnlabError` with a one-line message saying what to do),
then draws and returns a :class:`matplotlib.figure.Figure`.

Common options (where they make sense for the view):

* ``layer``: decoder layer, ``-1`` = last (negative counts from the end).
* ``head``: ``"mean"`` (average over heads) or a head index.
* ``words``: which decoding steps to show: ``None`` = every step except a
  trailing ``[SEP]`` end token; or a list of step indices.
* ``ax`` (single-panel views) or ``figsize``.
* ``cmap``, ``alpha`` (opacity of the attention over the image), ``smooth``
  (Gaussian sigma in grid cells, ``0`` = none).

:func:`attention_map` is the single place where a step's ``(H, W)`` patch map
becomes an image-sized map; every view and the explorer use it. The grid is
stretched over the whole image, so patch ``(r, c)`` covers rows
``[r * height / H, (r + 1) * height / H)`` and columns
``[c * width / W, (c + 1) * width / W)``; nothing assumes ``H == W``.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import AttnlabError
from .fileio import atomic_write
from .resample import axis_matrix

END_TOKEN = "[SEP]"
UPSAMPLE_MODES = ("bilinear", "bicubic")
FIGURE_SUFFIXES = (".png", ".svg")
DEFAULT_CMAP = "inferno"
DEFAULT_ALPHA = 0.6

__all__ = [
    "attention_map",
    "overlay",
    "word_grid",
    "head_grid",
    "layer_head_grid",
    "attention_matrix",
    "head_entropy",
    "head_peak",
    "head_stats",
    "save_gif",
    "save_figure",
]


# ======================================================================
# validation
# ======================================================================
def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check_trace(trace: Any) -> np.ndarray:
    """Return ``trace.cross_attention`` ``(layers, heads, steps, H, W)`` after checking the trace."""
    ca = getattr(trace, "cross_attention", None)
    if not hasattr(trace, "words") or not hasattr(trace, "image"):
        raise AttnlabError(f"expected a CaptionTrace, got {type(trace).__name__}: pass the result of attnlab.caption")
    if ca is None:
        raise AttnlabError("this trace holds no attention: caption again with record='cross' or 'all'")
    if ca.ndim != 5 or ca.shape[0] == 0 or ca.shape[1] == 0 or ca.shape[2] == 0:
        raise AttnlabError(
            f"cross_attention has shape {tuple(ca.shape)}: expected a non-empty (layers, heads, steps, H, W) array"
        )
    image = np.asarray(trace.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise AttnlabError(f"trace.image has shape {tuple(image.shape)}: expected an RGB image (height, width, 3)")
    return ca


def _layer_index(trace: Any, layer: Any) -> int:
    n = trace.cross_attention.shape[0]
    if not _is_int(layer) or not -n <= int(layer) < n:
        raise AttnlabError(f"layer {layer!r} does not exist: the decoder has {n} layers (use 0..{n - 1} or -1 for the last)")
    return int(layer) % n


def _head_index(trace: Any, head: Any) -> int | None:
    """``None`` for ``"mean"``, else the head index (0-based)."""
    n = trace.cross_attention.shape[1]
    if isinstance(head, str) and head == "mean":
        return None
    if not _is_int(head) or not -n <= int(head) < n:
        raise AttnlabError(f"head {head!r} does not exist: the layer has {n} heads (use 0..{n - 1} or 'mean')")
    return int(head) % n


def _step_index(trace: Any, step: Any) -> int:
    n = trace.cross_attention.shape[2]
    if not _is_int(step) or not -n <= int(step) < n:
        raise AttnlabError(f"step {step!r} does not exist: the trace has {n} steps (use 0..{n - 1})")
    return int(step) % n


def default_steps(trace: Any) -> list[int]:
    """Every step except a trailing ``[SEP]`` (kept if it is the only step)."""
    n = trace.cross_attention.shape[2]
    if n > 1 and trace.words[-1] == END_TOKEN:
        return list(range(n - 1))
    return list(range(n))


def _step_list(trace: Any, words: Sequence[int] | None) -> list[int]:
    if words is None:
        return default_steps(trace)
    if isinstance(words, (str, bytes)) or not hasattr(words, "__iter__"):
        raise AttnlabError(f"words={words!r} is not a list of step indices: pass e.g. words=[0, 2, 3] or None for all")
    steps = [_step_index(trace, w) for w in words]
    if not steps:
        raise AttnlabError("words=[] selects nothing: pass at least one step index or None for all")
    return steps


def _check_alpha(alpha: Any) -> float:
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise AttnlabError(f"alpha={alpha!r} is not an opacity: use a number from 0 to 1")
    return float(alpha)


def _check_smooth(smooth: Any) -> float:
    if (
        not isinstance(smooth, numbers.Real)
        or isinstance(smooth, bool)
        or not math.isfinite(float(smooth))
        or float(smooth) < 0
    ):
        raise AttnlabError(f"smooth={smooth!r} is not a Gaussian sigma: use a number >= 0 (grid cells; 0 = none)")
    return float(smooth)


def _check_upsample(upsample: Any) -> str:
    if upsample not in UPSAMPLE_MODES:
        raise AttnlabError(f"upsample={upsample!r} is not supported: use 'bilinear' or 'bicubic'")
    return upsample


def _check_cmap(cmap: Any):
    import matplotlib

    try:
        return matplotlib.colormaps.get_cmap(cmap)
    except (KeyError, ValueError, TypeError):
        raise AttnlabError(f"cmap={cmap!r} is not a matplotlib colormap: use a name like 'inferno' or 'jet'") from None


def _check_figsize(figsize: Any, ax: Any = None) -> tuple[float, float] | None:
    if figsize is None:
        return None
    if ax is not None:
        raise AttnlabError("pass either ax or figsize, not both")
    try:
        w, h = (float(v) for v in figsize)
    except (TypeError, ValueError):
        raise AttnlabError(f"figsize={figsize!r} is not a (width, height) pair in inches: pass e.g. (6, 4)") from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise AttnlabError(f"figsize={figsize!r} must be two positive numbers (inches)")
    return (w, h)


def _check_ax(ax: Any) -> None:
    if ax is None:
        return
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise AttnlabError(f"ax={ax!r} is not a matplotlib Axes: pass one from plt.subplots() or leave it out")


def _check_positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or int(value) < 1:
        raise AttnlabError(f"{name}={value!r} must be a positive integer")
    return int(value)


# ======================================================================
# maps
# ======================================================================
def _grid_map(trace: Any, layer: int, head: int | None, step: int) -> np.ndarray:
    """Validated indices -> the step's patch map ``(H, W)`` float64."""
    ca = trace.cross_attention  # (layers, heads, steps, H, W)
    if head is None:
        return ca[layer, :, step].astype(np.float64).mean(axis=0)  # (H, W)
    return ca[layer, head, step].astype(np.float64)  # (H, W)


def _upsample(trace: Any, grid_map: np.ndarray, smooth: float, upsample: str) -> np.ndarray:
    """Patch map ``(H, W)`` -> image-sized map ``(height, width)``."""
    H, W = grid_map.shape
    height, width = trace.image.shape[:2]
    my = axis_matrix(H, height, upsample, smooth)  # (height, H)
    mx = axis_matrix(W, width, upsample, smooth)  # (width, W)
    out = my @ grid_map @ mx.T  # (height, width)
    if upsample == "bicubic":
        np.maximum(out, 0.0, out=out)  # cubic overshoot below 0 is not a weight
    return out


def attention_map(
    trace: Any,
    step: int,
    layer: int = -1,
    head: int | str = "mean",
    smooth: float = 0.0,
    upsample: str = "bilinear",
) -> np.ndarray:
    """One step's attention upsampled to the image: ``(height, width)`` float64.

    The ``(H, W)`` patch map of ``step`` (one head, or the mean over heads) is
    optionally blurred with a Gaussian of sigma ``smooth`` grid cells (the
    border reflects; the total weight is kept), then resized to the image with
    ``upsample`` = ``"bilinear"`` or ``"bicubic"`` (same sampling as
    ``torch.nn.functional.interpolate(..., align_corners=False)``; bicubic
    overshoot below 0 is clipped). Values stay in patch-weight units: a map
    with all weight on one patch peaks near 1.
    """
    _check_trace(trace)
    t = _step_index(trace, step)
    li = _layer_index(trace, layer)
    hi = _head_index(trace, head)
    sigma = _check_smooth(smooth)
    mode = _check_upsample(upsample)
    return _upsample(trace, _grid_map(trace, li, hi, t), sigma, mode)  # (height, width)


def _map_stack(trace: Any, layer: int, head: int | None, steps: Sequence[int], smooth: float) -> np.ndarray:
    """Image-sized maps of several steps: ``(len(steps), height, width)``."""
    return np.stack([_upsample(trace, _grid_map(trace, layer, head, t), smooth, "bilinear") for t in steps])


# ======================================================================
# drawing helpers (also used by the explorer)
# ======================================================================
def _word_label(trace: Any, step: int, with_prob: bool = False, probs: np.ndarray | None = None) -> str:
    word = trace.words[step]
    if not with_prob:
        return word
    p = float(trace.probabilities()[step] if probs is None else probs[step])
    return f"{word} ({p:.2f})"


def _draw_map(ax, image: np.ndarray, amap: np.ndarray, cmap, alpha: float):
    """Draw ``image`` ``(height, width, 3)`` and ``amap`` ``(height, width)`` over it on ``ax``.

    Both span data coordinates x in [0, width], y in [0, height] (y down), so a
    pixel's box is its own index range. Returns ``(image_artist, map_artist)``.
    """
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    base = ax.imshow(image, extent=extent, interpolation="nearest")
    vmax = float(amap.max())
    heat = ax.imshow(
        amap,
        extent=extent,
        cmap=cmap,
        alpha=alpha,
        vmin=0.0,
        vmax=vmax if vmax > 0 else 1.0,
        interpolation="nearest",
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return base, heat


def _new_figure(figsize, nrows: int = 1, ncols: int = 1, **kwargs):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained", **kwargs)
    return fig, axes  # axes: (nrows, ncols) array of Axes


def _panel_size(trace: Any, side: float) -> tuple[float, float]:
    """A panel ``side`` inches wide with the image's aspect ratio: (width, height)."""
    height, width = trace.image.shape[:2]
    return side, side * height / width


# ======================================================================
# views
# ======================================================================
def overlay(
    trace: Any,
    step: int,
    layer: int = -1,
    head: int | str = "mean",
    *,
    ax=None,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
    upsample: str = "bilinear",
    colorbar: bool = True,
):
    """One word's attention map over the image, with a colorbar; the title is the word."""
    _check_trace(trace)
    t = _step_index(trace, step)
    li = _layer_index(trace, layer)
    hi = _head_index(trace, head)
    a = _check_alpha(alpha)
    sigma = _check_smooth(smooth)
    mode = _check_upsample(upsample)
    cm = _check_cmap(cmap)
    _check_ax(ax)
    size = _check_figsize(figsize, ax)

    amap = _upsample(trace, _grid_map(trace, li, hi, t), sigma, mode)  # (height, width)
    if ax is None:
        pw, ph = _panel_size(trace, 4.0)
        fig, axes = _new_figure(size or (pw + 1.0, ph + 0.5))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    _, heat = _draw_map(ax, trace.image, amap, cm, a)
    ax.set_title(trace.words[t])
    if colorbar:
        fig.colorbar(heat, ax=ax, label="attention weight", shrink=0.9)
    return fig


def word_grid(
    trace: Any,
    layer: int = -1,
    head: int | str = "mean",
    *,
    words: Sequence[int] | None = None,
    ncols: int = 5,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
):
    """The classic figure: the image, then one panel per word with its map.

    Each title is the word and its probability. Every panel has its own colour
    scale (0 to the map's peak).
    """
    _check_trace(trace)
    li = _layer_index(trace, layer)
    hi = _head_index(trace, head)
    steps = _step_list(trace, words)
    ncols = _check_positive_int("ncols", ncols)
    a = _check_alpha(alpha)
    sigma = _check_smooth(smooth)
    cm = _check_cmap(cmap)
    size = _check_figsize(figsize)

    maps = _map_stack(trace, li, hi, steps, sigma)  # (n_words, height, width)
    probs = trace.probabilities()  # (steps,)
    panels = len(steps) + 1
    ncols = min(ncols, panels)
    nrows = math.ceil(panels / ncols)
    pw, ph = _panel_size(trace, 2.4)
    fig, axes = _new_figure(size or (pw * ncols, (ph + 0.35) * nrows), nrows, ncols)
    flat = axes.ravel()  # (nrows * ncols,)
    flat[0].imshow(trace.image, extent=(0, trace.image.shape[1], trace.image.shape[0], 0), interpolation="nearest")
    flat[0].set_xticks([])
    flat[0].set_yticks([])
    flat[0].set_title("image")
    for ax, t, amap in zip(flat[1:], steps, maps):
        _draw_map(ax, trace.image, amap, cm, a)
        ax.set_title(_word_label(trace, t, True, probs))
    for ax in flat[panels:]:
        ax.set_axis_off()
    head_name = "mean of heads" if hi is None else f"head {hi}"
    fig.suptitle(f"layer {li}, {head_name}")
    return fig


def head_grid(
    trace: Any,
    layer: int = -1,
    *,
    words: Sequence[int] | None = None,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
):
    """Rows = every head of ``layer`` then a last row "mean"; columns = words."""
    _check_trace(trace)
    li = _layer_index(trace, layer)
    steps = _step_list(trace, words)
    a = _check_alpha(alpha)
    sigma = _check_smooth(smooth)
    cm = _check_cmap(cmap)
    size = _check_figsize(figsize)

    n_heads = trace.cross_attention.shape[1]
    rows: list[int | None] = [*range(n_heads), None]  # head index per row, None = mean
    pw, ph = _panel_size(trace, 1.6)
    fig, axes = _new_figure(size or (pw * len(steps) + 0.6, ph * len(rows) + 0.6), len(rows), len(steps))
    for r, hi in enumerate(rows):
        maps = _map_stack(trace, li, hi, steps, sigma)  # (n_words, height, width)
        for c, (t, amap) in enumerate(zip(steps, maps)):
            ax = axes[r, c]
            _draw_map(ax, trace.image, amap, cm, a)
            if r == 0:
                ax.set_title(trace.words[t])
            if c == 0:
                ax.set_ylabel("mean" if hi is None else f"head {hi}")
    fig.suptitle(f"layer {li}: each head vs the mean of heads")
    return fig


def layer_head_grid(
    trace: Any,
    step: int,
    *,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
):
    """One word: rows = layers, columns = heads then a last column "mean"."""
    _check_trace(trace)
    t = _step_index(trace, step)
    a = _check_alpha(alpha)
    sigma = _check_smooth(smooth)
    cm = _check_cmap(cmap)
    size = _check_figsize(figsize)

    n_layers, n_heads = trace.cross_attention.shape[:2]
    cols: list[int | None] = [*range(n_heads), None]  # head index per column, None = mean
    pw, ph = _panel_size(trace, 1.6)
    fig, axes = _new_figure(size or (pw * len(cols) + 0.6, ph * n_layers + 0.8), n_layers, len(cols))
    for li in range(n_layers):
        for c, hi in enumerate(cols):
            ax = axes[li, c]
            amap = _upsample(trace, _grid_map(trace, li, hi, t), sigma, "bilinear")  # (height, width)
            _draw_map(ax, trace.image, amap, cm, a)
            if li == 0:
                ax.set_title("mean" if hi is None else f"head {hi}")
            if c == 0:
                ax.set_ylabel(f"layer {li}")
    fig.suptitle(f"step {t}: {trace.words[t]!r}")
    return fig


def _matrix(trace: Any, layer: int, head: int | None, steps: Sequence[int]) -> np.ndarray:
    """Words-to-patches weights ``(len(steps), S)``, patches in row-major (r, c) order."""
    layer_maps = trace.cross_attention[layer].astype(np.float64)  # (heads, steps, H, W)
    if head is None:
        maps = layer_maps[:, list(steps)].mean(axis=0)  # (n, H, W)
    else:
        maps = layer_maps[head, list(steps)]  # (n, H, W)
    return maps.reshape(len(steps), -1)  # (n, S)


def attention_matrix(
    trace: Any,
    layer: int = -1,
    head: int | str = "mean",
    *,
    words: Sequence[int] | None = None,
    ax=None,
    figsize=None,
    cmap=DEFAULT_CMAP,
    tick_every: int | None = None,
):
    """The whole words-to-patches matrix ``(steps, S)`` as a seaborn heatmap.

    Words on the y axis; patches on the x axis in row-major order, labelled
    ``(row, col)`` every ``tick_every`` patches (default: about 20 ticks, or
    one per grid row when that is close).
    """
    import seaborn as sns

    _check_trace(trace)
    li = _layer_index(trace, layer)
    hi = _head_index(trace, head)
    steps = _step_list(trace, words)
    cm = _check_cmap(cmap)
    _check_ax(ax)
    size = _check_figsize(figsize, ax)
    if tick_every is not None:
        tick_every = _check_positive_int("tick_every", tick_every)

    H, W = trace.grid
    S = H * W
    mat = _matrix(trace, li, hi, steps)  # (n_words, S)
    if tick_every is None:
        tick_every = max(1, math.ceil(S / 20))
        if W >= tick_every / 2 and W <= tick_every * 2:
            tick_every = W  # one tick per grid row reads best
    if ax is None:
        fig, axes = _new_figure(size or (min(16.0, 3.0 + 0.05 * S), 1.8 + 0.3 * len(steps)))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    sns.heatmap(
        mat,
        ax=ax,
        cmap=cm,
        vmin=0.0,
        cbar_kws={"label": "attention weight"},
        xticklabels=False,
        yticklabels=[f"{t}: {trace.words[t]}" for t in steps],
    )
    ticks = np.arange(0, S, tick_every)  # (n_ticks,) patch indices
    ax.set_xticks(ticks + 0.5)
    ax.set_xticklabels([f"({s // W},{s % W})" for s in ticks], rotation=90)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_xlabel(f"patch (row, col) on the {H}x{W} grid")
    ax.set_ylabel("word")
    head_name = "mean of heads" if hi is None else f"head {hi}"
    ax.set_title(f"layer {li}, {head_name}")
    return fig


def head_entropy(trace: Any) -> np.ndarray:
    """Entropy (nats) of every map: ``(layers, heads, steps)``.

    0 = all weight on one patch; ``log(H * W)`` = uniform over the image.
    """
    ca = _check_trace(trace)  # (layers, heads, steps, H, W)
    p = ca.reshape(*ca.shape[:3], -1).astype(np.float64)  # (layers, heads, steps, S)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # (layers, heads, steps, S)
    return -plogp.sum(axis=-1)  # (layers, heads, steps)


def head_peak(trace: Any) -> np.ndarray:
    """Largest patch weight of every map: ``(layers, heads, steps)`` (1 = one patch, 1/S = uniform)."""
    ca = _check_trace(trace)  # (layers, heads, steps, H, W)
    return ca.reshape(*ca.shape[:3], -1).astype(np.float64).max(axis=-1)  # (layers, heads, steps)


def head_stats(trace: Any, *, words: Sequence[int] | None = None, figsize=None, cmap="viridis"):
    """Which heads focus and which are diffuse: two heatmaps (layers x heads).

    Left: the mean over the chosen words of each map's entropy (nats; lower =
    more focused). Right: the mean peak weight (higher = more focused).
    """
    import seaborn as sns

    _check_trace(trace)
    steps = _step_list(trace, words)
    cm = _check_cmap(cmap)
    size = _check_figsize(figsize)

    entropy = head_entropy(trace)[:, :, steps].mean(axis=-1)  # (layers, heads)
    peak = head_peak(trace)[:, :, steps].mean(axis=-1)  # (layers, heads)
    n_layers, n_heads = entropy.shape
    annot = n_layers * n_heads <= 160
    fig, axes = _new_figure(size or (2.0 + 1.2 * n_heads, 1.2 + 0.5 * n_layers), 1, 2)
    S = trace.grid[0] * trace.grid[1]
    for ax, data, title, kws in (
        (axes[0, 0], entropy, f"entropy (nats; uniform = {math.log(S):.2f})", {"vmin": 0.0, "vmax": math.log(S)}),
        (axes[0, 1], peak, "peak weight", {"vmin": 0.0, "vmax": 1.0}),
    ):
        sns.heatmap(
            data,
            ax=ax,
            cmap=cm if ax is axes[0, 1] else cm.reversed(),
            annot=annot,
            fmt=".2f",
            xticklabels=[str(h) for h in range(n_heads)],
            yticklabels=[str(l) for l in range(n_layers)],
            **kws,
        )
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title)
    fig.suptitle(f"attention focus per head (mean over {len(steps)} words)")
    return fig


# ======================================================================
# export
# ======================================================================
def save_figure(fig, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write ``fig`` as PNG or SVG (chosen by the suffix), atomically; returns the path."""
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise AttnlabError(f"expected a matplotlib Figure, got {type(fig).__name__}: pass what an attnlab.plot view returned")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FIGURE_SUFFIXES:
        raise AttnlabError(f"cannot save a figure as {path.name!r}: use a .png or .svg file name")
    if path.is_dir():
        raise AttnlabError(f"{path} is a folder: give a file name ending in .png or .svg")
    kwargs = {} if dpi is None else {"dpi": dpi}
    return atomic_write(path, lambda fh: fig.savefig(fh, format=suffix[1:], **kwargs))


def save_gif(
    trace: Any,
    path: str | os.PathLike,
    layer: int = -1,
    head: int | str = "mean",
    fps: float = 2,
    *,
    words: Sequence[int] | None = None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
    figsize=None,
    dpi: float = 100,
) -> Path:
    """An animated GIF stepping through the words (one frame per word), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    _check_trace(trace)
    li = _layer_index(trace, layer)
    hi = _head_index(trace, head)
    steps = _step_list(trace, words)
    a = _check_alpha(alpha)
    sigma = _check_smooth(smooth)
    cm = _check_cmap(cmap)
    size = _check_figsize(figsize)
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not 0 < float(fps) <= 100:
        raise AttnlabError(f"fps={fps!r} is not a frame rate: use a number above 0 (at most 100)")
    if not isinstance(dpi, numbers.Real) or isinstance(dpi, bool) or not 10 <= float(dpi) <= 1000:
        raise AttnlabError(f"dpi={dpi!r} is out of range: use a number from 10 to 1000")
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise AttnlabError(f"cannot save an animation as {path.name!r}: use a file name ending in .gif")

    maps = _map_stack(trace, li, hi, steps, sigma)  # (n_words, height, width)
    probs = trace.probabilities()  # (steps,)
    pw, ph = _panel_size(trace, 4.0)
    fig = Figure(figsize=size or (pw + 1.2, ph + 0.6), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _, heat = _draw_map(ax, trace.image, maps[0], cm, a)
    fig.colorbar(heat, ax=ax, label="attention weight", shrink=0.9)
    def label(i: int, t: int) -> str:
        return f"{i + 1}/{len(steps)}  {_word_label(trace, t, True, probs)}"

    title = ax.set_title(label(0, steps[0]))
    canvas.draw()  # lay out once, with a title in place
    fig.set_layout_engine("none")  # then keep that layout: frames must not jump
    frames = []
    for i, (t, amap) in enumerate(zip(steps, maps)):
        vmax = float(amap.max())
        heat.set_data(amap)
        heat.set_clim(0.0, vmax if vmax > 0 else 1.0)
        title.set_text(label(i, t))
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())  # (fig_h_px, fig_w_px, 4)
        frames.append(Image.fromarray(rgba[..., :3].copy()))

    duration = int(round(1000.0 / float(fps)))
    return atomic_write(
        path,
        lambda fh: frames[0].save(
            fh, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0
        ),
    )
