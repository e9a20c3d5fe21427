"""Decoding speed of attnlab's CATR, as ratios measured in one run.

Builds CATR with random weights (nothing downloaded), a 299x299 input and 12
greedy decoding steps, and prints:

  (a) template mode time / incremental mode time          target >= 10
  (b) incremental caption with full capture (record="all")
      / one forward pass of torchvision's dilated ResNet-101  target <= 1.3
  (c) capture on (record="all") / capture off (record="none")  target <= 1.05

Usage: python benchmarks/bench_decode.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torchvision

import attnlab
from attnlab.models import build_catr


def once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Run every function once per round, ``repeats`` rounds, after a warm-up round.

    Ratios are taken within a round (neighbouring runs see the same machine
    load) and the median over rounds is reported.
    """
    for fn in fns.values():
        fn()
    return _rounds(fns, repeats)


def _rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(once(fn))
    return out


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def decode_steps(model, x: torch.Tensor, steps: int) -> None:
    """``steps`` greedy decoder steps with attention weights, on an image encoded once (not timed)."""
    memory, mask, pos, _ = decode_steps.encoded
    cache = model.transformer.start_decoding(memory, mask, pos)
    ids = torch.full((1, 1), model.config.start_token_id)  # (N, 1)
    for _ in range(steps):
        hidden, _, _ = model.transformer.decode_step(ids, cache, want_weights=True)  # (N, 1, E)
        ids = model.mlp(hidden[:, -1]).argmax(-1)[:, None]  # (N, 1)


def weight_mb(model) -> float:
    """Megabytes of weights one decoding step reads: decoder layers, final norm, output head."""
    modules = [model.transformer.decoder, model.mlp]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--template-repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_catr()
    with torch.no_grad():  # never emit the end token, so every run decodes exactly `steps` tokens
        model.mlp.layers[-1].bias[model.config.end_token_id] = -1e4
    image = (np.random.default_rng(0).random((299, 299, 3)) * 255).astype(np.uint8)  # (H, W, 3)

    reference = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    x = attnlab.preprocess.prepare([image], 299).pixels  # (1, 3, 299, 299)

    def floor() -> None:
        with torch.inference_mode():
            reference(x)

    def incremental(record: str):
        return lambda: attnlab.caption(model, image, max_len=args.steps, record=record)

    trace = attnlab.caption(model, image, max_len=args.steps, record="all")
    assert trace.steps == args.steps, trace.steps
    t = paired(
        {
            "floor": floor,
            "none": incremental("none"),
            "cross": incremental("cross"),
            "all": incremental("all"),
        },
        args.repeats,
    )
    # the template loop is slow: a few rounds, each next to an incremental run
    tmpl = _rounds(
        {
            "template": lambda: attnlab.caption(model, image, max_len=args.steps, mode="template"),
            "cross": incremental("cross"),
        },
        args.template_repeats,
    )
    med = {k: statistics.median(v) for k, v in t.items()}
    # where the incremental caption's time goes (one more round, same machine state)
    with torch.inference_mode():
        body = model._inference_body.get(x)
        decode_steps.encoded = model.encode(x, torch.zeros(1, 299, 299, dtype=torch.bool))
        parts = _rounds(
            {
                "floor": floor,
                "folded backbone": lambda: body(x),
                "backbone + encoder": lambda: model.encode(x, torch.zeros(1, 299, 299, dtype=torch.bool)),
                "decoder step": lambda: decode_steps(model, x, args.steps),
            },
            args.repeats,
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, 299x299 input, grid {trace.grid}")
    print(f"torchvision dilated ResNet-101 forward : {med['floor'] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"incremental, record='none'             : {med['none'] * 1e3:8.1f} ms")
    print(f"incremental, record='cross'            : {med['cross'] * 1e3:8.1f} ms")
    print(f"incremental, record='all'              : {med['all'] * 1e3:8.1f} ms")
    print(f"template (reference loop)              : {statistics.median(tmpl['template']) * 1e3:8.1f} ms (median of {args.template_repeats})")
    part = {k: statistics.median(v) for k, v in parts.items()}
    print(f"  breakdown: folded ResNet-101 / torchvision: {median_ratio(parts['folded backbone'], parts['floor']):.3f}; "
          f"encoder {(part['backbone + encoder'] - part['folded backbone']) * 1e3:.0f} ms; "
          f"{args.steps} decoder steps {part['decoder step'] * 1e3:.0f} ms "
          f"({part['decoder step'] / args.steps * 1e3:.1f} ms each: every step reads all decoder and head weights, "
          f"{weight_mb(model):.0f} MB)")
    print(f"(a) template / incremental             : {median_ratio(tmpl['template'], tmpl['cross']):6.2f}   (target >= 10)")
    print(f"(b) incremental (record='all') / ResNet: {median_ratio(t['all'], t['floor']):6.3f}   (target <= 1.3)")
    print(f"(c) capture on / off ('all' / 'none')  : {median_ratio(t['all'], t['none']):6.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
