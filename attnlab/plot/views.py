"""The figures: one function per view; each checks its inputs, then draws and returns a matplotlib Figure.

Options shared by the views (where they make sense):

* ``layer``: decoder layer index, ``-1`` = the last; ``head``: a head index or
  ``"mean"`` (the average over heads); ``words``: the steps to show (``None`` =
  every step but a trailing ``[SEP]``).
* ``scale``: ``"shared"`` (default: one colour scale for the whole figure, its
  colour bar reads attention weight, so panels compare at a glance),
  ``"panel"`` (each panel from 0 to its own peak, printed in the panel) or
  ``"uniform"`` (weight relative to an even spread ``1/S``, log scale: "no
  preference" is the flat middle colour). See :class:`~attnlab.plot.maps.Scale`.
* ``interp``: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"`` (flat
  patches, the grid the model really saw); ``grid_lines=True`` draws the patch borders.
* ``cmap`` (default ``"inferno"``, ``"RdBu_r"`` for ``scale="uniform"``),
  ``alpha`` (opacity over the image), ``smooth`` (Gaussian sigma in patches).
* ``underlay``: what lies under each map: ``"grey"`` (default: the photo in
  grey, so a red object never reads as weight), ``"colour"`` or ``"none"``
  (the map alone, opaque); the figure's title says which. ``outlines``:
  boolean object masks drawn as cyan outlines (:func:`attnlab.shapes.outlines`).
* ``figsize`` (inches; the panels are fitted into it) and ``font_scale``
  (e.g. ``1.6`` for slides). Without ``figsize`` a figure has a bounded size
  whatever the image's shape.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import AttnlabError
from ..util import is_int
from . import maps
from .draw import (
    add_colorbar,
    caption_line,
    draw_image,
    draw_map,
    draw_outlines,
    panel_grid,
    panel_size,
    peak_note,
    stretch_note,
    underlay_note,
)
from .draw import check_outlines, check_underlay
from .multiview import is_multiview, views_overlay, views_word_grid
from .resolve import (
    by_word,
    DEFAULT_ALPHA,
    MapOptions,
    Resolved,
    check_alpha,
    check_cmap,
    check_count,
    check_figsize,
    check_font_scale,
    resolve,
)

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+: annotations only
    from typing import Unpack

ROW_WIDTH_INCHES = 13.0  # word_grid picks as many columns as fit in this width

__all__ = [
    "attention_matrix",
    "attention_row",
    "head_grid",
    "head_stats",
    "layer_head_grid",
    "matrix_row",
    "overlay",
    "word_grid",
]


# ------------------------------------------------------------------ helpers
def _panel_maps(r: Resolved, panels: Sequence[tuple[int, int, int | None]]) -> tuple[list[np.ndarray], list[float], maps.Scale]:
    return maps.figure_maps(r.trace, panels, r.scale, r.smooth, r.interp)


def _draw_panel(r: Resolved, ax, values: np.ndarray, peak: float, scale: maps.Scale, font: float):
    _, heat = draw_map(ax, r.trace.image, values, scale, r.cmap, r.alpha, grid=r.trace.grid, grid_lines=r.grid_lines,
                       underlay=r.underlay, outlines=r.outlines)
    if scale.kind == "panel":
        peak_note(ax, peak, font)
    return heat


def _needs_heads(trace: Any, view: str) -> None:
    """One line for the per-head views when ``trace`` is an explanation (one map per word, no heads)."""
    label = maps.explanation_label(trace)
    if label:
        raise AttnlabError(f"{view} shows layers and heads; an explanation ({label}) has one map per word: use word_grid, overlay or attention_matrix")


def _details(r: Resolved, *parts: str) -> str:
    """The figure's second title line: model, what is shown, grid size and drawing."""
    H, W = r.trace.grid
    drawing = "flat patches" if r.interp == "nearest" else f"{r.interp} upsampling"
    items = [f"model {r.trace.model_name}", *parts, f"{H} x {W} patches, {drawing}", underlay_note(r.underlay, len(r.outlines))]
    note = stretch_note(r.image_size)
    return " \u00b7 ".join(items + ([note] if note else []))


