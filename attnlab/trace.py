"""`CaptionTrace`: everything one captioning run produced, ready to plot or save.

The trace and the views of it (layers, heads, steps, words from pieces, probabilities).
Its ``.npz`` file format and the defensive reader live in :mod:`attnlab.trace_io`
(the format's names, such as :data:`~attnlab.trace_io.TRACE_VERSION`, are also
importable from here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import trace_io
from . import trace_build, trace_views
from .errors import AttnlabError
from .keys import View
from .trace_io import (  # noqa: F401  (the format's names, importable from here as before)
    LIMITS,
    MAX_HEADER_BYTES,
    MAX_TRACE_BYTES,
    MEMBERS,
    TRACE_FORMAT,
    TRACE_VERSION,
    logits_problem,
    read_header,
    word_probabilities_problem,
    write_npz,
)
from .util import is_int

if TYPE_CHECKING:
    from .diagnostics import Diagnostics
    from .sinks import VisionDiagnostics

STOP_REASONS = ("end", "max_len", "given")  # meta["stopped"]: see CaptionTrace.stopped


@dataclass
class CaptionTrace:
    """The caption of one image and the attention behind every decoded token.

    Attributes:
        token_ids: ``(steps,)`` int64, the token emitted at each decoding step
            (greedy) or the given token (teacher forcing). The end token is kept
            when it was emitted.
        words: ``steps`` strings, the display form of each token (WordPiece
            continuations keep their ``##`` prefix, ``[SEP]`` marks the end).
        logits: ``(steps, vocab)`` float32, the scores that produced each token,
            or ``None`` when the captioner did not give them (then
            :meth:`probabilities` returns ``None``).
        cross_attention: ``(layers, heads, steps, H, W)`` float32, the
            words-to-patches weights of every decoder layer and head over the
            image's patches. ``None`` when the run recorded nothing. A trace of
            several views has none: reading it is a one-line error (use
            :meth:`view_attention`). Nothing is
            renormalised: when the model also attends to ``prefix_tokens``
            non-patch keys, each ``[l, h, t]`` map sums to ``1 - prefix_share[l, h, t]``;
            without prefix keys it sums to 1.
        grid: ``(H, W)`` the image's feature grid (H rows, W columns, S = H * W).
        image: ``(height, width, 3)`` uint8, the resized RGB image the model saw.
        model_name: which model made the trace.
        caption: the decoded text (special tokens dropped, WordPiece merged).
        encoder_self_attention: ``(layers, heads, P + S, P + S)`` with
            ``P = prefix_tokens``: the first ``P`` rows and columns are the prefix
            keys, then the ``S`` patches row-major (``record="all"`` only).
        decoder_self_attention: ``(layers, heads, steps, steps)``: row t is the
            attention of step t over steps 0..t (``record="all"`` only).
        meta: free-form facts about the run (JSON values: numbers, strings,
            lists, dicts). ``caption --out`` records the image's ``source`` path
            and ``source_sha256`` here; ``caption()`` of a ``resize="pad"``
            captioner records ``padding_fraction`` (per patch, its share of
            padding); an explanation (:func:`attnlab.explain`) records its
            ``method``, ``method_label``, ``quantity`` and ``normalised``.
        prefix_tokens: how many leading keys of the model's cross-attention are
            not image patches (a ViT's CLS token and registers; 0 for CATR).
        prefix_share: ``(layers, heads, steps)`` float32, the weight each step
            put on those prefix keys (``None`` when there are none or they were
            not recorded); the same array as ``key_shares["prefix"]``.
        views: the views of the photo the attention is split over
            (:class:`~attnlab.keys.View`: ``name``, ``grid``, ``box``); by default
            one view ``"image"`` of ``grid`` over the whole ``image``. A trace of
            several views (:meth:`from_views`) has them in :meth:`view_attention`;
            its ``cross_attention`` is then an error.
        view_maps: for several views only, each view's ``(layers, heads, steps, h, w)``
            (read them with :meth:`view_attention`).
        key_shares: ``kind -> (layers, heads, steps)``, the weight on the keys that
            are not image patches, by kind (``"prefix"``, ``"prompt"``, ``"special"``,
            ``"newline"``, ``"padding"``, ``"generated"``, ``"overhang"``, ...): the
            views' maps plus the shares sum to 1 at every layer, head and step.
    """

    token_ids: np.ndarray
    words: list[str]
    logits: np.ndarray | None
    cross_attention: np.ndarray | None
    grid: tuple[int, int]
    image: np.ndarray
    model_name: str = "unknown"
    caption: str = ""
    encoder_self_attention: np.ndarray | None = None
    decoder_self_attention: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    prefix_tokens: int = 0
    prefix_share: np.ndarray | None = None
    word_starts: np.ndarray | None = None
    views: tuple[View, ...] | None = None
    view_maps: tuple[np.ndarray, ...] | None = None
    key_shares: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        self.words = [str(w) for w in self.words]
        self.prefix_tokens = int(self.prefix_tokens)
        steps = len(self.token_ids)
        if len(self.words) != steps:
            raise ValueError(f"{len(self.words)} words for {steps} tokens")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be 0 or more, not {self.prefix_tokens}")
        if self.logits is not None and (self.logits.ndim != 2 or self.logits.shape[0] != steps):
            raise ValueError(f"logits has shape {tuple(self.logits.shape)}, expected ({steps}, vocab)")
        self.views, self.view_maps = trace_views.check_views(
            (View.whole(self.grid, self.image),) if self.views is None else self.views, self.view_maps, self.grid
        )
        if len(self.views) > 1 and self._cross is not None:
            raise ValueError("a trace of several views keeps its maps in view_maps: pass cross_attention=None")
        ca = self._cross
        if ca is not None:
            if ca.ndim != 5 or ca.shape[2] != steps or tuple(ca.shape[3:]) != self.grid:
                raise ValueError(
                    f"cross_attention has shape {tuple(ca.shape)}, expected "
                    f"(layers, heads, {steps}, {self.grid[0]}, {self.grid[1]})"
                )
        first = self._first_maps()
        want = None if first is None else (*first.shape[:2], steps)
        if self.prefix_share is not None and (want is None or tuple(self.prefix_share.shape) != want):
            raise ValueError(f"prefix_share has shape {tuple(self.prefix_share.shape)}, expected (layers, heads, steps) = {want}")
        self.key_shares = trace_views.check_shares(dict(self.key_shares or {}), want)
        if self.prefix_share is None:
            self.prefix_share = self.key_shares.get("prefix")
        else:  # given (old code, dataclasses.replace): it is the "prefix" share
            self.key_shares = {"prefix": self.prefix_share, **{k: v for k, v in self.key_shares.items() if k != "prefix"}}
        enc = self.encoder_self_attention
        if enc is not None and len(self.views) > 1:
            raise ValueError("encoder_self_attention is kept for single-view traces only")
        if enc is not None:
            keys = self.prefix_tokens + self.grid[0] * self.grid[1]
            if enc.ndim != 4 or tuple(enc.shape[2:]) != (keys, keys):
                raise ValueError(f"encoder_self_attention has shape {tuple(enc.shape)}, expected (layers, heads, {keys}, {keys})")
        dec = self.decoder_self_attention
        if dec is not None and (dec.ndim != 4 or tuple(dec.shape[2:]) != (steps, steps)):
            raise ValueError(f"decoder_self_attention has shape {tuple(dec.shape)}, expected (layers, heads, {steps}, {steps})")
        if self.word_starts is not None:
            self.word_starts = np.asarray(self.word_starts, dtype=bool)
            if self.word_starts.shape != (steps,):
                raise ValueError(f"word_starts has shape {self.word_starts.shape}, expected ({steps},)")

    # ------------------------------------------------------------------ views
    @property
    def steps(self) -> int:
        """Number of decoding steps (one per token, the end token included)."""
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        """Decoder layers in the attention maps (0 when nothing was recorded)."""
        first = self._first_maps()
        return 0 if first is None else first.shape[0]

    @property
    def num_heads(self) -> int:
        """Attention heads per layer in the attention maps (0 when nothing was recorded)."""
        first = self._first_maps()
        return 0 if first is None else first.shape[1]

    def _first_maps(self) -> np.ndarray | None:
        """The first view's maps ``(layers, heads, steps, h, w)`` (any number of views), or ``None``."""
        return self._cross if self.view_maps is None else self.view_maps[0]

    def view_attention(self, i: int | str = 0) -> np.ndarray:
        """View ``i``'s maps ``(layers, heads, steps, h, w)`` (``i``: index or name; see ``views``).

        For a single-view trace ``view_attention(0)`` is ``cross_attention``. Nothing is
        renormalised: the views' maps plus ``key_shares`` sum to 1 at every layer, head and step.
        """
        n, names = len(self.views), [v.name for v in self.views]
        if isinstance(i, str) and i in names:
            i = names.index(i)
        if not is_int(i) or not -n <= int(i) < n:
            raise AttnlabError(f"view {i!r} does not exist: the trace has {n} views {names} (use 0..{n - 1} or a name)")
        maps = self._cross if self.view_maps is None else self.view_maps[int(i) % n]
        if maps is None:
            raise AttnlabError("this trace holds no attention: caption again with record='cross' or 'all'")
        return maps

    # ------------------------------------------ checks shared by every view
    def require_attention(self) -> np.ndarray:
        """``cross_attention`` ``(layers, heads, steps, H, W)``, or a one-line error when nothing was recorded."""
        if self.cross_attention is None:
            raise AttnlabError("this trace holds no attention: caption again with record='cross' or 'all'")
        return self.cross_attention

    def check_layer(self, i: Any) -> int:
        """Decoder layer ``i`` (negative counts from the end) as an index ``0..layers-1``, or a one-line error."""
        n = self.view_attention(0).shape[0]
        if not is_int(i) or not -n <= int(i) < n:
            raise AttnlabError(f"layer {i!r} does not exist: the decoder has {n} layers (use 0..{n - 1} or -1 for the last)")
        return int(i) % n

    def check_head(self, h: Any) -> int | None:
        """Head ``h`` as an index ``0..heads-1``; ``"mean"`` (the average over heads) gives ``None``."""
        n = self.view_attention(0).shape[1]
        if isinstance(h, str) and h == "mean":
            return None
        if not is_int(h) or not -n <= int(h) < n:
            raise AttnlabError(f"head {h!r} does not exist: the layer has {n} heads (use 0..{n - 1} or 'mean')")
        return int(h) % n

    def check_step(self, t: Any) -> int:
        """Decoding step ``t`` (negative counts from the end) as an index ``0..steps-1``, or a one-line error."""
        n = self.steps
        if not is_int(t) or not -n <= int(t) < n:
            raise AttnlabError(f"step {t!r} does not exist: the trace has {n} steps (use 0..{n - 1})")
        return int(t) % n

    def layer(self, i: int) -> np.ndarray:
        """Cross-attention of decoder layer ``i`` (negative counts from the end): ``(heads, steps, H, W)``."""
        return self.require_attention()[self.check_layer(i)]

    def mean_heads(self) -> np.ndarray:
        """Cross-attention averaged over heads: ``(layers, steps, H, W)``."""
        return self.require_attention().mean(axis=1)

    @property
    def stopped(self) -> str | None:
        """How the caption ended: ``"end"`` (the model wrote its end token), ``"max_len"`` (cut at the
        length limit, no end token), ``"given"`` (teacher forcing), or ``None`` when the trace cannot say.

        ``meta["stopped"]``; traces saved before it was recorded are read from ``meta["end_token"]``.
        """
        if self.meta.get("stopped") in STOP_REASONS:
            return self.meta["stopped"]
        end = self.meta.get("end_token")
        if self.meta.get("teacher_forced") or not isinstance(end, int) or isinstance(end, bool) or not self.steps:
            return None
        return "end" if int(self.token_ids[-1]) == end else "max_len"

    def probabilities(self) -> np.ndarray | None:
        """Softmax probability of each step's token: ``(steps,)`` float32; ``None`` without logits.

        A trace of whole words (:meth:`by_word`) gives each word's probability:
        the product of its pieces' probabilities.
        """
        if self.logits is None:
            merged = self.meta.get("word_probabilities")
            problem = word_probabilities_problem(self.meta, self.steps)
            if problem:
                raise AttnlabError(f"trace.{problem}")
            return None if merged is None else np.asarray(merged, dtype=np.float32)
        z = self.logits.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p[np.arange(self.steps), self.token_ids].astype(np.float32)

    # ------------------------------------------------------------ words from pieces
    def word_spans(self) -> list[tuple[int, int]]:
        """Steps ``[start, end)`` of each word: a WordPiece ``##`` piece or a byte-level BPE
        piece without a leading space continues the word before it (``word_starts``)."""
        starts = np.ones(self.steps, dtype=bool) if self.word_starts is None else self.word_starts.copy()
        if self.steps:
            starts[0] = True
        first = np.flatnonzero(starts).tolist()  # (words,) first step of each word
        return list(zip(first, [*first[1:], self.steps]))

    def by_word(self) -> "CaptionTrace":
        """The same trace with one step per *word*: each word's map is the mean of its
        pieces' maps, its probability the product of theirs (``probabilities()``),
        its token id the first piece's; ``meta["pieces"]`` keeps the spans. A trace
        whose pieces are all words already is returned as it is. Figures use this
        unless asked for ``pieces=True``; the trace itself keeps the pieces.
        """
        spans = self.word_spans()
        if all(end - start == 1 for start, end in spans):
            return self
        return CaptionTrace(**trace_build.word_fields(self, spans))

    def diagnostics(self, layer: int | None = None, head: int | str | None = None) -> "Diagnostics | VisionDiagnostics":
        """Where each map's weight goes besides the content. A single-view trace: the prefix keys, padding,
        border and entropy of every layer, head and step (:mod:`attnlab.diagnostics`; choose them in its
        ``line(step, layer, head)``). A vision-language trace (several views, a crop, a prompt's key shares):
        the off-image shares, visual sink tokens and weight by grid row at ``layer`` (default -1) and ``head``
        (default ``"mean"``) (:mod:`attnlab.sinks`)."""
        from .sinks import diagnostics_of

        return diagnostics_of(self, layer, head)

    def nonfinite(self) -> list[str]:
        """Names of the arrays holding values that make no sense: NaN or infinite
        attention, NaN or +inf logits, a step whose logits are all -inf (no token possible;
        single -inf logits are allowed: masked tokens)."""
        bad = []
        if self.logits is not None and logits_problem(self.logits):
            bad.append("logits")
        named = {"cross_attention": self._cross, "prefix_share": self.prefix_share}
        named.update({f"view_attention({v.name!r})": m for v, m in zip(self.views, self.view_maps or ())})
        named.update({f"key_shares[{k!r}]": v for k, v in self.key_shares.items() if k != "prefix"})
        named.update(encoder_self_attention=self.encoder_self_attention, decoder_self_attention=self.decoder_self_attention)
        return bad + [name for name, value in named.items() if value is not None and not np.isfinite(value).all()]

    def __repr__(self) -> str:
        if len(self.views) > 1:
            shown = f"views={[(v.name, v.grid) for v in self.views]}"
        else:
            shown = f"grid={self.grid}, cross_attention={None if self._cross is None else tuple(self._cross.shape)}"
        return f"CaptionTrace(caption={self.caption!r}, steps={self.steps}, {shown}, model={self.model_name!r})"

    # ----------------------------------------------------------- construction
    @classmethod
    def from_attention(
        cls,
        words: Sequence[str],
        token_ids: Sequence[int] | np.ndarray,
        cross_attention: Any,
        grid: tuple[int, int],
        image: Any,
        *,
        logits: Any = None,
        prefix_tokens: int = 0,
        model_name: str = "unknown",
        caption: str | None = None,
        word_starts: Sequence[bool] | None = None,
        atol: float = 1e-3,
    ) -> "CaptionTrace":
        """A trace from weights you already hold (your own decoding loop, a saved run).

        Args:
            words, token_ids: one per decoding step (``steps``).
            cross_attention: array or tensor, one row per step over the keys
                ``K = prefix_tokens + H * W`` (prefix first, then the patches in
                row-major order): ``(layers, heads, steps, K)``, ``(heads, steps, K)``
                or ``(steps, K)``; or ``(layers, heads, steps, H, W)`` without prefix.
                Row ``i`` must be the query that predicted ``token_ids[i]``.
            grid: ``(H, W)`` patch rows and columns.
            image: the image the grid covers (path, PIL image or ``(h, w, 3)`` array).
            logits: optional ``(steps, vocab)`` scores (for probabilities in figures).
            prefix_tokens: leading non-patch keys (CLS, registers): split off, their
                weight kept as ``prefix_share``; nothing is renormalised.
            word_starts: optional, per step: does the token start a word? (``False``
                for WordPiece ``##`` pieces); figures then merge pieces into words.
            atol: rows summing to 1 within ``atol`` pass silently; others are kept
                as given with a warning that says how far off they are.
        """
        fields = trace_build.attention_fields(
            words, token_ids, cross_attention, grid, image, logits=logits, prefix_tokens=prefix_tokens,
            model_name=model_name, caption=caption, word_starts=word_starts, atol=atol,
        )
        return cls(**fields)

    @classmethod
    def from_views(
        cls,
        words: Sequence[str],
        token_ids: Sequence[int] | np.ndarray,
        views: Sequence[Any],
        maps: Sequence[Any],
        image: Any,
        *,
        key_shares: dict[str, Any] | None = None,
        logits: Any = None,
        model_name: str = "unknown",
        caption: str | None = None,
        word_starts: Sequence[bool] | None = None,
        meta: dict[str, Any] | None = None,
        atol: float = 1e-3,
    ) -> "CaptionTrace":
        """A trace whose attention is split over several views of the photo (or one view with a box).

        Args:
            words, token_ids: one per decoding step (``steps``).
            views: :class:`~attnlab.keys.View` objects or ``(name, (h, w), (x0, y0, x1, y1))``
                tuples; boxes in pixels of ``image``, floats, may overhang it.
            maps: one ``(layers, heads, steps, h, w)`` array or tensor per view.
            image: the photo the boxes refer to (path, PIL image or ``(h, w, 3)`` array).
            key_shares: ``kind -> (layers, heads, steps)``, the weight on every other key
                (``"prefix"``, ``"prompt"``, ``"special"``, ...). Where the maps plus the
                shares do not sum to 1 within ``atol`` they are kept as given with a warning.
            logits, model_name, caption, word_starts: as for :meth:`from_attention`.
            meta: the trace's ``meta`` (default ``{"mode": "from_views"}``).
        """
        fields = trace_build.views_fields(
            words, token_ids, views, maps, image, key_shares=key_shares, logits=logits, model_name=model_name,
            caption=caption, word_starts=word_starts, meta=meta, atol=atol,
        )
        return cls(**fields)

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to a versioned ``.npz`` file (atomically); returns the path.

        Refuses (one line) a trace that :meth:`load` would refuse: non-finite
        attention (see :meth:`nonfinite`) or ``meta`` values JSON cannot hold
        (NumPy numbers and arrays are stored as plain numbers and lists).
        The format: :mod:`attnlab.trace_io`.
        """
        return trace_io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_bytes: int = MAX_TRACE_BYTES) -> "CaptionTrace":
        """Read a trace written by :meth:`save` (any version up to :data:`~attnlab.trace_io.TRACE_VERSION`).

        Refuses with one line (:class:`AttnlabError`) a file that is not a trace,
        comes from a newer attnlab, holds unknown or oversized members, or whose
        values are damaged; nothing big is decompressed before the checks pass.
        ``max_bytes``: the most its arrays may take in memory together (default
        1 GiB; raise it for a trusted ``record="all"`` trace of a big model).
        """
        fields = trace_io.load_fields(path, max_bytes=max_bytes)
        try:
            return cls(**fields)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise trace_io.damaged(Path(path), f"{type(exc).__name__}: {exc}") from None


def _get_cross(trace: CaptionTrace) -> np.ndarray | None:
    if len(trace.views) > 1:
        names = [v.name for v in trace.views]
        raise AttnlabError(f"this trace has {len(names)} views {names}: read each with trace.view_attention(i), not cross_attention")
    return trace._cross


def _set_cross(trace: CaptionTrace, value: np.ndarray | None) -> None:
    trace._cross = value


# ``cross_attention`` stays the first field of the constructor; reading it is an error for several views
# (no docstring of its own: the class's Attributes describe it, and the API page shows it once)
CaptionTrace.cross_attention = property(_get_cross, _set_cross)  # type: ignore[assignment]
