"""Figures of a ViT encoder's self-attention (traces recorded with ``record="all"``).

* :func:`cls_vs_words`: the class token's row of the encoder's self-attention
  (what a classifier built on the CLS token reads) next to each word's
  cross-attention row (what the captioner reads for that word), on one shared
  colour scale.
* :func:`patch_attention`: what one patch attends to in one encoder layer.
* :func:`rollout_map`: attention rollout through all encoder layers, from the
  class token or from a patch (:func:`attnlab.rollout.rollout`).

Conventions of the other views: inputs are checked first (one-line
:class:`~attnlab.errors.AttnlabError`), then the figure is drawn and returned.
Maps show raw weights on the patches; what a row puts on the prefix tokens
(class token, registers) is not drawn on the image and is printed in the
panel's title instead, so nothing is renormalised silently. Colour bars start
at 0 and say what the colour means. ``underlay`` (``"grey"``, default;
``"colour"``; ``"none"``) says what lies under the maps, as in the other views.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import rollout as numeric
from ..errors import AttnlabError
from ..resample import axis_matrix
from ..util import is_int
from .draw import add_colorbar, check_underlay, draw_map, panel_grid, panel_size, underlay_note
from .maps import Scale, check_smooth, default_steps, resize
from .resolve import DEFAULT_ALPHA, DEFAULT_CMAP, check_alpha, check_ax, check_cmap, check_count, check_figsize, check_font_scale

__all__ = ["cls_vs_words", "patch_attention", "rollout_map"]

WEIGHT = "attention weight"


def _check_image(trace: Any) -> None:
    image = np.asarray(getattr(trace, "image", None))
    if not hasattr(trace, "words") or image.ndim != 3 or image.shape[2] != 3:
        raise AttnlabError(f"expected a CaptionTrace with its image, got {type(trace).__name__}: pass the result of attnlab.caption")


def _prefix_note(prefix: np.ndarray) -> str:
    """``"40% on CLS"`` / ``"40% on CLS + registers"``: the row's weight the image does not show."""
    where = "CLS" if len(prefix) == 1 else "CLS + registers"
    return f"{prefix.sum():.0%} on {where}"


def _over_image(trace: Any, grid_map: np.ndarray, sigma: float) -> np.ndarray:
    """A patch map ``(h, w)``, blurred by ``sigma`` grid cells, stretched bilinearly over the image: ``(height, width)``."""
    out = np.asarray(grid_map, dtype=np.float64)  # (h, w)
    if sigma > 0:
        h, w = out.shape
        out = axis_matrix(h, h, "bilinear", sigma) @ out @ axis_matrix(w, w, "bilinear", sigma).T  # (h, w)
    return resize(out, trace.image.shape[:2], "bilinear")  # (height, width)


def _scale(trace: Any, vmax: float, quantity: str) -> Scale:
    """A linear 0..``vmax`` colour scale (``vmax``: the largest patch value drawn) whose bar reads "``quantity`` of a patch"."""
    patches = int(trace.grid[0] * trace.grid[1])
    return Scale("shared", vmax if vmax > 0 else 1.0, patches, quantity)


