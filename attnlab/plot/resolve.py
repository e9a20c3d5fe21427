"""One argument check for every view, the explorer and the HTML export.

Each view calls :func:`resolve` with the trace and the options it offers;
the answer is a :class:`Resolved` with every option checked and normalised
(``layer=-1`` becomes the last layer's index, ``head="mean"`` becomes ``None``,
``words=None`` becomes the list of steps to show, ``cmap`` a colormap). A bad
value raises :class:`~attnlab.errors.AttnlabError` with one line that says
what to pass instead, before anything is drawn or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
from typing import Any, Callable, TypedDict

import numpy as np

from ..errors import AttnlabError
from ..sinks import is_vision_language
from ..util import is_int, is_real
from . import maps
from .draw import DEFAULT_UNDERLAY, check_outlines, check_underlay

DEFAULT_CMAP = "inferno"  # "shared" and "panel" scales: dark = little weight, bright = much
"""The colour map of the views (``"shared"`` and ``"panel"`` scales)."""
DEFAULT_UNIFORM_CMAP = "RdBu_r"  # "uniform" scale: blue = less than uniform, white = uniform, red = more
DEFAULT_ALPHA = 0.6
"""The maps' opacity over the image."""
MAX_FIGURE_INCHES = 60.0  # per side: at 100 dpi, 6000 px
MAX_FONT_SCALE = 5.0

__all__ = [
    "by_word",
    "DEFAULT_ALPHA",
    "DEFAULT_CMAP",
    "DEFAULT_UNIFORM_CMAP",
    "MapOptions",
    "Resolved",
    "check_alpha",
    "check_cmap",
    "check_count",
    "check_figsize",
    "check_font_scale",
    "check_trace",
    "resolve",
]


class MapOptions(TypedDict, total=False):
    """Drawing options of every view that draws maps over the image (and of ``save_gif``), all optional.

    ``scale``: ``"shared"`` (default), ``"panel"`` or ``"uniform"``; ``interp``: ``"bilinear"``
    (default), ``"bicubic"`` or ``"nearest"``; ``grid_lines`` (default False); ``cmap`` (default by
    scale); ``alpha`` (default 0.6); ``smooth`` (default 0, Gaussian sigma in patches); ``figsize``
    (inches, default: fitted to the image); ``font_scale`` (default 1); ``underlay``: ``"grey"``
    (default: the photo in grey, so object colours never read as attention), ``"colour"`` or
    ``"none"`` (the map alone, opaque); ``outlines``: boolean object masks outlined over every map
    (e.g. :func:`attnlab.shapes.outlines`). See :mod:`attnlab.plot.views`.
    """

    scale: str
    interp: str
    grid_lines: bool
    cmap: Any
    alpha: float
    smooth: float
    figsize: tuple[float, float] | None
    font_scale: float
    underlay: str
    outlines: Any


