"""Writing the outputs of one input, all of them or none: the trace, its figure and its web page.

Each file is written to a temporary file beside its target first; the temporary files are
renamed into place only when all were written, the trace last, and a second name kept for
each older file puts it back if a later rename fails. The trace records the SHA-256 of the
figure and page written with it, so the outputs of a run killed between the renames are
never taken as done (:func:`~attnlab.outputs.resume_state`): the next run writes them again.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from ..errors import AttnlabError
from ..fileio import make_temp
from ..trace import CaptionTrace
from ..trace_io import write_npz
from ..util import file_sha256
from .naming import HTML_SUFFIX, Planned
from .ownership import PNG_TAG, check_plan, mark_page, recorded_page, recorded_source


def _keep_copy(path: Path) -> Path:
    """A second name for ``path``'s current content (a hard link, else a copy) beside it."""
    fd, keep = make_temp(path)
    os.close(fd)
    try:
        keep.unlink()
        os.link(path, keep)
    except OSError:
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


def _temp_named(path: Path, suffix: str, temps: list[Path]) -> Path:
    """A new empty temporary file beside ``path`` whose name ends in ``suffix`` (the writers
    check suffixes), added to ``temps`` (removed at the end, whatever happens)."""
    fd, tmp = make_temp(path)
    os.close(fd)
    temps.append(tmp)
    named = tmp.rename(tmp.with_name(tmp.name + suffix))
    temps[-1] = named
    return named


def _stale(plan: Planned, figure: bool, html: bool, mine: tuple[str, str]) -> list[Path]:
    """attnlab's figure or page of this input that will not be written again (it would not match the new trace)."""
    stale = []
    if not figure and recorded_source(plan.figure, True) == mine:
        stale.append(plan.figure)
    if not html and recorded_page(plan.html, plan.trace) == mine:
        stale.append(plan.html)
    return stale


def _page_to_temp(trace: CaptionTrace, plan: Planned, tag: dict[str, str], temps: list[Path]) -> Path:
    """The web page of ``trace``, marked as attnlab's for this input, in a temporary file."""
    from ..plot import export_html  # (not "from .. import plot": see attnlab.__getattr__)

    tmp = _temp_named(plan.html, HTML_SUFFIX, temps)
    export_html(trace, tmp, overwrite=True)
    mark_page(tmp, tag)  # the page tells it is attnlab's for this input on its own
    return tmp


def _figure_to_temp(trace: CaptionTrace, plan: Planned, tag: dict[str, str], temps: list[Path]) -> Path:
    """The word grid of ``trace`` with ``tag`` in a PNG text chunk, in a temporary file."""
    # "from .. import plot" would go through attnlab.__getattr__("plot"), which does the same
    # import again and recurses until RecursionError while attnlab.plot is not yet imported
    from ..plot import word_grid

    fig = word_grid(trace, pyplot=False)  # a Figure pyplot never sees: the user's backend stays as it is
    tmp = _temp_named(plan.figure, ".png", temps)
    fig.savefig(tmp, format="png", metadata={PNG_TAG: json.dumps(tag)})  # a tEXt chunk "attnlab"
    return tmp


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
    tag = {"source": plan.source.label, "source_sha256": plan.source.sha256 or ""}
    stale = _stale(plan, figure, html, (tag["source"], tag["source_sha256"]))
    temps: list[Path] = []
    pairs: list[tuple[Path, Path]] = []  # renamed in this order: the trace last, so that a run killed
    # between the renames leaves no trace that records a figure or page other than the one beside it
    try:
        plan.trace.parent.mkdir(parents=True, exist_ok=True)
        extra = dict(meta or {})
        if html:
            pairs.append((_page_to_temp(trace, plan, tag, temps), plan.html))
            extra["html_sha256"] = file_sha256(pairs[-1][0])
        trace = _with_meta(trace, {**trace.meta, **extra, **tag})
        if figure:
            pairs.append((_figure_to_temp(trace, plan, tag, temps), plan.figure))
            trace = _with_meta(trace, {**trace.meta, "figure_sha256": file_sha256(pairs[-1][0])})
        fd, tmp_npz = make_temp(plan.trace)
        temps.append(tmp_npz)
        with os.fdopen(fd, "wb") as fh:
            write_npz(trace, fh)
        pairs.append((tmp_npz, plan.trace))
        _commit(pairs)
    except OSError as exc:  # disk full, read-only folder, ...: one line, not a traceback
        reason = exc.strerror or type(exc).__name__
        names = " and ".join(f.name for f in plan.written(figure, html))
        raise AttnlabError(f"cannot write {names} in {plan.trace.parent} ({reason}); files that were there are unchanged") from None
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    for f in stale:
        try:
            f.unlink()
        except OSError:
            pass
    return list(plan.written(figure, html))


def _with_meta(trace: CaptionTrace, meta: dict) -> CaptionTrace:
    """A shallow copy of ``trace`` with ``meta`` (``dataclasses.replace`` would read ``cross_attention``,
    an error for a trace of several views)."""
    out = copy.copy(trace)
    out.meta = meta
    return out
