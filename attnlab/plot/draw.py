"""Drawing pieces shared by every figure and the explorer (matplotlib).

* :func:`panel_size`: a panel's size in inches for an image of any shape; very
  tall or wide images are drawn stretched to at most ``MAX_PANEL_ASPECT`` : 1
  (and the figure says so), so no figure grows without bound.
* :func:`panel_grid`: a figure with a fixed layout computed in inches: rows x
  columns of panels, room for every title line, a figure title and a colour bar
  that never overlap, scaled down to stay within ``MAX_FIGURE_INCHES``.
* :func:`draw_map`: the image and one attention map over it, in data
  coordinates = image pixels (x to the right, y down).
* :func:`underlay_image` / :func:`underlay_note`: what is drawn under a map
  (``underlay="grey"``, the default: the photo in grey, so no object colour reads
  as a colour of the map; ``"colour"``; ``"none"``: the map alone, opaque).
* :func:`draw_outlines`: object outlines (boolean masks) over a panel.
* :func:`add_colorbar`: the colour bar of a :class:`~attnlab.plot.maps.Scale`,
  labelled with what a colour reads as.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import AttnlabError
from .maps import Scale, patch_edges

MAX_PANEL_ASPECT = 4.0  # a panel is at most 4 times as tall as wide (or wide as tall)
MAX_FIGURE_INCHES = (30.0, 40.0)  # width, height of a default figure: 3000 x 4000 px at 100 dpi
BASE_FONT = 10.0  # points, at font_scale 1
MIN_COLORBAR_INCHES = 2.7  # at font_scale 1: the longest colour-bar label fits along the bar
UNDERLAYS = {  # what is drawn under a map, and how the figure says so
    "grey": "photo in grey under the map",
    "colour": "photo in colour under the map",
    "none": "map only, no photo",
}
DEFAULT_UNDERLAY = "grey"
OUTLINE_COLOR = "#00e5ff"  # cyan: in none of the default colour maps (inferno, RdBu_r)
CUT_NOTE = " (cut at the length limit: no end token)"  # after a caption whose trace says stopped == "max_len"
PEAK_BOX = {"boxstyle": "round,pad=0.2", "facecolor": "black", "alpha": 0.55, "linewidth": 0}

__all__ = ["BASE_FONT", "DEFAULT_UNDERLAY", "Layout", "MAX_PANEL_ASPECT", "UNDERLAYS", "add_colorbar", "check_outlines",
           "check_underlay", "draw_map", "draw_outlines", "panel_grid", "panel_size", "peak_note", "stretch_note",
           "underlay_image", "underlay_note"]


def panel_size(image_size: tuple[int, int], side: float) -> tuple[float, float, bool]:
    """``(width, height, stretched)`` in inches of a panel showing an image of ``(height, width)`` pixels.

    A square image gets ``side x side``; other shapes keep their aspect ratio
    with the long side growing up to ``2 * side`` (so wide images get wide
    panels). Beyond ``MAX_PANEL_ASPECT`` : 1 the panel keeps that ratio and
    ``stretched`` is True: the image is drawn stretched so that its maps stay visible.
    """
    height, width = image_size
    ratio = height / width  # > 1: tall
    shown = min(max(ratio, 1.0 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
    long_side = side * min(2.0, math.sqrt(max(shown, 1.0 / shown)))
    if shown >= 1.0:
        return long_side / shown, long_side, shown != ratio
    return long_side, long_side * shown, shown != ratio


def stretch_note(image_size: tuple[int, int]) -> str:
    """``"image 1 x 128 px, drawn stretched"`` for images beyond ``MAX_PANEL_ASPECT``; else ``""``."""
    height, width = image_size
    if max(height / width, width / height) <= MAX_PANEL_ASPECT:
        return ""
    return f"image {width} x {height} px (w x h), drawn stretched to {MAX_PANEL_ASPECT:g}:1"


@dataclass
class Layout:
    """A figure laid out by :func:`panel_grid`: ``axes`` ``(rows, cols)`` of panels, ``cax`` the colour bar (or None)."""

    fig: Any
    axes: np.ndarray
    cax: Any
    font: float  # points: panel titles and labels
    title: Any = None  # the figure title's Text


def _text_height(font: float, lines: int) -> float:
    """Inches taken by ``lines`` lines of ``font``-point text (with line spacing)."""
    return lines * font * 1.35 / 72.0


def panel_grid(
    rows: int,
    cols: int,
    panel: tuple[float, float],
    *,
    font_scale: float = 1.0,
    title_lines: int = 1,
    titles_on_first_row_only: bool = False,
    title: Sequence[str] = (),
    row_labels: bool = False,
    colorbar: bool = True,
    figsize: tuple[float, float] | None = None,
    pyplot: bool = True,
    dpi: float | None = None,
    col_widths: Sequence[float] | None = None,
    fit_width: float | None = None,
    extra_margins: tuple[float, float] = (0.0, 0.0),
    max_size: tuple[float, float] = MAX_FIGURE_INCHES,
) -> Layout:
    """A new figure with ``rows x cols`` panels of ``panel`` = (width, height) inches, laid out in inches.

    Room is kept for ``title_lines`` of panel title above each panel (or only
    above the first row), the lines of the figure ``title`` (drawn here; the
    figure is at least as wide as its longest line; ``layout.title`` changes
    it), a row label left of each row and a colour bar on the right, so
    nothing overlaps. With
    ``figsize`` the panels are scaled to fit it (fonts keep their size);
    without, the figure keeps its natural size unless that passes
    ``MAX_FIGURE_INCHES``, then the panels shrink. ``pyplot=False`` makes a
    figure that pyplot does not manage (for files and widgets).
    ``col_widths`` gives each column its own panel width (inches) instead of ``panel[0]``.
    ``fit_width`` (inches) scales the panels so the figure has that width (its height follows).
    ``extra_margins`` = (left, bottom) inches for tick labels outside the panels.
    ``max_size`` = (width, height) inches a figure without ``figsize`` may take at most.
    """
    font = BASE_FONT * font_scale
    title_h = _text_height(font, title_lines) + 0.06 if title_lines else 0.0
    sup_h = _text_height(font * 1.1, len(title)) + 0.12 if title else 0.08
    min_width = max((len(line) for line in title), default=0) * 0.6 * font * 1.1 / 72 + 0.3
    left = (_text_height(font, 1) + 0.12 if row_labels else 0.08) + extra_margins[0]
    # the colour bar: gap, bar, gap, tick labels (about 6 characters), its label
    cbar_w = 0.15 + 0.16 + 0.06 + 6 * 0.6 * font * 0.9 / 72 + _text_height(font, 1) + 0.15 if colorbar else 0.0
    gap_x, gap_y, margin = 0.1, 0.1, 0.08
    row_titles = [title_h if (r == 0 or not titles_on_first_row_only) else 0.0 for r in range(rows)]
    widths = list(col_widths) if col_widths is not None else [panel[0]] * cols  # (cols,) inches
    fixed_w = left + (cols - 1) * gap_x + margin + cbar_w
    fixed_h = sup_h + sum(row_titles) + (rows - 1) * gap_y + margin + extra_margins[1]
    ph = panel[1]
    scale, width, height = _fit(figsize, fit_width, max_size, (fixed_w, fixed_h), widths, ph, rows, cols)
    if figsize is None:
        width = max(min_width, width)
    widths, ph = [w * scale for w in widths], ph * scale
    block_h = rows * ph + sum(row_titles[1:]) + (rows - 1) * gap_y  # first panel's top to last panel's bottom
    bar_min = MIN_COLORBAR_INCHES * font_scale  # room for the colour bar's label along it
    if colorbar and figsize is None and block_h < bar_min:
        height += bar_min - block_h  # flat panels: the figure grows, the panels stay centred
    off_x = (width - fixed_w - sum(widths)) / 2  # centre the block when figsize left room
    off_y = (height - fixed_h - rows * ph) / 2
    lefts = left + off_x + np.concatenate([[0.0], np.cumsum(np.asarray(widths) + gap_x)])  # (cols + 1,) inches

    fig = _new_figure(width, height, dpi, pyplot)
    axes = np.empty((rows, cols), dtype=object)  # (rows, cols) Axes
    top = sup_h + off_y
    for r in range(rows):
        top += row_titles[r]
        for c in range(cols):
            axes[r, c] = fig.add_axes((lefts[c] / width, 1 - (top + ph) / height, widths[c] / width, ph / height))
        top += ph + gap_y
    cax = None
    if colorbar:
        bar_h = max(min(bar_min, height - sup_h - margin), min(4.0 * font_scale, 0.8 * block_h))
        y0 = sup_h + off_y + row_titles[0] + (block_h - bar_h) / 2
        x0 = lefts[cols] - gap_x + 0.15
        cax = fig.add_axes((x0 / width, 1 - (y0 + bar_h) / height, 0.16 / width, bar_h / height), label="<colorbar>")
    text = fig.suptitle("\n".join(title), y=1 - 0.06 / height, va="top", fontsize=font * 1.1) if title else None
    return Layout(fig, axes, cax, font, text)


def _fit(
    figsize: tuple[float, float] | None,
    fit_width: float | None,
    max_size: tuple[float, float],
    fixed: tuple[float, float],
    widths: list[float],
    ph: float,
    rows: int,
    cols: int,
) -> tuple[float, float, float]:
    """(scale of the panels, figure width, figure height) inches: ``figsize`` when given, else
    the natural size (``fit_width`` wide if given) within ``max_size``; ``fixed`` = (width,
    height) inches that do not scale (labels, gaps, colour bar). Panels under 0.15 in are refused."""
    fixed_w, fixed_h = fixed
    if figsize is not None:
        width, height = figsize
        scale = min((width - fixed_w) / sum(widths), (height - fixed_h) / (rows * ph))
        if scale * min(min(widths), ph) < 0.15:
            raise AttnlabError(
                f"figsize={figsize} is too small for {rows} x {cols} panels and their labels: "
                "give a larger figsize, fewer words or a smaller font_scale"
            )
        return scale, width, height
    max_w, max_h = max_size
    wanted = 1.0 if fit_width is None else (fit_width - fixed_w) / sum(widths)
    scale = max(min(wanted, (max_w - fixed_w) / sum(widths), (max_h - fixed_h) / (rows * ph)), 0.0)
    if scale * min(min(widths), ph) < 0.15:
        raise AttnlabError(f"a width of {fit_width} inches is too small for {rows} x {cols} panels: give a larger width")
    return scale, fixed_w + sum(widths) * scale, fixed_h + rows * ph * scale


def _new_figure(width: float, height: float, dpi: float | None, pyplot: bool) -> Any:
    """A figure of ``width x height`` inches; ``pyplot=False``: one pyplot does not manage."""
    if pyplot:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=(width, height), dpi=dpi)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def draw_image(ax, image: np.ndarray):
    """Draw the RGB ``image`` ``(height, width, 3)`` filling ``ax``, pixel ``(i, j)`` over the box ``[j, j+1] x [i, i+1]``."""
    height, width = image.shape[:2]
    base = ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", aspect="auto")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return base


def check_underlay(underlay: Any) -> str:
    """``"grey"``, ``"colour"`` or ``"none"`` (``"gray"``/``"color"`` accepted), or a one-line error."""
    value = {"gray": "grey", "color": "colour"}.get(underlay, underlay) if isinstance(underlay, str) else underlay
    if value not in UNDERLAYS:
        raise AttnlabError(f"underlay={underlay!r} is not supported: use 'grey' (photo in grey, default), 'colour' or 'none' (map only)")
    return value


def check_outlines(outlines: Any) -> tuple[np.ndarray, ...]:
    """Object masks to outline: a sequence of 2-D boolean arrays (each stretched over the whole image), or a one-line error."""
    if outlines is None:
        return ()
    if isinstance(outlines, np.ndarray) and outlines.ndim == 2:
        outlines = [outlines]
    if isinstance(outlines, (str, bytes)) or not hasattr(outlines, "__iter__"):
        raise AttnlabError(f"outlines={type(outlines).__name__} is not a list of masks: pass 2-D boolean arrays, e.g. attnlab.shapes.outlines(scene)")
    masks = []
    for m in outlines:
        mask = np.asarray(m)
        if mask.ndim != 2 or 0 in mask.shape or mask.dtype.kind not in "bui" or mask.size > 4096 * 4096:
            raise AttnlabError(f"outlines holds an array of shape {mask.shape} ({mask.dtype}): each must be a 2-D boolean mask of at most 4096 x 4096")
        masks.append(mask.astype(bool))
    return tuple(masks)


def underlay_image(image: np.ndarray, underlay: str = DEFAULT_UNDERLAY) -> np.ndarray:
    """What is drawn under a map: ``(height, width, 3)`` uint8.

    ``"grey"``: the photo's luminance (ITU-R BT.601 weights) in every channel;
    ``"colour"``: the photo as it is; ``"none"``: white (the map is then drawn opaque).
    """
    rgb = np.asarray(image)
    if underlay == "colour":
        return rgb
    if underlay == "none":
        return np.full(rgb.shape[:2] + (3,), 255, dtype=np.uint8)
    luma = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (height, width)
    return np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def underlay_note(underlay: str, outlines: int = 0, short: bool = False) -> str:
    """What a figure draws under its maps, for its title: ``"photo in grey under the map"`` (+ the outlines);
    ``short``: ``"photo in grey"`` (the explorer's narrow title)."""
    note = UNDERLAYS[underlay].replace(" under the map", "") if short else UNDERLAYS[underlay]
    if outlines:
        note += f", {outlines} outline{'s' if outlines != 1 else ''}" if short else \
            f", {outlines} object outline{'s' if outlines != 1 else ''} in cyan"
    return note


def draw_outlines(ax, masks: Sequence[np.ndarray], size: tuple[int, int]) -> list:
    """Outline each boolean mask (stretched over an image of ``size`` = (height, width) pixels) in ``OUTLINE_COLOR``."""
    height, width = size
    drawn = []
    for mask in masks:
        mh, mw = mask.shape
        if not mask.any() or mask.all():
            continue
        padded = np.pad(mask.astype(np.float64), 1)  # (mh + 2, mw + 2): a mask touching the border still closes
        xs = (np.arange(-1, mw + 1) + 0.5) * width / mw  # pixel centres, in image pixels
        ys = (np.arange(-1, mh + 1) + 0.5) * height / mh
        drawn.append(ax.contour(xs, ys, padded, levels=[0.5], colors=OUTLINE_COLOR, linewidths=1.3))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return drawn


def draw_map(
    ax,
    image: np.ndarray,
    values: np.ndarray,
    scale: Scale,
    cmap,
    alpha: float,
    *,
    grid: tuple[int, int] | None = None,
    grid_lines: bool = False,
    underlay: str = DEFAULT_UNDERLAY,
    outlines: Sequence[np.ndarray] = (),
):
    """Draw ``image`` (as ``underlay`` says) and ``values`` over it on ``ax``; returns ``(image_artist, map_artist)``.

    ``values`` (already passed through ``scale.values``) is either image-sized
    ``(height, width)`` or patch-sized ``(H, W)`` (flat patches): both are
    stretched over the whole image. ``underlay``: ``"grey"`` (default),
    ``"colour"`` or ``"none"`` (no photo: the map is drawn opaque, whatever
    ``alpha``). ``grid_lines`` draws the patch borders of ``grid`` = ``(H, W)``;
    ``outlines``: boolean masks of objects, outlined on top.
    """
    height, width = image.shape[:2]
    base = draw_image(ax, underlay_image(image, underlay))
    lo, hi = scale.limits
    heat = ax.imshow(
        values, extent=(0, width, height, 0), cmap=cmap, alpha=1.0 if underlay == "none" else alpha,
        vmin=lo, vmax=hi, interpolation="nearest", aspect="auto"
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    if grid_lines and grid is not None:
        rows, cols = patch_edges(grid, (height, width))  # (H + 1,), (W + 1,)
        style = {"colors": "white", "linewidths": 0.6, "alpha": 0.55}
        ax.hlines(rows[1:-1], 0, width, **style)
        ax.vlines(cols[1:-1], 0, height, **style)
    if outlines:
        draw_outlines(ax, outlines, (height, width))
    return base, heat


def add_colorbar(fig, cax, scale: Scale, cmap, font: float, ax=None):
    """The colour bar of ``scale`` in ``cax`` (or beside ``ax``), labelled with what a colour means."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(*scale.limits), cmap=cmap)
    bar = fig.colorbar(mappable, cax=cax) if cax is not None else fig.colorbar(mappable, ax=ax, shrink=0.9)
    ticks = scale.ticks()
    if ticks is not None:
        bar.set_ticks(ticks[0], labels=ticks[1])
    bar.ax.tick_params(labelsize=font * 0.9)
    bar.set_label(scale.label, fontsize=font)
    return bar


def peak_note(ax, peak: float, font: float):
    """The panel's own peak weight, printed in its lower-left corner (``scale="panel"``)."""
    return ax.text(0.03, 0.04, f"peak {peak:.3f}", transform=ax.transAxes, fontsize=font * 0.85, color="white",
                   ha="left", va="bottom", bbox=PEAK_BOX)


def caption_line(trace: Any, limit: int = 90) -> str:
    """The caption in quotes, cut at ``limit`` characters; a caption the length limit cut says so."""
    text = trace.caption or " ".join(w for w in trace.words if w != "[SEP]")
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    cut = getattr(trace, "stopped", None) == "max_len"
    return "\u201c" + text + "\u201d" + (CUT_NOTE if cut else "")
