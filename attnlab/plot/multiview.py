"""Figures of a trace whose image gives several views (vision-language models, issue 21).

A view (``trace.views[i]``: ``.name``, ``.grid`` ``(h, w)``, ``.box`` ``(x0, y0, x1, y1)``
on the photo, may overhang it) is drawn where its box says, clipped to the photo;
the weight of its patches that lie off the photo is printed, never dropped. A
view that overlaps views already placed (a low-resolution base/global view that
repeats the whole photo) gets its own panel. Every view's share of the word's
attention is printed on it, and the keys that are no image patch
(``trace.key_shares``: prompt, special, newline, ...) are listed in the title,
so the printed shares add up to the whole row.

* :func:`is_multiview`, :func:`view_maps`, :func:`key_share_values`,
  :func:`place_views`, :func:`shares_line`: the numbers and the placement (no matplotlib).
* :func:`sinks_text`, :func:`sink_lines`: the one sink line (:mod:`attnlab.sinks`), printed under the shares in
  every figure (``views_figure`` also outlines the sink tokens dashed).
* :func:`draw_views`: one panel (the photo and some views over it).
* :func:`views_overlay`: one word's figure (``plot.overlay`` draws it for a multi-view trace).
"""

from __future__ import annotations

import textwrap

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import AttnlabError
from ..sinks import VisionDiagnostics, diagnose_vision
from ..util import is_int
from . import maps
from .draw import add_colorbar, caption_line, check_outlines, check_underlay, draw_image, draw_outlines, panel_grid, panel_size, underlay_image, underlay_note
from .resolve import DEFAULT_ALPHA, is_multiview, check_alpha, check_cmap, check_figsize, check_font_scale

__all__ = ["MULTIVIEW_OPTIONS", "ViewMap", "check_view_args", "draw_views", "inside_fraction", "is_multiview", "key_share_values", "layer_peak", "place_views", "shares_line", "sink_lines", "sinks_text", "view_maps",
           "views_figure", "views_overlay", "views_word_grid"]

MULTIVIEW_OPTIONS = frozenset({"cmap", "alpha", "interp", "underlay", "outlines", "figsize", "font_scale"})  # what they draw
LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.6, "linewidth": 0}
BOX_COLOR = "#00e5ff"  # cyan, as the object outlines: in none of the default colour maps


@dataclass(frozen=True)
class ViewMap:
    """One view's map of one word: ``amap`` ``(h, w)`` patch weights, ``share`` their sum (of the whole row),
    ``off_photo`` the part of that weight on patch area outside the photo (drawn clipped)."""

    index: int
    name: str
    grid: tuple[int, int]
    box: tuple[float, float, float, float]
    amap: np.ndarray
    share: float
    off_photo: float
    composed: bool = False  # the view's map is composed (keys.View.composed): its name says the path


def _index(value: Any, n: int, what: str, hint: str) -> int:
    if not is_int(value) or not -n <= int(value) < n:
        raise AttnlabError(f"{what} {value!r} does not exist: the trace has {n} {what}s (use {hint})")
    return int(value) % n


def check_view_args(trace: Any, step: Any, layer: Any, head: Any) -> tuple[int, int, int | None]:
    first = np.asarray(trace.view_attention(0))  # (layers, heads, steps, h, w)
    layers, heads = first.shape[:2]
    t = trace.check_step(step)
    li = _index(layer, layers, "layer", f"0..{layers - 1} or -1 for the last")
    hi = None if isinstance(head, str) and head == "mean" else _index(head, heads, "head", f"0..{heads - 1} or 'mean'")
    return t, li, hi


