"""How fast does the explorer redraw when the word slider moves?

Measures the time from a slider value change to the redrawn figure (the new
PNG bytes in the explorer's ``ipywidgets.Image``), over many changes, and
prints the median and p90 in ms against the 30 ms target.

    PYTHONPATH=. MPLBACKEND=Agg python benchmarks/bench_widgets.py [--changes 50] [--view both]

Both views are timed by default; the target applies to the default
"averaged" view. Exit status 0 when its median is under the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.trace import CaptionTrace  # noqa: E402

TARGET_MS = 30.0


def synthetic_trace(
    layers: int = 3, heads: int = 8, steps: int = 10, grid: tuple[int, int] = (16, 16), size: int = 128, seed: int = 0
) -> CaptionTrace:
    """A random but plausible trace: each head looks at a blob that moves with the word."""
    rng = np.random.default_rng(seed)
    H, W = grid
    rows, cols = np.mgrid[0:H, 0:W]  # (H, W) each
    centres = rng.uniform([0, 0], [H, W], size=(layers, heads, steps, 2))  # (layers, heads, steps, 2)
    widths = rng.uniform(0.8, 4.0, size=(layers, heads, steps, 1, 1))  # (layers, heads, steps, 1, 1)
    d2 = (rows - centres[..., 0, None, None]) ** 2 + (cols - centres[..., 1, None, None]) ** 2  # (L, h, T, H, W)
    att = np.exp(-0.5 * d2 / widths**2)  # (layers, heads, steps, H, W)
    att /= att.sum(axis=(-2, -1), keepdims=True)
    words = ["a", "red", "circle", "next", "to", "a", "blue", "square", "on", "grass"][: steps - 1] + ["[SEP]"]
    words += ["x"] * (steps - len(words))
    # like a shapes scene: grey background, three flat coloured discs, pixel noise (sigma 8)
    yy, xx = np.mgrid[0:size, 0:size]  # (size, size) each
    picture = np.full((size, size, 3), 225.0)  # (size, size, 3)
    for colour in ((220, 40, 40), (40, 60, 220), (40, 180, 60)):
        cy, cx, r = rng.uniform(0.2 * size, 0.8 * size), rng.uniform(0.2 * size, 0.8 * size), rng.uniform(0.06, 0.15) * size
        picture[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = colour
    picture += rng.normal(0.0, 8.0, size=picture.shape)
    image = np.clip(np.rint(picture), 0, 255).astype(np.uint8)  # (size, size, 3)
    vocab = 50
    return CaptionTrace(
        token_ids=np.arange(steps) % vocab,
        words=words[:steps],
        logits=rng.standard_normal((steps, vocab)).astype(np.float32),  # (steps, vocab)
        cross_attention=att.astype(np.float32),
        grid=grid,
        image=image,
        model_name="synthetic",
        caption=" ".join(w for w in words[:steps] if w != "[SEP]"),
    )


def make_trace() -> tuple[CaptionTrace, str]:
    """The bundled model's trace of a shapes scene if that works, else a synthetic one; says which."""
    try:
        import attnlab
        from attnlab.shapes import make_scene

        scene = next(s for s in (make_scene(seed) for seed in range(100)) if len(s.objects) == 3)
        model = attnlab.load_model("shapes")
        trace = attnlab.caption(model, scene.image)
        if trace.cross_attention is None:
            raise AttnlabError("the model's trace holds no attention")
        return trace, f"bundled 'shapes' model on shapes scene {scene.seed} ({scene.caption!r})"
    except (ImportError, AttnlabError, AttributeError) as exc:
        return synthetic_trace(), f"synthetic (the bundled model is unavailable: {type(exc).__name__}: {exc})"


def measure(explorer, changes: int) -> list[float]:
    """Seconds from ``slider.value = v`` to new PNG bytes in ``explorer.image``, per change."""
    slider = explorer.slider
    values = list(range(slider.min, slider.max + 1))
    times = []
    for i in range(changes):
        current = slider.value
        target = values[i % len(values)]
        if target == current:  # assigning the same value fires nothing: move on
            target = values[(i + 1) % len(values)]
        before = explorer.image.value
        start = time.perf_counter()
        slider.value = target
        after = explorer.image.value
        times.append(time.perf_counter() - start)
        if after is before or after == before:
            raise RuntimeError(f"slider change {current}->{target} did not update the image")
    return times


def bench_view(trace: CaptionTrace, view: str, changes: int, warmup: int) -> float:
    """Time ``changes`` slider moves in ``view``; print the numbers; return the median in ms."""
    from attnlab.explorer import explore

    explorer = explore(trace)
    explorer.view_toggle.value = view
    measure(explorer, warmup)
    times_ms = np.array(measure(explorer, changes)) * 1000.0  # (changes,)
    median = float(np.median(times_ms))
    p90 = float(np.percentile(times_ms, 90))
    w, h = explorer.figure.canvas.get_width_height()
    print(f"view {view!r}: figure {w}x{h} px, PNG {len(explorer.image.value)} bytes")
    print(
        f"  slider change -> redrawn PNG over {changes} changes: median {median:.1f} ms, "
        f"p90 {p90:.1f} ms, min {times_ms.min():.1f} ms, mean {statistics.fmean(times_ms):.1f} ms"
    )
    print(f"  median / {TARGET_MS:.0f} ms target = {median / TARGET_MS:.2f}")
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50, help="slider changes to time (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed changes first (default 5)")
    parser.add_argument(
        "--view",
        choices=["averaged", "per-head grid", "both"],
        default="both",
        help="which view to time (default both; the target applies to 'averaged', the default view)",
    )
    args = parser.parse_args(argv)

    trace, source = make_trace()
    print(f"trace: {source}")
    print(f"  {trace!r}, image {trace.image.shape[1]}x{trace.image.shape[0]}")
    views = ["averaged", "per-head grid"] if args.view == "both" else [args.view]
    medians = {view: bench_view(trace, view, args.changes, args.warmup) for view in views}
    judged = "averaged" if "averaged" in medians else views[0]
    ok = medians[judged] < TARGET_MS
    print(f"{'PASS' if ok else 'FAIL'}: view {judged!r} median {medians[judged]:.1f} ms vs {TARGET_MS:.0f} ms target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
