"""Writing figures to files: PNG, SVG and PDF (:func:`save_figure`) and animated GIF (:func:`save_gif`).

Every file is written atomically (a temporary file beside it, then a rename):
a failed write leaves what was there before. Raster sizes are bounded
(``MAX_PIXELS`` per image), whatever ``dpi`` or ``figsize`` asks for.
The self-contained HTML page is :func:`attnlab.plot.html.export_html`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import AttnlabError
from ..util import is_real
from ..fileio import atomic_write
from . import maps
from .draw import add_colorbar, draw_map, panel_grid, panel_size, peak_note, stretch_note, underlay_note
from .resolve import MapOptions, by_word, resolve

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+: annotations only
    from typing import Unpack

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
MAX_PIXELS = 50_000_000  # one raster image (a figure at its dpi, or one GIF frame)
MAX_GIF_PIXELS = 300_000_000  # all frames of one GIF together (1 byte each in memory)
DPI_RANGE = (10.0, 1000.0)

__all__ = ["FIGURE_SUFFIXES", "check_dpi", "check_output_path", "save_figure", "save_gif"]


def check_dpi(dpi: Any, name: str = "dpi") -> float:
    """Dots per inch from 10 to 1000, or a one-line error."""
    lo, hi = DPI_RANGE
    if not is_real(dpi) or not lo <= float(dpi) <= hi:
        raise AttnlabError(f"{name}={dpi!r} is out of range: use a number from {lo:g} to {hi:g}")
    return float(dpi)


def check_pixels(size_inches: Sequence[float], dpi: float, what: str = "the figure") -> tuple[int, int]:
    """``(width, height)`` in pixels of ``size_inches`` at ``dpi``, or a one-line error beyond ``MAX_PIXELS``."""
    w, h = (int(float(v) * dpi) for v in size_inches)
    if w * h > MAX_PIXELS:
        raise AttnlabError(
            f"{what} would be {w} x {h} px at dpi {dpi:g} (more than {MAX_PIXELS // 1_000_000} million pixels): "
            "lower dpi or figsize"
        )
    return w, h


def check_output_path(path: Any, suffixes: Sequence[str], what: str) -> Path:
    """``path`` as a Path ending in one of ``suffixes`` (any case) that is not a folder, or a one-line error."""
    try:
        path = Path(path)
    except TypeError:
        raise AttnlabError(f"{path!r} is not a file name: pass a path ending in {' or '.join(suffixes)}") from None
    if path.suffix.lower() not in suffixes:
        raise AttnlabError(f"cannot save {what} as {path.name!r}: use a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise AttnlabError(f"{path} is a folder: give a file name ending in {' or '.join(suffixes)}")
    return path


def save_figure(fig, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write ``fig`` as PNG, SVG or PDF (chosen by the suffix), atomically; returns the path.

    An existing file at ``path`` is replaced (only once the new one is complete).
    """
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise AttnlabError(f"expected a matplotlib Figure, got {type(fig).__name__}: pass what an attnlab.plot view returned")
    path = check_output_path(path, FIGURE_SUFFIXES, "a figure")
    resolution = fig.dpi if dpi is None else check_dpi(dpi)
    check_pixels(fig.get_size_inches(), resolution)
    kwargs = {} if dpi is None else {"dpi": resolution}
    return atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lower()[1:], **kwargs))


@by_word
def save_gif(
    trace: Any,
    path: str | os.PathLike,
    layer: int = -1,
    head: int | str = "mean",
    fps: float = 2,
    *,
    words: Sequence[int] | None = None,
    dpi: float = 100,
    **options: Unpack[MapOptions],
) -> Path:
    """An animated GIF stepping through the words (one frame per word), written atomically; returns the path.

    All frames share one colour scale (``scale="shared"``, the colour bar reads
    attention weight), so a word that attends weakly looks weak. ``options``:
    the views' drawing options (:class:`~attnlab.plot.resolve.MapOptions`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    r = resolve(trace, layer=layer, head=head, words=words, **options)
    if not is_real(fps) or not 0 < float(fps) <= 100:
        raise AttnlabError(f"fps={fps!r} is not a frame rate: use a number above 0 (at most 100)")
    dpi = check_dpi(dpi)
    path = check_output_path(path, (".gif",), "an animation")

    shown, peaks, sc = maps.figure_maps(trace, [(t, r.layer, r.head) for t in r.steps], r.scale, r.smooth, r.interp)
    probs = r.probabilities()
    where = f"{maps.source_label(trace, r.layer, r.head)} \u00b7 model {trace.model_name}"
    H, W = trace.grid
    detail = f"{H} x {W} patches \u00b7 {underlay_note(r.underlay, len(r.outlines))}" + (
        f" \u00b7 {stretch_note(r.image_size)}" if stretch_note(r.image_size) else "")
    heads = [f"word {i + 1}/{len(r.steps)}, step {t}: {maps.word_label(trace, t, probs)}" for i, t in enumerate(r.steps)]
    pw, ph, _ = panel_size(r.image_size, 4.0)
    layout = panel_grid(1, 1, (pw, ph), font_scale=r.font_scale, title_lines=0, title=[max(heads, key=len), where, detail],
                        figsize=r.figsize, pyplot=False, dpi=dpi)
    fig, ax = layout.fig, layout.axes[0, 0]
    w_px, h_px = check_pixels(fig.get_size_inches(), dpi, "one GIF frame")
    if w_px * h_px * len(r.steps) > MAX_GIF_PIXELS:
        raise AttnlabError(f"{len(r.steps)} frames of {w_px} x {h_px} px are too many pixels: lower dpi or figsize, or pass fewer words")

    canvas = FigureCanvasAgg(fig)
    _, heat = draw_map(ax, trace.image, shown[0], sc, r.cmap, r.alpha, grid=trace.grid, grid_lines=r.grid_lines,
                       underlay=r.underlay, outlines=r.outlines)
    note = peak_note(ax, peaks[0], layout.font) if sc.kind == "panel" else None
    add_colorbar(fig, layout.cax, sc, r.cmap, layout.font)
    title = layout.title
    frames = []
    for i, t in enumerate(r.steps):
        heat.set_data(shown[i])
        if note is not None:
            note.set_text(f"peak {peaks[i]:.3f}")
        title.set_text("\n".join([heads[i], where, detail]))
        canvas.draw()
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (h_px, w_px, 3)
        frames.append(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE))  # 1 byte per pixel

    duration = int(round(1000.0 / float(fps)))
    return atomic_write(
        path,
        lambda fh: frames[0].save(fh, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0),
    )
