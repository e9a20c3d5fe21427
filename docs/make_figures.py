"""Re-create the README's pictures from a sample image with the bundled model (offline, a few seconds).

    python docs/make_figures.py                 # all of them
    python docs/make_figures.py student         # only docs/student_word_grid.png

* docs/word_grid.png: ``attnlab.plot.word_grid`` of ``scene-2.png`` (the README's opening figure).
* docs/explorer.gif: the explorer (``attnlab.explore``) stepping through the words of the same caption:
  each frame is the explorer's own figure after its word slider moved.
* docs/student_word_grid.png: the student-style model of notebook 05 (``attnlab.shapes.student``),
  wrapped with ``attnlab.wrap``, on held-out scene 0 of seed 3: its WordPiece pieces merged into words.

Run it again after changing a figure, and commit both files.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnlab  # noqa: E402
from attnlab import plot  # noqa: E402
from PIL import Image  # noqa: E402

DOCS = Path(__file__).resolve().parent
SAMPLE = "scene-2.png"


def palette(image: Image.Image) -> Image.Image:
    """256 colours, dithered (octree): a file a fraction of the size, with a colour bar that still reads true."""
    return image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)


def save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=64)
    with Image.open(buffer) as png:
        small = palette(png)
    small.save(path, optimize=True)
    print(f"wrote {path} ({small.width} x {small.height} px, {path.stat().st_size // 1024} KiB)")


def student() -> None:
    """The student-style model of notebook 05, wrapped in three lines, on one held-out scene."""
    from attnlab.shapes import CLS_ID, SEP_ID, make_scenes
    from attnlab.shapes.student import GRID, STUDENT_VOCAB, load_student

    model = load_student()
    cap = attnlab.wrap(model, encode=model.encode, decode=model.decode, cross_attention="decoder.layers.*.multihead_attn",
                       grid=GRID, image_size=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                       bos=CLS_ID, eos=SEP_ID, vocab=STUDENT_VOCAB, name="student")  # fmt: skip
    scene = make_scenes(1, seed=3, split="eval")[0]
    trace = attnlab.caption(cap, scene.image)
    print(f"student: {trace.caption!r} (pieces {trace.words}); truth {scene.caption!r}")
    save_png(plot.word_grid(trace), DOCS / "student_word_grid.png")


def main(which: list[str]) -> None:
    if "student" in which:
        student()
    if which and "readme" not in which:
        return
    model = attnlab.load_model()  # the bundled shapes model
    trace = attnlab.caption(model, attnlab.sample_path(SAMPLE))
    print(f"{SAMPLE}: {trace.caption}")

    buffer = io.BytesIO()
    plot.word_grid(trace).savefig(buffer, format="png", dpi=64)
    with Image.open(buffer) as png:
        small = palette(png)
    grid = DOCS / "word_grid.png"
    small.save(grid, optimize=True)
    print(f"wrote {grid} ({small.width} x {small.height} px, {grid.stat().st_size // 1024} KiB)")

    explorer = attnlab.explore(trace, width_inches=5.5, dpi=64)
    frames = []
    for step in plot.default_steps(trace):
        explorer.slider.value = step  # what a user does: the explorer redraws its figure
        with Image.open(io.BytesIO(explorer.image.value)) as png:
            frames.append(palette(png))
    gif = DOCS / "explorer.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=900, loop=0, optimize=True)
    print(f"wrote {gif} ({len(frames)} frames, {gif.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["readme", "student"])
