"""Small helpers every layer shares (no torch, no matplotlib): each rule is written once here.

* :func:`is_int`: an integer argument (Python's or NumPy's), never a bool;
* :func:`one_line`: an exception (or any message) as one short line for an error message;
* :func:`file_sha256`: the SHA-256 of a regular file's bytes, read in chunks;
* :func:`evaluating`: eval mode for a block, every submodule's training flag restored after.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import stat
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["evaluating", "file_sha256", "is_int", "one_line"]


def is_int(x: Any) -> bool:
    """True for an integer (``int``, ``np.int64``, ...) that is not a bool (``True`` is not a count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


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
def evaluating(model: Any) -> Iterator[None]:
    """``model.eval()`` for the block; on exit (exceptions included) every submodule gets back its training flag.

    A captioner that is not a module but holds one as ``.model`` (a wrapped or Hugging Face model): its
    ``eval()``/``train(True)`` run, and the flags restored are those of the inner module's submodules.
    """
    inner = model if hasattr(model, "modules") else getattr(model, "model", None)
    modules = list(inner.modules()) if hasattr(inner, "modules") else []
    flags = [m.training for m in modules]
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)  # the model's own train() runs (a wrapper may do more than set flags)
        for m, flag in zip(modules, flags):
            m.training = flag
