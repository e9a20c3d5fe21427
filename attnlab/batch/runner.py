"""The batch runner: worker processes read and prepare images, the main process decodes
batches and writes each trace as it finishes (see :mod:`attnlab.batch`)."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import outputs, runlist
from ..captioner import CaptionerSpec, as_captioner
from ..decode import decode_batch
from ..diagnostics import mark_padding
from ..errors import AttnlabError
from ..fileio import remove_stale_temps
from ..preprocess import prepare_for
from ..settings import check_count
from ..util import one_line
from .plan import RunPlan, as_half, plan_run, run_settings

# the run lists of any shard: an input subfolder with such a name would put outputs where a list goes
_RUN_LIST = re.compile(r"(captions|errors)(\.\d+-of-\d+)?\.jsonl")


# ====================================================================== worker side
@dataclass
class _Loaded:
    """What a worker hands over for one image."""

    index: int
    kind: str  # "image" (to caption), "done" (complete outputs from an earlier run) or "error"
    sha256: str | None = None
    # (3, h, w) float32 model input, as an array: a pickled array crosses from a worker process
    # several times faster than a tensor (which is sent as a shared-memory file, one per item)
    pixels: np.ndarray | None = None
    shown: np.ndarray | None = None  # (h', w', 3) uint8, the image the maps are drawn over
    header: dict[str, Any] | None = None  # "done": the trace's header (caption, words, meta)
    error: str = ""
    content: tuple[int, int] | None = None  # the image's (height, width) within ``shown`` (smaller only when padded)


class _Images(Dataset):
    """Item ``i``: image ``i`` of the plan hashed, checked against earlier outputs, and prepared."""

    def __init__(self, plan: RunPlan, spec: CaptionerSpec, run: dict[str, Any]) -> None:
        self.plans, self.spec, self.run, self.out = plan.plans, spec, run, os.path.realpath(plan.out)
        self.figures, self.html, self.overwrite = plan.figures, plan.html, plan.overwrite

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> _Loaded:
        plan = self.plans[i]
        try:
            _check_writable_name(plan, self.out)
            sha = outputs.file_sha256(plan.source.path)
            plan = replace(plan, source=replace(plan.source, sha256=sha))
            state = outputs.resume_state(plan, self.run, figure=self.figures, html=self.html, overwrite=self.overwrite)
            if state.action is outputs.Resume.DONE:
                return _Loaded(i, "done", sha, header=state.header)
            if state.action is outputs.Resume.REFUSED:
                return _Loaded(i, "error", error=state.reason)
            content: list[tuple[int, int]] = []
            pixels, shown = prepare_for([plan.source.path], self.spec, content=content)
            return _Loaded(i, "image", sha, pixels[0].numpy(), shown[0], content=content[0])
        except AttnlabError as exc:
            return _Loaded(i, "error", error=str(exc))
        except Exception as exc:  # an image no reader expected: listed with its reason, the run goes on
            return _Loaded(i, "error", error=f"{plan.source.path}: cannot be read ({one_line(exc, 200, with_type=True)})")


def _text(name: str) -> str:
    """A file name as text that can be written as UTF-8: undecodable bytes shown as ``\\xff``."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file system decoding makes
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def _check_writable_name(plan: outputs.Planned, out_real: str) -> None:
    """Refuse (one line, listed in the errors file) an image whose outputs could not be named or
    would leave ``--out``: an undecodable file name, a subfolder named like a run list, a link
    in the output folder that leads elsewhere."""
    name = plan.source.name
    if _text(name) != name:
        raise AttnlabError(f"{_text(str(plan.source.path))}: its file name is not valid UTF-8 text: rename the file")
    top = name.split("/")[0]
    if "/" in name and _RUN_LIST.fullmatch(top.casefold()):
        raise AttnlabError(
            f"{plan.source.path}: its outputs would go into the folder {top}/ of --out, where the run writes its list "
            f"{top}: rename that input subfolder"
        )
    real = os.path.realpath(plan.trace.parent)
    if os.path.commonpath([real, out_real]) != out_real:
        raise AttnlabError(f"{plan.trace.parent} leads out of --out (to {real}): remove that link, or give another --out folder")


def _as_is(item: _Loaded) -> _Loaded:
    return item