# -------------------------------------------------------------------- views
@by_word
def overlay(
    trace: Any,
    step: int,
    layer: int = -1,
    head: int | str = "mean",
    *,
    ax=None,
    colorbar: bool = True,
    **options: Unpack[MapOptions],
):
    """One word's attention map over the image, with its colour bar.

    The title is the word and its probability, then the layer, head and grid.
    Pass ``ax`` to draw into an existing Axes (the figure title goes into the
    Axes title then).
    """
    if is_multiview(trace):  # several views of the image: each drawn at its box, shares printed
        return views_overlay(trace, step, layer, head, ax=ax, colorbar=colorbar, **options)
    r = resolve(trace, step=step, layer=layer, head=head, ax=ax, **options)
    (values,), (peak,), sc = _panel_maps(r, [(r.step, r.layer, r.head)])
    word = maps.word_label(trace, r.step, r.probabilities())
    where = maps.source_label(trace, r.layer, r.head)
    if r.ax is None:
        pw, ph, _ = panel_size(r.image_size, 4.0)
        layout = panel_grid(1, 1, (pw, ph), font_scale=r.font_scale, title_lines=0,
                            title=[f"step {r.step}: {word}", where, _details(r)], colorbar=colorbar, figsize=r.figsize)
        fig, ax, font = layout.fig, layout.axes[0, 0], layout.font
    else:
        fig, ax, font = r.ax.figure, r.ax, 10.0 * r.font_scale
        ax.set_title(f"{word}\n{where} \u00b7 {underlay_note(r.underlay, len(r.outlines))}", fontsize=font)
        layout = None
    _draw_panel(r, ax, values, peak, sc, font)
    if colorbar:
        add_colorbar(fig, layout.cax if layout else None, sc, r.cmap, font, ax=ax)
    return fig


@by_word
def word_grid(
    trace: Any,
    layer: int = -1,
    head: int | str = "mean",
    *,
    words: Sequence[int] | None = None,
    ncols: int | None = None,
    pyplot: bool = True,
    **options: Unpack[MapOptions],
):
    """The classic figure: the caption on top, the image, then one panel per word with its map.

    Each panel title is the word and its probability (``p=``). By default all
    panels share one colour scale (the colour bar reads attention weight), so
    a word that attends weakly looks weak. ``ncols=None`` picks the number of
    columns from the image's shape. ``pyplot=False`` gives a figure that pyplot does not
    manage (for files: no backend is touched).
    """
    if is_multiview(trace):  # several views: a row per word, each view at its box, shares above the row
        return views_word_grid(trace, layer, head, words=words, ncols=ncols, pyplot=pyplot, **options)
    r = resolve(trace, layer=layer, head=head, words=words, ncols=ncols, **options)
    shown, peaks, sc = _panel_maps(r, [(t, r.layer, r.head) for t in r.steps])
    probs = r.probabilities()
    panels = len(r.steps) + 1
    pw, ph, _ = panel_size(r.image_size, 2.4)
    cols = min(panels, r.ncols or max(1, round(ROW_WIDTH_INCHES / (pw + 0.1))))
    rows = math.ceil(panels / cols)
    title = [caption_line(trace), _details(r, maps.source_label(trace, r.layer, r.head))]
    layout = panel_grid(rows, cols, (pw, ph), font_scale=r.font_scale, title=title, figsize=r.figsize, pyplot=pyplot)
    flat = layout.axes.ravel()  # (rows * cols,)
    draw_image(flat[0], trace.image)  # the photo as the model saw it, in colour
    draw_outlines(flat[0], r.outlines, r.image_size)
    flat[0].set_title("image (colour)", fontsize=layout.font)
    for ax, t, values, peak in zip(flat[1:], r.steps, shown, peaks):
        _draw_panel(r, ax, values, peak, sc, layout.font)
        ax.set_title(maps.word_label(trace, t, probs), fontsize=layout.font)
    for ax in flat[panels:]:
        ax.set_axis_off()
    add_colorbar(layout.fig, layout.cax, sc, r.cmap, layout.font)
    return layout.fig


