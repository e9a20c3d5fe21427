"""The run lists of a batch run (``captions.jsonl``, ``errors.jsonl``): written, read, recognised.

A run list is JSON lines: first a header record that only attnlab writes, then one
record per image::

    {"attnlab_run_list": "captions", "version": 2, "records": 16, "sha256": "<of the lines below>"}
    {"image": "photos/cats/x.jpg", "name": "cats/x.jpg", "caption": "...", ...}

The header's key ``attnlab_run_list`` is the mark, and its ``sha256`` (of every byte after
the header line) tells that the file is still exactly as attnlab wrote it. A file
without that header (a user's notes, a ground-truth list of ``{"image": ...}`` records,
a list written by earlier versions of attnlab, which had no header) or with records edited since is
not attnlab's: it is never replaced or deleted unless ``--overwrite``.
:func:`read_run_list` gives the records (the header left out).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import AttnlabError
from .fileio import atomic_write

MARK = "attnlab_run_list"
VERSION = 2
MAX_BYTES = 1 << 30  # a run list of 1 GiB holds millions of images; a bigger file is not one


def _encode(record: dict[str, Any]) -> str:
    # ASCII escapes keep any text (a lone surrogate from an undecodable file name included) writable
    return json.dumps(record, ensure_ascii=True) + "\n"


def render(kind: str, records: list[dict[str, Any]]) -> bytes:
    """The bytes of a run list of ``kind`` ("captions" or "errors"): the header, then the records."""
    body = "".join(_encode(r) for r in records).encode("ascii")
    header = {MARK: kind, "version": VERSION, "records": len(records), "sha256": hashlib.sha256(body).hexdigest()}
    return _encode(header).encode("ascii") + body


def write_run_list(path: Path, kind: str, records: list[dict[str, Any]]) -> None:
    """Write the run list atomically (it appears complete or not at all)."""
    data = render(kind, records)
    atomic_write(path, lambda fh: fh.write(data))


def _split(path: Path) -> tuple[dict[str, Any] | None, bytes]:
    """The header record (``None`` when the file is not an intact run list of attnlab's) and the body."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:  # a FIFO would block, a huge file is not a list
            return None, b""
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError:
        return None, b""
    first, _, body = data.partition(b"\n")
    try:
        header = json.loads(first)
    except ValueError:
        return None, b""
    if not isinstance(header, dict) or not isinstance(header.get(MARK), str) or len(data) > MAX_BYTES:
        return None, b""
    if header.get("sha256") != hashlib.sha256(body).hexdigest():
        return None, b""
    return header, body


def is_own(path: Path, kind: str) -> bool:
    """True when ``path`` is a run list of ``kind`` that attnlab wrote and nobody changed since."""
    header, _ = _split(path)
    return header is not None and header[MARK] == kind


def check_replaceable(path: Path, kind: str, overwrite: bool) -> None:
    """Refuse (one line) a file at ``path`` that a run may not replace or delete."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file() or path.is_symlink():
        raise AttnlabError(f"{path} is in the way and is not a regular file: move it or give another --out folder")
    if overwrite or is_own(path, kind):
        return
    raise AttnlabError(
        f"{path} exists and attnlab did not write it (it has no intact attnlab header line; lists of earlier "
        "attnlab versions had none): pass --overwrite to replace it (finished images are still skipped), or give another --out folder"
    )


def read_run_list(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run list attnlab wrote (``kind``: "captions" or "errors", or either)."""
    path = Path(path)
    header, body = _split(path)
    if header is None or (kind is not None and header[MARK] != kind):
        raise AttnlabError(f"{path} is not a run list attnlab wrote (or it was edited since): read it as JSON lines yourself")
    records = [json.loads(line) for line in body.decode("ascii").splitlines() if line.strip()]
    return [r for r in records if isinstance(r, dict)]


def own_records(path: Path, kind: str) -> dict[str, dict[str, Any]]:
    """An earlier run list of attnlab's by image name; empty when there is none (or it is not attnlab's)."""
    try:
        records = read_run_list(path, kind)
    except AttnlabError:
        return {}
    return {r["name"]: r for r in records if isinstance(r.get("name"), str)}
