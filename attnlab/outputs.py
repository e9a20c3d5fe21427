"""Where ``attnlab caption --out`` and ``attnlab demo`` put their files, and how they are named.

Per input image ``<stem>.<ext>`` the output folder gets two files:

* ``<stem>.npz``: the trace (:class:`attnlab.CaptionTrace`), and
* ``<stem>.attn.png``: the word grid figure;
* with ``--html`` also ``<stem>.html``: the explorer as one offline web page
  (:func:`attnlab.export_html`).

Rules (they protect the user's files):

* Names are unique by construction for any list of inputs: inputs whose stems
  clash (same name in two folders, names that differ only in case, ``x.png`` and
  ``x.jpg``) keep the plain stem for the first one and get ``-2``, ``-3`` ... for
  the others, skipping every stem another input already has (``x-2.png`` keeps
  ``x-2``). Trace names end in ``.npz`` and figure names in ``.attn.png``, so no
  trace can be named like a figure.
* A planned output is never one of the inputs (refused, ``--overwrite`` or not).
* An existing file is replaced only when attnlab wrote it for the same input:
  traces record the input's resolved path and SHA-256 in ``meta["source"]`` and
  ``meta["source_sha256"]``, figures in a PNG text chunk ``attnlab`` and web
  pages in a ``<meta name="attnlab-source">`` of their head (a page of an
  earlier version, without one, is attnlab's when the trace beside it records
  the page's SHA-256, ``meta["html_sha256"]``). Anything
  else (a photo, a file from another image, another program's file) is refused
  unless the user passes ``--overwrite``. Folders and other non-files in the way
  are always refused.
* Trace, figure and page are written to temporary files first and renamed into
  place only when all were written, the trace last; if anything fails, every
  file that was there before is left exactly as it was. The trace records the
  SHA-256 of the figure and page written with it (``meta["figure_sha256"]``,
  ``meta["html_sha256"]``), so the outputs of a run killed between the renames
  are never taken as done: the next run writes them again.

Folders and glob patterns (``attnlab caption photos/ --out DIR``, see
:mod:`attnlab.batch`) name outputs after each image's path relative to the
folder instead: ``photos/cats/tabby.jpg`` gets ``DIR/cats/tabby.jpg.npz`` (and
with ``--figures`` ``DIR/cats/tabby.jpg.attn.png``), so names are unique because
the paths are, whatever else the folder holds, and the same in every run and
every shard (:func:`mirror_names`, :func:`plan_mirrored`). Such runs resume:
:func:`resume_state` tells an image whose outputs are complete and were written
for the same input with the same settings (``meta["run"]``) from one that must
be (re)done and from one whose outputs may not be touched.

The rules as users read them: "Where files go" on the documentation site (``docs/files.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import AttnlabError
from .fileio import make_temp
from .trace import CaptionTrace, read_header, write_npz
from .util import file_sha256

TRACE_SUFFIX = ".npz"
FIGURE_SUFFIX = ".attn.png"
HTML_SUFFIX = ".html"
PNG_TAG = "attnlab"  # the PNG text chunk that names a figure's input
PAGE_MARK = b'<meta name="attnlab-source" content="'  # the same for a web page, in its <head>
_PAGE_ANCHOR = b'<meta name="generator" content="attnlab">\n'


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
    """The two files planned for one input."""

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


def _stem_of(name: str) -> str:
    stem = Path(name).stem.lstrip(".").replace("\x00", "")
    return stem or "image"


def unique_stems(names: Sequence[str]) -> list[str]:
    """One output stem per input name, unique even when compared case-insensitively.

    The first input of a clashing group keeps its stem, the others get ``-2``,
    ``-3`` ... skipping every stem that some input has or that was given out before.
    """
    bases = [_stem_of(n) for n in names]
    reserved = {b.casefold() for b in bases}
    clashes = Counter(b.casefold() for b in bases)
    taken: set[str] = set()
    stems = []
    for base in bases:
        stem = base
        if clashes[base.casefold()] > 1 and base.casefold() in taken:
            n = 2
            while f"{base}-{n}".casefold() in reserved | taken:
                n += 1
            stem = f"{base}-{n}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def plan_outputs(sources: Sequence[Source], out_dir: str | os.PathLike) -> list[Planned]:
    """Name the trace and figure of every input (see the module docstring for the rules)."""
    out = Path(out_dir)
    return [
        Planned(s, stem, out / f"{stem}{TRACE_SUFFIX}", out / f"{stem}{FIGURE_SUFFIX}")
        for s, stem in zip(sources, unique_stems([s.name for s in sources]))
    ]


def mirror_names(names: Sequence[str]) -> list[str]:
    """Relative image paths (``"cats/tabby.jpg"``) as output names: the path itself,
    unique even when compared case-insensitively.

    Names that differ only in case (possible on Linux, not on every disk the
    outputs may go to) keep the first as it is; the others get ``~2``, ``~3`` ...
    appended, which no image name ends with.
    """
    taken: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 2
        while unique.casefold() in taken:
            unique, n = f"{name}~{n}", n + 1
        taken.add(unique.casefold())
        out.append(unique)
    return out


def plan_mirrored(sources: Sequence[Source], out_dir: str | os.PathLike) -> list[Planned]:
    """Name each input's trace and figure after its relative path (``source.name``, unique:
    see :func:`mirror_names`): ``<name>.npz`` and ``<name>.attn.png`` under ``out_dir``."""
    out = Path(out_dir)
    return [Planned(s, s.name, out / f"{s.name}{TRACE_SUFFIX}", out / f"{s.name}{FIGURE_SUFFIX}") for s in sources]


class _Inputs:
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


def _recorded_source(path: Path, is_figure: bool) -> tuple[str, str] | None:
    """The (source, sha256) an attnlab output records, or None when it is not one."""
    try:
        if is_figure:
            from PIL import Image

            with Image.open(path) as im:
                tag = json.loads(im.info[PNG_TAG]) if im.format == "PNG" and PNG_TAG in im.info else None
        else:
            tag = read_header(path).get("meta", {})
    except Exception:  # unreadable, not ours: all the same here
        return None
    if not isinstance(tag, dict) or not isinstance(tag.get("source"), str) or not isinstance(tag.get("source_sha256"), str):
        return None
    return tag["source"], tag["source_sha256"]


def _page_mark(page: Path) -> tuple[str, str] | None:
    """The (source, sha256) a web page of attnlab's records in its ``<head>``, or None."""
    import html

    try:
        with page.open("rb") as fh:
            head = fh.read(1 << 16)
        start = head.index(PAGE_MARK) + len(PAGE_MARK)
        tag = json.loads(html.unescape(head[start : head.index(b'"', start)].decode("ascii")))
    except (OSError, ValueError):  # no mark (ValueError: not found, not ASCII, not JSON)
        return None
    if not isinstance(tag, dict) or not isinstance(tag.get("source"), str) or not isinstance(tag.get("source_sha256"), str):
        return None
    return tag["source"], tag["source_sha256"]


