"""``contrast``: a word's attention on the image divided by the attention under a neutral prompt.

After "MLLMs know where to look" (Zhang et al., arXiv 2502.17422): a few image tokens take
high weight whatever is asked (visual sinks, a position bias); the same caption read after a
generic request shows that constant part, and the ratio cancels it.

Definition, for word ``i`` of the caption (its tokens teacher-forced after both prompts):

1. ``a_i``: the mean over every layer and every head of word ``i``'s attention row (at its
   query, :mod:`attnlab.explain.sequence`) under the captioner's prompt; ``b_i`` the same
   under the reference prompt (default :data:`REFERENCE`).
2. Off-image keys are excluded: both are restricted to the image keys (every view's cells, in
   the layout's view order; the same photo gives the same image keys under both prompts) and
   renormalised there: ``p = a_img / sum(a_img)``, ``p_ref = b_img / sum(b_img)``.
3. ``ratio = p / (p_ref + eps)`` with ``eps = EPS_SHARE / N`` (``N`` image keys: a thousandth
   of the uniform share, so keys the reference ignores do not blow up).
4. The map is ``ratio / sum(ratio)`` on the image keys, 0 on every other key (the trace's
   key shares are 0): a key that takes the same share under both prompts gets ratio 1,
   whatever its weight, so constant sinks are cancelled to the level of a key the prompt
   does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AttnlabError
from .sequence import image_keys, mean_rows

if TYPE_CHECKING:
    from ..captioner import SequencePass

REFERENCE = "Write a general description of the image."
"""The default neutral reference prompt (as arXiv 2502.17422's generic instruction)."""

EPS_SHARE = 1e-3
"""``eps = EPS_SHARE / N`` (``N`` image keys) in the division."""


def _normalise(x: np.ndarray) -> np.ndarray:
    """``(n, N)`` rows divided by their sums (a row of zeros stays zero)."""
    return x / np.maximum(x.sum(axis=1, keepdims=True), np.finfo(float).tiny)


def contrast(rows: np.ndarray, keys: np.ndarray, ref_rows: np.ndarray, ref_keys: np.ndarray) -> np.ndarray:
    """Steps 2-4 of the module docstring on plain arrays.

    Args:
        rows: ``(n, T)``, word ``i``'s attention over the ``T`` keys of the prompted pass.
        keys: ``(N,)``, the image keys' positions in ``rows`` (:func:`image_keys`).
        ref_rows: ``(n, T')``, the same words' rows under the reference prompt (``T'`` may differ from ``T``).
        ref_keys: ``(N,)``, the same image keys' positions in ``ref_rows``, in the same order.

    Returns:
        ``(n, T)`` float64: each word's contrast over the image keys, summing to 1 (0 for a row with no image
        weight), 0 on every other key.
    """
    p = _normalise(rows[:, keys])  # (n, N)
    r = _normalise(ref_rows[:, ref_keys])  # (n, N)
    ratio = p / (r + EPS_SHARE / len(keys))  # (n, N)
    out = np.zeros_like(rows, dtype=np.float64)  # (n, T)
    out[:, keys] = _normalise(ratio)
    return out


def contrast_rows(seq: "SequencePass", m: Any, again: Callable[[], "SequencePass"]) -> np.ndarray:
    """``contrast``'s rows ``(n, T)``: the pass's head-and-layer mean divided by the reference pass's.

    ``again()`` runs the same image and caption after the reference prompt (one more forward pass); ``m``
    is the method (unused: ``contrast`` takes no layer or head). One line if the two passes' image keys differ."""
    ref = again()
    keys, ref_keys = image_keys(seq), image_keys(ref)
    if len(keys) != len(ref_keys):
        raise AttnlabError(f"the reference prompt gave {len(ref_keys)} image keys where the prompt gave {len(keys)}: "
                           "contrast needs the same photo in both")
    return contrast(mean_rows(seq, m), keys, mean_rows(ref, m), ref_keys)


def reference_of(value: Any) -> str:
    """The reference prompt: ``value`` (a non-empty string) or :data:`REFERENCE`; one line otherwise."""
    if value is None:
        return REFERENCE
    if not isinstance(value, str) or not value.strip():
        raise AttnlabError(f"reference={value!r} must be a prompt (a non-empty string), e.g. {REFERENCE!r}")
    return value
