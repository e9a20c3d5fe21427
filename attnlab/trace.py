"""`CaptionTrace`: everything one captioning run produced, ready to plot or save.

The file format (``.npz``, one ``.npy`` member per array plus a JSON ``header``)
carries one integer :data:`TRACE_VERSION`. Reading is defensive: only the
members listed in :data:`MEMBERS` are read, each member's shape, dtype and size
are taken from its zip and ``.npy`` headers and checked against the others and
against :data:`LIMITS` and a memory budget (:data:`MAX_TRACE_BYTES`) *before* anything is
decompressed, and damaged values (a string version, an infinite grid, token ids
beyond the vocabulary, NaN attention, ...) are refused with one line.

Upgrade path: a file of an older version is read with the members and header keys
that version had, then brought up to date by the ``_UPGRADES`` steps, one per
version (``_v1_to_v2`` fills ``prefix_tokens = 0`` and ``prefix_share = None``).
To add a field: add it to :class:`CaptionTrace` with a default, to
:data:`MEMBERS` (arrays, with the version that introduced it) or ``_HEADER_KEYS``
(plain values), bump :data:`TRACE_VERSION`, and add the step that fills the
default for older files. Files of a newer version are refused ("upgrade attnlab").

Versions: 1 (attnlab 0.1: logits required; ``prefix_tokens``/``prefix_share``
optional, written only by the first captioner-seam builds); 2 (``prefix_tokens``
always in the header, ``prefix_share`` and ``logits`` optional).
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .errors import AttnlabError
from .fileio import atomic_write
from .util import is_int as _is_index

if TYPE_CHECKING:
    from .diagnostics import Diagnostics

TRACE_FORMAT = "attnlab-trace"
TRACE_VERSION = 2

# member -> (dtype kinds allowed, the version that introduced it)
MEMBERS: dict[str, tuple[str, int]] = {
    "header": ("U", 1),
    "token_ids": ("iu", 1),
    "logits": ("f", 1),
    "image": ("u", 1),
    "cross_attention": ("f", 1),
    "encoder_self_attention": ("f", 1),
    "decoder_self_attention": ("f", 1),
    "prefix_share": ("f", 1),  # written by some version-1 files already (see _v1_to_v2)
}
_REQUIRED = {1: ("header", "token_ids", "logits", "image"), 2: ("header", "token_ids", "image")}
_HEADER_KEYS = {1: ("words", "grid", "model_name", "caption"), 2: ("words", "grid", "model_name", "caption", "prefix_tokens")}

# sanity bounds on what a trace file may declare (far above any real captioner)
LIMITS = {
    "steps": 4096,  # decoding steps
    "vocab": 2_000_000,  # width of the logits
    "layers": 512,
    "heads": 512,
    "grid": 4096,  # rows or columns of the patch grid
    "prefix_tokens": 4096,
    "image": 16384,  # pixels per side of the stored image
}
MAX_TRACE_BYTES = 1024**3  # all arrays together, uncompressed (CaptionTrace.load(max_bytes=...) to allow more)
STOP_REASONS = ("end", "max_len", "given")  # meta["stopped"]: see CaptionTrace.stopped
MAX_HEADER_BYTES = 16 * 1024**2  # the JSON header (words, caption, meta)
_NPY_HEADER_MAX = 10_000  # numpy's own limit for a .npy header


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
            image's patches. ``None`` when the run recorded nothing. Nothing is
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
            not recorded).
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
        ca = self.cross_attention
        if ca is not None:
            if ca.ndim != 5 or ca.shape[2] != steps or tuple(ca.shape[3:]) != self.grid:
                raise ValueError(
                    f"cross_attention has shape {tuple(ca.shape)}, expected "
                    f"(layers, heads, {steps}, {self.grid[0]}, {self.grid[1]})"
                )
        if self.prefix_share is not None:
            want = None if ca is None else (*ca.shape[:2], steps)
            if want is None or tuple(self.prefix_share.shape) != want:
                raise ValueError(f"prefix_share has shape {tuple(self.prefix_share.shape)}, expected (layers, heads, steps) = {want}")
        enc = self.encoder_self_attention
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
        """Decoder layers in ``cross_attention`` (0 when nothing was recorded)."""
        return 0 if self.cross_attention is None else self.cross_attention.shape[0]

    @property
    def num_heads(self) -> int:
        """Attention heads per layer in ``cross_attention`` (0 when nothing was recorded)."""
        return 0 if self.cross_attention is None else self.cross_attention.shape[1]

    # ------------------------------------------ checks shared by every view
    def require_attention(self) -> np.ndarray:
        """``cross_attention`` ``(layers, heads, steps, H, W)``, or a one-line error when nothing was recorded."""
        if self.cross_attention is None:
            raise AttnlabError("this trace holds no attention: caption again with record='cross' or 'all'")
        return self.cross_attention

    def check_layer(self, i: Any) -> int:
        """Decoder layer ``i`` (negative counts from the end) as an index ``0..layers-1``, or a one-line error."""
        n = self.require_attention().shape[0]
        if not _is_index(i) or not -n <= int(i) < n:
            raise AttnlabError(f"layer {i!r} does not exist: the decoder has {n} layers (use 0..{n - 1} or -1 for the last)")
        return int(i) % n

    def check_head(self, h: Any) -> int | None:
        """Head ``h`` as an index ``0..heads-1``; ``"mean"`` (the average over heads) gives ``None``."""
        n = self.require_attention().shape[1]
        if isinstance(h, str) and h == "mean":
            return None
        if not _is_index(h) or not -n <= int(h) < n:
            raise AttnlabError(f"head {h!r} does not exist: the layer has {n} heads (use 0..{n - 1} or 'mean')")
        return int(h) % n

    def check_step(self, t: Any) -> int:
        """Decoding step ``t`` (negative counts from the end) as an index ``0..steps-1``, or a one-line error."""
        n = self.steps
        if not _is_index(t) or not -n <= int(t) < n:
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
            problem = _word_probabilities_problem(self.meta, self.steps)
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

        def mean_steps(a: np.ndarray | None, axis: int) -> np.ndarray | None:
            if a is None:
                return None
            parts = [a.take(range(s, e), axis=axis).mean(axis=axis, keepdims=True) for s, e in spans]
            return np.concatenate(parts, axis=axis).astype(a.dtype)  # the steps axis now counts words

        words = ["".join([self.words[s], *(w[2:] if w.startswith("##") else w for w in self.words[s + 1 : e])]) for s, e in spans]
        probs = self.probabilities()
        meta = dict(self.meta, pieces=[[s, e] for s, e in spans])
        if probs is not None:
            meta["word_probabilities"] = [float(np.prod(probs[s:e], dtype=np.float64)) for s, e in spans]
        return CaptionTrace(
            token_ids=self.token_ids[[s for s, _ in spans]],
            words=words,
            logits=None,
            cross_attention=mean_steps(self.cross_attention, 2),  # (layers, heads, words, H, W)
            grid=self.grid,
            image=self.image,
            model_name=self.model_name,
            caption=self.caption,
            encoder_self_attention=self.encoder_self_attention,
            decoder_self_attention=None,  # step-to-step weights have no per-word meaning
            meta=meta,
            prefix_tokens=self.prefix_tokens,
            prefix_share=mean_steps(self.prefix_share, 2),  # (layers, heads, words)
        )

    def diagnostics(self) -> "Diagnostics":
        """Where each map's weight goes besides the content: the prefix keys (CLS, registers),
        padding, the grid's border, and its entropy against a uniform map, per layer, head (and
        the head mean, the last head index) and step; see :mod:`attnlab.diagnostics`."""
        from .diagnostics import diagnose

        return diagnose(self)

    def nonfinite(self) -> list[str]:
        """Names of the arrays holding values that make no sense: NaN or infinite
        attention, NaN or +inf logits, a step whose logits are all -inf (no token possible;
        single -inf logits are allowed: masked tokens)."""
        bad = []
        if self.logits is not None and _logits_problem(self.logits):
            bad.append("logits")
        for name in ("cross_attention", "prefix_share", "encoder_self_attention", "decoder_self_attention"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                bad.append(name)
        return bad

    def __repr__(self) -> str:
        shape = None if self.cross_attention is None else tuple(self.cross_attention.shape)
        return (
            f"CaptionTrace(caption={self.caption!r}, steps={self.steps}, grid={self.grid}, "
            f"cross_attention={shape}, model={self.model_name!r})"
        )

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
        from .keys import KeyLayout  # the one rule for which keys are patches
        from .preprocess import load_image  # the input layer; only this constructor needs it

        ids = np.asarray(token_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise AttnlabError(f"token_ids must be a 1-D list of integer ids, not {ids.dtype} of shape {ids.shape}")
        steps = len(ids)
        if len(words) != steps:
            raise AttnlabError(f"{len(words)} words for {steps} token ids: give one word per decoding step")
        layout = KeyLayout.checked(prefix_tokens, grid)
        gh, gw = layout.grid
        ca = layout.rows_of(cross_attention, steps)  # (layers, heads, steps, K)
        sums = ca.sum(axis=-1)  # (layers, heads, steps)
        if np.abs(sums - 1).max() > atol:
            warnings.warn(
                f"cross_attention rows sum to {sums.min():.3g}..{sums.max():.3g}, not 1: kept as given "
                "(did you drop prefix or padding keys, or pass pre-softmax scores?)",
                stacklevel=2,
            )
        share = layout.share(ca)  # (layers, heads, steps) or None
        patches = layout.split(ca)[1]  # (layers, heads, steps, H, W)
        arr = logits
        if arr is not None:
            arr = np.asarray(arr.detach().cpu() if hasattr(arr, "detach") else arr, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != steps:
                raise AttnlabError(f"logits has shape {arr.shape}: expected ({steps}, vocab)")
        img = np.asarray(load_image(image))  # (h, w, 3) uint8
        return cls(
            token_ids=ids.astype(np.int64),
            words=list(words),
            logits=arr,
            cross_attention=np.ascontiguousarray(patches),
            grid=(gh, gw),
            image=img,
            model_name=model_name,
            caption=" ".join(words) if caption is None else caption,
            prefix_tokens=int(prefix_tokens),
            prefix_share=None if share is None else np.ascontiguousarray(share),
            word_starts=None if word_starts is None else np.asarray(word_starts, dtype=bool),
            meta={"mode": "from_attention"},
        )

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to a versioned ``.npz`` file (atomically); returns the path.

        Refuses (one line) a trace that :meth:`load` would refuse: non-finite
        attention (see :meth:`nonfinite`) or ``meta`` values JSON cannot hold
        (NumPy numbers and arrays are stored as plain numbers and lists).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        try:
            arrays = _npz_members(self)
        except AttnlabError as exc:
            raise AttnlabError(f"cannot save the trace to {path}: {exc}") from None
        atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_bytes: int = MAX_TRACE_BYTES) -> "CaptionTrace":
        """Read a trace written by :meth:`save` (any version up to :data:`TRACE_VERSION`).

        Refuses with one line (:class:`AttnlabError`) a file that is not a trace,
        comes from a newer attnlab, holds unknown or oversized members, or whose
        values are damaged; nothing big is decompressed before the checks pass.
        ``max_bytes``: the most its arrays may take in memory together (default
        1 GiB; raise it for a trusted ``record="all"`` trace of a big model).
        """
        path = Path(path)
        with _open_trace(path) as zf:
            header, version, members = _read_header(path, zf)
            shapes = {name: _peek(path, zf, info) for name, info in members.items() if name != "header"}
            _check_shapes(path, header, version, shapes, max_bytes)
            arrays = {name: _read_member(path, zf, members[name]) for name in shapes}
        header, arrays = _upgrade(header, arrays, version)
        _check_values(path, arrays)
        try:
            return cls(
                token_ids=arrays["token_ids"],
                words=header["words"],
                logits=arrays.get("logits"),
                cross_attention=arrays.get("cross_attention"),
                grid=tuple(header["grid"]),
                image=arrays["image"],
                model_name=header["model_name"],
                caption=header["caption"],
                encoder_self_attention=arrays.get("encoder_self_attention"),
                decoder_self_attention=arrays.get("decoder_self_attention"),
                meta=header.get("meta", {}),
                prefix_tokens=header["prefix_tokens"],
                prefix_share=arrays.get("prefix_share"),
                word_starts=header.get("word_starts"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _damaged(path, f"{type(exc).__name__}: {exc}") from None


def _npz_members(trace: CaptionTrace) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file, the JSON header first; refuses what :meth:`CaptionTrace.load` would."""
    bad = trace.nonfinite()
    if bad:
        raise AttnlabError(f"{', '.join(bad)} hold NaN or infinite values (the model's weights may be broken)")
    problem = _text_problem(trace.words, trace.caption, trace.model_name) or _word_probabilities_problem(trace.meta, trace.steps)
    if problem:
        raise AttnlabError(problem)
    header = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "words": trace.words,
        "grid": list(trace.grid),
        "model_name": trace.model_name,
        "caption": trace.caption,
        "prefix_tokens": trace.prefix_tokens,
        "meta": trace.meta,
    }
    if trace.word_starts is not None:
        header["word_starts"] = trace.word_starts.tolist()
    try:
        text = json.dumps(header, default=_json_value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AttnlabError(f"meta holds a value JSON cannot store ({exc}); use numbers, strings, lists and dicts") from None
    arrays: dict[str, np.ndarray] = {"header": np.array(text), "token_ids": trace.token_ids, "image": trace.image}
    for name in ("logits", "cross_attention", "encoder_self_attention", "decoder_self_attention", "prefix_share"):
        value = getattr(trace, name)
        if value is not None:
            arrays[name] = value
    return arrays


def write_npz(trace: CaptionTrace, fh: BinaryIO) -> None:
    """Write ``trace`` in the ``.npz`` format of :meth:`CaptionTrace.save` to an open binary file."""
    np.savez_compressed(fh, **_npz_members(trace))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a trace file (words, grid, caption, meta, ...) without reading its arrays."""
    path = Path(path)
    with _open_trace(path) as zf:
        header, _, _ = _read_header(path, zf)
    return header


# ====================================================================== reading, defensively
def _json_value(value: Any) -> Any:
    """``json.dumps`` fallback: NumPy numbers/arrays and paths become plain values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a {type(value).__name__}")


def _logits_problem(logits: np.ndarray) -> str | None:
    """Why ``logits`` (steps, vocab) give no probabilities, or None (-inf alone is a masked token)."""
    if np.isnan(logits).any() or np.isposinf(logits).any():
        return "logits hold NaN or +inf"
    if logits.size and np.isneginf(logits).all(axis=1).any():  # (steps,): softmax of such a row is NaN
        return f"the logits of step {int(np.flatnonzero(np.isneginf(logits).all(axis=1))[0])} are all -inf (no token possible)"
    return None


def _text_problem(words: list[str], caption: str, model_name: str) -> str | None:
    """Why the words, caption or model name cannot be written as UTF-8 (a lone surrogate), or None."""
    for what, text in [*((f"word {i}", w) for i, w in enumerate(words)), ("caption", caption), ("model_name", model_name)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"{what} {ascii(text)[:60]} is not valid Unicode text (a lone surrogate); use real characters"
    return None


def _word_probabilities_problem(meta: dict[str, Any], steps: int) -> str | None:
    """Why ``meta["word_probabilities"]`` (written by :meth:`CaptionTrace.by_word`) is not one
    probability from 0 to 1 per word, or None."""
    if "word_probabilities" not in meta:
        return None
    probs = meta["word_probabilities"]
    ok = isinstance(probs, list) and len(probs) == steps
    ok = ok and all(type(p) in (int, float) and math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs)
    if ok:
        return None
    return f"meta['word_probabilities'] must be one probability from 0 to 1 per word ({steps}), not {ascii(probs)[:60]}: remove it or caption again"


def _damaged(path: Path, reason: str) -> AttnlabError:
    reason = " ".join(reason.split())[:300]
    return AttnlabError(f"{path} is a damaged attnlab trace ({reason}); caption the image again to write a new one")


def _open_trace(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise AttnlabError(f"no trace file at {path}")
    if not stat.S_ISREG(path.stat().st_mode):
        raise AttnlabError(f"{path} is not a regular file: pass a .npz trace written by CaptionTrace.save")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise AttnlabError(f"{path} is not an attnlab trace file ({type(exc).__name__}); save one with CaptionTrace.save") from None


def _read_header(path: Path, zf: zipfile.ZipFile) -> tuple[dict[str, Any], int, dict[str, zipfile.ZipInfo]]:
    """The checked header, the file's version and its members (name -> zip entry)."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if "header.npy" not in names:
        raise AttnlabError(f"{path} is not an attnlab trace file (no header); save one with CaptionTrace.save")
    if len(set(names)) != len(names):
        raise _damaged(path, "a member appears twice")
    members = {}
    for info in infos:
        name = info.filename[:-4] if info.filename.endswith(".npy") else None
        if name not in MEMBERS:
            raise _damaged(path, f"unknown member {info.filename[:60]!r}")
        members[name] = info
    shape, dtype, _ = _peek(path, zf, members["header"])
    if shape != () or dtype.kind != "U" or dtype.itemsize > MAX_HEADER_BYTES:
        raise _damaged(path, "the header is not one JSON string of reasonable size")
    try:
        text = str(_read_member(path, zf, members["header"]))
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _damaged(path, f"header: {type(exc).__name__}") from None
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise AttnlabError(f"{path} is not an attnlab trace file")
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise _damaged(path, f"version {version!r} is not a whole number from 1")
    if version > TRACE_VERSION:
        raise AttnlabError(f"{path} was written by a newer attnlab (trace version {version}); upgrade attnlab")
    for name in members:
        if MEMBERS[name][1] > version:
            raise _damaged(path, f"member {name} did not exist in version {version}")
    for name in _REQUIRED[version]:
        if name not in members:
            raise _damaged(path, f"member {name} is missing")
    _check_header(path, header, version)
    return header, version, members


def _whole(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _check_header(path: Path, header: dict[str, Any], version: int) -> None:
    for key in _HEADER_KEYS[version]:
        if key not in header:
            raise _damaged(path, f"the header has no {key!r}")
    words = header["words"]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or len(words) > LIMITS["steps"]:
        raise _damaged(path, "words must be a list of strings")
    grid = header["grid"]
    if not isinstance(grid, list) or len(grid) != 2 or not all(_whole(g, 1, LIMITS["grid"]) for g in grid):
        shown = grid if not isinstance(grid, list) else [g if not isinstance(g, float) or math.isfinite(g) else str(g) for g in grid[:3]]
        raise _damaged(path, f"grid {shown!r} is not two whole numbers from 1 to {LIMITS['grid']}")
    for key in ("model_name", "caption"):
        if not isinstance(header[key], str):
            raise _damaged(path, f"{key} is not a string")
    if not isinstance(header.get("meta", {}), dict):
        raise _damaged(path, "meta is not a dict")
    if (version >= 2 or "prefix_tokens" in header) and not _whole(header["prefix_tokens"], 0, LIMITS["prefix_tokens"]):
        raise _damaged(path, f"prefix_tokens {header['prefix_tokens']!r} is not a whole number from 0 to {LIMITS['prefix_tokens']}")
    starts = header.get("word_starts")  # optional in version 2 (added without a version bump: older files lack it)
    if starts is not None and (not isinstance(starts, list) or len(starts) != len(words) or not all(isinstance(b, bool) for b in starts)):
        raise _damaged(path, "word_starts must be one true/false per word")
    problem = _text_problem(words, header["caption"], header["model_name"]) or _word_probabilities_problem(header.get("meta", {}), len(words))
    if problem:
        raise _damaged(path, problem)


def _peek(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and byte size of a member, from its ``.npy`` header only (a few bytes decompressed).

    The size the zip entry declares must be exactly the ``.npy`` header plus the array:
    no hidden data, no bomb behind a small shape.
    """
    try:
        with zf.open(info) as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh, max_header_size=_NPY_HEADER_MAX)
            offset = fh.tell()
    except Exception as exc:  # zipfile, numpy and zlib raise their own types
        raise _damaged(path, f"member {info.filename}: {type(exc).__name__}") from None
    name = info.filename[:-4]
    if dtype.hasobject or dtype.kind not in MEMBERS[name][0] or dtype.fields is not None or dtype.subdtype is not None:
        raise _damaged(path, f"member {name} has dtype {dtype}")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != offset + nbytes:
        raise _damaged(path, f"member {name} declares {info.file_size} bytes, its array of shape {shape} needs {offset + nbytes}")
    return tuple(shape), dtype, nbytes


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    try:
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False, max_header_size=_NPY_HEADER_MAX)
    except Exception as exc:  # a bad CRC, a cut stream, ...
        raise _damaged(path, f"member {info.filename}: {type(exc).__name__}: {exc}") from None


def _check_shapes(path: Path, header: dict[str, Any], version: int, shapes: dict[str, tuple], max_bytes: int) -> None:
    """Every declared shape against the header and the others, before any array is read."""
    steps = len(header["words"])
    rows, cols = header["grid"]
    prefix = header.get("prefix_tokens", 0)

    def shape(name: str) -> tuple[int, ...] | None:
        return shapes[name][0] if name in shapes else None

    def need(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise _damaged(path, f"{name} has shape {shape(name)}, expected {want}")

    need("token_ids", shape("token_ids") == (steps,), f"({steps},): one id per word")
    if "logits" in shapes:
        s = shape("logits")
        need("logits", len(s) == 2 and s[0] == steps and 1 <= s[1] <= LIMITS["vocab"], f"({steps}, vocab) with vocab up to {LIMITS['vocab']}")
    s = shape("image")
    need("image", len(s) == 3 and s[2] == 3 and all(1 <= v <= LIMITS["image"] for v in s[:2]), f"(height, width, 3), sides up to {LIMITS['image']}")
    if shapes["image"][1] != np.uint8:
        raise _damaged(path, f"image has dtype {shapes['image'][1]}, expected uint8")
    layers_heads = f"layers and heads up to {LIMITS['layers']} and {LIMITS['heads']}"

    def lh(s: tuple[int, ...]) -> bool:
        return 1 <= s[0] <= LIMITS["layers"] and 1 <= s[1] <= LIMITS["heads"]

    ca = shape("cross_attention")
    if ca is not None:
        need("cross_attention", len(ca) == 5 and lh(ca) and ca[2:] == (steps, rows, cols), f"(layers, heads, {steps}, {rows}, {cols}), {layers_heads}")
    ps = shape("prefix_share")
    if ps is not None:
        need("prefix_share", ca is not None and ps == ca[:2] + (steps,), "(layers, heads, steps) of the cross-attention")
    enc = shape("encoder_self_attention")
    if enc is not None:
        keys = prefix + rows * cols
        need("encoder_self_attention", len(enc) == 4 and lh(enc) and enc[2:] == (keys, keys), f"(layers, heads, {keys}, {keys}), {layers_heads}")
    dec = shape("decoder_self_attention")
    if dec is not None:
        need("decoder_self_attention", len(dec) == 4 and lh(dec) and dec[2:] == (steps, steps), f"(layers, heads, {steps}, {steps}), {layers_heads}")
    total = sum(nbytes for _, _, nbytes in shapes.values())
    if total > max_bytes:
        raise AttnlabError(
            f"{path} was refused: its arrays would take {total / 1024**2:,.0f} MiB, more than max_bytes "
            f"({max_bytes / 1024**2:,.0f} MiB); if you trust the file, load it with CaptionTrace.load(path, max_bytes=...)"
        )


def _check_values(path: Path, arrays: dict[str, np.ndarray]) -> None:
    ids = arrays["token_ids"]
    logits = arrays.get("logits")
    vocab = None if logits is None else logits.shape[1]
    if ids.size and ids.min() < 0:
        raise _damaged(path, f"token id {int(ids.min())} is negative")
    if ids.size and ids.max() >= (LIMITS["vocab"] if vocab is None else vocab):
        raise _damaged(path, f"token id {int(ids.max())} lies beyond the vocabulary ({'its logits have ' + str(vocab) if vocab else 'at most ' + str(LIMITS['vocab'])} tokens)")
    if logits is not None and (problem := _logits_problem(logits)):
        raise _damaged(path, problem)
    for name in ("cross_attention", "prefix_share", "encoder_self_attention", "decoder_self_attention"):
        value = arrays.get(name)
        if value is not None and not np.isfinite(value).all():
            raise _damaged(path, f"{name} holds NaN or infinite values")


def _v1_to_v2(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    # attnlab 0.1 knew only CATR-like models (every key a patch); the last version-1 files
    # of the captioner seam already wrote prefix_tokens and prefix_share, kept as they are
    header.setdefault("prefix_tokens", 0)


_UPGRADES = {1: _v1_to_v2}  # version n -> n + 1


def _upgrade(header: dict[str, Any], arrays: dict[str, np.ndarray], version: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    for v in range(version, TRACE_VERSION):
        _UPGRADES[v](header, arrays)
    return header, arrays
