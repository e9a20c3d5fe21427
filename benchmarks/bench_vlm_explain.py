"""Peak memory of ``attnlab.explain`` on a vision-language model against eager ``output_attentions``, as ratios in one run.

A tiny random Qwen2-VL (tests/vlm_tiny.py's, with ``--layers`` decoder layers of 4 heads, hidden 64)
and a photo of about ``--image-tokens`` image tokens (the image processor's pixel limit raised),
a caption of ``--tokens`` teacher-forced tokens: the sequence is ``T`` keys, and the ``T x T``
attention matrices dominate memory. Variants:

* ``sdpa``: the same teacher-forced forward under sdpa without attention weights (the floor: the
  model's own activations, the vision tower included);
* ``eager``: one teacher-forced forward under eager with ``output_attentions=True`` (every layer's
  ``heads x T x T`` held at once): what the methods without gradients are compared with;
* ``eager_grad``: the same with autograd and the gradient of one word's logit w.r.t. every layer's
  attention (every layer's ``A`` and ``dA`` at once): what the gradient methods are compared with;
* ``raw``, ``layer_mean``, ``rollout``, ``contrast``, ``grad_attn``, ``relevance``:
  ``attnlab.explain(captioner, photo, method, tokens=...)`` (the model under sdpa; one layer's
  ``T x T`` at a time beside the running product).

Memory: a fresh process per variant (glibc told to serve large blocks from mmap) builds the model,
runs the variant once (first-call allocations), resets the peak resident memory
(``/proc/self/clear_refs``) and runs it again; printed is the peak above the memory before that run
(``run MB``) and its ratio to the variant's eager baseline, then the same above ``sdpa``'s run
(``over sdpa``: what the attention weights and the methods' own arithmetic cost) and its ratio.
Wall seconds of that run are printed too (a shared machine: indicative only).

Usage: python benchmarks/bench_vlm_explain.py [--layers 8] [--image-tokens 1024] [--tokens 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("raw", "layer_mean", "rollout", "contrast", "grad_attn", "relevance")
VARIANTS = ("sdpa", "eager", "eager_grad", *METHODS)
WORDS = ["a", "red", "car", "dog", ".", "the", "cat"]
PROMPT = "describe this image ."


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) * 1024 / 1e6


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def build(layers: int, image_tokens: int):
    """The model (sdpa), its processor, a photo of about ``image_tokens`` tokens and the caption's ids."""
    sys.path.insert(0, str(ROOT / "tests"))
    import vlm_tiny

    folder = Path(tempfile.mkdtemp())
    small, processor = vlm_tiny.build("qwen2_vl", folder)
    cfg = small.config
    cfg.text_config.num_hidden_layers = layers
    if getattr(cfg.text_config, "layer_types", None):
        cfg.text_config.layer_types = [cfg.text_config.layer_types[0]] * layers
    model = type(small)._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config = small.generation_config
    ip = processor.image_processor
    side = int(round(image_tokens**0.5)) * ip.patch_size * ip.merge_size
    ip.max_pixels = ip.size["longest_edge"] = side * side
    photo = vlm_tiny.photo(side, side, seed=1)
    tokens = [int(processor.tokenizer.convert_tokens_to_ids(w)) for w in WORDS]
    return model, processor, photo, tokens


def runner(variant: str, model, processor, photo, tokens):
    import torch

    import attnlab

    sys.path.insert(0, str(ROOT / "tests"))
    import vlm_tiny

    cap = attnlab.from_huggingface(model, processor, prompt=PROMPT)
    inputs = vlm_tiny.prompt(processor, photo, PROMPT)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.as_tensor([tokens[:-1]])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(tokens) - 1, dtype=torch.long)], 1)
    q, t = inputs["input_ids"].shape[1] - 1, tokens[0]

    def once():
        if variant in METHODS:
            return attnlab.explain(cap, photo, variant, tokens=tokens)
        if variant == "sdpa":
            with torch.no_grad():
                return model(**full).logits
        model.set_attn_implementation("eager")
        try:
            if variant == "eager":
                with torch.no_grad():
                    return model(**full, output_attentions=True).attentions
            out = model(**full, output_attentions=True)
            return torch.autograd.grad(out.logits[0, q, t], out.attentions)  # dA of every layer
        finally:
            model.set_attn_implementation("sdpa")

    return once, full["input_ids"].shape[1]


def measure(variant: str, layers: int, image_tokens: int, n: int) -> dict:
    import torch

    torch.set_num_threads(1)
    model, processor, photo, tokens = build(layers, image_tokens)
    once, T = runner(variant, model, processor, photo, tokens[:n])
    out = once()
    del out
    before = rss_mb()
    reset_hwm()
    start = time.perf_counter()
    out = once()
    wall = time.perf_counter() - start
    peak = hwm_mb()
    del out
    return dict(variant=variant, run_mb=peak - before, wall=wall, T=T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(measure(args.part, args.layers, args.image_tokens, args.tokens)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--part", v, "--layers", str(args.layers), "--image-tokens", str(args.image_tokens),
               "--tokens", str(args.tokens)]
        line = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[v] = json.loads(line)
    T = results["eager"]["T"]
    print(f"tiny Qwen2-VL, {args.layers} layers x 4 heads, T = {T} keys (prompt + image + {args.tokens - 1} caption tokens), "
          f"eager output_attentions holds {args.layers * 4 * T * T * 4 / 1e6:.0f} MB of weights")
    print(f"{'variant':<12}{'run MB':>9}{'ratio':>7}{'over sdpa':>11}{'ratio':>7}  {'(to)':<12}{'wall s':>7}")
    floor = results["sdpa"]["run_mb"]
    for v in VARIANTS:
        base = "eager_grad" if v in ("eager_grad", "grad_attn", "relevance") else "eager"
        r, b = results[v]["run_mb"], results[base]["run_mb"]
        print(f"{v:<12}{r:>9.1f}{r / b:>7.2f}{r - floor:>11.1f}{(r - floor) / (b - floor):>7.2f}  {base:<12}{results[v]['wall']:>7.2f}")

if __name__ == "__main__":
    main()