def _mark_page(path: Path, tag: dict[str, str]) -> None:
    """Put ``tag`` (JSON, ASCII, HTML-escaped) into the ``<head>`` of a page :func:`attnlab.export_html` wrote."""
    import html

    data = path.read_bytes()
    if _PAGE_ANCHOR not in data[: 1 << 12]:
        raise OSError(errno.EINVAL, "the page is not one of attnlab's", str(path))
    mark = PAGE_MARK + html.escape(json.dumps(tag), quote=True).encode("ascii") + b'">\n'
    with path.open("wb") as fh:
        fh.write(data.replace(_PAGE_ANCHOR, _PAGE_ANCHOR + mark, 1))


def _recorded_page(page: Path, trace: Path) -> tuple[str, str] | None:
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
    if not isinstance(meta.get("source"), str) or not isinstance(meta.get("source_sha256"), str):
        return None
    return meta["source"], meta["source_sha256"]


def _conflict(path: Path, plan: Planned, inputs: _Inputs, overwrite: bool) -> str | None:
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
        recorded = _recorded_page(path, plan.trace)
    else:
        recorded = _recorded_source(path, path.name.endswith(FIGURE_SUFFIX))
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
    inputs = _Inputs([p.source.path for p in plans if p.source.path is not None])
    problems = []
    for plan in plans:
        if plan.source.sha256 is None:
            continue  # the image cannot be read: it fails later and nothing is written for it
        problems += [m for f in plan.written(figure, html) if (m := _conflict(f, plan, inputs, overwrite))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AttnlabError(problems[0] + more)


def resume_state(plan: Planned, run: dict, *, figure: bool, html: bool = False, overwrite: bool = False) -> tuple[str, str | dict]:
    """What a resumed run does with ``plan``'s input: ``("done", header)``, ``("todo", "")``
    or ``("refused", reason)``.

    Done: the trace (and with ``figure`` the figure) exists, attnlab wrote it for
    this very input (same path, same SHA-256; with ``html`` the page too) and with the same settings
    (``meta["run"] == run``: model, weights, max_len, beams, ...); ``header`` is
    the trace's JSON header (caption, words, meta). An output of attnlab's for
    the same input with other settings, or a missing file, is "todo" (it will
    be replaced). A file that may not be written over is "refused" (see
    :func:`check_plan`). Atomic writes mean a trace at its final name is
    complete; one that cannot be opened is not attnlab's (refused, not redone).
    """
    if plan.source.sha256 is None:
        return "todo", ""  # unreadable: reading the image says why
    inputs = _Inputs([plan.source.path] if plan.source.path is not None else [])
    for f in plan.written(figure, html):
        reason = _conflict(f, plan, inputs, overwrite)
        if reason:
            return "refused", reason
    try:
        header = read_header(plan.trace)
    except Exception:  # missing, or foreign and --overwrite: redo
        return "todo", ""
    meta = header.get("meta", {})
    ours = meta.get("source") == plan.source.label and meta.get("source_sha256") == plan.source.sha256
    if not ours or meta.get("run") != run:
        return "todo", ""
    mine = (plan.source.label, plan.source.sha256)
    # the figure and page must be the very ones written with this trace (a run killed between the
    # renames leaves newer ones beside an older trace, or none): their SHA-256 is in the trace
    if figure and (_recorded_source(plan.figure, True) != mine or meta.get("figure_sha256") != file_sha256(plan.figure)):
        return "todo", ""
    if html and (_recorded_page(plan.html, plan.trace) != mine or meta.get("html_sha256") != file_sha256(plan.html)):
        return "todo", ""
    return "done", header


def _keep_copy(path: Path) -> Path:
    """A second name for ``path``'s current content (a hard link, else a copy) beside it."""
    fd, keep = make_temp(path)
    os.close(fd)
    try:
        keep.unlink()
        os.link(path, keep)
    except OSError:
        import shutil

        shutil.copy2(path, keep)
    return keep


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each temporary file onto its target; if a rename fails, put back what was there.

    The old files stay in place until they are replaced (each rename is atomic), and
    a second name kept for each of them restores it when a later rename fails.
    """
    done: list[tuple[Path, Path | None]] = []
    try:
        for tmp, final in pairs:
            keep = _keep_copy(final) if final.is_file() else None
            try:
                os.replace(tmp, final)
            except BaseException:
                if keep is not None:
                    keep.unlink(missing_ok=True)
                raise
            done.append((final, keep))
    except BaseException:
        for final, keep in reversed(done):
            if keep is not None:
                os.replace(keep, final)
            else:
                final.unlink(missing_ok=True)
        raise
    finally:
        for _, keep in done:
            if keep is not None:
                keep.unlink(missing_ok=True)


def _temp_named(path: Path, suffix: str) -> Path:
    """A new empty temporary file beside ``path`` whose name ends in ``suffix`` (the writers check suffixes)."""
    fd, tmp = make_temp(path)
    os.close(fd)
    return tmp.rename(tmp.with_name(tmp.name + suffix))


def write_outputs(
    trace: CaptionTrace,
    plan: Planned,
    *,
    overwrite: bool = False,
    figure: bool = True,
    html: bool = False,
    meta: dict | None = None,
) -> list[Path]:
    """Write the trace of ``plan``'s input, with its word grid (``figure``) and web page
    (``html``, :func:`attnlab.export_html`): all of them or none.

    The trace records ``plan.source`` (``meta["source"]``, ``meta["source_sha256"]``)
    and so does the figure (PNG text chunk); the trace also records the page's
    SHA-256, so a later run recognises all three as its own. Raises
    :class:`AttnlabError` (one line) when a file in the way may not be replaced
    (see :func:`check_plan`) or a write fails; then nothing changed. An earlier
    figure or page of attnlab's for this input that is not written again is
    removed (it would no longer match the new trace). ``meta`` is added to the
    trace's ``meta`` (the batch runner records its settings as ``"run"``).
    """
    check_plan([plan], overwrite=overwrite, figure=figure, html=html)  # again: files may have appeared since the run began
    bad = trace.nonfinite()
    if bad:
        raise AttnlabError(f"nothing written for {plan.source.label}: the model's {', '.join(bad)} hold NaN or infinite values (its weights may be broken)")
    out_dir = plan.trace.parent
    tag = {"source": plan.source.label, "source_sha256": plan.source.sha256 or ""}
    mine = (tag["source"], tag["source_sha256"])
    stale = [f for f, kept, recorded in (
        (plan.figure, figure, lambda: _recorded_source(plan.figure, True)),
        (plan.html, html, lambda: _recorded_page(plan.html, plan.trace)),
    ) if not kept and recorded() == mine]  # fmt: skip
    temps: list[Path] = []
    pairs: list[tuple[Path, Path]] = []  # renamed in this order: the trace last, so that a run killed
    # between the renames leaves no trace that records a figure or page other than the one beside it
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        extra = dict(meta or {})
        if html:
            from .plot import export_html  # (not "from . import plot": see attnlab.__getattr__)

            tmp_html = _temp_named(plan.html, HTML_SUFFIX)
            temps.append(tmp_html)
            export_html(trace, tmp_html, overwrite=True)
            _mark_page(tmp_html, tag)  # the page tells it is attnlab's for this input on its own
            extra["html_sha256"] = file_sha256(tmp_html)
            pairs.append((tmp_html, plan.html))
        trace = replace(trace, meta={**trace.meta, **extra, **tag})
        if figure:
            # "from . import plot" would go through attnlab.__getattr__("plot"), which does the same
            # import again and recurses until RecursionError while attnlab.plot is not yet imported
            from .plot import word_grid

            fig = word_grid(trace, pyplot=False)  # a Figure pyplot never sees: the user's backend stays as it is
            tmp_png = _temp_named(plan.figure, ".png")
            temps.append(tmp_png)
            fig.savefig(tmp_png, format="png", metadata={PNG_TAG: json.dumps(tag)})  # a tEXt chunk "attnlab"
            pairs.append((tmp_png, plan.figure))
            trace = replace(trace, meta={**trace.meta, "figure_sha256": file_sha256(tmp_png)})
        fd, tmp_npz = make_temp(plan.trace)
        temps.append(tmp_npz)
        with os.fdopen(fd, "wb") as fh:
            write_npz(trace, fh)
        pairs.append((tmp_npz, plan.trace))
        _commit(pairs)
    except OSError as exc:  # disk full, read-only folder, ...: one line, not a traceback
        reason = exc.strerror or type(exc).__name__
        names = " and ".join(f.name for f in plan.written(figure, html))
        raise AttnlabError(f"cannot write {names} in {out_dir} ({reason}); files that were there are unchanged") from None
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    for f in stale:  # attnlab's figure or page of this input's earlier trace: it would not match the new one
        try:
            f.unlink()
        except OSError:
            pass
    return list(plan.written(figure, html))
