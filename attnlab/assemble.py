"""The one assembler: attention rows of a caption -> a :class:`~attnlab.trace.CaptionTrace`.

Decoding (:mod:`attnlab.decode`) and the explanation methods
(:mod:`attnlab.explain`) both end here: rows over the keys are split by the
key layout (:class:`attnlab.keys.KeyLayout`) into every view's maps and the
share of every other kind of key (the prefix share of a captioner), and the
words come from the captioner's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .captioner import CaptionerSpec
from .keys import KeyLayout
from .trace import CaptionTrace

__all__ = ["trace_from_rows"]


def _float32(a: Any) -> np.ndarray | None:
    """A tensor or array as a contiguous float32 NumPy array (``None`` stays ``None``)."""
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def trace_from_rows(
    spec: CaptionerSpec,
    ids: Sequence[int],
    rows: Any,
    grid: tuple[int, int],
    image: np.ndarray,
    *,
    logits: Any = None,
    meta: dict[str, Any] | None = None,
    encoder: Any = None,
    decoder: Any = None,
    layout: KeyLayout | None = None,
) -> CaptionTrace:
    """One caption's trace from its attention ``rows`` ``(layers, heads, steps, K)`` (or ``None``).

    ``layout``: the image's key layout (default: ``spec.layout(grid, image)``);
    one of several views (:meth:`KeyLayout.of_views`) gives a trace of several views.
    ``K`` may run past the layout's keys (batch padding, dropped). ``encoder`` and
    ``decoder`` are the self-attention arrays of ``record="all"``.
    """
    layout = layout or spec.layout(grid, image)
    maps: list[Any] = [None] * max(1, len(layout.views))
    shares: dict[str, Any] = {}
    if rows is not None:
        parts, kinds = layout.split_views(rows, padded=True)  # (layers, heads, steps, h, w) each, kind -> (layers, heads, steps)
        maps, shares = [_float32(m) for m in parts], {k: _float32(v) for k, v in kinds.items()}
    several = len(maps) > 1
    ids = [int(t) for t in ids]
    starts = getattr(spec.vocab, "word_starts", None)
    return CaptionTrace(
        token_ids=np.array(ids, dtype=np.int64),
        words=[spec.vocab.token(t) for t in ids],
        logits=_float32(logits),
        cross_attention=None if several else maps[0],
        grid=layout.grid,
        image=image,
        model_name=spec.name,
        caption=spec.vocab.decode(ids),
        encoder_self_attention=_float32(encoder),
        decoder_self_attention=decoder,
        prefix_tokens=layout.prefix,
        views=tuple(layout.views) or None,  # None: one view over the whole image
        view_maps=tuple(maps) if several and rows is not None else None,
        key_shares=shares,
        word_starts=None if starts is None else np.array(starts(ids), dtype=bool),
        meta=dict(meta or {}),
    )
