"""Atomic file writes: a file appears complete or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_create(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Like :func:`atomic_write`, but never replaces a file: ``FileExistsError`` when ``path`` exists.

    The complete file is written under a temporary name, then hard-linked to
    ``path`` (which fails if the name is taken, even by a file that appeared
    meanwhile); where the file system has no hard links, the check and the
    rename are two steps.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise FileExistsError(path)
    staged = atomic_write(path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"), write)
    try:
        try:
            os.link(staged, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network or FAT file systems)
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return path
