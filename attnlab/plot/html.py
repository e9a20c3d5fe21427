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
from .draw import CUT_NOTE, MAX_PANEL_ASPECT, UNDERLAYS, stretch_note
from .export import check_output_path
from .resolve import DEFAULT_ALPHA, DEFAULT_CMAP, DEFAULT_UNIFORM_CMAP, by_word, check_count, resolve

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
    r = resolve(trace, layer=layer, head=head, scale=scale, interp=interp, grid_lines=grid_lines, alpha=alpha, cmap=cmap,
                underlay=underlay, outlines=outlines)
    r = replace(r, step=maps.default_steps(trace)[0] if step is None else trace.check_step(step))
    long_side = check_count("size", size, allow_none=False)
    if not 64 <= long_side <= 4000:
        raise AttnlabError(f"size={size!r} is out of range: use a number of pixels from 64 to 4000")
    if not isinstance(overwrite, bool):
        raise AttnlabError(f"overwrite={overwrite!r} must be True or False")
    path = check_output_path(path, HTML_SUFFIXES, "a web page")
    if not overwrite and os.path.lexists(path):
        raise AttnlabError(f"{path} already exists: choose another name, or pass overwrite=True to replace it")

    _check_showable(trace)
    page = PAGE.format(
        title=html.escape(f"attnlab: {trace.caption or ' '.join(trace.words)}"),
        caption=html.escape((trace.caption or " ".join(trace.words)) + (CUT_NOTE if getattr(trace, "stopped", None) == "max_len" else "")),
        image=_png_data_url(trace.image),
        data=_json_for_script(_payload(trace, r, long_side, r.cmap)),
        script=SCRIPT,
    ).encode("utf-8")
    try:
        if overwrite:
            return atomic_write(path, lambda fh: fh.write(page))
        return atomic_create(path, lambda fh: fh.write(page))
    except FileExistsError:
        raise AttnlabError(f"{path} already exists: choose another name, or pass overwrite=True to replace it") from None
    except OSError as exc:
        raise AttnlabError(f"cannot write {path} ({exc.strerror or type(exc).__name__}): choose a folder you can write to") from None


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="attnlab">
<title>{title}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 1.2em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 0.2em 0; }}
#meta, #note {{ color: #555; margin: 0.1em 0; }}
#controls {{ display: flex; flex-wrap: wrap; gap: 0.4em 1.2em; align-items: center; margin: 0.6em 0; }}
#controls label {{ white-space: nowrap; }}
#word {{ width: 22em; }}
#label {{ font-weight: 600; margin: 0.4em 0; min-height: 1.4em; }}
#stage {{ display: flex; gap: 10px; align-items: flex-start; }}
#words span {{ cursor: pointer; padding: 0 0.15em; border-radius: 3px; }}
#words span.current {{ background: #222; color: #fff; }}
#words {{ margin: 0.5em 0; max-width: 60em; }}
</style>
</head>
<body>
<h1 id="caption">{caption}</h1>
<p id="meta"></p>
<noscript><p>This page draws its pictures with JavaScript: allow scripts for this file.</p></noscript>
<div id="controls">
  <label>word <input id="word" type="range" min="0" max="0" step="1" value="0" aria-label="word"></label>
  <label>layer <select id="layer" aria-label="layer"></select></label>
  <label>head <select id="head" aria-label="head"></select></label>
  <label>colours <select id="scale" aria-label="colour scale">
    <option value="shared">shared (compare words)</option>
    <option value="panel">each map to its own peak</option>
    <option value="uniform">relative to uniform</option>
  </select></label>
  <label><input id="patches" type="checkbox"> flat patches</label>
  <label><input id="gridlines" type="checkbox"> patch grid</label>
  <label>under the map <select id="underlay" aria-label="under the map">
    <option value="grey">photo in grey</option>
    <option value="colour">photo in colour</option>
    <option value="none">nothing (map only)</option>
  </select></label>
  <label>opacity <input id="alpha" type="range" min="0" max="1" step="0.05"></label>
