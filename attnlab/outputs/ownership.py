"""Which files attnlab may write over: the marks only attnlab writes and the checks built on them.

An existing file is replaced only when attnlab wrote it for the same input: traces record
the input's resolved path and SHA-256 in ``meta["source"]`` and ``meta["source_sha256"]``,
figures in a PNG text chunk ``attnlab`` and web pages in a ``<meta name="attnlab-source">``
of their head (a page of an earlier version, without one, is attnlab's when the trace
beside it records the page's SHA-256, ``meta["html_sha256"]``). Inputs are never written
over; folders and other non-files in the way are always refused. :func:`resume_state`
tells a resumed run what to do with an input. The rules as users read them: ``docs/files.md``.
"""

from __future__ import annotations

import enum
import errno
import html
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AttnlabError
from ..trace_io import read_header
from ..util import file_sha256
from .naming import FIGURE_SUFFIX, Planned

PNG_TAG = "attnlab"  # the PNG text chunk that names a figure's input
PAGE_MARK = b'<meta name="attnlab-source" content="'  # the same for a web page, in its <head>
_PAGE_ANCHOR = b'<meta name="generator" content="attnlab">\n'


class _InputFiles:
    """The input files of a run, to tell whether a path is one of them (hard links and
    case-insensitive file systems included)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.ids: set[tuple[int, int]] = set()
        self.names = {os.path.normcase(os.path.abspath(p)) for p in paths}
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            self.ids.add((st.st_dev, st.st_ino))

    def __contains__(self, path: Path) -> bool:
        try:
            st = path.stat()
            if (st.st_dev, st.st_ino) in self.ids:
                return True
        except OSError:
            pass
        return os.path.normcase(os.path.abspath(path)) in self.names


def _source_in(tag: Any) -> tuple[str, str] | None:
    """The (source, sha256) a mark of attnlab's holds (a trace's meta, a figure's or page's tag), or None."""
    if not isinstance(tag, dict) or not isinstance(tag.get("source"), str) or not isinstance(tag.get("source_sha256"), str):
        return None
    return tag["source"], tag["source_sha256"]


def recorded_source(path: Path, is_figure: bool) -> tuple[str, str] | None:
    """The (source, sha256) an attnlab trace or figure records, or None when it is not one."""
    try:
        if is_figure:
            from PIL import Image

            with Image.open(path) as im:
                tag = json.loads(im.info[PNG_TAG]) if im.format == "PNG" and PNG_TAG in im.info else None
        else:
            tag = read_header(path).get("meta", {})
    except Exception:  # unreadable, not ours: all the same here
        return None
    return _source_in(tag)


def _page_mark(page: Path) -> tuple[str, str] | None:
    """The (source, sha256) a web page of attnlab's records in its ``<head>``, or None."""
    try:
        with page.open("rb") as fh:
            head = fh.read(1 << 16)
        start = head.index(PAGE_MARK) + len(PAGE_MARK)
        tag = json.loads(html.unescape(head[start : head.index(b'"', start)].decode("ascii")))
    except (OSError, ValueError):  # no mark (ValueError: not found, not ASCII, not JSON)
        return None
    return _source_in(tag)


def mark_page(path: Path, tag: dict[str, str]) -> None:
    """Put ``tag`` (JSON, ASCII, HTML-escaped) into the ``<head>`` of a page :func:`attnlab.export_html` wrote."""
    data = path.read_bytes()
    if _PAGE_ANCHOR not in data[: 1 << 12]:
        raise OSError(errno.EINVAL, "the page is not one of attnlab's", str(path))
    mark = PAGE_MARK + html.escape(json.dumps(tag), quote=True).encode("ascii") + b'">\n'
    with path.open("wb") as fh:
        fh.write(data.replace(_PAGE_ANCHOR, _PAGE_ANCHOR + mark, 1))


def recorded_page(page: Path, trace: Path) -> tuple[str, str] | None:
    """The (source, sha256) of a web page: its own mark, or (pages of earlier versions, which
    have none) the trace beside it when that trace records the page's SHA-256."""
    if (marked := _page_mark(page)) is not None:
        return marked
    try:
        meta = read_header(trace).get("meta", {})
    except Exception:
        return None
    if not isinstance(meta, dict) or meta.get("html_sha256") != file_sha256(page):
        return None
    return _source_in(meta)