@by_word
def head_grid(trace: Any, layer: int = -1, *, words: Sequence[int] | None = None, **options: Unpack[MapOptions]):
    """Rows = every head of ``layer`` then a last row "mean"; columns = words."""
    _needs_heads(trace, "head_grid")
    r = resolve(trace, layer=layer, words=words, **options)
    heads: list[int | None] = [*range(r.heads), None]  # head per row, None = mean
    shown, peaks, sc = _panel_maps(r, [(t, r.layer, h) for h in heads for t in r.steps])
    pw, ph, _ = panel_size(r.image_size, 1.6)
    title = [f"{maps.layer_label(r.layer, r.layers)}: each head, and their mean (last row)", _details(r)]
    layout = panel_grid(len(heads), len(r.steps), (pw, ph), font_scale=r.font_scale, titles_on_first_row_only=True,
                        title=title, row_labels=True, figsize=r.figsize)
    probs = r.probabilities()
    for i, (ax, values, peak) in enumerate(zip(layout.axes.ravel(), shown, peaks)):
        row, col = divmod(i, len(r.steps))
        _draw_panel(r, ax, values, peak, sc, layout.font)
        if row == 0:
            ax.set_title(maps.word_label(trace, r.steps[col], probs), fontsize=layout.font)
        if col == 0:
            ax.set_ylabel("mean" if heads[row] is None else f"head {heads[row]}", fontsize=layout.font)
    add_colorbar(layout.fig, layout.cax, sc, r.cmap, layout.font)
    return layout.fig


@by_word
def layer_head_grid(trace: Any, step: int, **options: Unpack[MapOptions]):
    """One word: rows = layers (first to last), columns = heads then a last column "mean"."""
    _needs_heads(trace, "layer_head_grid")
    r = resolve(trace, step=step, **options)
    heads: list[int | None] = [*range(r.heads), None]  # head per column, None = mean
    shown, peaks, sc = _panel_maps(r, [(r.step, li, h) for li in range(r.layers) for h in heads])
    pw, ph, _ = panel_size(r.image_size, 1.6)
    word = maps.word_label(trace, r.step, r.probabilities())
    title = [f"step {r.step}: {word}, in every layer and head", _details(r)]
    layout = panel_grid(r.layers, len(heads), (pw, ph), font_scale=r.font_scale, titles_on_first_row_only=True,
                        title=title, row_labels=True, figsize=r.figsize)
    for i, (ax, values, peak) in enumerate(zip(layout.axes.ravel(), shown, peaks)):
        li, col = divmod(i, len(heads))
        _draw_panel(r, ax, values, peak, sc, layout.font)
        if li == 0:
            ax.set_title("mean" if heads[col] is None else f"head {heads[col]}", fontsize=layout.font)
        if col == 0:
            ax.set_ylabel(f"layer {li}" + (", last" if li == r.layers - 1 else ""), fontsize=layout.font)
    add_colorbar(layout.fig, layout.cax, sc, r.cmap, layout.font)
    return layout.fig


def _patch_ticks(ax, grid: tuple[int, int], tick_every: int | None, font: float, offset: float = 0.5) -> None:
    """Label the patch axis (columns of a words-to-patches matrix) with ``(row, col)``."""
    H, W = grid
    S = H * W
    if tick_every is None:
        tick_every = max(1, math.ceil(S / 20))
        if W / 2 <= tick_every <= W * 2:
            tick_every = W  # one tick per grid row reads best
    ticks = np.arange(0, S, tick_every)  # (n_ticks,) patch indices
    ax.set_xticks(ticks + offset)
    ax.set_xticklabels([f"({s // W},{s % W})" for s in ticks], rotation=90, fontsize=font * 0.8)
    ax.set_xlabel(f"patch (row, col) on the {H} x {W} grid, row by row (S = {S})", fontsize=font)