def inside_fraction(grid: tuple[int, int], box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """``(h, w)``: the fraction of each patch's area (patches cover ``box`` evenly) that lies on the photo of
    ``size`` = ``(height, width)``."""
    h, w = grid
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = np.linspace(x0, x1, w + 1)  # (w + 1,) patch edges
    ys = np.linspace(y0, y1, h + 1)  # (h + 1,)
    inside_x = (np.clip(xs[1:], 0, size[1]) - np.clip(xs[:-1], 0, size[1])) / np.diff(xs)  # (w,)
    inside_y = (np.clip(ys[1:], 0, size[0]) - np.clip(ys[:-1], 0, size[0])) / np.diff(ys)  # (h,)
    return inside_y[:, None] * inside_x[None, :]  # (h, w)


def off_photo_weight(amap: np.ndarray, box: Sequence[float], size: tuple[int, int]) -> float:
    """The weight of ``amap``'s patches on area outside the photo: each patch's weight times the fraction of
    its area that overhangs."""
    return float(np.sum(amap * (1.0 - inside_fraction(amap.shape, box, size))))


def view_maps(trace: Any, step: int, layer: int = -1, head: int | str = "mean") -> list[ViewMap]:
    """Every view's map of step ``step`` at ``layer`` (one head, or the mean over heads), as the trace holds it."""
    t, li, hi = check_view_args(trace, step, layer, head)
    size = tuple(np.asarray(trace.image).shape[:2])
    out = []
    for i, view in enumerate(trace.views):
        a = np.asarray(trace.view_attention(i))[li, :, t].astype(np.float64)  # (heads, h, w)
        amap = a.mean(axis=0) if hi is None else a[hi]  # (h, w)
        box = tuple(float(v) for v in view.box)
        out.append(ViewMap(i, str(view.name), tuple(view.grid), box, amap, float(amap.sum()),
                           off_photo_weight(amap, box, size), bool(getattr(view, "composed", False))))
    return out


def key_share_values(trace: Any, step: int, layer: int = -1, head: int | str = "mean") -> dict[str, float]:
    """The weight of each kind of key that is no image patch (``trace.key_shares``), for one word, layer and head."""
    t, li, hi = check_view_args(trace, step, layer, head)
    out = {}
    for kind, arr in (getattr(trace, "key_shares", None) or {}).items():
        a = np.asarray(arr, dtype=np.float64)[li, :, t]  # (heads,)
        out[str(kind)] = float(a.mean() if hi is None else a[hi])
    return out


def layer_peak(trace: Any, layer: int = -1, head: int | str = "mean") -> float:
    """The largest patch weight of any view at any step of ``layer`` (one head, or the mean over heads): the top
    of a colour scale that means the same for every word."""
    _, li, hi = check_view_args(trace, 0, layer, head)
    peak = 0.0
    for i in range(len(trace.views)):
        a = np.asarray(trace.view_attention(i))[li].astype(np.float64)  # (heads, steps, h, w)
        peak = max(peak, float((a.mean(axis=0) if hi is None else a[hi]).max()))
    return peak if peak > 0 else 1.0


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


MANY_VIEWS = 4  # more views than this: the line gives their number, each view's share is on its box


def shares_line(vms: Sequence[ViewMap], shares: dict[str, float]) -> str:
    """``"image 62.0% (tiles 45.0% · base 17.0%) · prompt 31.0% · special 7.0%"``: where the whole row went.

    One view: just ``"image 90.0%"``; a composed view (BLIP-2) names its path: ``"image 55.0% (composed: language
    model -> 32 queries -> patches)"``; more than :data:`MANY_VIEWS` views (SmolVLM's tiles): ``"image 74.1% (13
    views, each one's share on its box)"``. Kinds are listed largest first, those with no weight at all last in
    one ``"none on ..."``; what neither the views nor the shares account for is printed as ``unaccounted``.
    """
    image = sum(v.share for v in vms)
    views = " (" + " \u00b7 ".join(f"{v.name} {_pct(v.share)}" for v in vms) + ")" if len(vms) > 1 else ""
    views = f" ({len(vms)} views, each one's share on its box)" if len(vms) > MANY_VIEWS else views
    views = f" ({vms[0].name})" if len(vms) == 1 and vms[0].composed else views
    parts = [f"image {_pct(image)}{views}"]
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    parts += [f"{k} {_pct(s)}" for k, s in ranked if s != 0]
    rest = 1.0 - image - sum(shares.values())
    if abs(rest) >= 5e-4:
        parts.append(f"unaccounted {_pct(rest)}")
    empty = [k for k, s in ranked if s == 0]
    if empty:
        parts.append("none on " + ", ".join(empty))
    return " \u00b7 ".join(parts)


def sinks_text(trace: Any, layer: int = -1, head: int | str = "mean") -> str:
    """The one sink line of ``trace`` at ``layer`` and ``head`` (``trace.diagnostics(layer, head).line()``, see
    :mod:`attnlab.sinks`): ``"sink: 3 tokens take 41% for 90% of words"`` or ``"no sink tokens"``."""
    return diagnose_vision(trace, layer, head).line()


def _mark_sinks(ax, sinks: Sequence[Any], group: Sequence[int]) -> None:
    """Each sink token of the views in ``group`` outlined dashed in white at its box (clipped by the panel)."""
    from matplotlib.patches import Rectangle

    for s in sinks:
        if s.view_index in group:
            x0, y0, x1, y1 = s.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2,
                                   linestyle="--"))


