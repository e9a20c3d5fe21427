"""A static explorer: one self-contained HTML file per trace (no kernel, no network, no external scripts).

The page holds the image the model saw (a PNG data URL), every words-to-patches
map of the trace as numbers (16-bit, ``round(weight * 65535)``; the error is at
most ``1 / 131070`` of a patch weight) and a small script that colours them in
the browser: a word slider (arrow keys move it), layer and head pickers, the
colour scale (shared / panel / uniform, as in :mod:`attnlab.plot.views`),
flat patches or bilinear, opacity, and what lies under the map (the photo in
grey, the default, so no object colour reads as attention; in colour; none),
with optional object outlines. A Content-Security-Policy in the page
forbids every network request. Made for homework reports and static notebook
viewers, where no Python runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AttnlabError
from ..fileio import atomic_create, atomic_write
from . import maps
from . import multiview
from .draw import CUT_NOTE, check_underlay, MAX_PANEL_ASPECT, UNDERLAYS, stretch_note
from .export import check_output_path
from .html_page import PAGE, SCRIPT
from .html_views_page import VIEWS_SCRIPT
from .maps import check_interp
from .resolve import DEFAULT_ALPHA, DEFAULT_CMAP, DEFAULT_UNIFORM_CMAP, by_word, check_alpha, check_cmap, check_count, resolve

HTML_SUFFIXES = (".html", ".htm")
FORMAT = "attnlab-html"
VERSION = 1
QUANT = 65535  # weights are stored as round(weight * QUANT) in uint16
MAX_ATTENTION_NUMBERS = 20_000_000  # 40 MB of maps: beyond that, pass fewer layers (a browser page is not a data set)

__all__ = ["export_html"]


def _png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _lut(cmap) -> str:
    """256 colours of ``cmap`` as a hex string of RGB bytes (768 bytes)."""
    rgb = (np.asarray(cmap(np.linspace(0.0, 1.0, 256)))[:, :3] * 255.0 + 0.5).astype(np.uint8)  # (256, 3)
    return rgb.tobytes().hex()


def _display_size(image_size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """``(width, height)`` in CSS pixels of the picture: long side ``long_side``, aspect at most ``MAX_PANEL_ASPECT``."""
    height, width = image_size
    ratio = min(max(height / width, 1.0 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
    if ratio >= 1:
        return max(1, round(long_side / ratio)), long_side
    return long_side, max(1, round(long_side * ratio))


def _outline_pixels(masks, size: tuple[int, int]) -> str:
    """The border pixels of every mask, stretched to ``size`` = (height, width), as a base64 bitmap (1 byte per pixel)."""
    from .maps import resize

    height, width = size
    edge = np.zeros((height, width), dtype=np.uint8)  # (height, width)
    for mask in masks:
        inside = resize(mask.astype(np.float64), size, "nearest") > 0.5  # (height, width)
        padded = np.pad(inside, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        edge |= (inside & ~interior).astype(np.uint8)
    return base64.b64encode(edge.tobytes()).decode("ascii")


def _payload(trace: Any, r, long_side: int, cmap) -> dict:
    ca = trace.require_attention()  # (layers, heads, steps, H, W)
    if ca.size > MAX_ATTENTION_NUMBERS:
        raise AttnlabError(
            f"the trace holds {ca.size:,} attention weights, too many for one page (at most {MAX_ATTENTION_NUMBERS:,}): "
            "export a shorter caption"
        )
    quantised = np.rint(np.clip(ca.astype(np.float64), 0.0, 1.0) * QUANT).astype("<u2")  # (layers, heads, steps, H, W)
    probs = r.probabilities()
    import matplotlib

    sequential = cmap if r.scale != "uniform" else matplotlib.colormaps.get_cmap(DEFAULT_CMAP)
    diverging = cmap if r.scale == "uniform" else matplotlib.colormaps.get_cmap(DEFAULT_UNIFORM_CMAP)
    width, height = _display_size(r.image_size, long_side)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": str(trace.model_name),
        "caption": str(trace.caption),
        "words": list(trace.words),
        "wordLabels": [maps.word_label(trace, t, probs) for t in range(trace.steps)],
        "probabilities": None if probs is None else [round(float(p), 4) for p in probs],
        "layers": r.layers,
        "heads": r.heads,
        "steps": trace.steps,
        "grid": list(trace.grid),
        "imageSize": list(r.image_size),
        "display": [width, height],
        "stretched": stretch_note(r.image_size),
        "layerLabels": [maps.explanation_label(trace) or maps.layer_label(i, r.layers) for i in range(r.layers)],
        "method": maps.explanation_label(trace),
        "underlays": UNDERLAYS,
        "outlines": _outline_pixels(r.outlines, r.image_size) if r.outlines else None,
        "outlineCount": len(r.outlines),
        "quant": QUANT,
        "attention": base64.b64encode(quantised.tobytes()).decode("ascii"),
        "lut": {"sequential": _lut(sequential), "diverging": _lut(diverging)},
        "labels": {kind: maps.Scale(kind, 2.0, r.patches, maps.quantity(trace)).label for kind in maps.SCALES},
        "start": {
            "step": r.step,
            "layer": r.layer,
            "head": "mean" if r.head is None else r.head,
            "scale": r.scale,
            "interp": "nearest" if r.interp == "nearest" else "bilinear",
            "alpha": r.alpha,
            "gridLines": r.grid_lines,
            "underlay": r.underlay,
        },
    }


def _with_mean(a: np.ndarray) -> list[float]:
    """``(layers, heads, steps)`` -> ``(layers, heads + 1, steps)`` (the mean over heads last), flat, 6 decimals."""
    a = np.asarray(a, dtype=np.float64)
    both = np.concatenate([a, a.mean(axis=1, keepdims=True)], axis=1)  # (layers, heads + 1, steps)
    return [round(float(x), 6) for x in both.ravel()]


def _views_payload(trace: Any, start: dict, long_side: int, cmap) -> dict:
    """The page's data for a trace with several views: each view's maps (16-bit, as :func:`_payload`'s), box and
    grid, its share and off-photo share per layer, head (and their mean) and step, every other kind's share."""
    size = tuple(np.asarray(trace.image).shape[:2])
    arrays = [np.asarray(trace.view_attention(i)) for i in range(len(trace.views))]  # each (layers, heads, steps, h, w)
    if sum(a.size for a in arrays) > MAX_ATTENTION_NUMBERS:
        raise AttnlabError(f"the trace's views hold more than {MAX_ATTENTION_NUMBERS:,} attention weights, too many for one page: "
                           "export a shorter caption")
    layers, heads = arrays[0].shape[:2]
    views = []
    for view, a in zip(trace.views, arrays):
        inside = multiview.inside_fraction(a.shape[-2:], view.box, size)  # (h, w)
        views.append({"name": str(view.name), "grid": [int(g) for g in a.shape[-2:]], "box": [float(v) for v in view.box],
                      "attention": base64.b64encode(np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * QUANT).astype("<u2").tobytes()).decode("ascii"),
                      "share": _with_mean(a.sum(axis=(-2, -1))), "off": _with_mean((a * (1.0 - inside)).sum(axis=(-2, -1)))})
    probs = trace.probabilities()
    return {
        "format": FORMAT, "version": VERSION, "model": str(trace.model_name), "caption": str(trace.caption),
        "words": list(trace.words), "wordLabels": [maps.word_label(trace, t, probs) for t in range(len(trace.words))],
        "layers": layers, "heads": heads, "steps": len(trace.words), "imageSize": list(size),
        "display": list(_display_size(size, long_side)), "views": views,
        "groups": multiview.place_views(trace.views, size),
        "shares": {str(k): _with_mean(v) for k, v in (getattr(trace, "key_shares", None) or {}).items()},
        "sinkLines": multiview.sink_lines(trace),  # [layer][head, then the mean]: the figures' sink line
        "manyViews": multiview.MANY_VIEWS,  # the shares line gives the number of views beyond this many
        "layerLabels": [maps.layer_label(i, layers) for i in range(layers)], "underlays": UNDERLAYS, "quant": QUANT,
        "lut": _lut(cmap), "label": f"{maps.quantity(trace)} of a patch", "start": start,
    }