</div>
<div id="label" aria-live="polite"></div>
<div id="stage">
  <canvas id="view" aria-label="attention over the image"></canvas>
  <canvas id="colorbar" aria-label="colour bar"></canvas>
</div>
<div id="words"></div>
<p id="note"></p>
<img id="source" alt="" hidden src="{image}">
<script type="application/json" id="attnlab-data">{data}</script>
<script>
{script}
</script>
</body>
</html>
"""

SCRIPT = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("attnlab-data").textContent);
  const $ = (id) => document.getElementById(id);
  const [H, W] = D.grid, S = H * W, T = D.steps, L = D.layers, NH = D.heads;
  // the maps: (layers, heads, steps, H, W) uint16, little-endian
  const raw = atob(D.attention);
  const weights = new Float32Array(raw.length / 2);
  for (let i = 0; i < weights.length; i++) weights[i] = (raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8)) / D.quant;
  const luts = {};
  for (const k in D.lut) {
    const hex = D.lut[k], a = new Uint8Array(768);
    for (let i = 0; i < 768; i++) a[i] = parseInt(hex.substr(2 * i, 2), 16);
    luts[k] = a;
  }
  const [dw, dh] = D.display;
  const view = $("view"), bar = $("colorbar"), img = $("source");
  view.width = dw; view.height = dh; bar.width = 110; bar.height = dh;
  const overlay = document.createElement("canvas");
  overlay.width = dw; overlay.height = dh;
  // what lies under the map: the photo in grey (BT.601 luminance, as attnlab.plot.draw.underlay_image), in colour, or white
  const under = {};
  function underlays() {
    const [ih, iw] = D.imageSize;
    const colour = document.createElement("canvas"); colour.width = iw; colour.height = ih;
    colour.getContext("2d").drawImage(img, 0, 0);
    const grey = document.createElement("canvas"); grey.width = iw; grey.height = ih;
    const g = colour.getContext("2d").getImageData(0, 0, iw, ih), p = g.data;
    for (let i = 0; i < p.length; i += 4) {
      const y = Math.round(0.299 * p[i] + 0.587 * p[i + 1] + 0.114 * p[i + 2]);
      p[i] = p[i + 1] = p[i + 2] = y;
    }
    grey.getContext("2d").putImageData(g, 0, 0);
    under.colour = colour; under.grey = grey;
    if (D.outlines) {  // the objects' border pixels, cyan, on a transparent canvas of the image's size
      const edge = atob(D.outlines), lines = document.createElement("canvas");
      lines.width = iw; lines.height = ih;
      const o = lines.getContext("2d").createImageData(iw, ih);
      for (let i = 0; i < edge.length; i++) if (edge.charCodeAt(i)) { o.data.set([0, 229, 255, 255], 4 * i); }
      lines.getContext("2d").putImageData(o, 0, 0);
      under.lines = lines;
    }
  }

  // a step's (H, W) map of one head, or the mean over heads
  function gridMap(layer, head, step) {
    const out = new Float64Array(S);
    const heads = head === "mean" ? [...Array(NH).keys()] : [head];
    for (const h of heads) {
      const base = ((layer * NH + h) * T + step) * S;
      for (let i = 0; i < S; i++) out[i] += weights[base + i];
    }
    for (let i = 0; i < S; i++) out[i] /= heads.length;
    return out;
  }
  const peakOf = (m) => m.reduce((a, b) => Math.max(a, b), 0);

  // the colour scale, as attnlab.plot.maps.Scale
  function scaleFor(kind, layer, head, current) {
    if (kind === "panel") return {kind, lo: 0, hi: 1, top: peakOf(current)};
    let peak = 0;
    for (let t = 0; t < T; t++) peak = Math.max(peak, peakOf(gridMap(layer, head, t)));
    if (kind === "shared") return {kind, lo: 0, hi: peak > 0 ? peak : 1};
    const k = Math.max(1, Math.ceil(Math.log2(Math.max(peak * S, 2)) - 1e-9));
    return {kind, lo: -k, hi: k};
  }
  function value(sc, w) {
    if (sc.kind === "shared") return w;
    if (sc.kind === "panel") return sc.top > 0 ? w / sc.top : w;
    return Math.min(sc.hi, Math.max(sc.lo, Math.log2(Math.max(w * S, Math.pow(2, sc.lo)))));
  }

  // bilinear as torch interpolate(align_corners=False); nearest: the patch under the pixel centre
  function sampler(n, size, nearest) {
    const i0 = new Int32Array(size), i1 = new Int32Array(size), w1 = new Float64Array(size);
    for (let d = 0; d < size; d++) {
      if (nearest) { const i = Math.min(n - 1, Math.floor((d + 0.5) * n / size)); i0[d] = i1[d] = i; continue; }
      const src = Math.max((d + 0.5) * n / size - 0.5, 0);
      const a = Math.min(Math.floor(src), n - 1);
      i0[d] = a; i1[d] = Math.min(a + 1, n - 1); w1[d] = src - a;
    }
    return {i0, i1, w1};
  }

  function fill(select, options, value) {
    select.innerHTML = "";
    for (const [v, text] of options) {
      const o = document.createElement("option");
      o.value = String(v); o.textContent = text; select.appendChild(o);
    }
    select.value = String(value);
  }
  fill($("layer"), D.layerLabels.map((t, i) => [i, t]), D.start.layer);
  fill($("head"), [["mean", "mean of " + NH + " heads"], ...[...Array(NH).keys()].map((h) => [h, "head " + h])], D.start.head);
  if (D.method) { $("head").disabled = true; $("layer").disabled = true; }  // an explanation: one map per word
  $("scale").value = D.start.scale;
  $("patches").checked = D.start.interp === "nearest";
  $("gridlines").checked = D.start.gridLines;
  $("underlay").value = D.start.underlay;
  $("alpha").value = String(D.start.alpha);
  const slider = $("word");
  slider.max = String(T - 1); slider.value = String(D.start.step);
  $("meta").textContent = "model " + D.model + " \u00b7 image " + D.imageSize[1] + " x " + D.imageSize[0] +
    " px \u00b7 " + H + " x " + W + " patches \u00b7 " + (D.method ? D.method : L + " layers x " + NH + " heads") +
    (D.stretched ? " \u00b7 " + D.stretched : "");
  const words = $("words");
  D.words.forEach((w, t) => {
    const s = document.createElement("span");
    s.textContent = w; s.title = "step " + t;
    s.addEventListener("click", () => { slider.value = String(t); render(); });
    words.appendChild(s); words.appendChild(document.createTextNode(" "));
  });

  function drawColorbar(sc, lut) {
    const c = bar.getContext("2d"), top = 8, h = dh - 16, x = 4, w = 16;
    c.clearRect(0, 0, bar.width, bar.height);
    for (let y = 0; y < h; y++) {
      const j = Math.round(255 * (1 - y / Math.max(1, h - 1))) * 3;
      c.fillStyle = "rgb(" + lut[j] + "," + lut[j + 1] + "," + lut[j + 2] + ")";
      c.fillRect(x, top + y, w, 1);
    }
    c.strokeStyle = "#444"; c.strokeRect(x, top, w, h);
    c.fillStyle = "#222"; c.font = "12px system-ui, sans-serif"; c.textBaseline = "middle";
    let ticks;
    if (sc.kind === "uniform") {
      ticks = [];
      const step = Math.max(1, Math.ceil((sc.hi - sc.lo) / 8));
      for (let e = sc.lo; e <= sc.hi; e++) if (e % step === 0) ticks.push([e, e >= 0 ? Math.pow(2, e) + "x" : "1/" + Math.pow(2, -e)]);
    } else {
      ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => [sc.lo + f * (sc.hi - sc.lo), (sc.lo + f * (sc.hi - sc.lo)).toFixed(sc.hi < 10 ? 3 : 0)]);
    }
    for (const [v, text] of ticks) {
      const y = top + h * (1 - (v - sc.lo) / (sc.hi - sc.lo));
      c.fillRect(x + w, y, 4, 1);
      c.fillText(text, x + w + 7, y);
    }
    c.save(); c.translate(bar.width - 6, top + h / 2); c.rotate(-Math.PI / 2);
    c.textAlign = "center"; c.textBaseline = "bottom";
    c.fillText(D.labels[sc.kind], 0, 0); c.restore();
  }

  function render() {
    const step = Number(slider.value), layer = Number($("layer").value);
    const head = $("head").value === "mean" ? "mean" : Number($("head").value);
    const kind = $("scale").value, nearest = $("patches").checked, beneath = $("underlay").value;
    const alpha = beneath === "none" ? 1 : Number($("alpha").value);  // no photo: the map is opaque
    const m = gridMap(layer, head, step);
    const sc = scaleFor(kind, layer, head, m);
    const lut = luts[kind === "uniform" ? "diverging" : "sequential"];
    const ys = sampler(H, dh, nearest), xs = sampler(W, dw, nearest);
    const oc = overlay.getContext("2d"), data = oc.createImageData(dw, dh), px = data.data;
    for (let y = 0; y < dh; y++) {
      const a = ys.i0[y] * W, b = ys.i1[y] * W, wy = ys.w1[y];
      for (let x = 0; x < dw; x++) {
        const p = xs.i0[x], q = xs.i1[x], wx = xs.w1[x];
        const w = (1 - wy) * ((1 - wx) * m[a + p] + wx * m[a + q]) + wy * ((1 - wx) * m[b + p] + wx * m[b + q]);
        const f = (value(sc, w) - sc.lo) / (sc.hi - sc.lo);
        const j = Math.max(0, Math.min(255, Math.round(f * 255))) * 3, o = 4 * (y * dw + x);
        px[o] = lut[j]; px[o + 1] = lut[j + 1]; px[o + 2] = lut[j + 2]; px[o + 3] = 255;
      }
    }
    oc.putImageData(data, 0, 0);
    const c = view.getContext("2d");
    c.globalAlpha = 1; c.imageSmoothingEnabled = false;  // image pixels stay crisp, as in the figures
    if (!under.colour) underlays();
    c.fillStyle = "#fff"; c.fillRect(0, 0, dw, dh);
    if (beneath !== "none") c.drawImage(under[beneath], 0, 0, dw, dh);
    c.globalAlpha = alpha; c.drawImage(overlay, 0, 0);
    c.globalAlpha = 1;
    if (under.lines) c.drawImage(under.lines, 0, 0, dw, dh);
    if ($("gridlines").checked) {
      c.strokeStyle = "rgba(255,255,255,0.55)"; c.lineWidth = 1; c.beginPath();
      for (let r = 1; r < H; r++) { const y = Math.round(r * dh / H) + 0.5; c.moveTo(0, y); c.lineTo(dw, y); }
      for (let k = 1; k < W; k++) { const x = Math.round(k * dw / W) + 0.5; c.moveTo(x, 0); c.lineTo(x, dh); }
      c.stroke();
    }
    drawColorbar(sc, lut);
    const headText = D.method ? "" : " \u00b7 " + (head === "mean" ? "mean of " + NH + " heads" : "head " + head);
    $("label").textContent = step + ": " + D.wordLabels[step] + " \u00b7 " + D.layerLabels[layer] +
      headText + (D.method ? " \u00b7 peak " : " \u00b7 peak weight ") + peakOf(m).toFixed(3);
    $("note").textContent = "Colours: " + D.labels[kind] + ". " + H + " x " + W + " patches, " +
      (nearest ? "drawn as flat patches. " : "bilinear between patch centres. ") + D.underlays[beneath] +
      (D.outlineCount ? ", " + D.outlineCount + " object outline" + (D.outlineCount > 1 ? "s" : "") + " in cyan." : ".");
    words.querySelectorAll("span").forEach((s, t) => s.classList.toggle("current", t === step));
    document.body.dataset.step = String(step);
  }

  for (const id of ["word", "alpha"]) $(id).addEventListener("input", render);
  for (const id of ["layer", "head", "scale", "patches", "gridlines", "underlay"]) $(id).addEventListener("change", render);
  if (img.complete) render(); else img.addEventListener("load", render);
})();
"""