def _conflict(path: Path, plan: Planned, inputs: _InputFiles, overwrite: bool) -> str | None:
    """Why ``path`` may not be written for ``plan``, or None."""
    if path in inputs:
        return f"{path} is one of the inputs; attnlab never writes over an input: give another --out folder"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check {path} ({exc.strerror}): a file may stand where a folder is needed; move it or give another --out folder"
    if stat.S_ISDIR(mode):
        return f"{path} is a folder in the way of an output: move it or give another --out folder"
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        return f"{path} is not a regular file: move it or give another --out folder"
    if overwrite:
        return None
    if stat.S_ISLNK(mode):
        recorded = None
    elif path == plan.html:
        recorded = recorded_page(path, plan.trace)
    else:
        recorded = recorded_source(path, path.name.endswith(FIGURE_SUFFIX))
    if recorded is None:
        return f"{path} exists and attnlab did not write it for this image (it records no input): pass --overwrite to replace it, or give another --out folder"
    source, sha = recorded
    if source != plan.source.label:
        return f"{path} holds attnlab's output for another image ({source}): pass --overwrite to replace it, or give another --out folder"
    if sha != plan.source.sha256:
        return f"{path} was written for an earlier version of {source} (its SHA-256 differs): pass --overwrite to replace it"
    return None


def check_plan(plans: Sequence[Planned], *, overwrite: bool = False, figure: bool = True, html: bool = False) -> None:
    """Refuse (one line, before any work) a plan that would write over an input or a file
    attnlab did not write for the same input (unless ``overwrite``); ``figure``/``html``:
    whether the figures and web pages will be written too."""
    inputs = _InputFiles([p.source.path for p in plans if p.source.path is not None])
    problems = []
    for plan in plans:
        if plan.source.sha256 is None:
            continue  # the image cannot be read: it fails later and nothing is written for it
        problems += [m for f in plan.written(figure, html) if (m := _conflict(f, plan, inputs, overwrite))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AttnlabError(problems[0] + more)


class Resume(enum.Enum):
    """What a resumed run does with an input (see :func:`resume_state`)."""

    DONE = "done"  # complete outputs of attnlab's for this input, same settings: skipped
    TODO = "todo"  # missing, or written with other settings: (re)done
    REFUSED = "refused"  # a file in the way may not be written over: listed as an error


@dataclass(frozen=True)
class ResumeState:
    """:func:`resume_state`'s answer: ``action``, with the trace's JSON ``header`` when
    :attr:`Resume.DONE` and the one-line ``reason`` when :attr:`Resume.REFUSED`."""

    action: Resume
    header: dict[str, Any] | None = None
    reason: str = ""


_TODO = ResumeState(Resume.TODO)


def resume_state(plan: Planned, run: dict, *, figure: bool, html: bool = False, overwrite: bool = False) -> ResumeState:
    """What a resumed run does with ``plan``'s input (a :class:`ResumeState`).

    Done: the trace (and with ``figure`` the figure) exists, attnlab wrote it for
    this very input (same path, same SHA-256; with ``html`` the page too) and with the same settings
    (``meta["run"] == run``: model, weights, max_len, beams, ...); ``header`` is
    the trace's JSON header (caption, words, meta). An output of attnlab's for
    the same input with other settings, or a missing file, is to do (it will
    be replaced). A file that may not be written over is refused (see
    :func:`check_plan`). Atomic writes mean a trace at its final name is
    complete; one that cannot be opened is not attnlab's (refused, not redone).
    """
    if plan.source.sha256 is None:
        return _TODO  # unreadable: reading the image says why
    inputs = _InputFiles([plan.source.path] if plan.source.path is not None else [])
    for f in plan.written(figure, html):
        reason = _conflict(f, plan, inputs, overwrite)
        if reason:
            return ResumeState(Resume.REFUSED, reason=reason)
    try:
        header = read_header(plan.trace)
    except Exception:  # missing, or foreign and --overwrite: redo
        return _TODO
    meta = header.get("meta", {})
    mine = (plan.source.label, plan.source.sha256)
    if _source_in(meta) != mine or meta.get("run") != run:
        return _TODO
    # the figure and page must be the very ones written with this trace (a run killed between the
    # renames leaves newer ones beside an older trace, or none): their SHA-256 is in the trace
    if figure and (recorded_source(plan.figure, True) != mine or meta.get("figure_sha256") != file_sha256(plan.figure)):
        return _TODO
    if html and (recorded_page(plan.html, plan.trace) != mine or meta.get("html_sha256") != file_sha256(plan.html)):
        return _TODO
    return ResumeState(Resume.DONE, header=header)
