"""The static explorer's script for a trace with several views of its image (:data:`VIEWS_SCRIPT`): it fills
:data:`attnlab.plot.html_page.PAGE` like the single-view script, one canvas per panel (the views on the photo
where their boxes say, clipped to it; each overlapping base/global view in its own), every view's and every
other kind of key's share in the label, then the sink line of the layer and head (``D.sinkLines``, computed
in Python by :func:`attnlab.plot.multiview.sink_lines`). Text only, no Python logic."""

VIEWS_SCRIPT = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("attnlab-data").textContent);
  const $ = (id) => document.getElementById(id);
  const T = D.steps, NH = D.heads;
  function decode(b64) {  // uint16 little-endian -> weights
    const raw = atob(b64), w = new Float32Array(raw.length / 2);
    for (let i = 0; i < w.length; i++) w[i] = (raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8)) / D.quant;
    return w;
  }
  const V = D.views.map((v) => Object.assign({}, v, {w: decode(v.attention)}));  // each (layers, heads, steps, h, w)
  const lut = new Uint8Array(768);
  for (let i = 0; i < 768; i++) lut[i] = parseInt(D.lut.substr(2 * i, 2), 16);
  const [dw, dh] = D.display, [ih, iw] = D.imageSize, sx = dw / iw, sy = dh / ih;
  const stage = $("stage"), bar = $("colorbar"), img = $("source");
  $("view").remove();
  bar.width = 110; bar.height = dh;
  const panels = D.groups.map((g) => {
    const fig = document.createElement("figure"), cap = document.createElement("figcaption"), c = document.createElement("canvas");
    fig.style.margin = "0"; c.width = dw; c.height = dh; c.className = "panel";
    fig.appendChild(cap); fig.appendChild(c); stage.insertBefore(fig, bar);
    return {g, c, cap};
  });
  const under = {};
  function underlays() {
    const colour = document.createElement("canvas"); colour.width = iw; colour.height = ih;
    colour.getContext("2d").drawImage(img, 0, 0);
    const grey = document.createElement("canvas"); grey.width = iw; grey.height = ih;
    const g = colour.getContext("2d").getImageData(0, 0, iw, ih), p = g.data;
    for (let i = 0; i < p.length; i += 4) p[i] = p[i + 1] = p[i + 2] = Math.round(0.299 * p[i] + 0.587 * p[i + 1] + 0.114 * p[i + 2]);
    grey.getContext("2d").putImageData(g, 0, 0);
    under.colour = colour; under.grey = grey;
  }
  function viewMap(v, layer, head, step) {  // (h, w) of one head or the mean over heads
    const S = v.grid[0] * v.grid[1], out = new Float64Array(S);
    const heads = head === "mean" ? [...Array(NH).keys()] : [head];
    for (const h of heads) { const base = ((layer * NH + h) * T + step) * S; for (let i = 0; i < S; i++) out[i] += v.w[base + i]; }
    for (let i = 0; i < S; i++) out[i] /= heads.length;
    return out;
  }
  const hi = (head) => head === "mean" ? NH : head;  // the shares' head axis: heads, then their mean
  const share = (arr, layer, head, step) => arr[(layer * (NH + 1) + hi(head)) * T + step];
  const pct = (x) => (100 * x).toFixed(1) + "%";
  function layerPeak(layer, head) {
    let peak = 0;
    for (const v of V) for (let t = 0; t < T; t++) for (const x of viewMap(v, layer, head, t)) peak = Math.max(peak, x);
    return peak > 0 ? peak : 1;
  }
  function sampler(n, size, nearest) {  // as attnlab.plot.maps.resize (bilinear: align_corners=False)
    const i0 = new Int32Array(size), i1 = new Int32Array(size), w1 = new Float64Array(size);
    for (let d = 0; d < size; d++) {
      if (nearest) { const i = Math.min(n - 1, Math.floor((d + 0.5) * n / size)); i0[d] = i1[d] = i; continue; }
      const src = Math.max((d + 0.5) * n / size - 0.5, 0), a = Math.min(Math.floor(src), n - 1);
      i0[d] = a; i1[d] = Math.min(a + 1, n - 1); w1[d] = src - a;
    }
    return {i0, i1, w1};
  }
  function mapCanvas(v, m, top, nearest) {  // the view's map at its box's size in display pixels
    const [H, W] = v.grid, [x0, y0, x1, y1] = v.box;
    const bw = Math.max(1, Math.round((x1 - x0) * sx)), bh = Math.max(1, Math.round((y1 - y0) * sy));
    const c = document.createElement("canvas"); c.width = bw; c.height = bh;
    const data = c.getContext("2d").createImageData(bw, bh), px = data.data;
    const ys = sampler(H, bh, nearest), xs = sampler(W, bw, nearest);
    for (let y = 0; y < bh; y++) {
      const a = ys.i0[y] * W, b = ys.i1[y] * W, wy = ys.w1[y];
      for (let x = 0; x < bw; x++) {
        const p = xs.i0[x], q = xs.i1[x], wx = xs.w1[x];
        const w = (1 - wy) * ((1 - wx) * m[a + p] + wx * m[a + q]) + wy * ((1 - wx) * m[b + p] + wx * m[b + q]);
        const j = Math.max(0, Math.min(255, Math.round(w / top * 255))) * 3, o = 4 * (y * bw + x);
        px[o] = lut[j]; px[o + 1] = lut[j + 1]; px[o + 2] = lut[j + 2]; px[o + 3] = 255;
      }
    }
    c.getContext("2d").putImageData(data, 0, 0);
    return c;
  }
  function drawColorbar(top) {
    const c = bar.getContext("2d"), y0 = 8, h = dh - 16;
    c.clearRect(0, 0, bar.width, bar.height);
    for (let y = 0; y < h; y++) {
      const j = Math.round(255 * (1 - y / Math.max(1, h - 1))) * 3;
      c.fillStyle = "rgb(" + lut[j] + "," + lut[j + 1] + "," + lut[j + 2] + ")"; c.fillRect(4, y0 + y, 16, 1);
    }
    c.fillStyle = "#222"; c.font = "12px system-ui, sans-serif"; c.textBaseline = "middle";
    for (const f of [0, 0.25, 0.5, 0.75, 1]) { const y = y0 + h * (1 - f); c.fillRect(20, y, 4, 1); c.fillText((f * top).toFixed(3), 27, y); }
    c.save(); c.translate(bar.width - 6, y0 + h / 2); c.rotate(-Math.PI / 2); c.textAlign = "center"; c.textBaseline = "bottom";
    c.fillText(D.label, 0, 0); c.restore();
  }
  function fill(select, options, value) {
    select.innerHTML = "";
    for (const [v, text] of options) { const o = document.createElement("option"); o.value = String(v); o.textContent = text; select.appendChild(o); }
    select.value = String(value);
  }
  fill($("layer"), D.layerLabels.map((t, i) => [i, t]), D.start.layer);
  fill($("head"), [["mean", "mean of " + NH + " heads"], ...[...Array(NH).keys()].map((h) => [h, "head " + h])], D.start.head);
  $("scale").value = "shared"; $("scale").disabled = true; $("gridlines").disabled = true;
  $("scale").title = $("gridlines").title = "several views: one shared scale, no patch grid";
  $("patches").checked = D.start.interp === "nearest"; $("underlay").value = D.start.underlay; $("alpha").value = String(D.start.alpha);
  const slider = $("word"); slider.max = String(T - 1); slider.value = String(D.start.step);
  $("meta").textContent = "model " + D.model + " \u00b7 image " + iw + " x " + ih + " px \u00b7 " + V.length + (V.length === 1 ? " view (" : " views (") +
    V.map((v) => v.name + " " + v.grid[0] + " x " + v.grid[1]).join(", ") + ") \u00b7 " + D.layers + " layers x " + NH + " heads";
  const words = $("words");
  D.words.forEach((w, t) => {
    const s = document.createElement("span"); s.textContent = w; s.title = "step " + t;
    s.addEventListener("click", () => { slider.value = String(t); render(); });
    words.appendChild(s); words.appendChild(document.createTextNode(" "));
  });
  function sharesLine(layer, head, step) {  // as attnlab.plot.multiview.shares_line
    const vs = V.map((v) => share(v.share, layer, head, step)), image = vs.reduce((a, b) => a + b, 0);
    const kinds = Object.keys(D.shares).map((k) => [k, share(D.shares[k], layer, head, step)]).sort((a, b) => b[1] - a[1]);
    let views = V.length > 1 ? " (" + V.map((v, i) => v.name + " " + pct(vs[i])).join(" \u00b7 ") + ")" : "";
    if (V.length > D.manyViews) views = " (" + V.length + " views, each one's share on its box)";
    if (V.length === 1 && V[0].name.startsWith("composed: ")) views = " (" + V[0].name + ")";
    const parts = ["image " + pct(image) + views];
    for (const [k, s] of kinds) if (s !== 0) parts.push(k + " " + pct(s));
    const rest = 1 - image - kinds.reduce((a, b) => a + b[1], 0);
    if (Math.abs(rest) >= 5e-4) parts.push("unaccounted " + pct(rest));
    const empty = kinds.filter((kv) => kv[1] === 0).map((kv) => kv[0]);
    if (empty.length) parts.push("none on " + empty.join(", "));
    return parts.join(" \u00b7 ");
  }
  function render() {
    const step = Number(slider.value), layer = Number($("layer").value);
    const head = $("head").value === "mean" ? "mean" : Number($("head").value);
    const nearest = $("patches").checked, beneath = $("underlay").value;
    const alpha = beneath === "none" ? 1 : Number($("alpha").value), top = layerPeak(layer, head);
    if (!under.colour) underlays();
    for (const {g, c, cap} of panels) {
      const x = c.getContext("2d");
      x.globalAlpha = 1; x.imageSmoothingEnabled = false; x.fillStyle = "#fff"; x.fillRect(0, 0, dw, dh);
      if (beneath !== "none") x.drawImage(under[beneath], 0, 0, dw, dh);
      let total = 0, patches = 0;
      for (const i of g) {
        const v = V[i], [x0, y0, x1, y1] = v.box, s = share(v.share, layer, head, step), off = share(v.off, layer, head, step);
        total += s; patches += v.grid[0] * v.grid[1];
        x.globalAlpha = alpha; x.drawImage(mapCanvas(v, viewMap(v, layer, head, step), top, nearest), x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
        x.globalAlpha = 1; x.strokeStyle = "#00e5ff"; x.lineWidth = 1; x.strokeRect(x0 * sx + 0.5, y0 * sy + 0.5, (x1 - x0) * sx - 1, (y1 - y0) * sy - 1);
        const text = v.name + " " + pct(s) + (off >= 5e-4 ? ", " + pct(off) + " off the photo" : "");
        const lx = Math.min(Math.max(x0, 0), iw) * sx + 3, ly = Math.min(Math.max(y0, 0), ih) * sy + 3;
        x.font = "11px system-ui, sans-serif"; x.textBaseline = "top";
        x.fillStyle = "rgba(0,0,0,0.6)"; x.fillRect(lx - 2, ly - 1, x.measureText(text).width + 4, 14);
        x.fillStyle = "#fff"; x.fillText(text, lx, ly);
      }
      const v0 = V[g[0]], pw = (v0.box[2] - v0.box[0]) / v0.grid[1], ph = (v0.box[3] - v0.box[1]) / v0.grid[0];
      cap.textContent = g.length === 1 ? "view '" + v0.name + "' (" + v0.grid[0] + " x " + v0.grid[1] + " patches of " +
        Number(pw.toPrecision(3)) + " x " + Number(ph.toPrecision(3)) + " px): " + pct(total)
        : g.length + " views on the photo (" + patches + " patches): " + pct(total);
    }
    drawColorbar(top);
    $("label").textContent = step + ": " + D.wordLabels[step] + " \u00b7 " + D.layerLabels[layer] + " \u00b7 " +
      (head === "mean" ? "mean of " + NH + " heads" : "head " + head) + " \u00b7 " + sharesLine(layer, head, step) +
      " \u00b7 " + D.sinkLines[layer][hi(head)];  // as attnlab.plot.multiview.sinks_text
    $("note").textContent = "Colours: " + D.label + ", one scale for every word of this layer and head. Each view is drawn where its box lies " +
      "on the photo (cyan), clipped to it; " + (nearest ? "flat patches. " : "bilinear between patch centres. ") + D.underlays[beneath] + ".";
    words.querySelectorAll("span").forEach((s, t) => s.classList.toggle("current", t === step));
    document.body.dataset.step = String(step);
  }
  for (const id of ["word", "alpha"]) $(id).addEventListener("input", render);
  for (const id of ["layer", "head", "patches", "underlay"]) $(id).addEventListener("change", render);
  if (img.complete) render(); else img.addEventListener("load", render);
})();
"""