@dataclass(frozen=True)
class Resolved:
    """The checked options of one view (fields a view did not ask for keep their defaults)."""

    trace: Any
    step: int = 0
    layer: int = -1
    head: int | None = None  # None = the mean over heads
    steps: list[int] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA
    smooth: float = 0.0
    interp: str = "bilinear"
    scale: str = "shared"
    cmap: Any = None  # a matplotlib Colormap
    figsize: tuple[float, float] | None = None
    ax: Any = None
    font_scale: float = 1.0
    grid_lines: bool = False
    ncols: int | None = None
    underlay: str = DEFAULT_UNDERLAY  # "grey", "colour" or "none"
    outlines: tuple = ()  # boolean object masks, each (h, w)

    @property
    def layers(self) -> int:
        return self.trace.num_layers

    @property
    def heads(self) -> int:
        return self.trace.num_heads

    @property
    def patches(self) -> int:
        return int(self.trace.grid[0] * self.trace.grid[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image the model saw."""
        return tuple(self.trace.image.shape[:2])

    def probabilities(self) -> np.ndarray | None:
        """``(steps,)`` probability of each emitted token, or ``None`` when the trace holds no scores."""
        return self.trace.probabilities()  # None without scores; a by-word trace gives each word's product


def is_multiview(trace: Any) -> bool:
    """True when ``trace`` must be drawn view by view (:mod:`attnlab.plot.multiview`), with every view at its
    box on the photo and every share of the row printed: a vision-language trace
    (:func:`attnlab.sinks.is_vision_language`: several views, one view whose box is not the whole image, or
    key shares of a prompt) or a composed view (BLIP-2: its name must be printed). A captioner's trace with
    one grid over the whole image (and at most prefix keys) is none of these."""
    views = getattr(trace, "views", None)
    if views is None or len(views) == 0:
        return False
    return any(getattr(v, "composed", False) for v in views) or is_vision_language(trace)


def check_trace(trace: Any) -> Any:
    """A :class:`~attnlab.trace.CaptionTrace` with attention and an RGB image, or a one-line error."""
    if is_multiview(trace):
        n = len(trace.views)
        whole = n == 1 and all(abs(float(a) - b) < 0.5 for a, b in zip(trace.views[0].box, (0, 0, *np.asarray(trace.image).shape[1::-1])))
        what = f"{n} views of its image" if n > 1 else "one view of a part of its image (a crop)"
        what = "rows that also weigh a prompt (its share must be printed beside the map)" if whole else what
        what = f"a composed view ({trace.views[0].name})" if n == 1 and getattr(trace.views[0], "composed", False) else what
        raise AttnlabError(f"this figure draws one grid over the whole image and the trace has {what}: use "
                           "plot.overlay(trace, step), plot.word_grid, attnlab.explore(trace) or attnlab.export_html, which draw every view")
    if not all(hasattr(trace, name) for name in ("words", "image", "require_attention", "check_layer")):
        raise AttnlabError(f"expected a CaptionTrace, got {type(trace).__name__}: pass the result of attnlab.caption")
    ca = trace.require_attention()
    if ca.ndim != 5 or 0 in ca.shape:
        raise AttnlabError(
            f"cross_attention has shape {tuple(ca.shape)}: expected a non-empty (layers, heads, steps, H, W) array"
        )
    image = np.asarray(trace.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise AttnlabError(f"trace.image has shape {tuple(image.shape)}: expected an RGB image (height, width, 3)")
    return trace


# ------------------------------------------------------------- one check per option
def _steps(trace: Any, words: Any) -> list[int]:
    if words is None:
        return maps.default_steps(trace)
    if isinstance(words, (str, bytes)) or not hasattr(words, "__iter__"):
        raise AttnlabError(f"words={words!r} is not a list of step indices: pass e.g. words=[0, 2, 3] or None for all")
    steps = [trace.check_step(w) for w in words]
    if not steps:
        raise AttnlabError("words=[] selects nothing: pass at least one step index or None for all")
    return steps


def check_alpha(alpha: Any) -> float:
    """An opacity from 0 to 1, or a one-line error."""
    if not is_real(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise AttnlabError(f"alpha={alpha!r} is not an opacity: use a number from 0 to 1")
    return float(alpha)


def check_figsize(figsize: Any) -> tuple[float, float] | None:
    """``None`` or a (width, height) pair in inches, each above 0 and at most ``MAX_FIGURE_INCHES``."""
    if figsize is None:
        return None
    try:
        w, h = (float(v) for v in figsize)
    except (TypeError, ValueError):
        raise AttnlabError(f"figsize={figsize!r} is not a (width, height) pair in inches: pass e.g. (6, 4)") from None
    if not (0 < w <= MAX_FIGURE_INCHES and 0 < h <= MAX_FIGURE_INCHES):
        raise AttnlabError(f"figsize={figsize!r} must be two numbers above 0 and at most {MAX_FIGURE_INCHES:g} (inches)")
    return (w, h)


def check_ax(trace: Any, ax: Any) -> Any:
    """``ax`` when it is a matplotlib Axes (or ``None``); a one-line error otherwise."""
    if ax is None:
        return None
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise AttnlabError(f"ax={ax!r} is not a matplotlib Axes: pass one from plt.subplots() or leave it out")
    return ax


def check_font_scale(value: Any) -> float:
    """A factor for every font of a figure, from 0.25 to ``MAX_FONT_SCALE``."""
    if not is_real(value) or not 0.25 <= float(value) <= MAX_FONT_SCALE:
        raise AttnlabError(f"font_scale={value!r} is out of range: use a number from 0.25 to {MAX_FONT_SCALE:g} (1 = normal, 1.6 = slides)")
    return float(value)


def _flag(name: str) -> Callable[[Any, Any], bool]:
    def check(trace: Any, value: Any) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise AttnlabError(f"{name}={value!r} must be True or False")
        return bool(value)

    return check


def check_count(name: str, value: Any, allow_none: bool = True) -> int | None:
    """A positive integer (or ``None`` when allowed), or a one-line error naming the option."""
    if value is None and allow_none:
        return None
    if not is_int(value) or int(value) < 1:
        raise AttnlabError(f"{name}={value!r} must be a positive integer" + (" (or None)" if allow_none else ""))
    return int(value)


def _scale(trace: Any, value: Any) -> str:
    if not isinstance(value, str) or value not in maps.SCALES:
        raise AttnlabError(f"scale={value!r} is not supported: use 'shared' (one scale), 'panel' (each its own) or 'uniform'")
    return value


_CHECKS: dict[str, Callable[[Any, Any], Any]] = {
    "step": lambda trace, v: trace.check_step(v),
    "layer": lambda trace, v: trace.check_layer(v),
    "head": lambda trace, v: trace.check_head(v),
    "words": _steps,
    "alpha": lambda trace, v: check_alpha(v),
    "smooth": lambda trace, v: maps.check_smooth(v),
    "interp": lambda trace, v: maps.check_interp(v),
    "scale": _scale,
    "figsize": lambda trace, v: check_figsize(v),
    "ax": check_ax,
    "font_scale": lambda trace, v: check_font_scale(v),
    "grid_lines": _flag("grid_lines"),
    "ncols": lambda trace, v: check_count("ncols", v),
    "underlay": lambda trace, v: check_underlay(v),
    "outlines": lambda trace, v: check_outlines(v),
}


def check_cmap(cmap: Any, scale: str = "shared"):
    """A matplotlib colormap (``None`` = the default for ``scale``), or a one-line error."""
    import matplotlib

    if cmap is None:
        cmap = DEFAULT_UNIFORM_CMAP if scale == "uniform" else DEFAULT_CMAP
    try:
        return matplotlib.colormaps.get_cmap(cmap)
    except (KeyError, ValueError, TypeError):
        raise AttnlabError(f"cmap={cmap!r} is not a matplotlib colormap: use a name like 'inferno' or 'viridis'") from None


def resolve(trace: Any, **options: Any) -> Resolved:
    """Check ``trace`` and every option given (see :class:`Resolved` for the names); returns them normalised.

    ``words`` becomes ``steps``; ``cmap`` is checked after ``scale`` (its
    default depends on the scale); ``ax`` and ``figsize`` exclude each other.
    """
    check_trace(trace)
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name == "cmap":
            continue
        if name not in _CHECKS:
            raise TypeError(f"got an unexpected keyword argument {name!r}")
        values["steps" if name == "words" else name] = _CHECKS[name](trace, value)
    if values.get("ax") is not None and values.get("figsize") is not None:
        raise AttnlabError("pass either ax or figsize, not both")
    values["cmap"] = check_cmap(options.get("cmap"), values.get("scale", "shared"))
    return Resolved(trace=trace, **values)


def by_word(view: Callable[..., Any]) -> Callable[..., Any]:
    """Give a view taking a trace first the option ``pieces=False``.

    By default the view draws whole words: WordPiece (``##``) and byte-level
    BPE pieces are merged, each word's map the mean of its pieces' maps
    (:meth:`~attnlab.trace.CaptionTrace.by_word`); step indices then count
    words. ``pieces=True`` draws one panel per token, as decoded.
    """

    @functools.wraps(view)
    def wrapper(trace: Any, *args: Any, pieces: bool = False, **kwargs: Any) -> Any:
        if not isinstance(pieces, (bool, np.bool_)):
            raise AttnlabError(f"pieces={pieces!r} must be True (one panel per token) or False (per word)")
        if not pieces and callable(getattr(trace, "by_word", None)):
            trace = trace.by_word()
        return view(trace, *args, **kwargs)

    return wrapper