def _views_start(trace: Any, step, layer, head, scale, interp, grid_lines, alpha, underlay, outlines) -> dict:
    """The first state of a multi-view page, checked (one line for what such a page cannot draw)."""
    if scale != "shared" or grid_lines or outlines is not None:
        raise AttnlabError("a trace with several views is drawn with one shared scale, no patch grid and no outlines: "
                           "leave scale, grid_lines and outlines out")
    t, li, hi = multiview.check_view_args(trace, 0 if step is None else step, layer, head)
    return {"step": t, "layer": li, "head": "mean" if hi is None else hi,
            "interp": "nearest" if check_interp(interp) == "nearest" else "bilinear",
            "alpha": check_alpha(alpha), "underlay": check_underlay(underlay)}


def _check_showable(trace: Any) -> None:
    """Refuse (one line) what a page cannot show: NaN or infinite numbers (``JSON.parse`` would
    fail and leave the page blank), text with a lone surrogate (not UTF-8)."""
    bad = trace.nonfinite()
    if bad:
        raise AttnlabError(f"the trace's {', '.join(bad)} hold NaN or infinite values, which a page cannot show: caption the image again")
    for text in (trace.caption, *trace.words):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise AttnlabError(f"the trace's text {ascii(text)[:60]} holds a lone surrogate, which a page cannot hold: use real characters") from None


