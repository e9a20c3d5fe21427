"""The explorer of a trace with several views of its image (vision-language models, issue 21).

The same controls as :class:`~attnlab.explorer.AttentionExplorer` where they apply (word slider, layer and
head dropdowns, opacity, a save row); each move redraws :func:`attnlab.plot.multiview.views_figure`: every
view at its box on the photo, overlapping (base/global) views in their own panel, every view's and every
other kind of key's share in the title, and under them the sink line of the shown layer and head
(``trace.diagnostics(layer, head)``, computed once per layer and head). The colour scale covers every
word of the shown layer and head, so moving the word slider never changes what a colour means.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..errors import AttnlabError
from ..plot import maps
from ..plot.export import check_dpi, save_figure
from ..plot.multiview import MULTIVIEW_OPTIONS, layer_peak, views_figure
from ..plot.resolve import DEFAULT_ALPHA, check_alpha

__all__ = ["ViewsExplorer"]


class ViewsExplorer(widgets.VBox):
    """The explorer widget of a multi-view trace; ``slider``, ``layer_dropdown``, ``head_dropdown``,
    ``alpha_slider``, ``path_text``, ``save_button``, ``status``, ``image``, ``figure``, ``render()``, ``save(path)``."""

    def __init__(self, trace: Any, layer: int = -1, head: int | str = "mean", *, step: int | None = None,
                 alpha: float = DEFAULT_ALPHA, path: str | None = None, dpi: float = 80, save_dpi: float = 150,
                 **style: Any) -> None:
        unknown = sorted(set(style) - (MULTIVIEW_OPTIONS - {"alpha"}))
        if unknown:
            raise AttnlabError(f"{unknown[0]}= is not drawn for a trace with several views: leave it out (the explorer "
                               f"takes step, alpha, path, dpi, save_dpi, {', '.join(sorted(MULTIVIEW_OPTIONS - {'alpha'}))})")
        layers, heads = trace.view_attention(0).shape[:2]
        self.trace, self._style = trace, style
        self._dpi, self._save_dpi = check_dpi(dpi), check_dpi(save_dpi, "save_dpi")
        self.figure = views_figure(trace, 0 if step is None else step, layer, head, alpha=alpha, pyplot=False,
                                   dpi=self._dpi, **style)  # checks every argument once
        self._written: set[Path] = set()
        self._peaks: dict[tuple, float] = {}  # (layer, head) -> the top of the colour scale
        self._sinks: dict[tuple, Any] = {}  # (layer, head) -> trace.diagnostics(layer, head): its line, its sink tokens
        self.slider = widgets.IntSlider(value=trace.check_step(0 if step is None else step), min=0,
                                        max=len(trace.words) - 1, description="word")
        self.layer_dropdown = widgets.Dropdown(options=[(maps.layer_label(i, layers), i) for i in range(layers)],
                                               value=int(layer) % layers, description="layer")
        self.head_dropdown = widgets.Dropdown(options=[("mean", "mean")] + [(str(h), h) for h in range(heads)],
                                              value=head, description="head")
        self.alpha_slider = widgets.FloatSlider(value=check_alpha(alpha), min=0.0, max=1.0, step=0.05,
                                                description="alpha")
        self.path_text = widgets.Text(value=str(path or f"attention-views-{trace.model_name}.png"), description="save to")
        self.save_button = widgets.Button(description="save PNG", icon="save")
        self.status, self.image = widgets.Label(), widgets.Image(format="png")
        super().__init__(children=[widgets.HBox([self.slider]), widgets.HBox([self.layer_dropdown, self.head_dropdown]),
                                   self.alpha_slider, self.image,
                                   widgets.HBox([self.path_text, self.save_button, self.status])])
        for w in (self.slider, self.layer_dropdown, self.head_dropdown, self.alpha_slider):
            w.observe(lambda _change: self.render(), names="value")
        self.save_button.on_click(self._on_save)
        self.last_render_s = 0.0
        self.render()

    def render(self) -> bytes:
        """Redraw the figure for the controls' values and show its PNG; returns the PNG."""
        import io

        start = time.perf_counter()
        layer, head = int(self.layer_dropdown.value), self.head_dropdown.value
        if (layer, head) not in self._peaks:
            self._peaks[(layer, head)] = layer_peak(self.trace, layer, head)
            self._sinks[(layer, head)] = self.trace.diagnostics(layer, head)
        self.figure = views_figure(self.trace, int(self.slider.value), layer, head, alpha=self.alpha_slider.value,
                                   pyplot=False, dpi=self._dpi, vmax=self._peaks[(layer, head)],
                                   sinks=self._sinks[(layer, head)], **self._style)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=self._dpi)
        self.image.value = buffer.getvalue()
        self.last_render_s = time.perf_counter() - start
        return self.image.value

    def save(self, path: str | None = None, *, overwrite: bool = False) -> Path:
        """Save the current figure (PNG, SVG or PDF by suffix) at ``save_dpi``; a file this explorer did not
        write is never replaced unless ``overwrite=True``."""
        target = Path(self.path_text.value if path is None else path).expanduser()
        if target.exists() and not target.is_dir() and not overwrite and target.resolve() not in self._written:
            raise AttnlabError(f"{target} already exists: choose another name (or call save(path, overwrite=True))")
        saved = save_figure(self.figure, target, dpi=self._save_dpi).resolve()
        self._written.add(saved)
        return saved

    def _on_save(self, _button=None) -> None:
        try:
            self.status.value = f"saved to {self.save()}"
        except (AttnlabError, OSError) as exc:
            self.status.value = f"not saved: {exc}"
