"""The explorer widget: controls on top, the figure of the current view, a save row."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..errors import AttnlabError
from ..util import is_real
from ..plot import maps
from ..plot.multiview import is_multiview
from ..plot.export import check_dpi, check_pixels, save_figure
from ..plot.draw import underlay_note
from ..plot.resolve import DEFAULT_ALPHA, by_word, resolve
from .controls import VIEW_AVERAGED, VIEW_GRID, Controls
from .views import AveragedView, GridView, Style

__all__ = ["AttentionExplorer", "default_save_name", "explore"]


def default_save_name(trace: Any) -> str:
    """``attention-<model>-<8 hex digits>.png``: the digits come from the image, the tokens and the model, so two traces get two names."""
    digest = hashlib.sha256()
    for part in (str(trace.model_name).encode(), trace.token_ids.tobytes(), trace.image.tobytes()):
        digest.update(part)
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(trace.model_name)).strip("-.") or "model"
    return f"attention-{model}-{digest.hexdigest()[:8]}.png"


class AttentionExplorer(widgets.VBox):
    """The explorer widget (a ``VBox``); see :func:`explore`.

    Attributes for driving it from code: ``slider``, ``word_label``,
    ``layer_dropdown``, ``head_dropdown``, ``view_toggle``, ``alpha_slider``,
    ``smooth_slider``, ``path_text``, ``save_button``, ``status`` (a Label),
    ``image`` (the ``ipywidgets.Image``), ``figure`` (the current view's
    figure), ``heat_image`` (the averaged view's map), ``grid_images`` (the
    per-head grid's maps, heads then mean; empty until that view is shown),
    ``render()``, ``save(path)`` and ``last_render_s``.
    """

    def __init__(
        self,
        trace: Any,
        layer: int = -1,
        head: int | str = "mean",
        *,
        step: int | None = None,
        cmap=None,
        alpha: float = DEFAULT_ALPHA,
        smooth: float = 0.0,
        scale: str = "shared",
        interp: str = "bilinear",
        grid_lines: bool = False,
        path: str | None = None,
        dpi: float = 80,
        width_inches: float = 7.0,
        save_dpi: float = 150,
        font_scale: float = 1.0,
        underlay: str = "grey",
        outlines: Any = None,
    ) -> None:
        r = resolve(trace, layer=layer, head=head, cmap=cmap, alpha=alpha, smooth=smooth, scale=scale, interp=interp,
                    grid_lines=grid_lines, font_scale=font_scale, underlay=underlay, outlines=outlines)
        t0 = maps.default_steps(trace)[0] if step is None else trace.check_step(step)
        dpi, self._save_dpi = check_dpi(dpi), check_dpi(save_dpi, "save_dpi")
        if not is_real(width_inches) or not 2 <= width_inches <= 30:
            raise AttnlabError(f"width_inches={width_inches!r} is out of range: use a number from 2 to 30")
        check_pixels((width_inches, width_inches * 2), dpi, "the explorer's figure")
        self.trace = trace
        self._style = Style(cmap=r.cmap, scale=r.scale, interp=r.interp, grid_lines=r.grid_lines,
                            width=float(width_inches), dpi=dpi, font_scale=r.font_scale, underlay=r.underlay,
                            outlines=r.outlines)
        self._underlay = underlay_note(r.underlay, len(r.outlines), short=True)
        self._probs = r.probabilities()
        self._method = maps.explanation_label(trace)
        self._diagnostics = trace.diagnostics() if callable(getattr(trace, "diagnostics", None)) else None
        self._written: set[Path] = set()  # files this explorer saved (it may replace those)
        self.controls = Controls(trace, t0, r.layer, r.head, r.alpha, r.smooth, str(path or default_save_name(trace)))
        self.image = widgets.Image(format="png")
        self._views: dict[str, Any] = {VIEW_AVERAGED: AveragedView(trace, self._style, self._longest_title(False))}
        self.last_render_s = 0.0
        super().__init__(children=self.controls.rows(self.image))
        self.controls.on_change(self.render)
        self.controls.save_button.on_click(self._on_save)
        self.render()

    # ------------------------------------------------------------- state
    @property
    def step(self) -> int:
        return int(self.controls.slider.value)

    @property
    def layer(self) -> int:
        return int(self.controls.layer_dropdown.value)

    @property
    def head(self) -> int | str:
        return self.controls.head_dropdown.value

    @property
    def view(self) -> str:
        return self.controls.view_toggle.value

    def _view(self, key: str):
        if key not in self._views:
            self._views[key] = GridView(self.trace, self._style, self._longest_title(True))
        return self._views[key]

    @property
    def figure(self):
        """The matplotlib figure of the current view (built once, then updated in place)."""
        return self._view(self.view).figure.fig

    @property
    def heat_image(self):
        return self._views[VIEW_AVERAGED].images[0]

    @property
    def grid_images(self) -> list:
        view = self._views.get(VIEW_GRID)
        return [] if view is None else list(view.images)

    # ------------------------------------------------------------ render
    def _title_lines(self, step: int, layer: int, head: int | None, grid: bool) -> tuple[str, str]:
        """The figure's two title lines: the word; layer, head(s) (or the explanation's method) and model."""
        word = maps.word_label(self.trace, step, self._probs)
        if self._method:
            where = self._method
        else:
            heads = "every head and their mean" if grid else maps.head_label(head, self.trace.num_heads)
            where = f"{maps.layer_label(layer, self.trace.num_layers)} \u00b7 {heads}"
        return f"step {step}: {word}", f"{where} \u00b7 model {self.trace.model_name} \u00b7 {self._underlay}"

    def _longest_title(self, grid: bool) -> list[str]:
        """The longest title lines a view will show (its figure is made wide enough for them)."""
        T, L = self.trace.steps, self.trace.num_layers
        first = max((self._title_lines(t, 0, None, grid)[0] for t in range(T)), key=len)
        second = max((self._title_lines(0, li, h, grid)[1] for li in range(L) for h in (None, self.trace.num_heads - 1)), key=len)
        return [first, second]

    def _titles(self, state, grid: bool) -> tuple[str, str]:
        """(the figure's title, the label beside the slider: word, where, peak and the sanity diagnostics)."""
        first, second = self._title_lines(state.step, state.layer, state.head, grid)
        peak = "" if grid else f", peak {'' if self._method else 'weight '}{self._views[VIEW_AVERAGED].peaks[0]:.3f}"
        word = maps.word_label(self.trace, state.step, self._probs)
        where = second.rsplit(" \u00b7 model ", 1)[0]  # the label beside the slider: no model, no underlay
        checks = ""
        if self._diagnostics is not None and not grid:
            checks = " \u00b7 " + self._diagnostics.line(state.step, state.layer, "mean" if state.head is None else state.head)
        return f"{first}\n{second}", f"{state.step}: {word}, {where}{peak}{checks}"

    def render(self) -> bytes:
        """Bring the current view's figure up to date and put its PNG in ``self.image``; returns the PNG."""
        start = time.perf_counter()
        grid = self.controls.grid_view
        self.controls.head_dropdown.disabled = grid or bool(self._method)  # the grid shows every head; an explanation has none
        view = self._view(self.view)
        state = self.controls.state()
        title, _ = self._titles(state, grid)
        view.update(state, title)
        png = view.png()
        # show the PNG at its own pixel size: the browser would otherwise stretch it to the cell width
        width = f"{view.figure.width_px}px"
        if self.image.layout.width != width:
            self.image.layout.width = width
        self.controls.word_label.value = self._titles(state, grid)[1]
        self.image.value = png
        self.last_render_s = time.perf_counter() - start
        return png

    def invalidate(self) -> None:
        """Forget the saved backgrounds: the next render draws every figure in full."""
        for view in self._views.values():
            view.figure.invalidate()

    # -------------------------------------------------------------- save
    def save(self, path: str | None = None, *, overwrite: bool = False) -> Path:
        """Save the current view's figure (PNG, SVG or PDF by suffix) at ``save_dpi``; returns the path.

        Its title names the word, layer, head(s) and model. A file that this
        explorer did not write is never replaced unless ``overwrite=True``.
        """
        target = Path(self.controls.path_text.value if path is None else path).expanduser()
        if target.exists() and not target.is_dir() and not overwrite and target.resolve() not in self._written:
            raise AttnlabError(f"{target} already exists: choose another name (or call save(path, overwrite=True))")
        try:
            saved = save_figure(self.figure, target, dpi=self._save_dpi)
        finally:
            self.invalidate()  # savefig redrew the canvas at another dpi
        self._written.add(saved.resolve())
        return saved.resolve()

    def _on_save(self, _button=None) -> None:
        try:
            saved = self.save()
        except AttnlabError as exc:
            self.controls.status.value = f"not saved: {exc}"
        except OSError as exc:
            self.controls.status.value = f"not saved: {exc.strerror or exc} ({self.controls.path_text.value})"
        else:
            self.controls.status.value = f"saved to {saved}"


CONTROL_NAMES = ("slider", "word_label", "layer_dropdown", "head_dropdown", "view_toggle", "alpha_slider",
                 "smooth_slider", "path_text", "save_button", "status")
for _name in CONTROL_NAMES:  # the widgets, also as attributes of the explorer itself
    setattr(AttentionExplorer, _name, property(lambda self, name=_name: getattr(self.controls, name)))


@by_word
def explore(trace: Any, layer: int = -1, head: int | str = "mean", **options: Any) -> AttentionExplorer:
    """An interactive explorer of ``trace`` (an ``ipywidgets.VBox``); display it in a notebook.

    ``options``: ``step`` (first word shown), ``scale`` (``"shared"``, default:
    one colour scale for every word of the layer; ``"panel"``; ``"uniform"``),
    ``interp`` (``"nearest"`` = flat patches), ``grid_lines``, ``cmap``,
    ``alpha``, ``smooth``, ``path`` (default save name: unique per trace),
    ``width_inches`` (default 7) and ``dpi`` (default 80) set the figure's size
    on screen, ``font_scale`` (e.g. 1.5 to project), ``save_dpi`` (default 150),
    ``underlay`` (``"grey"``, default: the photo in grey under the map;
    ``"colour"``; ``"none"``: the map alone) and ``outlines`` (boolean object
    masks, e.g. :func:`attnlab.shapes.outlines`).
    A trace with several views of its image (a vision-language model's) gets a
    :class:`~attnlab.explorer.multiview.ViewsExplorer`: every view at its box on
    the photo, with the word, layer, head and opacity controls and a save row.
    """
    if is_multiview(trace):  # several views of the image: each at its box on the photo, shares printed
        from .multiview import ViewsExplorer

        return ViewsExplorer(trace, layer=layer, head=head, **options)
    return AttentionExplorer(trace, layer=layer, head=head, **options)
