"""Small helpers every layer shares (no torch, no matplotlib): each rule is written once here.

* :func:`is_int`: an integer argument (Python's or NumPy's), never a bool;
* :func:`is_real`: a finite real number (Python's or NumPy's), never a bool;
* :func:`one_line`: an exception (or any message) as one short line for an error message;
* :func:`file_sha256`: the SHA-256 of a regular file's bytes, read in chunks;
* :func:`evaluating`: a model in eval mode for a block, every training flag restored after.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["evaluating", "file_sha256", "is_int", "is_real", "one_line"]


def is_int(x: Any) -> bool:
    """True for an integer (``int``, ``np.int64``, ...) that is not a bool (``True`` is not a count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x: Any) -> bool:
    """True for a finite real number (``int``, ``float``, ``np.float32``, ...) that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(float(x))


def one_line(exc: object, limit: int | None = None, *, with_type: bool = False) -> str:
    """The first non-blank line of ``str(exc)``, stripped and cut to ``limit`` characters.

    An empty message gives the type's name; ``with_type=True`` puts the type's name
    in front (``"ValueError: bad value"``), for reasons whose type says what happened.
    """
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    text = lines[0][:limit] if lines else ""
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text


def file_sha256(path: Path) -> str | None:
    """SHA-256 (hex) of a regular file's bytes; ``None`` when it is not one or cannot be read."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """``model.eval()`` for the block; on exit (exceptions included) every submodule's
    training flag is back as it was, so a half-frozen model (a BatchNorm left in eval
    while the rest trains) stays exactly so.

    ``model`` is a ``torch.nn.Module`` or an object with ``.training``/``.eval()``/``.train()``
    around one in ``.model`` (a wrapped captioner); one with no training flag is left alone.
    """
    inner = model if callable(getattr(model, "modules", None)) else getattr(model, "model", None)
    flags = [(m, m.training) for m in inner.modules()] if callable(getattr(inner, "modules", None)) else []
    was_training = getattr(model, "training", None)
    if was_training is not None or flags:
        model.eval()
    try:
        yield model
    finally:
        if flags:
            for module, flag in flags:
                module.training = flag
        elif was_training is not None:
            model.train(was_training)