@by_word
def attention_matrix(
    trace: Any,
    layer: int = -1,
    head: int | str = "mean",
    *,
    words: Sequence[int] | None = None,
    ax=None,
    figsize=None,
    cmap=None,
    tick_every: int | None = None,
    font_scale: float = 1.0,
):
    """The words-to-patches matrix ``(words, S)`` as a seaborn heatmap.

    Words on the y axis; patches on the x axis in row-major order, labelled
    ``(row, col)`` every ``tick_every`` patches (default: about 20 ticks, or
    one per grid row when that is close). One colour scale: attention weight.
    """
    import seaborn as sns

    r = resolve(trace, layer=layer, head=head, words=words, ax=ax, figsize=figsize, cmap=cmap, font_scale=font_scale)
    tick_every = check_count("tick_every", tick_every)
    mat = maps.word_matrix(trace, r.layer, "mean" if r.head is None else r.head, r.steps)  # (n_words, S)
    font = 10.0 * r.font_scale
    if r.ax is None:
        import matplotlib.pyplot as plt

        size = r.figsize or (min(16.0, 3.0 + 0.05 * r.patches), min(30.0, 1.8 + 0.3 * len(r.steps)) * r.font_scale)
        fig, ax = plt.subplots(figsize=size, layout="constrained")
    else:
        fig, ax = r.ax.figure, r.ax
    sns.heatmap(mat, ax=ax, cmap=r.cmap, vmin=0.0, cbar_kws={"label": f"{maps.quantity(trace)} of a patch"},
                xticklabels=False, yticklabels=[f"{t}: {trace.words[t]}" for t in r.steps])
    _patch_ticks(ax, trace.grid, tick_every, font)
    ax.tick_params(axis="y", labelrotation=0, labelsize=font * 0.9)
    ax.set_ylabel("step: word", fontsize=font)
    ax.set_title(maps.source_label(trace, r.layer, r.head).replace(" \u00b7 ", ", "), fontsize=font)
    return fig


def _matrix_inputs(weights: Any, row: Any, grid: Any, image: Any, filled: Any, labels: Any):
    """Check :func:`matrix_row`'s inputs: ``(matrix (L, S) float64, (H, W), row, filled, image or None)``."""
    mat = np.asarray(weights, dtype=np.float64)  # (L, S)
    if mat.ndim != 2 or 0 in mat.shape or not np.isfinite(mat).all():
        raise AttnlabError(f"weights of shape {mat.shape} are not a finite (L, S) matrix: pass one row per query")
    L, S = mat.shape
    try:
        H, W = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise AttnlabError(f"grid={grid!r} is not (rows, cols): pass e.g. grid=(19, 19)") from None
    if H * W != S or H < 1:
        raise AttnlabError(f"grid={grid!r} has {H * W} patches but the matrix has S = {S} columns")
    filled = L if filled is None else filled
    if not is_int(filled) or not 1 <= int(filled) <= L:
        raise AttnlabError(f"filled={filled!r} must be a number of rows from 1 to {L}")
    if not is_int(row) or not 0 <= int(row) < int(filled):
        raise AttnlabError(f"row={row!r} does not exist: use 0..{int(filled) - 1} (the filled rows)")
    if labels is not None and len(labels) != L:
        raise AttnlabError(f"labels has {len(labels)} names for {L} rows")
    if image is not None:
        image = np.asarray(image)  # (height, width, 3)
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape[:2]:
            raise AttnlabError(f"image has shape {image.shape}: expected an RGB image (height, width, 3)")
    return mat, (H, W), int(row), int(filled), image


