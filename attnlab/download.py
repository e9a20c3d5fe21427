"""Cached downloads with a progress bar; nothing is left behind when one fails."""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from .errors import AttnlabError
from .fileio import atomic_write


def cache_dir() -> Path:
    """Where downloads go: ``$ATTNLAB_CACHE``, else ``<torch.hub dir>/attnlab``."""
    env = os.environ.get("ATTNLAB_CACHE")
    if env:
        return Path(env).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "attnlab"


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` exists; return ``dest``.

    The bytes go to a temporary file beside ``dest`` that is renamed only when
    complete (:func:`attnlab.fileio.atomic_write`), so an interrupted download
    never looks like a cached file.
    """
    if dest.is_file():
        return dest

    def fetch(out: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            written = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                written += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            if total is not None and written != total:
                raise AttnlabError(f"the download of {url} stopped early ({written} of {total} bytes): try again")

    try:
        atomic_write(dest, fetch)
    # http.client.HTTPException (IncompleteRead of a cut chunked body, BadStatusLine) is no OSError
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split()) or type(exc).__name__  # one line
        raise AttnlabError(
            f"could not download {url} ({reason}); without network, download it on another machine and put it at {dest}"
        ) from None
    return dest
