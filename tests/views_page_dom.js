// A fake DOM, just enough to run attnlab's views script in node and read the label it writes.
const fs = require("fs");
const [scriptPath, dataPath, ...moves] = process.argv.slice(2);
const els = {}, listeners = {};
function ctx(c) {
  return new Proxy({}, {get: (_, k) => {
    if (k === "getImageData" || k === "createImageData") return (a, b, w, h) => ({data: new Uint8ClampedArray(4 * (w || a) * (h || b))});
    if (k === "measureText") return () => ({width: 10});
    return () => {};
  }, set: () => true});
}
function element(id) {
  const e = {id, value: "", checked: false, textContent: "", innerHTML: "", style: {}, dataset: {}, width: 0, height: 0, complete: true,
    classList: {toggle() {}}, children: [],
    appendChild(c) { this.children.push(c); return c; }, insertBefore(c) { this.children.push(c); return c; }, remove() {},
    addEventListener(type, f) { (listeners[id + ":" + type] = listeners[id + ":" + type] || []).push(f); },
    querySelectorAll() { return []; }, getContext() { return ctx(this); }};
  return e;
}
globalThis.document = {
  getElementById(id) {
    if (!els[id]) els[id] = element(id);
    if (id === "attnlab-data") els[id].textContent = fs.readFileSync(dataPath, "utf8");
    return els[id];
  },
  createElement(tag) { return element(tag); }, createTextNode() { return {}; },
};
globalThis.document.body = element("body");
eval(fs.readFileSync(scriptPath, "utf8"));
const out = [els.label.textContent];
for (const move of moves) {  // "layer,head": choose them and fire the dropdowns' change
  const [layer, head] = move.split(",");
  els.layer.value = layer; els.head.value = head;
  for (const f of listeners["head:change"] || []) f();
  out.push(els.label.textContent);
}
console.log(JSON.stringify(out));