def matrix_row(
    weights: Any,
    row: int,
    *,
    grid: tuple[int, int],
    image: np.ndarray | None = None,
    filled: int | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    cmap=None,
    alpha: float = DEFAULT_ALPHA,
    interp: str = "bilinear",
    figsize=None,
    font_scale: float = 1.0,
    quantity: str = "attention weight",
    underlay: str = "grey",
    outlines: Any = None,
):
    """Any ``(L, S)`` weight matrix with row ``row`` outlined, and that row as a map over the image beside it.

    Classification reads one row of q·k (the class token's); captioning needs
    every row, one per word: this view shows all of them and which one makes
    the map. ``filled``: only rows ``0..filled-1`` hold words yet (e.g. the
    128-position template at step ``t`` has ``t + 1``); the others are drawn
    grey. ``labels``: one name per row (default: the row index). One colour
    scale (attention weight, or what ``quantity`` names) serves the matrix and the map.
    """
    from matplotlib.patches import Rectangle

    mat, (H, W), row, filled, image = _matrix_inputs(weights, row, grid, image, filled, labels)  # mat: (L, S)
    L, S = mat.shape
    a, size, fs = check_alpha(alpha), check_figsize(figsize), check_font_scale(font_scale)
    mode, cm = maps.check_interp(interp), check_cmap(cmap)
    underlay, masks = check_underlay(underlay), check_outlines(outlines)
    underlay = underlay if image is not None else "none"  # no image: the map alone

    if not isinstance(quantity, str) or not quantity:
        raise AttnlabError(f"quantity={quantity!r} must name what the numbers are, e.g. 'attention weight'")
    scale = maps.build_scale("shared", [mat[:filled]], S, quantity)
    shown = np.ma.masked_array(mat, mask=np.zeros_like(mat, dtype=bool))  # (L, S)
    shown.mask[filled:] = True
    map_size = image.shape[:2] if image is not None else (H * 16, W * 16)
    pw, ph, _ = panel_size(map_size, 3.2)
    matrix_w = min(9.0, max(4.0, 0.02 * S + 2.5))  # inches: wide enough for S columns
    names = list(labels) if labels is not None else [str(i) for i in range(L)]
    font = 10.0 * fs
    margins = (max(len(n) for n in names) * 0.6 * font * 0.8 / 72 + 0.35,  # row names, then the axis label
               8 * 0.6 * font * 0.8 / 72 + 0.45)  # "(row,col)" ticks on end, then the axis label
    layout = panel_grid(1, 2, (pw, ph), col_widths=(matrix_w, pw), font_scale=fs, title_lines=2,
                        title=[title or f"one row of the {L} x {S} matrix is one map"], figsize=size, extra_margins=margins)
    fig, (ax_m, ax_i) = layout.fig, layout.axes[0]

    cmap_grey = cm.with_extremes(bad=(0.85, 0.85, 0.85))
    ax_m.imshow(shown, aspect="auto", cmap=cmap_grey, vmin=0.0, vmax=scale.vmax, interpolation="nearest",
                extent=(0, S, L, 0))
    ax_m.add_patch(Rectangle((0, row), S, 1, fill=False, edgecolor="tab:blue", linewidth=2.0, clip_on=False))
    step = max(1, math.ceil(L / 16))
    ticks = sorted({t for t in range(0, L, step) if abs(t - row) * 2 >= step} | {row})  # no label crowds the row's
    ax_m.set_yticks([t + 0.5 for t in ticks])
    ax_m.set_yticklabels([names[t] for t in ticks], fontsize=font * 0.8)
    ax_m.get_yticklabels()[ticks.index(row)].set_color("tab:blue")
    ax_m.get_yticklabels()[ticks.index(row)].set_fontweight("bold")
    _patch_ticks(ax_m, (H, W), None, font, offset=0.5)
    ax_m.set_ylabel("query row" if labels is None else "step: word", fontsize=font)
    empty = f"; rows {filled}..{L - 1} grey: no word yet" if filled < L else ""
    ax_m.set_title(f"the whole {L} x {S} weight matrix{empty}\nrow {row} outlined", fontsize=font)

    grid_row = mat[row].reshape(H, W)  # (H, W)
    backdrop = image if image is not None else np.full((*map_size, 3), 255, dtype=np.uint8)
    values = grid_row if mode == "nearest" else maps.resize(grid_row, backdrop.shape[:2], mode)
    draw_map(ax_i, backdrop, scale.values(values), scale, cm, a, grid=(H, W), underlay=underlay, outlines=masks)
    named = f"row {row} ({names[row]})" if labels is not None else f"row {row}"
    ax_i.set_title(f"{named} as a {H} x {W} map\npeak {grid_row.max():.3f} \u00b7 {underlay_note(underlay, len(masks))}",
                   fontsize=font)
    add_colorbar(fig, layout.cax, scale, cm, font)
    return fig