def sink_lines(trace: Any) -> list[list[str]]:
    """:func:`sinks_text` for every layer and head: ``[layer][head]``, the last head index the mean over heads
    (the static page's ``sinkLines``, printed as the figures print it)."""
    layers, heads = np.asarray(trace.view_attention(0)).shape[:2]
    words = trace.by_word()  # merged once here, not once per layer and head inside diagnose_vision
    return [[sinks_text(words, li, h) for h in [*range(heads), "mean"]] for li in range(layers)]


def _covers(a: Sequence[float], b: Sequence[float], size: tuple[int, int]) -> bool:
    """True when boxes ``a`` and ``b`` overlap by more than a pixel on the photo (clipped)."""
    limits = (size[1], size[0], size[1], size[0])  # x0, y0, x1, y1 clipped to the photo
    ax0, ay0, ax1, ay1 = (min(max(float(v), 0.0), m) for v, m in zip(a, limits))
    bx0, by0, bx1, by1 = (min(max(float(v), 0.0), m) for v, m in zip(b, limits))
    return min(ax1, bx1) - max(ax0, bx0) > 1.0 and min(ay1, by1) - max(ay0, by0) > 1.0


def place_views(views: Sequence[Any], size: tuple[int, int]) -> list[list[int]]:
    """Which views each panel draws: ``[[on the photo...], [own panel], ...]`` (view indices).

    The views with the most patches per photo pixel are placed first; a view
    whose box overlaps one already on the photo (a low-resolution base or
    global view) gets its own panel. Panels keep the views' order.
    """
    def density(i: int) -> float:
        x0, y0, x1, y1 = (float(v) for v in views[i].box)
        return views[i].grid[0] * views[i].grid[1] / max((x1 - x0) * (y1 - y0), 1e-9)

    main: list[int] = []
    alone: list[int] = []
    for i in sorted(range(len(views)), key=lambda i: (-density(i), i)):
        (alone if any(_covers(views[i].box, views[j].box, size) for j in main) else main).append(i)
    return [sorted(main)] + [[i] for i in sorted(alone)]


def _label(vm: ViewMap) -> str:
    off = f", {_pct(vm.off_photo)} off the photo" if vm.off_photo >= 5e-4 else ""
    return f"{vm.name} {_pct(vm.share)}{off}"


def _draw_box(ax, vm: ViewMap, text: str, size: tuple[int, int], font: float) -> None:
    """``vm``'s box outlined in cyan (clipped by the panel) and ``text`` in its top-left corner on the photo."""
    from matplotlib.patches import Rectangle

    height, width = size
    x0, y0, x1, y1 = vm.box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOR, linewidth=1.0))
    tx, ty = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    ax.text(tx + 0.01 * width, ty + 0.01 * height, text, fontsize=font * 0.8, color="white", ha="left", va="top",
            bbox=LABEL_BOX, clip_on=True)


