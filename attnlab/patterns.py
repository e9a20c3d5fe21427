"""Glob patterns of a batch run, expanded so that the walk is bounded and every match lies
below the pattern's fixed folder.

``glob.glob(..., recursive=True)`` follows symbolic links to folders under ``**``, so a
link to a folder above (``ln -s .. up``) makes it walk forever, and ``*/../x.png``
matches files outside the folder its matches are named after. Here:

* ``**`` (a whole part: zero or more folders) walks the real folder tree only: a
  link to a folder is not entered by ``**`` (as in :func:`os.walk` and the folder
  walk of a batch run), so the walk ends whatever links the tree holds;
* other wildcard parts (``*``, ``?``, ``[...]``) match one name each, links
  included; each such part goes one level down, so they end too;
* ``..`` or ``.`` after a wildcard is refused: a pattern must not climb out of the
  folder before its first wildcard (name that folder instead);
* hidden names (``.x``) match only a part that starts with ``.``, and ``**`` does
  not enter hidden folders (as glob does).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import AttnlabError

MAGIC = re.compile(r"[*?[]")


def split(pattern: str) -> tuple[Path, list[str]]:
    """``"photos/2024/**/*.jpg"`` -> ``(Path("photos/2024"), ["**", "*.jpg"])``: the fixed
    folder (``.`` when the first part is a wildcard) and the parts from the first wildcard on."""
    parts = list(Path(pattern).parts)
    first = next((i for i, part in enumerate(parts) if MAGIC.search(part)), len(parts) - 1)
    first = min(first, len(parts) - 1)  # the last part is always matched (a file name)
    rest = parts[first:]
    if any(part in ("..", ".") for part in rest[1:]):
        raise AttnlabError(
            f"the pattern {pattern!r} climbs out of its folder ('..' after a wildcard): "
            "put every '..' before the first wildcard (e.g. '../photos/*.png') or name the folder"
        )
    return (Path(*parts[:first]) if first else Path(".")), rest


def _matches(name: str, part: str) -> bool:
    if name.startswith(".") and not part.startswith("."):
        return False
    return fnmatch.fnmatch(name, part)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:  # gone, not a folder, no permission: no matches (as glob)
        return []


def _real_folders(folder: Path) -> Iterator[Path]:
    """``folder`` and every non-hidden folder below it, links to folders not entered (bounded)."""
    yield folder
    for top, dirs, _ in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            yield Path(top) / d


def _expand(folder: Path, parts: list[str]) -> Iterator[Path]:
    part, rest = parts[0], parts[1:]
    if part == "**":
        while rest and rest[0] == "**":
            rest = rest[1:]  # "**/**" is "**"
        for sub in _real_folders(folder):
            if rest:
                yield from _expand(sub, rest)
            else:
                yield from (sub / e.name for e in _entries(sub) if not e.name.startswith("."))
        return
    if not MAGIC.search(part):
        names = [part]
    else:
        names = sorted(e.name for e in _entries(folder) if _matches(e.name, part))
    for name in names:
        path = folder / name
        if not rest:
            if os.path.lexists(path):
                yield path
        elif path.is_dir():
            yield from _expand(path, rest)


def expand(pattern: str) -> tuple[Path, list[Path]]:
    """The fixed folder of ``pattern`` and its matches (files and folders), each below that folder."""
    root, parts = split(pattern)
    seen: set[Path] = set()
    found = []
    for path in _expand(root, parts):
        if path not in seen:  # "a/**/b/**/x" reaches a file along several ways
            seen.add(path)
            found.append(path)
    return root, found
