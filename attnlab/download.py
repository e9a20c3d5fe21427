"""Cached downloads that verify what they keep, and a cache that heals.

* :func:`download` fetches a URL into a temporary file beside its destination
  (named with the process id, see :mod:`attnlab.fileio`), checks it (the size the
  server announced, no web page instead of a file, and the caller's ``check``),
  and only then renames it into place and records its SHA-256 in
  ``<name>.sha256``. A transfer has a per-read timeout and an overall deadline;
  its progress bar says when it has stalled.
* :func:`cached` loads a cached file; one that fails to load, or whose bytes no
  longer match the recorded SHA-256, is renamed ``<name>.bad`` (never deleted:
  people put files into the cache by hand) and fetched again.
* Errors say which side failed: the network ("could not download ...") or the
  disk ("cannot write into ...", e.g. a full disk).

Not ``torch.hub.download_url_to_file``: it keeps a transfer that stopped early as
complete (1,000 of 100,000 announced bytes), waits without a timeout or deadline on a
stalled server, and names its temporary files ``<name>.<uuid>.partial``, which a
killed run leaves behind. ``huggingface_hub`` downloads from the Hub into its own
cache layout, not from CATR's GitHub release URLs into this one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from .errors import AttnlabError
from .fileio import atomic_write, make_temp, remove_stale_temps
from .util import file_sha256, one_line

T = TypeVar("T")

DEADLINE_S = 3600.0  # a whole download may take at most this long
STALL_AFTER_S = 5.0  # the progress bar says "stalled" after this long without a byte
# URLError, socket timeouts and refused or reset connections are all OSErrors; a broken answer is an HTTPException
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


def cache_dir() -> Path:
    """Where downloads go: ``$ATTNLAB_CACHE``, else ``<torch.hub dir>/attnlab``."""
    env = os.environ.get("ATTNLAB_CACHE")
    if env:
        return Path(env).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "attnlab"


def sha256_path(dest: Path) -> Path:
    """Where the SHA-256 of a downloaded file is recorded: ``<name>.sha256`` beside it."""
    return dest.with_name(dest.name + ".sha256")


class _NetworkError(Exception):
    pass


class _DiskError(Exception):
    def __init__(self, exc: OSError) -> None:
        super().__init__(exc.strerror or type(exc).__name__)


def _reason(exc: BaseException) -> str:
    """What went wrong on the network, in one line (a URLError's own reason when it has one)."""
    return one_line(getattr(exc, "reason", None) or exc)


class _Progress:
    """A tqdm bar (when enabled) whose postfix says ``stalled N s`` while no byte arrives."""

    def __init__(self, enabled: bool, total: int | None, name: str) -> None:
        self.bar = None
        self.last = time.monotonic()
        self.stalled = False
        self._stop = threading.Event()
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.5, STALL_AFTER_S / 2)):
            idle = time.monotonic() - self.last
            if idle >= STALL_AFTER_S:
                self.stalled = True
                self.bar.set_postfix_str(f"stalled {idle:.0f} s", refresh=True)

    def update(self, n: int) -> None:
        self.last = time.monotonic()
        if self.bar is not None:
            if self.stalled:
                self.stalled = False
                self.bar.set_postfix_str("", refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self._stop.set()
            self._thread.join()
            self.bar.close()


def _fetch(url: str, out: BinaryIO, name: str, progress: bool, timeout: float, deadline: float) -> str:
    """Stream ``url`` into ``out``; returns the SHA-256 of the bytes. Raises _NetworkError,
    _DiskError or AttnlabError (the transfer went wrong in a way the server showed)."""
    start = time.monotonic()
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except _NETWORK_ERRORS as exc:
        raise _NetworkError(_reason(exc)) from None
    except ValueError as exc:  # not a URL
        raise _NetworkError(str(exc)) from None
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind == "text/html" and not name.lower().endswith((".html", ".htm")):
            raise AttnlabError(f"{url} answered with a web page (Content-Type text/html), not the file")
        read = getattr(response, "read1", response.read)  # read1: whatever has arrived, so stalls are seen
        bar = _Progress(progress, total, name)
        written = 0
        try:
            while True:
                if time.monotonic() - start > deadline:
                    raise AttnlabError(
                        f"the download of {url} took longer than {deadline:g} s ({written:,} bytes arrived)"
                    )
                try:
                    chunk = read(1 << 16)
                except _NETWORK_ERRORS as exc:
                    raise _NetworkError(_reason(exc)) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _DiskError(exc) from None
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
    if total is not None and written != total:
        raise AttnlabError(f"the download of {url} stopped early ({written} of {total} bytes)")
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = 30.0,
    deadline: float = DEADLINE_S,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` exists; return ``dest``.

    ``timeout`` bounds each wait for the server, ``deadline`` the whole transfer
    (checked between reads). ``check(path)``, when given, must accept the complete
    file (raise :class:`AttnlabError` otherwise) before it is renamed to ``dest``; a
    file that fails any check is not kept. Its SHA-256 goes to ``<dest>.sha256``.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    tmp = None
    try:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(dest.parent)
            fd, tmp = make_temp(dest)
        except OSError as exc:
            raise _DiskError(exc) from None
        with os.fdopen(fd, "wb") as out:
            sha = _fetch(url, out, dest.name, progress, timeout, deadline)
        if check is not None:
            try:
                check(tmp)
            except AttnlabError as exc:
                reason = str(exc).replace(str(tmp), dest.name)
                raise AttnlabError(f"{url} sent something that is not a usable {dest.name} ({reason})") from None
        try:
            os.replace(tmp, dest)
            atomic_write(sha256_path(dest), lambda fh: fh.write(f"{sha}  {dest.name}\n".encode()))
        except OSError as exc:
            raise _DiskError(exc) from None
    except _NetworkError as exc:
        raise AttnlabError(
            f"could not download {url} ({exc}); without network, download it on another machine and put it at {dest}"
        ) from None
    except _DiskError as exc:
        raise AttnlabError(
            f"cannot write into {dest.parent} ({exc}) while downloading {dest.name}: free some space there or set ATTNLAB_CACHE to another folder"
        ) from None
    except AttnlabError as exc:
        raise AttnlabError(f"{exc}; nothing was kept: try again, or download it on another machine and put it at {dest}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return dest


def _check_recorded_sha(path: Path) -> None:
    record = sha256_path(path)
    try:
        recorded = record.read_text(encoding="ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        return  # no record (a file put there by hand): nothing to compare
    if file_sha256(path) != recorded:
        raise AttnlabError(f"its bytes no longer match the SHA-256 recorded in {record.name} when it was downloaded")


def set_aside(path: Path) -> Path:
    """Rename a bad cached file to ``<name>.bad`` (``.bad-2``, ... if taken), its SHA-256 record with it."""
    n, bad = 1, path.with_name(path.name + ".bad")
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.bad-{n}")
    os.replace(path, bad)
    record = sha256_path(path)
    if record.exists():
        os.replace(record, sha256_path(bad))
    return bad


def cached(url: str, dest: str | os.PathLike, load: Callable[[Path], T], *, progress: bool = True) -> T:
    """``load(dest)``, downloading ``dest`` from ``url`` first when it is not in the cache.

    A download is kept only when ``load`` accepts it. A cached file that ``load``
    refuses, or whose bytes differ from its recorded SHA-256, is renamed
    ``<name>.bad`` (kept, never deleted) and fetched again; when that fails too,
    the error names both files.
    """
    dest = Path(dest)
    if not dest.is_file():
        loaded: list[T] = []
        download(url, dest, progress=progress, check=lambda p: loaded.append(load(p)))
        return loaded[0]
    remove_stale_temps(dest.parent)
    try:
        _check_recorded_sha(dest)
        return load(dest)
    except AttnlabError as exc:
        problem = str(exc)
    try:
        bad = set_aside(dest)
    except OSError as exc:
        raise AttnlabError(f"the cached {dest} cannot be loaded ({problem}) nor renamed ({exc.strerror}): delete or replace it") from None
    try:
        loaded = []
        download(url, dest, progress=progress, check=lambda p: loaded.append(load(p)))
    except AttnlabError as again:
        raise AttnlabError(f"the cached {dest} could not be loaded ({problem}), so it was renamed {bad}; fetching it again failed: {again}") from None
    warnings.warn(f"the cached {dest} could not be loaded ({problem}): it was renamed {bad.name} and downloaded again", stacklevel=2)
    return loaded[0]