def draw_views(ax, image: np.ndarray, vms: Sequence[ViewMap], scale: maps.Scale, cmap, alpha: float, *,
               interp: str = "bilinear", underlay: str = "grey", font: float = 10.0) -> list:
    """Draw the photo (as ``underlay`` says) and each view's map at its box, clipped to the photo, outlined in cyan,
    its share printed in its top-left corner; returns the map artists (one per view)."""
    height, width = image.shape[:2]
    draw_image(ax, underlay_image(image, underlay))
    lo, hi = scale.limits
    heats = []
    for vm in vms:
        x0, y0, x1, y1 = vm.box
        shown = vm.amap if interp == "nearest" else maps.resize(
            vm.amap, (max(1, round(y1 - y0)), max(1, round(x1 - x0))), interp)  # (box h px, box w px)
        heats.append(ax.imshow(scale.values(shown), extent=(x0, x1, y1, y0), cmap=cmap, vmin=lo, vmax=hi,
                               alpha=1.0 if underlay == "none" else alpha, interpolation="nearest", aspect="auto"))
        _draw_box(ax, vm, _label(vm), (height, width), font)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return heats


def _panel_title(views: Sequence[ViewMap], size: tuple[int, int]) -> str:
    if len(views) == 1:
        v = views[0]
        pw, ph = (v.box[2] - v.box[0]) / v.grid[1], (v.box[3] - v.box[1]) / v.grid[0]
        return f"view {v.name!r} ({v.grid[0]} x {v.grid[1]} patches of {pw:.3g} x {ph:.3g} px): {_pct(v.share)}"
    patches = sum(v.grid[0] * v.grid[1] for v in views)
    return f"{len(views)} views on the photo ({patches} patches): {_pct(sum(v.share for v in views))}"


def views_overlay(trace: Any, step: int, layer: int = -1, head: int | str = "mean", *, colorbar: bool = True,
                  cmap=None, alpha: float | None = None, interp: str = "bilinear", underlay: str = "grey",
                  outlines=None, figsize=None, font_scale: float = 1.0, ax=None, **other: Any):
    """One word's attention over every view of a multi-view trace: the views on the photo where their boxes
    say, each overlapping (base/global) view in its own panel, one shared colour scale (attention weight of a
    patch), every view's share and every other kind of key's share printed."""
    if ax is not None or other:
        name = "ax" if ax is not None else sorted(other)[0]
        raise AttnlabError(f"{name}= is not drawn for a trace with several views: leave it out (the figure "
                           f"takes {', '.join(sorted(MULTIVIEW_OPTIONS))})")
    return views_figure(trace, step, layer, head, colorbar=colorbar, cmap=cmap, alpha=alpha, interp=interp,
                        underlay=underlay, outlines=outlines, figsize=figsize, font_scale=font_scale)


