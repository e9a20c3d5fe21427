"""The explorer's controls: ipywidgets for the word, layer, head, view, opacity, smoothing and saving."""

from __future__ import annotations

from typing import Any, Callable

import ipywidgets as widgets

from ..plot import maps
from .views import State

VIEW_AVERAGED = "averaged"
VIEW_GRID = "per-head grid"

__all__ = ["Controls", "VIEW_AVERAGED", "VIEW_GRID"]


class Controls:
    """Every widget of the explorer (attributes named as in :class:`~attnlab.explorer.AttentionExplorer`)."""

    def __init__(self, trace: Any, step: int, layer: int, head: int | None, alpha: float, smooth: float, path: str) -> None:
        n_layers, n_heads = trace.num_layers, trace.num_heads
        method = maps.explanation_label(trace)  # an explanation: one map per word, named by its method
        self.slider = widgets.IntSlider(value=step, min=0, max=trace.steps - 1, step=1, description="word",
                                        continuous_update=True)
        self.word_label = widgets.Label()
        self.layer_dropdown = widgets.Dropdown(options=[(method or maps.layer_label(i, n_layers), i) for i in range(n_layers)],
                                               value=layer, description="method" if method else "layer", disabled=bool(method))
        self.head_dropdown = widgets.Dropdown(options=[("mean", "mean")] + [(str(h), h) for h in range(n_heads)],
                                              value="mean" if head is None else head, description="head", disabled=bool(method))
        self.view_toggle = widgets.ToggleButtons(options=[VIEW_AVERAGED, VIEW_GRID], value=VIEW_AVERAGED, disabled=bool(method))
        self.alpha_slider = widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="alpha",
                                                continuous_update=True)
        self.smooth_slider = widgets.FloatSlider(value=min(smooth, 3.0), min=0.0, max=3.0, step=0.25,
                                                 description="smooth", continuous_update=True)
        self.path_text = widgets.Text(value=path, description="save to")
        self.save_button = widgets.Button(description="save PNG", icon="save")
        self.status = widgets.Label()
        self._smooth = smooth  # beyond the slider's range until the slider moves

    def rows(self, image: widgets.Image) -> list[widgets.Widget]:
        """The explorer's rows, top to bottom, with ``image`` (the figure) in its place."""
        return [
            widgets.HBox([self.slider, self.word_label]),
            widgets.HBox([self.layer_dropdown, self.head_dropdown]),
            self.view_toggle,
            widgets.HBox([self.alpha_slider, self.smooth_slider]),
            image,
            widgets.HBox([self.path_text, self.save_button, self.status]),
        ]

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever a control that changes the figure moves."""
        def changed(change) -> None:
            if change["owner"] is self.smooth_slider:
                self._smooth = float(self.smooth_slider.value)
            callback()

        for w in (self.slider, self.layer_dropdown, self.head_dropdown, self.view_toggle, self.alpha_slider,
                  self.smooth_slider):
            w.observe(changed, names="value")

    @property
    def grid_view(self) -> bool:
        return self.view_toggle.value == VIEW_GRID

    def state(self) -> State:
        head = self.head_dropdown.value
        return State(step=int(self.slider.value), layer=int(self.layer_dropdown.value),
                     head=None if head == "mean" else int(head), alpha=float(self.alpha_slider.value),
                     smooth=self._smooth)
