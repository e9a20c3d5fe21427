"""Sink diagnostics of a vision-language trace: where a word's weight goes besides the photo's content.

Reading a vision-language model's attention as grounding has measured pitfalls: a few
fixed visual "sink" tokens take high weight whatever the word ("See What You Are Told",
ICLR 2025; massive activations, arXiv 2402.17762; ViT registers, arXiv 2309.16588), much
weight sits on keys that are no image token at all (the prompt, special tokens), and RoPE
favours the image rows nearest the text (Qwen3-VL #1551). :func:`diagnose_vision`
(``trace.diagnostics()`` of a trace of several views, or of one view with key shares other
than ``"prefix"``) reports, at one layer and one head or the mean over the layer's heads, per *word*
(pieces merged as the figures merge them, :meth:`~attnlab.trace.CaptionTrace.by_word`):

* **off-image shares**: each key kind's share of the whole row (``trace.key_shares``:
  prompt, special, newline, ...), each view's and the image's total, per word and as the
  mean over the caption's words;
* **visual sink tokens**: image tokens whose weight exceeds :data:`SINK_FACTOR` times the
  uniform weight over the image tokens (the word's image share divided by the number of
  image tokens of all views) for at least :data:`SINK_WORDS` of the words; each with its
  view, row and column, its box on the photo and its share (mean over words, of the row);
* **weight by grid row** (position bias): per view, each grid row's share of the row, mean
  over words, and the ratio last row / first row.

``k = 5``: a sink token of the papers holds tens to hundreds of times the uniform weight,
while a word's map over an object spreads over its tokens; 5 is low enough to catch a sink
in a grid of a few dozen tokens and high enough that noise around the uniform weight never
passes. "Most words" (half or more) is what separates a sink from a content peak: a word's
object moves from word to word, a sink stays. A token that every word of the caption is
about also passes (one object described word after word): compare with another prompt or
caption. With ``SINK_FACTOR`` image tokens or fewer no token can pass (its weight would exceed
the whole image's), and a caption of fewer than :data:`~attnlab.diagnostics.MIN_SINK_STEPS` (3) words has
none (its line says so: a word's own peak would pass). Shares are of the whole row, as recorded: nothing is
renormalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .diagnostics import MIN_SINK_STEPS, diagnose
from .errors import AttnlabError

__all__ = ["SINK_FACTOR", "SINK_WORDS", "SinkToken", "VisionDiagnostics", "diagnose_vision", "diagnostics_of", "is_vision_language",
           "sink_line"]

SINK_FACTOR = 5.0  # k: a sink token takes more than k times the uniform weight over the image tokens ...
SINK_WORDS = 0.5  # ... for at least this fraction of the words


@dataclass(frozen=True)
class SinkToken:
    """One visual sink token: cell ``(row, col)`` of view ``view`` (``view_index`` in ``trace.views``),
    ``box = (x0, y0, x1, y1)`` its area on the photo (pixels of ``trace.image``, may overhang it),
    ``share`` its weight (of the whole row) averaged over the words, ``words`` the fraction of the
    words for which it took more than :data:`SINK_FACTOR` times the uniform weight.

    ``SINK_FACTOR`` 5 and ``SINK_WORDS`` one half: the module docstring gives the reasons."""

    view: str
    view_index: int
    row: int
    col: int
    box: tuple[float, float, float, float]
    share: float
    words: float


@dataclass
class VisionDiagnostics:
    """The sink diagnostics of a vision-language trace at ``layer`` and ``head`` (``"mean"``: the mean over
    the layer's heads); see :mod:`attnlab.sinks`. Per-word arrays are ``(words,)``: ``words`` are the
    trace's words (pieces merged, ``trace.by_word()``).

    Attributes:
        shares: kind -> ``(words,)``, every key kind's share of the row (``trace.key_shares``).
        view_shares: view name -> ``(words,)``, the weight on each view's tokens.
        image: ``(words,)``, the weight on every image token (the views' shares summed).
        sinks: the sink tokens, largest share first.
        sink_share: ``(words,)``, the sink tokens' weight together, per word.
        row_weights: view name -> ``(h,)``, each grid row's share of the row, mean over words.
        row_ratio: view name -> last row / first row of ``row_weights`` (``inf`` when the first row
            has none, ``nan`` when neither has any).
    """

    layer: int
    head: int | str
    words: list[str]
    shares: dict[str, np.ndarray]
    view_shares: dict[str, np.ndarray]
    image: np.ndarray
    sinks: tuple[SinkToken, ...]
    sink_share: np.ndarray
    row_weights: dict[str, np.ndarray]
    row_ratio: dict[str, float]
    _trace: Any = field(default=None, repr=False, compare=False)
    _lines: dict = field(default_factory=dict, repr=False, compare=False)  # (layer, head) -> the line there

    @property
    def caption_shares(self) -> dict[str, float]:
        """Over the caption (mean over words): ``"image"`` (every view together), then every key kind; they sum
        to 1 (the whole row) where the trace's rows do."""
        return {name: _mean(arr) for name, arr in [("image", self.image), *self.shares.items()]}

    @property
    def caption_view_shares(self) -> dict[str, float]:
        """Over the caption (mean over words): every view's share by name (together ``caption_shares["image"]``)."""
        return {name: _mean(arr) for name, arr in self.view_shares.items()}

    def line(self, step: Any = None, layer: Any = None, head: Any = None) -> str:
        """The one line every figure and explorer prints, e.g. ``"sink: 3 tokens take 41% for 90% of words"``
        (``"no sink tokens"`` when none); see :func:`sink_line`. ``step`` is accepted for the explorer's call
        (``line(step, layer, head)``) and changes nothing: sinks are found over every word. A ``layer`` or
        ``head`` other than this report's computes the report there."""
        if layer is not None or head is not None:
            if self._trace is None:
                raise AttnlabError("this report holds no trace: call trace.diagnostics(layer, head) for another layer or head")
            li = self.layer if layer is None else self._trace.check_layer(layer)
            hi = self.head if head is None else self._trace.check_head(head)
            key = (li, "mean" if hi is None else hi)
            if key != (self.layer, self.head):
                if key not in self._lines:  # the explorer asks on every redraw
                    self._lines[key] = diagnose_vision(self._trace, *key).line()
                return self._lines[key]
        return sink_line(self.sinks, self.sink_share)


def _mean(arr: np.ndarray) -> float:
    return float(np.mean(arr)) if np.size(arr) else 0.0


def sink_line(sinks: tuple[SinkToken, ...], sink_share: np.ndarray) -> str:  # sink_share: (words,)
    """``"sink: 3 tokens take 41% for 90% of words"``: how many sink tokens, their weight together (mean over
    words, of the whole row) and the fewest words any of them is a sink for; ``"no sink tokens"`` when none."""
    if np.size(sink_share) < MIN_SINK_STEPS:
        return f"sink: n/a (fewer than {MIN_SINK_STEPS} words)"
    if not sinks:
        return "no sink tokens"
    n = len(sinks)
    share = float(np.mean(sink_share)) if np.size(sink_share) else 0.0
    words = min(s.words for s in sinks)
    return f"sink: {n} token{'s' if n > 1 else ''} take{'' if n > 1 else 's'} {share:.0%} for {words:.0%} of words"


def is_vision_language(trace: Any) -> bool:
    """True for a trace whose diagnostics are :func:`diagnose_vision`'s: several views, one view whose box is
    not the whole photo (a processor's crop), or key shares of a kind other than ``"prefix"`` (a prompt)."""
    views = trace.views
    if len(views) > 1 or any(kind != "prefix" for kind in (getattr(trace, "key_shares", None) or {})):
        return True
    height, width = np.asarray(trace.image).shape[:2]
    return any(abs(float(a) - b) > 0.5 for a, b in zip(views[0].box, (0.0, 0.0, width, height)))


def diagnostics_of(trace: Any, layer: Any = None, head: Any = None) -> Any:
    """``trace.diagnostics(layer, head)``: :func:`diagnose_vision` for a vision-language trace
    (:func:`is_vision_language`), else :func:`attnlab.diagnostics.diagnose` (every layer and head; passing
    ``layer`` or ``head`` is then a one-line error)."""
    if is_vision_language(trace):
        return diagnose_vision(trace, -1 if layer is None else layer, "mean" if head is None else head)
    if layer is not None or head is not None:
        raise AttnlabError("this single-view trace's diagnostics cover every layer and head: call trace.diagnostics() "
                           "and choose them in .line(step, layer, head)")
    return diagnose(trace)


def _pick(arr: np.ndarray, layer: int, head: int | None) -> np.ndarray:
    """``arr`` ``(layers, heads, steps, ...)`` at one layer and head (or the mean over heads): ``(steps, ...)``."""
    a = np.asarray(arr[layer], dtype=np.float64)  # (heads, steps, ...)
    return a.mean(axis=0) if head is None else a[head]


def _cell_box(view: Any, row: int, col: int) -> tuple[float, float, float, float]:
    """Cell ``(row, col)``'s area on the photo: the view's box split evenly into its grid."""
    (h, w), (x0, y0, x1, y1) = view.grid, view.box
    cw, ch = (x1 - x0) / w, (y1 - y0) / h
    return (x0 + col * cw, y0 + row * ch, x0 + (col + 1) * cw, y0 + (row + 1) * ch)


def _ratio(rows: np.ndarray) -> float:
    first, last = float(rows[0]), float(rows[-1])
    if first > 0:
        return last / first
    return math.inf if last > 0 else math.nan


def diagnose_vision(trace: Any, layer: Any = -1, head: Any = "mean") -> VisionDiagnostics:
    """The sink diagnostics of ``trace`` at ``layer`` (negative counts from the end) and ``head`` (an index or
    ``"mean"``, the mean over the layer's heads); see the module docstring."""
    li, hi = trace.check_layer(layer), trace.check_head(head)
    trace = trace.by_word()  # words, as the figures count them: a word's map is the mean of its pieces'
    views = trace.views
    maps = [_pick(trace.view_attention(i), li, hi) for i in range(len(views))]  # (words, h, w) each
    steps = trace.steps
    view_shares = {v.name: m.sum(axis=(-2, -1)) for v, m in zip(views, maps)}  # name -> (words,)
    image = np.sum([s for s in view_shares.values()], axis=0) if maps else np.zeros(steps)  # (words,)
    shares = {str(k): _pick(v, li, hi) for k, v in (trace.key_shares or {}).items()}  # kind -> (words,)
    tokens = sum(v.grid[0] * v.grid[1] for v in views)
    threshold = SINK_FACTOR * image / tokens  # (words,) k times the uniform weight over the image tokens
    found, together = [], np.zeros(steps)  # together: (words,) the sink tokens' weight summed
    for i, (view, m) in enumerate(zip(views, maps)):
        above = m > threshold[:, None, None]  # (steps, h, w)
        frac = above.mean(axis=0) if steps else np.zeros(view.grid)  # (h, w) fraction of words
        for r, c in zip(*np.nonzero((frac >= SINK_WORDS) & (steps >= MIN_SINK_STEPS))):
            found.append(SinkToken(view.name, i, int(r), int(c), _cell_box(view, int(r), int(c)),
                                   float(m[:, r, c].mean()), float(frac[r, c])))
            together += m[:, r, c]
    found.sort(key=lambda s: (-s.share, s.view_index, s.row, s.col))
    rows = {v.name: (m.sum(axis=-1).mean(axis=0) if steps else np.zeros(v.grid[0])) for v, m in zip(views, maps)}  # (h,)
    return VisionDiagnostics(
        layer=li, head="mean" if hi is None else hi, words=list(trace.words), shares=shares, view_shares=view_shares,
        image=image, sinks=tuple(found), sink_share=together, row_weights=rows,
        row_ratio={name: _ratio(r) for name, r in rows.items()}, _trace=trace,
    )