def views_figure(trace: Any, step: int, layer: int = -1, head: int | str = "mean", *, colorbar: bool = True,
                 cmap=None, alpha: float | None = None, interp: str = "bilinear", underlay: str = "grey",
                 outlines=None, figsize=None, font_scale: float = 1.0, pyplot: bool = True, dpi: float | None = None,
                 vmax: float | None = None, sinks: VisionDiagnostics | None = None):
    """:func:`views_overlay`'s figure; ``pyplot=False`` (with ``dpi``): one pyplot does not manage (the
    explorer's); ``vmax``: the top of the colour scale (default: the word's own largest patch weight);
    ``sinks``: ``trace.diagnostics(layer, head)`` (computed when not given): its line is printed under the
    shares and its sink tokens are outlined dashed in white."""
    vms = view_maps(trace, step, layer, head)
    shares = key_share_values(trace, step, layer, head)
    t, li, hi = check_view_args(trace, step, layer, head)
    sinks = diagnose_vision(trace, li, head) if sinks is None else sinks
    cmap = check_cmap(cmap, "shared")
    alpha = check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
    interp, underlay, masks = maps.check_interp(interp), check_underlay(underlay), check_outlines(outlines)
    image = np.asarray(trace.image)
    size = tuple(image.shape[:2])
    groups = place_views(trace.views, size)
    scale = maps.build_scale("shared", [v.amap for v in vms], sum(v.amap.size for v in vms), maps.quantity(trace))
    if vmax is not None:
        scale = maps.Scale("shared", float(vmax), scale.patches, scale.quantity)
    first = np.asarray(trace.view_attention(0))
    where = f"{maps.layer_label(li, first.shape[0])} \u00b7 {maps.head_label(hi, first.shape[1])}"
    drawing = "flat patches" if interp == "nearest" else f"{interp} upsampling"
    n = len(vms)
    details = f"model {trace.model_name} \u00b7 {n} view{'s' if n > 1 else ''}, box{'es' if n > 1 else ''} in cyan, " \
              f"clipped to the photo \u00b7 {drawing} \u00b7 {underlay_note(underlay, len(masks))}" + (" \u00b7 sink tokens dashed" if sinks.sinks else "")
    pw, ph, _ = panel_size(size, 4.0)
    layout = panel_grid(1, len(groups), (pw, ph), font_scale=check_font_scale(font_scale), title_lines=1,
                        title=[f"step {t}: {maps.word_label(trace, t, trace.probabilities())}", where,
                               shares_line(vms, shares), sinks.line(), details],
                        colorbar=colorbar, figsize=check_figsize(figsize), pyplot=pyplot, dpi=dpi)
    for col, group in enumerate(groups):
        ax = layout.axes[0, col]
        draw_views(ax, image, [vms[i] for i in group], scale, cmap, alpha, interp=interp, underlay=underlay,
                   font=layout.font)
        _mark_sinks(ax, sinks.sinks, group)
        draw_outlines(ax, masks, size)
        ax.set_title(_panel_title([vms[i] for i in group], size), fontsize=layout.font)
    if colorbar:
        add_colorbar(layout.fig, layout.cax, scale, cmap, layout.font)
    return layout.fig


WORDS_PER_ROW = 4  # a trace whose views share one panel: its words flow into rows of this many panels


