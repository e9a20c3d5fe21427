"""Building a :class:`~attnlab.trace.CaptionTrace` from weights a user already holds.

:meth:`CaptionTrace.from_attention` (rows over one grid's keys) and
:meth:`CaptionTrace.from_views` (maps of several views plus the shares of the other keys)
check their arguments here and get the trace's keyword arguments back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import AttnlabError
from .keys import KeyLayout, View

__all__ = ["attention_fields", "views_fields", "word_fields"]


def _array(a: Any) -> np.ndarray:
    """A tensor or array as float32 NumPy."""
    return np.asarray(a.detach().float().cpu() if hasattr(a, "detach") else a, dtype=np.float32)


def _ids(words: Sequence[str], token_ids: Any) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise AttnlabError(f"token_ids must be a 1-D list of integer ids, not {ids.dtype} of shape {ids.shape}")
    if len(words) != len(ids):
        raise AttnlabError(f"{len(words)} words for {len(ids)} token ids: give one word per decoding step")
    return ids.astype(np.int64)


def _logits(logits: Any, steps: int) -> np.ndarray | None:
    if logits is None:
        return None
    arr = _array(logits)
    if arr.ndim != 2 or arr.shape[0] != steps:
        raise AttnlabError(f"logits has shape {arr.shape}: expected ({steps}, vocab)")
    return arr


def _warn_sums(sums: np.ndarray, atol: float, what: str) -> None:
    """Warn (kept as given) when rows do not sum to 1 within ``atol``."""
    if sums.size and np.abs(sums - 1).max() > atol:
        warnings.warn(
            f"{what} sum to {sums.min():.3g}..{sums.max():.3g}, not 1: kept as given "
            "(did you drop prefix, padding or other keys, or pass pre-softmax scores?)",
            stacklevel=4,
        )


def _common(words: Sequence[str], ids: np.ndarray, image: Any, logits: Any, model_name: str, caption: str | None, word_starts: Any) -> dict[str, Any]:
    from .preprocess import load_image  # the input layer; only these constructors need it

    return dict(
        token_ids=ids,
        words=list(words),
        logits=_logits(logits, len(ids)),
        image=np.asarray(load_image(image)),  # (h, w, 3) uint8
        model_name=model_name,
        caption=" ".join(words) if caption is None else caption,
        word_starts=None if word_starts is None else np.asarray(word_starts, dtype=bool),
    )


def attention_fields(words, token_ids, cross_attention, grid, image, *, logits, prefix_tokens, model_name, caption, word_starts, atol) -> dict[str, Any]:
    """The keyword arguments of :meth:`CaptionTrace.from_attention` (its docstring says what each is)."""
    ids = _ids(words, token_ids)
    layout = KeyLayout.checked(prefix_tokens, grid)
    ca = layout.rows_of(cross_attention, len(ids))  # (layers, heads, steps, K)
    _warn_sums(ca.sum(axis=-1), atol, "cross_attention rows")
    share = layout.share(ca)  # (layers, heads, steps) or None
    return dict(
        _common(words, ids, image, logits, model_name, caption, word_starts),
        cross_attention=np.ascontiguousarray(layout.split(ca)[1]),  # (layers, heads, steps, H, W)
        grid=layout.grid,
        prefix_tokens=int(prefix_tokens),
        prefix_share=None if share is None else np.ascontiguousarray(share),
        meta={"mode": "from_attention"},
    )


def views_fields(words, token_ids, views, maps, image, *, key_shares, logits, model_name, caption, word_starts, meta, atol) -> dict[str, Any]:
    """The keyword arguments of :meth:`CaptionTrace.from_views` (its docstring says what each is)."""
    ids = _ids(words, token_ids)
    views = tuple(View.checked(v.name, v.grid, v.box) if isinstance(v, View) else View.checked(*v) for v in views)
    maps = [_array(m) for m in maps]
    if not views or len(maps) != len(views):
        raise AttnlabError(f"{len(maps)} maps for {len(views)} views: give one (layers, heads, steps, h, w) array per view")
    lead = (*maps[0].shape[:2], len(ids)) if maps[0].ndim == 5 else None
    for v, m in zip(views, maps):
        if lead is None or m.shape != (*lead, *v.grid):
            raise AttnlabError(f"the maps of view {v.name!r} have shape {m.shape}: expected (layers, heads, steps, h, w) = {(*(lead or ('L', 'H', len(ids))), *v.grid)}")
    shares = {str(k): _array(s) for k, s in (key_shares or {}).items()}
    for kind, s in shares.items():
        if s.shape != lead:
            raise AttnlabError(f"key_shares[{kind!r}] has shape {s.shape}: expected (layers, heads, steps) = {lead}")
    if any((m < 0).any() or not np.isfinite(m).all() for m in [*maps, *shares.values()]):
        raise AttnlabError("the maps or key_shares hold negative, NaN or infinite values: pass softmax weights")
    _warn_sums(sum(m.sum(axis=(-2, -1)) for m in maps) + sum(shares.values(), np.zeros(lead, np.float32)), atol, "the views' maps plus key_shares")
    several = len(views) > 1
    return dict(
        _common(words, ids, image, logits, model_name, caption, word_starts),
        cross_attention=None if several else np.ascontiguousarray(maps[0]),
        grid=views[0].grid,
        views=views,
        view_maps=tuple(np.ascontiguousarray(m) for m in maps) if several else None,
        key_shares={k: np.ascontiguousarray(s) for k, s in shares.items()},
        meta=dict(meta or {"mode": "from_views"}),
    )


def word_fields(trace: Any, spans: list[tuple[int, int]]) -> dict[str, Any]:
    """The keyword arguments of ``trace.by_word()``: one step per span ``[start, end)`` of steps."""

    def mean_steps(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        parts = [a.take(range(s, e), axis=2).mean(axis=2, keepdims=True) for s, e in spans]
        return np.concatenate(parts, axis=2).astype(a.dtype)  # (layers, heads, words, ...): the steps axis counts words

    words = ["".join([trace.words[s], *(w[2:] if w.startswith("##") else w for w in trace.words[s + 1 : e])]) for s, e in spans]
    probs = trace.probabilities()
    meta = dict(trace.meta, pieces=[[s, e] for s, e in spans])
    if probs is not None:
        meta["word_probabilities"] = [float(np.prod(probs[s:e], dtype=np.float64)) for s, e in spans]
    several = trace.view_maps is not None
    return dict(
        token_ids=trace.token_ids[[s for s, _ in spans]],
        words=words,
        logits=None,
        cross_attention=None if several else mean_steps(trace.cross_attention),  # (layers, heads, words, H, W)
        grid=trace.grid,
        image=trace.image,
        model_name=trace.model_name,
        caption=trace.caption,
        encoder_self_attention=trace.encoder_self_attention,
        decoder_self_attention=None,  # step-to-step weights have no per-word meaning
        meta=meta,
        prefix_tokens=trace.prefix_tokens,
        views=trace.views,
        view_maps=tuple(mean_steps(m) for m in trace.view_maps) if several else None,
        key_shares={k: mean_steps(v) for k, v in trace.key_shares.items()},  # (layers, heads, words) each
    )
