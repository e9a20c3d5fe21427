"""The decode settings: one frozen object, checked once, used by every path that decodes.

:func:`decode_settings` checks what a caller gave (``max_len``, ``beams``,
``length_penalty``, ``record``, ``mode``, ``tokens``) against a captioner's
spec and returns a :class:`DecodeSettings`; :func:`attnlab.caption`,
:func:`attnlab.decode.decode_batch`, the batch runner and
:func:`attnlab.explain.explain` all take their settings from it, so each rule
and its message is written here once. Errors name the library's arguments
(``batch_size``, not ``--batch-size``); the command line checks its flags itself
and names them.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .captioner import CaptionerSpec, check_record
from .errors import AttnlabError
from .util import is_int

__all__ = ["MAX_BEAMS", "MODES", "DecodeSettings", "check_beams", "check_count", "check_max_len",
           "check_tokens", "decode_settings"]

MAX_BEAMS = 64
MODES = ("incremental", "template")


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded, checked (build it with :func:`decode_settings`).

    ``tokens`` (teacher forcing) holds one tuple of ids per image, or ``None``.
    :meth:`as_dict` is what a batch run records in ``meta["run"]``.
    """

    max_len: int
    beams: int = 1
    length_penalty: float = 1.0
    record: str = "cross"
    mode: str = "incremental"
    tokens: tuple[tuple[int, ...], ...] | None = None

    @property
    def forced(self) -> list[list[int]] | None:
        """The teacher-forcing ids as lists, one per image (``None``: the model's own caption)."""
        return None if self.tokens is None else [list(t) for t in self.tokens]

    @property
    def steps(self) -> int:
        """The most steps a caption may take: ``max_len``, or the longest given caption."""
        return self.max_len if self.tokens is None else max(len(t) for t in self.tokens)

    def as_dict(self) -> dict[str, Any]:
        """The settings a trace depends on (``mode``, ``max_len``, ``beams``, ``length_penalty``)."""
        d = asdict(self)
        return {k: d[k] for k in ("mode", "max_len", "beams", "length_penalty")}


def decode_settings(
    spec: CaptionerSpec,
    *,
    max_len: Any = None,
    beams: Any = 1,
    length_penalty: Any = 1.0,
    record: Any = "cross",
    mode: Any = "incremental",
    tokens: Any = None,
    n_images: int = 1,
) -> DecodeSettings:
    """Check every decode argument once (one line each) -> :class:`DecodeSettings`.

    ``tokens`` (one list for all images or one per image) is checked for ``n_images``.
    """
    record = check_record(record)
    if mode not in MODES:
        raise AttnlabError(f"mode must be 'incremental' or 'template', not {mode!r}")
    limit = check_max_len(max_len, spec.max_len)
    beams, length_penalty = check_beams(beams, length_penalty)
    forced = check_tokens(tokens, n_images, spec.max_len, len(spec.vocab) or None)
    if forced is not None and beams > 1:
        raise AttnlabError("tokens= traces a given caption: beam search (beams > 1) has nothing to choose; drop one of them")
    frozen = None if forced is None else tuple(tuple(f) for f in forced)
    return DecodeSettings(limit, beams, length_penalty, record, mode, frozen)


def check_count(name: str, value: Any, least: int, hint: str = "") -> int:
    """An integer argument ``name`` (NumPy's too, never a bool) of at least ``least``, or one line."""
    if not is_int(value) or int(value) < least:
        raise AttnlabError(f"{name} must be a whole number >= {least}{hint}, not {value!r}")
    return int(value)


def check_max_len(max_len: Any, limit: int) -> int:
    """``None`` -> ``limit``; else an integer (NumPy's too) from 1 to ``limit``."""
    if max_len is None:
        return limit
    if not is_int(max_len) or not 1 <= int(max_len) <= limit:
        raise AttnlabError(f"max_len must be an integer from 1 to {limit}, not {max_len!r}")
    return int(max_len)


def check_beams(beams: Any, length_penalty: Any) -> tuple[int, float]:
    """``beams``: an integer (NumPy's too) from 1 to :data:`MAX_BEAMS`; ``length_penalty``: a number >= 0."""
    if not is_int(beams) or not 1 <= int(beams) <= MAX_BEAMS:
        raise AttnlabError(f"beams must be an integer from 1 to {MAX_BEAMS}, not {beams!r}")
    if isinstance(length_penalty, (bool, np.bool_)) or not isinstance(length_penalty, numbers.Real) or not (
        0 <= float(length_penalty) < float("inf")
    ):
        raise AttnlabError(f"length_penalty must be a finite number >= 0, not {length_penalty!r}")
    return int(beams), float(length_penalty)


def _as_ids(seq: Any) -> list[int]:
    """One caption's ids: a list/tuple/array/tensor of integers (no strings, floats, None)."""
    if isinstance(seq, str):
        raise AttnlabError(
            f"tokens={seq!r} is text: pass token ids (e.g. model.spec.vocab.encode(...) for a word-level vocabulary)"
        )
    if isinstance(seq, (np.ndarray, torch.Tensor)):
        if seq.dtype in (torch.bool, np.bool_) or (
            seq.dtype.is_floating_point if isinstance(seq, torch.Tensor) else not np.issubdtype(seq.dtype, np.integer)
        ):
            raise AttnlabError(f"tokens must hold integer ids, not {seq.dtype}")
        seq = seq.tolist()
    ids = []
    for t in seq:
        if not is_int(t):
            raise AttnlabError(f"tokens must hold integer ids, not {t!r} ({type(t).__name__})")
        ids.append(int(t))
    return ids


def check_tokens(tokens: Any, n_images: int, limit: int, vocab_size: int | None) -> list[list[int]] | None:
    """Teacher-forcing ids: one list for all images or one per image -> ``n_images`` lists."""
    if tokens is None:
        return None
    if isinstance(tokens, str):
        _as_ids(tokens)
    if isinstance(tokens, (np.ndarray, torch.Tensor)) and tokens.ndim == 0:
        tokens = [tokens.item()]
    if isinstance(tokens, (np.ndarray, torch.Tensor)) and tokens.ndim == 2:
        tokens = list(tokens)
    if not isinstance(tokens, (list, tuple, np.ndarray, torch.Tensor)):
        raise AttnlabError(f"tokens must be a list of token ids (or one list per image), not {type(tokens).__name__}")
    nested = len(tokens) > 0 and (
        isinstance(tokens[0], (list, tuple)) or (isinstance(tokens[0], (np.ndarray, torch.Tensor)) and tokens[0].ndim >= 1)
    )
    per_image = list(tokens) if nested else [tokens] * n_images
    if len(per_image) != n_images:
        raise AttnlabError(f"tokens gives {len(per_image)} captions for {n_images} images")
    out = []
    for seq in per_image:
        ids = _as_ids(seq)
        if not ids:
            raise AttnlabError("tokens is empty: give the ids of the caption to trace")
        if len(ids) > limit:
            raise AttnlabError(f"tokens has {len(ids)} ids; this model decodes at most {limit}")
        top = vocab_size - 1 if vocab_size else None
        if min(ids) < 0 or (top is not None and max(ids) > top):
            raise AttnlabError(f"token ids must lie in 0..{top}" if top is not None else "token ids must be >= 0")
        out.append(ids)
    return out