def _worker_ignores_ctrl_c(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops them in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """Worker processes for reading images: a quarter of the cores, 1 to 4 (decoding needs the rest)."""
    return max(1, min(4, (os.cpu_count() or 2) // 4))


class _Threads:
    """Within the block, torch uses at most ``cores - workers`` threads (at least 1): the worker
    processes use cores too, and a thread pool bigger than the free cores makes every small
    operation wait for a busy core (on a 2-core machine 8x slower). Put back on exit; a thread
    count set with ``OMP_NUM_THREADS`` is left alone."""

    def __init__(self, workers: int) -> None:
        self.limit = max(1, (os.cpu_count() or 1) - workers)
        self.before = torch.get_num_threads()

    def __enter__(self) -> "_Threads":
        if "OMP_NUM_THREADS" not in os.environ and self.limit < self.before:
            torch.set_num_threads(self.limit)
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


# ====================================================================== main side
class _CtrlC:
    """Within the block, a first Ctrl-C asks to stop after the batch in hand; a second raises
    KeyboardInterrupt at once. The previous handler comes back on exit (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nattnlab: stopping after the current batch (press Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


@dataclass
class RunReport:
    """The outcome of a batch run (this shard)."""

    total: int  # images in this shard
    captioned: int  # captioned and written in this run
    skipped: int  # complete from an earlier run
    failed: int  # listed in the errors file
    interrupted: bool
    seconds: float
    captions: Path
    errors: Path | None  # None when there were no errors


class _Run:
    """One batch run's bookkeeping: results by image index, the progress bar, the writes."""

    def __init__(self, plan: RunPlan, model: Any, run: dict[str, Any], batch_size: int, progress: bool | None) -> None:
        from tqdm.auto import tqdm

        if progress is None:  # a bar redraws in place only on a terminal; a saved notebook or a log keeps its first frame
            progress = bool(getattr(sys.stderr, "isatty", lambda: False)())

        self.plan, self.model, self.run, self.batch_size = plan, model, run, batch_size
        self.captions: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, dict[str, Any]] = {}
        self.reached: set[int] = set()
        self.captioned = self.skipped = 0
        self.bar = tqdm(total=len(plan.plans), unit="img", desc="captioning", disable=not progress, file=sys.stderr, smoothing=0.1)

    def _record(self, i: int, caption: str, words: list[str]) -> dict[str, Any]:
        p = self.plan.plans[i]
        record = {
            "image": _text(str(p.source.path)),
            "name": _text(p.source.name),
            "caption": caption,
            "words": words,
            "trace": _text(p.trace.relative_to(self.plan.out).as_posix()),
        }
        if self.plan.figures:
            record["figure"] = _text(p.figure.relative_to(self.plan.out).as_posix())
        if self.plan.html:
            record["html"] = _text(p.html.relative_to(self.plan.out).as_posix())
        return record

    def _fail(self, i: int, reason: str) -> None:
        p = self.plan.plans[i]
        self.errors[i] = {"image": _text(str(p.source.path)), "name": _text(p.source.name), "error": _text(reason)}

    def _tick(self) -> None:
        self.bar.set_postfix(new=self.captioned, earlier=self.skipped, errors=len(self.errors), refresh=False)
        self.bar.update(1)

    def take(self, loaded: _Loaded) -> bool:
        """Book a loaded item; True when it is an image to caption."""
        self.reached.add(loaded.index)
        if loaded.kind == "image":
            return True
        if loaded.kind == "done":
            header = loaded.header or {}
            self.captions[loaded.index] = self._record(loaded.index, header.get("caption", ""), header.get("words", []))
            self.skipped += 1
        else:
            self._fail(loaded.index, loaded.error)
        self._tick()
        return False

    def decode(self, batch: list[_Loaded]) -> None:
        """Caption a batch and write each trace (and figure) as soon as the batch is decoded."""
        run = self.run
        try:
            traces = decode_batch(
                self.model, [torch.from_numpy(b.pixels) for b in batch], [b.shown for b in batch],
                max_len=run["max_len"], mode=run["mode"], beams=run["beams"], length_penalty=run["length_penalty"],
            )  # fmt: skip
            mark_padding(traces, [b.content for b in batch], as_captioner(self.model).spec)
        except torch.cuda.OutOfMemoryError:
            raise AttnlabError(
                f"out of GPU memory at batch size {self.batch_size}: run the same command with a smaller batch size (--batch-size) "
                "(finished images are kept and skipped)"
            ) from None
        for loaded, trace in zip(batch, traces):
            i = loaded.index
            p = self.plan.plans[i]
            p = replace(p, source=replace(p.source, sha256=loaded.sha256))
            if run["half"]:
                trace = as_half(trace)
            try:
                outputs.write_outputs(
                    trace, p, overwrite=self.plan.overwrite, figure=self.plan.figures, html=self.plan.html, meta={"run": run}
                )
            except AttnlabError as exc:
                self._fail(i, str(exc))
            else:
                self.captions[i] = self._record(i, trace.caption, trace.words)
                self.captioned += 1
            self._tick()

    def finish(self) -> None:
        """Write the captions and errors files: this run's results, and for images this run
        did not reach (it was interrupted) what the earlier files said."""
        self.bar.close()
        old_captions = runlist.own_records(self.plan.captions, "captions")
        old_errors = runlist.own_records(self.plan.errors, "errors")
        captions, errors = [], []
        for i, p in enumerate(self.plan.plans):
            if i in self.captions:
                captions.append(self.captions[i])
            elif i in self.errors:
                errors.append(self.errors[i])
            elif i not in self.reached:
                name = _text(p.source.name)
                if name in old_captions:
                    captions.append(old_captions[name])
                elif name in old_errors:
                    errors.append(old_errors[name])
        overwrite = self.plan.overwrite
        try:  # checked again: a file may have appeared in the way since plan_run
            runlist.check_replaceable(self.plan.captions, "captions", overwrite)
            if errors:
                runlist.check_replaceable(self.plan.errors, "errors", overwrite)
            runlist.write_run_list(self.plan.captions, "captions", captions)
            if errors:
                runlist.write_run_list(self.plan.errors, "errors", errors)
            elif self.plan.errors.is_file() and (overwrite or runlist.is_own(self.plan.errors, "errors")):
                self.plan.errors.unlink()  # attnlab's own list from an earlier run: all fixed now
        except OSError as exc:  # a full disk, a folder made read-only: one line, the traces stay
            raise AttnlabError(
                f"cannot write the run lists in {self.plan.out} ({exc.strerror or type(exc).__name__}); the traces written are "
                "kept: make room or make the folder writable, then run the same command again (finished images are skipped)"
            ) from None


def _loader(images: _Images, workers: int, batch_size: int) -> DataLoader:
    """The images one by one, read and prepared by ``workers`` processes (0: in this one)."""
    return DataLoader(
        images,
        batch_size=None,  # items one by one: the batches are made by the runner, of images that need captioning
        num_workers=workers,
        collate_fn=_as_is,
        worker_init_fn=_worker_ignores_ctrl_c if workers else None,
        prefetch_factor=2 * batch_size if workers else None,
    )


def run_plan(
    model: Any,
    plan: RunPlan,
    *,
    batch_size: int = 8,
    workers: int | None = None,
    max_len: int | None = None,
    beams: int = 1,
    length_penalty: float = 1.0,
    half: bool = False,
    mode: str = "incremental",
    progress: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RunReport:
    """Caption the images of ``plan`` with ``model`` (see the module docstring).

    ``progress``: a progress bar on stderr; ``None`` (default) shows it only when stderr is a
    terminal (not in a notebook, whose saved output would keep a frozen first frame),
    ``True`` always (a widget in Jupyter), ``False`` never.
    ``on_batch(n)`` is called after the ``n``-th batch has been written (e.g. to
    stop a test run after ``k`` batches: raise ``KeyboardInterrupt`` there).
    """
    batch_size = check_count("batch_size", batch_size, 1)
    workers = check_count("workers", default_workers() if workers is None else workers, 0, " (0: read images in the main process)")
    run = run_settings(model, max_len=max_len, beams=beams, length_penalty=length_penalty, half=half, mode=mode)
    spec = as_captioner(model).spec
    out_real = os.path.realpath(plan.out)
    for folder in sorted({p.trace.parent for p in plan.plans}):
        if os.path.commonpath([os.path.realpath(folder), out_real]) == out_real:  # never through a link out of --out
            remove_stale_temps(folder)  # left by killed runs (never a live one of a parallel run)
    state = _Run(plan, model, run, batch_size, progress)
    loader = _loader(_Images(plan, spec, run), workers, batch_size)
    start = time.perf_counter()
    batches = 0
    interrupted = False
    pending: list[_Loaded] = []
    items = iter(loader)
    try:
        with _CtrlC() as ctrl_c, _Threads(workers):
            for loaded in items:
                if state.take(loaded):
                    pending.append(loaded)
                if len(pending) == batch_size:
                    state.decode(pending)
                    pending = []
                    batches += 1
                    if on_batch is not None:
                        on_batch(batches)
                if ctrl_c.requested:
                    interrupted = True
                    break
            if pending and not interrupted:
                state.decode(pending)
                pending = []
                batches += 1
                if on_batch is not None:
                    on_batch(batches)
    except KeyboardInterrupt:
        interrupted = True  # the batch in hand is dropped: nothing of it was written
    finally:
        del items  # stops the worker processes
        state.reached -= {b.index for b in pending}  # prepared but not captioned: not done
        state.finish()
    return RunReport(
        total=len(plan.plans),
        captioned=state.captioned,
        skipped=state.skipped,
        failed=len(state.errors),
        interrupted=interrupted,
        seconds=time.perf_counter() - start,
        captions=plan.captions,
        errors=plan.errors if state.errors else None,
    )


def caption_folder(
    model: Any,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    shard: tuple[int, int] = (1, 1),
    figures: bool = False,
    html: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> RunReport:
    """Caption every image of folders and glob patterns into ``out``: one trace per image
    (with ``figures`` its word grid, with ``html`` its web page), ``captions.jsonl``,
    ``errors.jsonl``; reruns skip what is done (see the module docstring).

    ``options``: ``batch_size`` (8), ``workers`` (:func:`default_workers`),
    ``max_len``, ``beams``, ``length_penalty``, ``half``, ``mode``, ``progress``, ``on_batch``
    (see :func:`run_plan`).
    """
    names = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    plan = plan_run(names, out, shard=shard, figures=figures, overwrite=overwrite, html=html)
    return run_plan(model, plan, **options)