@by_word
def attention_row(trace: Any, step: int, layer: int = -1, head: int | str = "mean", **options: Unpack[MapOptions]):
    """Every word's row of the words-to-patches matrix ``(steps, S)``, row ``step`` outlined and drawn as its map.

    A classifier reads one row of q·k (its class token); a captioner reads
    every row, one per word. See :func:`matrix_row`. Options: ``cmap``,
    ``alpha``, ``interp``, ``figsize``, ``font_scale`` (the matrix and the map
    share one colour scale: attention weight).
    """
    ignored = sorted({"scale", "smooth", "grid_lines"} & options.keys())
    if ignored:
        raise AttnlabError(f"attention_row draws the raw weights on one shared scale: leave out {', '.join(ignored)}")
    r = resolve(trace, step=step, layer=layer, head=head, **options)
    mat = maps.word_matrix(trace, r.layer, "mean" if r.head is None else r.head)  # (steps, S)
    probs = r.probabilities()
    title = f"{maps.word_label(trace, r.step, probs)} \u00b7 {maps.source_label(trace, r.layer, r.head)} \u00b7 model {trace.model_name}"
    return matrix_row(mat, r.step, grid=trace.grid, image=trace.image, labels=[f"{t}: {w}" for t, w in enumerate(trace.words)],
                      title=title, cmap=r.cmap, alpha=r.alpha, interp=r.interp, figsize=r.figsize, font_scale=r.font_scale,
                      quantity=maps.quantity(trace), underlay=r.underlay, outlines=r.outlines)


def head_stats(trace: Any, *, words: Sequence[int] | None = None, figsize=None, cmap="viridis", font_scale: float = 1.0):
    """Which heads focus and which are diffuse: two heatmaps (layers x heads).

    Left: the mean over the chosen words of each map's entropy (nats; lower =
    more focused, ``log S`` = uniform). Right: the mean peak weight (higher =
    more focused, 1 = one patch).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _needs_heads(trace, "head_stats")
    r = resolve(trace, words=words, figsize=figsize, cmap=cmap, font_scale=font_scale)
    entropy = maps.head_entropy(trace)[:, :, r.steps].mean(axis=-1)  # (layers, heads)
    peak = maps.head_peak(trace)[:, :, r.steps].mean(axis=-1)  # (layers, heads)
    n_layers, n_heads = entropy.shape
    font = 10.0 * r.font_scale
    size = r.figsize or (min(30.0, (2.0 + 1.2 * n_heads) * r.font_scale), min(30.0, (1.4 + 0.5 * n_layers) * r.font_scale))
    fig, axes = plt.subplots(1, 2, figsize=size, layout="constrained")
    S = r.patches
    for ax, data, title, kws, cm in (
        (axes[0], entropy, f"entropy (nats; uniform = {math.log(S):.2f})", {"vmin": 0.0, "vmax": math.log(S)}, r.cmap.reversed()),
        (axes[1], peak, "peak weight (1 = one patch)", {"vmin": 0.0, "vmax": 1.0}, r.cmap),
    ):
        sns.heatmap(data, ax=ax, cmap=cm, annot=n_layers * n_heads <= 160, fmt=".2f",
                    annot_kws={"fontsize": font * 0.8},
                    xticklabels=[str(h) for h in range(n_heads)], yticklabels=[str(l) for l in range(n_layers)], **kws)
        ax.set_xlabel("head", fontsize=font)
        ax.set_ylabel("layer", fontsize=font)
        ax.set_title(title, fontsize=font)
    fig.suptitle(f"attention focus per head (mean over {len(r.steps)} words)", fontsize=font * 1.1)
    return fig
