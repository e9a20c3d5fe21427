"""Re-create the README's pictures from a sample image with the bundled model (offline, a few seconds).

    python docs/make_figures.py

* docs/word_grid.png: ``attnlab.plot.word_grid`` of ``scene-2.png`` (the README's opening figure).
* docs/explorer.gif: the explorer (``attnlab.explore``) stepping through the words of the same caption:
  each frame is the explorer's own figure after its word slider moved.

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


def main() -> None:
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
    main()
