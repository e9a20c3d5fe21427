"""Figures of a ViT encoder's self-attention (traces recorded with ``record="all"``).

* :func:`cls_vs_words`: the class token's row of the encoder's self-attention
  (what a classifier built on the CLS token reads) next to each word's
  cross-attention row (what the captioner reads for that word), on one shared
  colour scale.
* :func:`patch_attention`: what one patch attends to in one encoder layer.
* :func:`rollout_map`: attention rollout through all encoder layers, from the
  class token or from a patch (:func:`attnlab.rollout.rollout`).

Conventions of :mod:`attnlab.plot`: inputs are checked first (one-line
:class:`~attnlab.errors.AttnlabError`), then the figure is drawn and returned.
Maps show raw weights on the patches; what a row puts on the prefix tokens
(class token, registers) is not drawn on the image and is printed in the
panel's title instead, so nothing is renormalised silently. Colour bars start
at 0 and say what the colour means.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import rollout as numeric
from .errors import AttnlabError
from .plot import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    _check_alpha,
    _check_ax,
    _check_cmap,
    _check_figsize,
    _check_positive_int,
    _check_smooth,
    _is_int,
    _new_figure,
    _panel_size,
    _upsample,
    default_steps,
)

__all__ = ["cls_vs_words", "patch_attention", "rollout_map"]


def _check_image(trace: Any) -> None:
    image = np.asarray(getattr(trace, "image", None))
    if not hasattr(trace, "words") or image.ndim != 3 or image.shape[2] != 3:
        raise AttnlabError(f"expected a CaptionTrace with its image, got {type(trace).__name__}: pass the result of attnlab.caption")


def _prefix_note(prefix: np.ndarray) -> str:
    """``"40% on CLS"`` / ``"40% on CLS + registers"``: the row's weight the image does not show."""
    where = "CLS" if len(prefix) == 1 else "CLS + registers"
    return f"{prefix.sum():.0%} on {where}"


def _draw(ax, trace: Any, grid_map: np.ndarray, cmap, alpha: float, vmax: float, smooth: float):
    """Image, then the ``(h, w)`` patch map upsampled over it on a 0..``vmax`` scale; returns the map artist."""
    height, width = trace.image.shape[:2]
    extent = (0, width, height, 0)
    ax.imshow(trace.image, extent=extent, interpolation="nearest")
    amap = _upsample(trace, grid_map, smooth, "bilinear")  # (height, width)
    heat = ax.imshow(amap, extent=extent, cmap=cmap, alpha=alpha, vmin=0.0, vmax=vmax if vmax > 0 else 1.0, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return heat


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
    if not steps or not all(_is_int(t) and -len(trace.words) <= t < len(trace.words) for t in steps):
        raise AttnlabError(f"words={words!r}: pass step indices 0..{len(trace.words) - 1} (or None for all)")
    ncols = _check_positive_int("ncols", ncols)
    a, sigma, cm = _check_alpha(alpha), _check_smooth(smooth), _check_cmap(cmap)
    size = _check_figsize(figsize)

    maps = [data.cls_map, *(data.word_maps[t] for t in steps)]  # (h, w) each
    vmax = max(float(m.max()) for m in maps)  # one scale: the panels are comparable
    panels = len(maps)
    ncols = min(ncols, panels)
    nrows = -(-panels // ncols)
    pw, ph = _panel_size(trace, 2.4)
    fig, axes = _new_figure(size or (pw * ncols + 1.0, (ph + 0.55) * nrows + 0.5), nrows, ncols)
    flat = axes.ravel()
    heat = _draw(flat[0], trace, data.cls_map, cm, a, vmax, sigma)
    flat[0].set_title(f"CLS row (encoder layer {data.encoder_layer})\n{_prefix_note(data.cls_prefix)}", fontsize=10)
    for ax, t in zip(flat[1:], steps):
        _draw(ax, trace, data.word_maps[t], cm, a, vmax, sigma)
        ax.set_title(f"{trace.words[t]!r}\noverlap with CLS {data.overlap[t]:.2f}", fontsize=10)
    for ax in flat[panels:]:
        ax.set_axis_off()
    fig.colorbar(heat, ax=list(flat[:panels]), label="attention weight on a patch (one scale)", shrink=0.9)
    fig.suptitle(
        f"what a classifier reads (CLS row, same for every word) vs what the captioner reads "
        f"(word rows, decoder layer {data.decoder_layer}, mean of heads)",
        fontsize=10,
    )
    return fig


def _one_map(trace: Any, grid_map: np.ndarray, title: str, label: str, patch, ax, figsize, cmap, alpha, smooth):
    """Check the drawing options, then draw one ``(h, w)`` map over the image (``patch`` outlined) with its colour bar."""
    a, sigma, cm = _check_alpha(alpha), _check_smooth(smooth), _check_cmap(cmap)
    _check_ax(ax)
    size = _check_figsize(figsize, ax)
    if ax is None:
        pw, ph = _panel_size(trace, 4.0)
        fig, axes = _new_figure(size or (pw + 1.2, ph + 0.8))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    heat = _draw(ax, trace, grid_map, cm, a, float(grid_map.max()), sigma)
    if patch is not None:
        _mark_patch(ax, trace, patch)
    ax.set_title(title, fontsize=10)
    fig.colorbar(heat, ax=ax, label=label, shrink=0.9)
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
):
    """What patch ``(row, col)`` (outlined) attends to in encoder ``layer`` (one head or the mean)."""
    _check_image(trace)
    prefix, grid_map = numeric.patch_row(trace, patch, layer=layer, head=head)
    n_layers = numeric.encoder_attention(trace).num_layers
    note = f"; {_prefix_note(prefix)}" if len(prefix) else ""
    title = f"patch {tuple(int(p) for p in patch)} (outlined), encoder layer {int(layer) % n_layers}\n{_head_name(head)}{note}"
    return _one_map(trace, grid_map, title, "attention weight on a patch", patch, ax, figsize, cmap, alpha, smooth)


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
    return _one_map(trace, grid_map, title, "rolled-out share from a patch", patch, ax, figsize, cmap, alpha, smooth)
