"""The explorer's two views, each a :class:`~attnlab.explorer.canvas.BlittedFigure` updated in place.

* :class:`AveragedView`: one map (a head, or the mean over heads) over the image.
* :class:`GridView`: every head of the layer and their mean, side by side.

Both colour with an :class:`attnlab.plot.maps.Scale`. With ``"shared"`` and
``"uniform"`` the scale covers every word of the current layer (and head, or
heads), so moving the word slider never changes what a colour means; it is
recomputed (and the colour bar redrawn) only when the layer, head or
smoothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..plot import maps
from ..plot.draw import add_colorbar, draw_map, panel_grid, panel_size, peak_note
from .canvas import BlittedFigure

__all__ = ["AveragedView", "GridView", "State", "Style"]


@dataclass(frozen=True)
class State:
    """What the controls select: step, layer, head (``None`` = mean), opacity, smoothing."""

    step: int
    layer: int
    head: int | None
    alpha: float
    smooth: float


@dataclass(frozen=True)
class Style:
    """How the explorer draws (fixed when it is made)."""

    cmap: Any
    scale: str
    interp: str
    grid_lines: bool
    width: float  # inches
    dpi: float
    font_scale: float
    underlay: str = "grey"  # what lies under the maps: "grey", "colour" or "none"
    outlines: tuple = ()  # boolean object masks outlined over every panel


class _MapView:
    """Panels of maps over the image, one per entry of :meth:`heads`, with a colour bar and a two-line title."""

    name = ""

    def __init__(self, trace: Any, style: Style, rows: int, cols: int, panel_titles: list[str] | None,
                 longest_title: list[str]) -> None:
        # room (height and width) for the longest title update() will set
        self.trace, self.style = trace, style
        pw, ph, _ = panel_size(trace.image.shape[:2], 4.0)
        layout = panel_grid(rows, cols, (pw, ph), font_scale=style.font_scale, title_lines=1 if panel_titles else 0,
                            title=longest_title, colorbar=True, pyplot=False, dpi=style.dpi, fit_width=style.width,
                            max_size=(style.width, style.width * 1.25))  # tall images: not taller than a screen
        self.figure = BlittedFigure(layout.fig)
        self._cax, self._font = layout.cax, layout.font
        self._key: tuple | None = None  # what the current scale was computed for
        self.scale = maps.build_scale(style.scale, [np.zeros(trace.grid)], self._patches, maps.quantity(trace))
        self.images: list[Any] = []  # the maps' AxesImages, one per panel
        self.notes: list[Any] = []  # the panels' peak labels (scale="panel" only)
        blank = np.zeros(trace.grid if style.interp == "nearest" else trace.image.shape[:2], dtype=np.float32)
        n = len(panel_titles) if panel_titles else 1
        for i, ax in enumerate(layout.axes.ravel()):
            if i >= n:
                ax.set_axis_off()
                continue
            _, heat = draw_map(ax, trace.image, blank, self.scale, style.cmap, 0.5, grid=trace.grid,
                               grid_lines=style.grid_lines, underlay=style.underlay, outlines=style.outlines)
            self.images.append(heat)
            if panel_titles:
                ax.set_title(panel_titles[i], fontsize=self._font, y=1.0)
            if style.scale == "panel":
                self.notes.append(peak_note(ax, 0.0, self._font))
        # two title lines as two texts, both at fixed places: the word changes with the slider (redrawn each
        # time); the layer, head and model line only with the dropdowns (kept in the background)
        fig, title = layout.fig, layout.title
        title.set_text(" ")
        line = self._font * 1.1 * 1.35 / 72 / fig.get_size_inches()[1]  # one title line, in figure fractions
        self.title = title
        self.subtitle = fig.text(0.5, title.get_position()[1] - line, " ", ha="center", va="top",
                                 fontsize=self._font * 1.1)
        # redrawn on every change, in the order a full draw uses: the maps, the patch-grid lines and frames over them
        over = [a for ax in layout.axes.ravel()[:n] for a in (*ax.collections, *ax.spines.values())]
        self.figure.dynamic = [*self.images, *over, *self.notes, self.title]
        self._colorbar()
        self.peaks = [0.0] * n

    @property
    def _patches(self) -> int:
        return int(self.trace.grid[0] * self.trace.grid[1])

    def heads(self, state: State) -> list[int | None]:
        raise NotImplementedError

    def _colorbar(self) -> None:
        self._cax.clear()
        add_colorbar(self.figure.fig, self._cax, self.scale, self.style.cmap, self._font)
        self.figure.invalidate()

    def _update_scale(self, state: State, heads: list[int | None]) -> None:
        """For "shared"/"uniform": one scale over every word of the shown layer and heads (kept while they stay)."""
        key = (state.layer, tuple(heads), state.smooth)
        if key == self._key or self.style.scale == "panel":
            return
        grids = [maps.grid_map(self.trace, t, state.layer, "mean" if h is None else h, state.smooth)
                 for h in heads for t in range(self.trace.steps)]  # each (H, W)
        scale = maps.build_scale(self.style.scale, grids, self._patches, maps.quantity(self.trace))
        self._key = key
        if scale != self.scale:
            self.scale = scale
            for heat in self.images:
                heat.set_clim(*scale.limits)
            self._colorbar()

    def update(self, state: State, title: str) -> None:
        """Show ``state``: every panel's map, its peak note, the title (two lines: the word; layer, head, model)."""
        heads = self.heads(state)
        self._update_scale(state, heads)
        for i, (heat, h) in enumerate(zip(self.images, heads)):
            g = maps.grid_map(self.trace, state.step, state.layer, "mean" if h is None else h, state.smooth)  # (H, W)
            shown = g if self.style.interp == "nearest" else maps.resize(g, self.trace.image.shape[:2], self.style.interp)
            self.peaks[i] = float(g.max())
            heat.set_data(self.scale.values(shown, self.peaks[i]))
            heat.set_alpha(1.0 if self.style.underlay == "none" else state.alpha)  # no photo: the map is opaque
            if self.notes:
                self.notes[i].set_text(f"peak {self.peaks[i]:.3f}")
        first, second = title.split("\n", 1)
        self.title.set_text(first)
        if self.subtitle.get_text() != second:
            self.subtitle.set_text(second)
            self.figure.invalidate()  # a static part changed

    def png(self) -> bytes:
        return self.figure.png()


class AveragedView(_MapView):
    """One map over the image: the selected head, or the mean over heads."""

    name = "averaged"

    def __init__(self, trace: Any, style: Style, longest_title: list[str]) -> None:
        super().__init__(trace, style, 1, 1, None, longest_title)

    def heads(self, state: State) -> list[int | None]:
        return [state.head]


class GridView(_MapView):
    """Every head of the layer, then their mean, in a near-square grid of panels."""

    name = "per-head grid"

    def __init__(self, trace: Any, style: Style, longest_title: list[str]) -> None:
        n_heads = trace.num_heads
        n = n_heads + 1
        cols = math.ceil(math.sqrt(n))
        titles = [f"head {h}" for h in range(n_heads)] + ["mean"]
        super().__init__(trace, style, math.ceil(n / cols), cols, titles, longest_title)

    def heads(self, state: State) -> list[int | None]:
        return [*range(self.trace.num_heads), None]
