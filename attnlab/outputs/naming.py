"""How the outputs of an input image are named: one scheme for single files and folder runs.

Single files (``attnlab caption x.png --out DIR``) are named after the image's stem
(``DIR/x.npz``, ``DIR/x.attn.png``); folder runs after its path relative to the folder
(``DIR/cats/x.jpg.npz``). Either way the names go through :func:`unique_names`: the
first of the names that are equal when compared case-insensitively keeps its name, the
others get a number (2, 3, ...) after a mark, the lowest that no name taken before and
no reserved name has. The mark differs only so the names read naturally: ``x-2`` for a
stem, ``x.jpg~2`` for a path (a number appended to a file name, which no image name
ends with). The rules as users read them: ``docs/files.md``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AttnlabError
from ..fileio import make_temp
from ..util import file_sha256

TRACE_SUFFIX = ".npz"
FIGURE_SUFFIX = ".attn.png"
HTML_SUFFIX = ".html"


@dataclass(frozen=True)
class Source:
    """One input image: the name its outputs are named after and how to recognise it.

    ``label`` is recorded in the outputs (the resolved path of a file, or a
    description of an image made in memory); ``sha256`` is the hash of the file's
    bytes (of the pixels for an image in memory), ``None`` when the file cannot be read
    (then nothing will be written for it).
    """

    name: str
    label: str
    sha256: str | None
    path: Path | None = None

    @classmethod
    def of_path(cls, path: str | os.PathLike) -> "Source":
        p = Path(path)
        label = str(p.resolve()) if p.exists() else str(p.absolute())
        return cls(p.name, label, file_sha256(p), p)

    @classmethod
    def of_array(cls, name: str, array: np.ndarray, label: str) -> "Source":
        return cls(name, label, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())


@dataclass(frozen=True)
class Planned:
    """The files planned for one input: its trace and figure (and its web page, :attr:`html`)."""

    source: Source
    stem: str
    trace: Path
    figure: Path

    @property
    def files(self) -> tuple[Path, Path]:
        return self.trace, self.figure

    @property
    def html(self) -> Path:
        """The web page's path: the trace's name with ``.html`` for ``.npz``."""
        return self.trace.with_name(self.trace.name[: -len(TRACE_SUFFIX)] + HTML_SUFFIX)

    def written(self, figure: bool = True, html: bool = False) -> tuple[Path, ...]:
        """The files a run writes for this input: the trace, and the figure and page when asked."""
        return (self.trace,) + ((self.figure,) if figure else ()) + ((self.html,) if html else ())


def check_out_dir(out_dir: Path) -> None:
    """Fail before any work when ``--out`` cannot become a folder (nothing is created here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AttnlabError(f"--out {out_dir} is a file: give a folder")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AttnlabError(f"--out {out_dir} cannot be a folder: {existing} is a file; give another folder")
    try:  # really try: permission bits do not tell for root, ACLs or read-only file systems
        fd, probe = make_temp(existing / "probe")
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise AttnlabError(
            f"--out {out_dir}: cannot write in {existing} ({exc.strerror or type(exc).__name__}); give a folder you can write to"
        ) from None


def unique_names(names: Sequence[str], numbered: Callable[[str, int], str], reserved: Collection[str] = ()) -> list[str]:
    """The naming scheme: ``names`` made unique when compared case-insensitively.

    A name keeps itself unless an earlier one took it; then it becomes ``numbered(name, n)``
    with the lowest ``n`` from 2 whose result neither an earlier name took nor
    ``reserved`` holds.
    """
    reserved_keys = {r.casefold() for r in reserved}
    taken: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 2
        while unique.casefold() in taken:
            unique, n = numbered(name, n), n + 1
            while unique.casefold() in reserved_keys:
                unique, n = numbered(name, n), n + 1
        taken.add(unique.casefold())
        out.append(unique)
    return out


def _stem_of(name: str) -> str:
    stem = Path(name).stem.lstrip(".").replace("\x00", "")
    return stem or "image"


def unique_stems(names: Sequence[str]) -> list[str]:
    """One output stem per input file name (single files): ``x``, then ``x-2``, ``x-3`` ...
    skipping every stem that some input has (:func:`unique_names`)."""
    stems = [_stem_of(n) for n in names]
    return unique_names(stems, lambda stem, n: f"{stem}-{n}", reserved=stems)


def mirror_names(names: Sequence[str]) -> list[str]:
    """Relative image paths (``"cats/tabby.jpg"``) as output names (folder runs): the path
    itself; names that differ only in case (possible on Linux, not on every disk the outputs
    may go to) keep the first as it is, the others get ``~2``, ``~3`` ... appended
    (:func:`unique_names`), which no image name ends with."""
    return unique_names(names, lambda name, n: f"{name}~{n}")


def plan_outputs(sources: Sequence[Source], out_dir: str | os.PathLike) -> list[Planned]:
    """Name the trace and figure of every input after its stem (:func:`unique_stems`)."""
    out = Path(out_dir)
    return [
        Planned(s, stem, out / f"{stem}{TRACE_SUFFIX}", out / f"{stem}{FIGURE_SUFFIX}")
        for s, stem in zip(sources, unique_stems([s.name for s in sources]))
    ]


def plan_mirrored(sources: Sequence[Source], out_dir: str | os.PathLike) -> list[Planned]:
    """Name each input's trace and figure after its relative path (``source.name``, unique:
    see :func:`mirror_names`): ``<name>.npz`` and ``<name>.attn.png`` under ``out_dir``."""
    out = Path(out_dir)
    return [Planned(s, s.name, out / f"{s.name}{TRACE_SUFFIX}", out / f"{s.name}{FIGURE_SUFFIX}") for s in sources]
