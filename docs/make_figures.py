"""Re-create the README's pictures from a sample image with the bundled model (offline, under a minute).

    python docs/make_figures.py                 # all of them
    python docs/make_figures.py student         # only docs/student_word_grid.png

* docs/word_grid.png: ``attnlab.plot.word_grid`` of ``scene-2.png`` (the README's opening figure),
  saved at a dpi at which its titles and colour bar read at the README's width.
* docs/explorer.gif: the real HTML page of the same caption (``attnlab.export_html``) recorded in
  headless Chromium (Playwright, Debian's /usr/bin/chromium): one frame per word after the word slider
  moved by the arrow key, with the caption, the slider, the word's label and the colour bar in view.
* docs/student_word_grid.png: the student-style model of notebook 05 (``attnlab.shapes.student``),
  wrapped with ``attnlab.wrap``, on held-out scene 0 of seed 3: its WordPiece pieces merged into words.

Run it again after changing a figure, and commit the files.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnlab  # noqa: E402
from attnlab import plot  # noqa: E402
from PIL import Image  # noqa: E402

DOCS = Path(__file__).resolve().parent
SAMPLE = "scene-2.png"
DPI = 110  # the word grid's titles and colour bar read at the README's width
CHROMIUM = os.environ.get("ATTNLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
VIEWPORT = {"width": 620, "height": 620}  # CSS pixels; the page wraps its controls to fit


def palette(image: Image.Image) -> Image.Image:
    """256 colours, dithered (octree): a file a fraction of the size, with a colour bar that still reads true."""
    return image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)


def save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
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


def page_frames(trace) -> list[Image.Image]:
    """The HTML page of ``trace`` in headless Chromium: a screenshot per word, the slider moved by ArrowRight."""
    from playwright.sync_api import sync_playwright

    frames = []
    with tempfile.TemporaryDirectory(prefix="attnlab-figures-") as tmp, sync_playwright() as p:
        path = attnlab.export_html(trace, Path(tmp) / "explorer.html", size=300)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            page.goto(path.as_uri(), timeout=30_000)
            steps = plot.default_steps(trace)
            for k, step in enumerate(steps):
                if k:
                    page.focus("#word")
                    page.keyboard.press("ArrowRight")  # what a reader does: the page redraws the map and its label
                page.wait_for_function(f"document.body.dataset.step === '{step}'", timeout=10_000)
                box = page.locator("#words").bounding_box()  # below the map and its colour bar: the caption's words
                clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": box["y"] + box["height"] + 8}
                with Image.open(io.BytesIO(page.screenshot(clip=clip))) as png:
                    frames.append(palette(png))
        finally:
            browser.close()
    return frames


def main(which: list[str]) -> None:
    if "student" in which:
        student()
    if which and "readme" not in which:
        return
    model = attnlab.load_model()  # the bundled shapes model
    trace = attnlab.caption(model, attnlab.sample_path(SAMPLE))
    print(f"{SAMPLE}: {trace.caption}")
    save_png(plot.word_grid(trace), DOCS / "word_grid.png")

    frames = page_frames(trace)
    gif = DOCS / "explorer.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=1100, loop=0, optimize=True)
    print(f"wrote {gif} ({frames[0].width} x {frames[0].height} px, {len(frames)} frames, {gif.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["readme", "student"])
