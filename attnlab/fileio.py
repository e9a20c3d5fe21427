"""Atomic file writes: a file appears complete or not at all.

Every temporary file attnlab writes lies beside its target and is named
``.<name>.<random>.pid<pid>.<host>.tmp``: the writing process and machine are in the
name, so a later run can tell a temporary file left by a killed run (its process is
gone, or it is hours old) from the live one of a run going on in parallel
(:func:`remove_stale_temps`).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# a temporary file older than this is stale whoever wrote it (no attnlab write takes hours:
# downloads have a deadline of one hour, see attnlab.download)
STALE_AFTER_S = 6 * 3600.0
# ".<name>.<8 random>.pid<pid>.<host>.tmp[.png|.html]" (this version) or ".<name>.<8 random>.tmp" (earlier ones;
_OWNER = re.compile(r"^\..+\.[a-z0-9_]{8}\.pid(\d+)\.([A-Za-z0-9_-]*)\.tmp(\.png|\.html)?$")
# only for the suffixes attnlab wrote, so that a user's own ".notes.abcd1234.tmp" is safe)
_OLD = re.compile(r"^\..+\.(pt|pth|train|npz|png|svg|gif|txt|sha256)\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]


def make_temp(path: str | os.PathLike) -> tuple[int, Path]:
    """Create a new empty temporary file beside ``path`` (normal file mode); returns its fd and path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".pid{os.getpid()}.{_host()}.tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    return fd, Path(tmp)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    *,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it to ``path``.

    ``check(tmp)``, when given, runs on the complete temporary file before the
    rename (e.g. "does it open as a checkpoint?"). On any exception the temporary
    file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a number we cannot judge): assume alive
    return True


def is_stale_temp(path: Path, *, now: float | None = None) -> bool:
    """True for a temporary file of attnlab's whose writer is gone or that is hours old."""
    owner = _OWNER.match(path.name)
    if owner is None and not _OLD.match(path.name):
        return False  # not a name attnlab makes: never touched
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    if owner is None or owner.group(2) != _host():
        return False  # no pid in the name, or written on another machine: only age tells
    pid = int(owner.group(1))
    return pid != os.getpid() and not _alive(pid)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed runs left in ``folder``; returns them.

    Only the names :func:`make_temp` makes are considered, and of those only
    the ones whose writing process has ended (its pid and host are in the name) or
    that are older than :data:`STALE_AFTER_S`; a live temporary file of a parallel
    run is never touched. Errors (a folder that is gone, no permission) are ignored.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        p = Path(entry.path)
        if is_stale_temp(p):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


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
