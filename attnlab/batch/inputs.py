"""Finding the input images of a batch run: folders, glob patterns, files, and shards of them."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import outputs, patterns
from ..errors import AttnlabError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
"""File name endings (any case) taken from folders and glob patterns."""


@dataclass(frozen=True)
class Item:
    """One input image: its file and the relative name its outputs mirror (``"cats/x.jpg"``)."""

    path: Path
    name: str


def is_pattern(text: str) -> bool:
    """True for a folder or a glob pattern (what makes ``attnlab caption`` a batch run)."""
    p = Path(text)
    return p.is_dir() or (not p.exists() and bool(patterns.MAGIC.search(text)))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk(root: Path) -> list[Path]:
    """Image files below ``root``, hidden files and folders left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if _is_image(f)]
    return found


def _check_name(name: str, path: Path) -> str:
    """A relative output name that stays below ``--out``: no ``..``, ``.``, empty or absolute parts."""
    parts = name.split("/")
    if os.path.isabs(name) or any(part in ("", ".", "..") for part in parts):
        raise AttnlabError(f"{path} would be named {name!r}, which leaves the output folder: name its folder or a pattern below it")
    return name


def _own_figure(path: Path, out: Path | None) -> bool:
    """A figure attnlab writes into ``out`` (never taken as an input, e.g. with ``--out`` inside the folder)."""
    if out is None or not path.name.endswith(outputs.FIGURE_SUFFIX):
        return False
    return out.resolve() in path.resolve().parents


def find_images(inputs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None) -> list[Item]:
    """The images named by ``inputs``: folders (read recursively), glob patterns
    (``"photos/**/*.jpg"``, recursive ``**`` allowed) and files.

    Folders and patterns yield the files ending in one of :data:`IMAGE_SUFFIXES`
    (hidden ones left out), sorted by name. Names are relative to the folder (to a
    pattern's fixed leading folders); with several inputs each folder's name is
    put in front (``photos/cats/x.jpg``). Figures attnlab wrote into ``out`` are
    never inputs. The same file named twice is taken once.
    """
    if not inputs:
        raise AttnlabError("no folder, pattern or image given")
    out_dir = Path(out) if out is not None else None
    found: list[tuple[Path, str]] = []
    for arg in inputs:
        text = os.fspath(arg)
        p = Path(text)
        if p.is_dir():
            root, paths, label = p, _walk(p), p.resolve().name or "root"
            if not paths:
                raise AttnlabError(f"no images in folder {text} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, in subfolders too)")
        elif p.exists() or not patterns.MAGIC.search(text):
            if not p.exists():
                raise AttnlabError(f"no file, folder or glob match at {text}: check the path")
            root, paths, label = p.parent, [p], ""
        else:
            root, matches = patterns.expand(text)  # bounded, every match below root
            paths = [m for m in matches if m.is_file() and _is_image(m.name)]
            label = root.resolve().name or "root"
            if not paths:
                raise AttnlabError(f"the pattern {text!r} matches no image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        named = []
        for path in paths:
            if _own_figure(path, out_dir):
                continue
            name = _check_name(path.relative_to(root).as_posix() if root != Path(".") else path.as_posix(), path)
            named.append((path, f"{label}/{name}" if len(inputs) > 1 and label else name))
        found += sorted(named, key=lambda pn: pn[1])  # one order however the folder was named or walked
    seen: set[str] = set()
    unique = []
    for path, name in found:
        key = os.path.normcase(str(path.resolve()))
        if key not in seen:
            seen.add(key)
            unique.append((path, name))
    if not unique:
        raise AttnlabError("no images to caption (only figures attnlab wrote were found)")
    names = outputs.mirror_names([n for _, n in unique])
    return [Item(path, name) for (path, _), name in zip(unique, names)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` -> ``(3, 8)``: the 3rd of 8 slices (``K`` from 1 to ``N``)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise AttnlabError(f"--shard {text!r}: give K/N with K from 1 to N, e.g. 3/8 for the third of eight slices")
    return int(m.group(1)), int(m.group(2))


def shard_items(items: Sequence[Any], shard: tuple[int, int]) -> list[Any]:
    """The ``k``-th of ``n`` disjoint slices: items ``k-1, k-1+n, k-1+2n, ...`` (together: all of them)."""
    k, n = shard
    if not 1 <= k <= n:
        raise AttnlabError(f"shard {k}/{n}: K must lie from 1 to N")
    return list(items[k - 1 :: n])


def sidecar_names(shard: tuple[int, int]) -> tuple[str, str]:
    """The captions and errors file names of a shard: ``captions.jsonl`` or ``captions.3-of-8.jsonl``."""
    k, n = shard
    tag = "" if n == 1 else f".{k}-of-{n}"
    return f"captions{tag}.jsonl", f"errors{tag}.jsonl"
