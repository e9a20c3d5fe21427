"""The static explorer's page (:data:`PAGE`, an HTML template for ``str.format``) and its
script (:data:`SCRIPT`): what :func:`attnlab.plot.html.export_html` fills with one trace.
Text only, no Python logic; the script reads the JSON payload the exporter writes."""

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