def _mark_patch(ax, trace: Any, patch: tuple[int, int]) -> None:
    """Outline patch ``(row, col)`` of the trace's grid on ``ax`` (image coordinates)."""
    from matplotlib.patches import Rectangle

    (gh, gw), (height, width) = trace.grid, trace.image.shape[:2]
    ph, pw = height / gh, width / gw
    ax.add_patch(Rectangle((patch[1] * pw, patch[0] * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=2.5))


def cls_vs_words(
    trace: Any,
    *,
    encoder_layer: int = -1,
    decoder_layer: int = -1,
    words: Sequence[int] | None = None,
    ncols: int = 5,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
    font_scale: float = 1.0,
    underlay: str = "grey",
):
    """The CLS row of the encoder next to the word rows of the decoder, on one colour scale.

    First panel: the class token's self-attention in ``encoder_layer`` (head
    mean), the one map a classifier reads, the same for every word. Then one
    panel per word: its cross-attention in ``decoder_layer`` (head mean). Each
    title gives the share of the row on the prefix tokens (CLS panel) or the
    overlap of the word's map with the CLS map (1 = the same map, 0 = disjoint).
    ``words``: step indices (default: every step but a trailing end token).
    """
    _check_image(trace)
    data = numeric.cls_vs_words(trace, encoder_layer=encoder_layer, decoder_layer=decoder_layer)
    steps = default_steps(trace) if words is None else list(words)
    if not steps or not all(is_int(t) and -len(trace.words) <= t < len(trace.words) for t in steps):
        raise AttnlabError(f"words={words!r}: pass step indices 0..{len(trace.words) - 1} (or None for all)")
    ncols = check_count("ncols", ncols, allow_none=False)
    a, sigma, cm = check_alpha(alpha), check_smooth(smooth), check_cmap(cmap)
    size, fs, under = check_figsize(figsize), check_font_scale(font_scale), check_underlay(underlay)

    grids = [data.cls_map, *(data.word_maps[t] for t in steps)]  # (h, w) each
    images = [_over_image(trace, g, sigma) for g in grids]  # (height, width) each
    scale = _scale(trace, max(float(g.max()) for g in grids), WEIGHT)  # one scale: the panels are comparable
    panels = len(grids)
    ncols = min(ncols, panels)
    nrows = -(-panels // ncols)
    pw, ph, _ = panel_size(trace.image.shape[:2], 2.4)
    title = [
        "what a classifier reads (CLS row, the same for every word)",
        f"vs what the captioner reads (word rows, decoder layer {data.decoder_layer}, mean of heads)",
        underlay_note(under),
    ]
    layout = panel_grid(nrows, ncols, (pw, ph), font_scale=fs, title_lines=2, title=title, figsize=size)
    flat = layout.axes.ravel()
    font = layout.font
    draw_map(flat[0], trace.image, images[0], scale, cm, a, underlay=under)
    flat[0].set_title(f"CLS row (encoder layer {data.encoder_layer})\n{_prefix_note(data.cls_prefix)}", fontsize=font)
    for ax, t, values in zip(flat[1:], steps, images[1:]):
        draw_map(ax, trace.image, values, scale, cm, a, underlay=under)
        ax.set_title(f"{trace.words[t]!r}\noverlap with CLS {data.overlap[t]:.2f}", fontsize=font)
    for ax in flat[panels:]:
        ax.set_axis_off()
    add_colorbar(layout.fig, layout.cax, scale, cm, font)
    return layout.fig


def _one_map(trace: Any, grid_map: np.ndarray, title: str, label: str, patch, ax, figsize, cmap, alpha, smooth, font_scale,
             underlay):
    """Check the drawing options, then draw one ``(h, w)`` map over the image (``patch`` outlined) with its colour bar."""
    a, sigma, cm = check_alpha(alpha), check_smooth(smooth), check_cmap(cmap)
    under = check_underlay(underlay)
    title = f"{title}\n{underlay_note(under)}"
    ax, size, fs = check_ax(trace, ax), check_figsize(figsize), check_font_scale(font_scale)
    if ax is not None and size is not None:
        raise AttnlabError("pass either ax or figsize, not both")
    values = _over_image(trace, grid_map, sigma)  # (height, width)
    scale = _scale(trace, float(np.max(grid_map)), label)
    if ax is None:
        pw, ph, _ = panel_size(trace.image.shape[:2], 4.0)
        layout = panel_grid(1, 1, (pw, ph), font_scale=fs, title_lines=3, figsize=size)
        fig, ax, cax, font = layout.fig, layout.axes[0, 0], layout.cax, layout.font
    else:
        fig, cax, font = ax.figure, None, 10.0 * fs
    draw_map(ax, trace.image, values, scale, cm, a, underlay=under)
    if patch is not None:
        _mark_patch(ax, trace, patch)
    ax.set_title(title, fontsize=font)
    add_colorbar(fig, cax, scale, cm, font, ax=ax)
    return fig


def _head_name(head: int | str) -> str:
    return "mean of heads" if head == "mean" else f"head {head}"


def patch_attention(
    trace: Any,
    patch: tuple[int, int],
    *,
    layer: int = -1,
    head: int | str = "mean",
    ax=None,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
    font_scale: float = 1.0,
    underlay: str = "grey",
):
    """What patch ``(row, col)`` (outlined) attends to in encoder ``layer`` (one head or the mean)."""
    _check_image(trace)
    prefix, grid_map = numeric.patch_row(trace, patch, layer=layer, head=head)
    n_layers = numeric.encoder_attention(trace).num_layers
    note = f"; {_prefix_note(prefix)}" if len(prefix) else ""
    title = f"patch {tuple(int(p) for p in patch)} (outlined), encoder layer {int(layer) % n_layers}\n{_head_name(head)}{note}"
    return _one_map(trace, grid_map, title, WEIGHT, patch, ax, figsize, cmap, alpha, smooth, font_scale, underlay)


def rollout_map(
    trace: Any,
    query: str | tuple[int, int] = "cls",
    *,
    head: int | str = "mean",
    ax=None,
    figsize=None,
    cmap=DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    smooth: float = 0.0,
    font_scale: float = 1.0,
    underlay: str = "grey",
):
    """Attention rollout through every encoder layer, from ``"cls"`` or a patch ``(row, col)``.

    The map shows how much of the query token's final state came from each
    patch's input (Abnar & Zuidema 2020; identity added for the residual,
    rows renormalised, layers multiplied). The title gives the share that
    came from the prefix tokens.
    """
    _check_image(trace)
    prefix, grid_map = numeric.rollout_row(trace, query, head=head)
    n_layers = numeric.encoder_attention(trace).num_layers
    patch = None if isinstance(query, str) else query
    source = "CLS" if patch is None else f"patch {tuple(int(q) for q in patch)} (outlined)"
    note = f"; {_prefix_note(prefix)}" if len(prefix) else ""
    title = f"rollout of {n_layers} encoder layers ({_head_name(head)})\nfrom {source}{note}"
    return _one_map(trace, grid_map, title, "rolled-out share", patch, ax, figsize, cmap, alpha, smooth, font_scale, underlay)