def _word_cells(words: int, groups: int) -> tuple[int, int, list[list[tuple[int, int]]]]:
    """``(rows, cols, cells)``: ``cells[k][g]`` is the ``(row, col)`` of panel group ``g`` of entry ``k``
    (entry 0 the photo, entry ``k`` word ``k - 1``). Several groups: one row per entry; one group: the
    entries flow into rows of :data:`WORDS_PER_ROW`."""
    if groups > 1:
        return words + 1, groups, [[(k, g) for g in range(groups)] for k in range(words + 1)]
    cols = min(WORDS_PER_ROW, words + 1)
    return -(-(words + 1) // cols), cols, [[divmod(k, cols)] for k in range(words + 1)]


def _chars(layout: Any, panels: Sequence[tuple[int, int]]) -> int:
    """How many characters of the layout's font fit across ``panels`` (``(row, col)`` cells side by side), at least 24."""
    width = sum(layout.axes[r, c].get_position().width for r, c in panels) * layout.fig.get_figwidth()  # inches
    return max(24, int(width * 72 / (0.6 * layout.font)))  # a character is about 0.6 em wide


def _wrapped(headings: Sequence[str], layout: Any, cells: list[list[tuple[int, int]]]) -> list[str]:
    """Each word's heading wrapped to the width of its panels (one entry's panels side by side)."""
    return [textwrap.fill(text, _chars(layout, cells[k]), break_long_words=False)
            for k, text in enumerate(headings, start=1)]


def views_word_grid(trace: Any, layer: int = -1, head: int | str = "mean", *, words: Sequence[int] | None = None,
                    cmap=None, alpha: float | None = None, interp: str = "bilinear", underlay: str = "grey",
                    outlines=None, figsize=None, font_scale: float = 1.0, pyplot: bool = True, ncols=None, **other: Any):
    """``word_grid`` of a multi-view trace: first the photo in colour with where each view lies, then each
    word's panels (as :func:`views_overlay`'s) under its word and where its whole row went. Views in several
    panels: one row per word; all views in one panel: the words flow into rows of :data:`WORDS_PER_ROW`."""
    if ncols is not None or other:
        name = "ncols" if ncols is not None else sorted(other)[0]
        raise AttnlabError(f"{name}= is not drawn for a trace with several views: leave it out (the figure "
                           f"takes words, {', '.join(sorted(MULTIVIEW_OPTIONS))})")
    steps = maps.default_steps(trace) if words is None else [trace.check_step(t) for t in words]
    if not steps:
        raise AttnlabError("words=[] selects nothing: pass at least one step index or None for all")
    rows = [view_maps(trace, t, layer, head) for t in steps]
    _, li, hi = check_view_args(trace, steps[0], layer, head)
    cmap, alpha = check_cmap(cmap, "shared"), check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
    interp, underlay, masks = maps.check_interp(interp), check_underlay(underlay), check_outlines(outlines)
    image = np.asarray(trace.image)
    size = tuple(image.shape[:2])
    groups = place_views(trace.views, size)
    scale = maps.build_scale("shared", [v.amap for vms in rows for v in vms], sum(v.amap.size for v in rows[0]),
                             maps.quantity(trace))
    first = np.asarray(trace.view_attention(0))
    pw, ph, _ = panel_size(size, 3.0)
    n_rows, n_cols, cells = _word_cells(len(steps), len(groups))
    probs = trace.probabilities()
    headings = [f"{maps.word_label(trace, t, probs)}: {shares_line(vms, key_share_values(trace, t, layer, head))}"
                for t, vms in zip(steps, rows)]
    title = [caption_line(trace), f"model {trace.model_name} \u00b7 {maps.layer_label(li, first.shape[0])} "
             f"\u00b7 {maps.head_label(hi, first.shape[1])} \u00b7 {underlay_note(underlay, len(masks))}", sinks_text(trace, li, head)]
    lines = 2
    for _ in range(3):  # room for the longest wrapped heading: wrapping depends on the panels' final width
        layout = panel_grid(n_rows, n_cols, (pw, ph), font_scale=check_font_scale(font_scale), title_lines=lines,
                            title=title, figsize=check_figsize(figsize), pyplot=pyplot)
        wrapped = _wrapped(headings, layout, cells)
        need = max(2, *(h.count("\n") + 1 for h in wrapped))
        if need <= lines:
            break
        if pyplot:  # a figure pyplot manages is closed; one it does not is dropped with its last reference
            import matplotlib.pyplot as plt

            plt.close(layout.fig)
        lines = need
    for g, group in enumerate(groups):
        ax = layout.axes[cells[0][g]]
        draw_image(ax, image)
        for i in group:
            _draw_box(ax, rows[0][i], rows[0][i].name, size, layout.font)
        draw_outlines(ax, masks, size)
        views = textwrap.shorten(_panel_title([rows[0][i] for i in group], size).rsplit(":", 1)[0], _chars(layout, [cells[0][g]]),
                                 placeholder="...")
        ax.set_title(("the photo (colour) and its views\n" if g == 0 else "\n") + views, fontsize=layout.font)
    for k, (vms, heading) in enumerate(zip(rows, wrapped), start=1):
        for g, group in enumerate(groups):
            ax = layout.axes[cells[k][g]]
            draw_views(ax, image, [vms[i] for i in group], scale, cmap, alpha, interp=interp, underlay=underlay,
                       font=layout.font)
            draw_outlines(ax, masks, size)
            ax.set_title(heading if g == 0 else " ", fontsize=layout.font, loc="left")
    for r, c in [(r, c) for r in range(n_rows) for c in range(n_cols)][len(cells) * len(groups):]:
        layout.axes[r, c].set_axis_off()  # the last row's unused panels
    add_colorbar(layout.fig, layout.cax, scale, cmap, layout.font)
    return layout.fig