def _json_for_script(data: dict) -> str:
    """JSON that cannot end its ``<script>`` element early (``<``, ``>``, ``&`` and line separators escaped)."""
    try:  # NaN or infinity would make the page's JSON.parse fail: a blank page
        text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise AttnlabError("the trace holds NaN or infinite values a web page cannot show: check trace.nonfinite()") from None
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@by_word
def export_html(
    trace: Any,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    layer: int = -1,
    head: int | str = "mean",
    step: int | None = None,
    scale: str = "shared",
    interp: str = "bilinear",
    grid_lines: bool = False,
    alpha: float = DEFAULT_ALPHA,
    cmap=None,
    size: int = 480,
    underlay: str = "grey",
    outlines: Any = None,
) -> Path:
    """Write one self-contained HTML explorer of ``trace`` to ``path`` (``.html``); returns the path.

    Open the file in any browser, offline: a word slider (the arrow keys move
    it), layer and head pickers, the colour scale, flat patches or bilinear,
    opacity. ``layer``, ``head``, ``step`` (default: the first word), ``scale``,
    ``interp``, ``grid_lines``, ``alpha``, ``cmap`` and ``underlay`` (``"grey"``,
    default: the photo in grey; ``"colour"``; ``"none"``) set what it shows first;
    ``outlines``: boolean object masks outlined on the page (e.g. :func:`attnlab.shapes.outlines`);
    ``size`` is the picture's long side in CSS pixels. An existing file is
    never replaced unless ``overwrite=True``; the file appears complete or not at all.
    """
    long_side = check_count("size", size, allow_none=False)
    if not 64 <= long_side <= 4000:
        raise AttnlabError(f"size={size!r} is out of range: use a number of pixels from 64 to 4000")
    if not isinstance(overwrite, bool):
        raise AttnlabError(f"overwrite={overwrite!r} must be True or False")
    path = check_output_path(path, HTML_SUFFIXES, "a web page")
    if not overwrite and os.path.lexists(path):
        raise AttnlabError(f"{path} already exists: choose another name, or pass overwrite=True to replace it")

    if multiview.is_multiview(trace):  # several views of the image: each at its box on the photo, shares printed
        _check_showable(trace)
        start = _views_start(trace, step, layer, head, scale, interp, grid_lines, alpha, underlay, outlines)
        data, script = _views_payload(trace, start, long_side, check_cmap(cmap, "shared")), VIEWS_SCRIPT
    else:
        r = resolve(trace, layer=layer, head=head, scale=scale, interp=interp, grid_lines=grid_lines, alpha=alpha,
                    cmap=cmap, underlay=underlay, outlines=outlines)
        r = replace(r, step=maps.default_steps(trace)[0] if step is None else trace.check_step(step))
        _check_showable(trace)
        data, script = _payload(trace, r, long_side, r.cmap), SCRIPT
    page = PAGE.format(
        title=html.escape(f"attnlab: {trace.caption or ' '.join(trace.words)}"),
        caption=html.escape((trace.caption or " ".join(trace.words)) + (CUT_NOTE if getattr(trace, "stopped", None) == "max_len" else "")),
        image=_png_data_url(trace.image),
        data=_json_for_script(data),
        script=script,
    ).encode("utf-8")
    try:
        if overwrite:
            return atomic_write(path, lambda fh: fh.write(page))
        return atomic_create(path, lambda fh: fh.write(page))
    except FileExistsError:
        raise AttnlabError(f"{path} already exists: choose another name, or pass overwrite=True to replace it") from None
    except OSError as exc:
        raise AttnlabError(f"cannot write {path} ({exc.strerror or type(exc).__name__}): choose a folder you can write to") from None
