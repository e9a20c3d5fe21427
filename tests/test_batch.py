"""Many images (``attnlab caption DIR --out OUT``, :mod:`attnlab.batch`): every image's trace
equals captioning it alone; names mirror the paths, whatever the shard; interrupted runs
resume without redoing or losing images; files attnlab did not write are never touched.

The bundled shapes model captions a folder of shapes scenes in subfolders, with an image
of another size, a JPEG drawing, a file that is not an image, and files that are ignored.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnlab
from attnlab import AttnlabError
from attnlab.batch import as_half, caption_folder, find_images, parse_shard, plan_run, shard_items, sidecar_names
from attnlab.cli import main
from attnlab.outputs import mirror_names

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

GOOD = 16  # images that caption
BROKEN = "part-a/broken.png"


@pytest.fixture(scope="module")
def model():
    return attnlab.load_model()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from attnlab.shapes import make_scenes

    root = tmp_path_factory.mktemp("batch") / "photos"
    for i, scene in enumerate(make_scenes(14, seed=21, split="eval")):
        sub = root / ("part-a" if i < 5 else "part-b/deeper" if i < 10 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(sub / f"scene-{i:02d}.png")
    Image.open(root / "scene-10.png").resize((128, 96)).save(root / "part-b" / "wide.png")  # another grid
    shutil.copy(attnlab.sample_path("drawing-tabletop.jpg"), root / "drawing.jpg")
    (root / BROKEN).write_text("not an image\n")
    (root / "notes.txt").write_text("ignored: not an image name\n")
    shutil.copy(root / "scene-10.png", root / ".hidden.png")  # hidden: ignored
    return root


@pytest.fixture(scope="module")
def alone(model, folder) -> dict[str, attnlab.CaptionTrace]:
    """Each good image captioned on its own, by name."""
    return {item.name: attnlab.caption(model, item.path) for item in find_images([folder]) if item.name != BROKEN}


def no_temps(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def state_of(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every trace below ``root``: (mtime_ns, inode, SHA-256) by relative path."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*.npz")
    }


def lines(path: Path) -> list[dict]:
    """The image records of a run list (its first line is attnlab's header record)."""
    header, *records = [json.loads(line) for line in path.read_text().splitlines()]
    assert header["attnlab_run_list"] in ("captions", "errors") and header["records"] == len(records)
    return records


def assert_equals_alone(out: Path, alone: dict[str, attnlab.CaptionTrace], names=None) -> None:
    for name in names or alone:
        trace = attnlab.CaptionTrace.load(out / f"{name}.npz")
        single = alone[name]
        np.testing.assert_array_equal(trace.token_ids, single.token_ids)
        assert trace.grid == single.grid and trace.words == single.words
        np.testing.assert_array_equal(trace.image, single.image)
        np.testing.assert_allclose(trace.cross_attention, single.cross_attention, atol=1e-5, rtol=0)
        np.testing.assert_allclose(trace.logits, single.logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- results and names
class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_bar_only_on_a_terminal_by_default(model, folder, tmp_path, monkeypatch, capsys):
    report = caption_folder(model, folder / "part-b" / "deeper", tmp_path / "piped", workers=0)  # stderr captured: not a terminal
    assert report.captioned == 5 and capsys.readouterr().err == ""  # no frozen "0/5" left in a notebook or a log
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caption_folder(model, folder / "part-b" / "deeper", tmp_path / "terminal", workers=0)
    assert "captioning" in terminal.text and "5/5" in terminal.text
    monkeypatch.undo()
    assert caption_folder(model, folder / "part-b" / "deeper", tmp_path / "forced", workers=0, progress=True).captioned == 5
    assert "5/5" in capsys.readouterr().err  # progress=True: shown wherever it goes


def test_folder_run_equals_each_image_alone(model, folder, alone, tmp_path):
    out = tmp_path / "out"
    report = caption_folder(model, folder, out, batch_size=4, workers=1, progress=False)
    assert (report.total, report.captioned, report.skipped, report.failed, report.interrupted) == (GOOD + 1, GOOD, 0, 1, False)
    assert len({t.grid for t in alone.values()}) == 3  # mixed sizes in the batches: 8 x 8, 6 x 8 and the drawing's
    assert_equals_alone(out, alone)
    trace = attnlab.CaptionTrace.load(out / "part-a/scene-00.png.npz")
    assert trace.meta["source"] == str((folder / "part-a/scene-00.png").resolve())
    assert trace.meta["source_sha256"] == hashlib.sha256((folder / "part-a/scene-00.png").read_bytes()).hexdigest()
    assert trace.meta["run"]["model"] == "shapes" and trace.meta["run"]["beams"] == 1
    captions = lines(out / "captions.jsonl")
    assert [c["name"] for c in captions] == [n for n in (i.name for i in find_images([folder])) if n != BROKEN]
    for c in captions:
        assert c["caption"] == alone[c["name"]].caption and c["words"] == alone[c["name"]].words
        assert (out / c["trace"]).is_file() and "figure" not in c
    (error,) = lines(out / "errors.jsonl")
    assert error["name"] == BROKEN and "not an image" in error["error"]
    assert not list(out.rglob("*.attn.png"))  # figures only with figures=True
    assert no_temps(out)


def test_names_mirror_relative_paths(folder):
    names = [item.name for item in find_images([folder])]
    assert names == sorted(names)
    assert set(names) == {
        *(f"part-a/scene-{i:02d}.png" for i in range(5)), BROKEN,
        *(f"part-b/deeper/scene-{i:02d}.png" for i in range(5, 10)), "part-b/wide.png",
        *(f"scene-{i:02d}.png" for i in range(10, 14)), "drawing.jpg",
    }  # fmt: skip
    # a glob pattern: names relative to its fixed folders; several inputs: each folder's name in front
    assert [i.name for i in find_images([f"{folder}/part-b/**/*.png"])] == ["deeper/" + f"scene-{i:02d}.png" for i in range(5, 10)] + ["wide.png"]
    two = [i.name for i in find_images([folder / "part-a", folder / "part-b"])]
    assert two[0] == "part-a/broken.png" and "part-b/deeper/scene-05.png" in two and len(two) == 12
    assert mirror_names(["x.png", "X.png", "X.png~2", "y.png"]) == ["x.png", "X.png~2", "X.png~2~2", "y.png"]
    with pytest.raises(AttnlabError, match="matches no image"):
        find_images([f"{folder}/*.gif"])


def test_one_naming_scheme_for_single_files_and_folder_runs():
    from attnlab.outputs import unique_names, unique_stems

    def by_hand(names, mark, reserved):  # the rule of docs/files.md, written out independently
        out, taken = [], set()
        for name in names:
            candidates = [name] + [f"{name}{mark}{n}" for n in range(2, 50)]
            pick = next(c for c in candidates if c.casefold() not in taken and (c == name or c.casefold() not in reserved))
            taken.add(pick.casefold())
            out.append(pick)
        return out

    names = ["x", "X", "x-2", "y", "x", "X-2", "x-3"]
    stems = unique_stems([f"{n}.png" for n in names])
    assert stems == by_hand(names, "-", {n.casefold() for n in names}) == ["x", "X-4", "x-2", "y", "x-5", "X-2-2", "x-3"]
    paths = ["a/x.png", "A/X.png", "a/x.png~2", "b/y.png", "a/X.PNG"]
    assert mirror_names(paths) == by_hand(paths, "~", set()) == ["a/x.png", "A/X.png~2", "a/x.png~2~2", "b/y.png", "a/X.PNG~3"]
    assert unique_names(["a", "A", "a"], lambda name, n: f"{name}({n})") == ["a", "A(2)", "a(3)"]


def test_resume_state_is_an_object(model, folder, tmp_path):
    from attnlab.batch import run_settings
    from attnlab.outputs import Resume, file_sha256, resume_state

    out = tmp_path / "o"
    plan = plan_run([folder / "part-a"], out)
    first = replace(plan.plans[1], source=replace(plan.plans[1].source, sha256=file_sha256(plan.plans[1].source.path)))
    run = run_settings(model)
    todo = resume_state(first, run, figure=False)
    assert todo.action is Resume.TODO and todo.header is None and todo.reason == ""
    caption_folder(model, folder / "part-a", out, workers=0, progress=False)
    done = resume_state(first, run, figure=False)
    assert done.action is Resume.DONE and done.header["caption"] == attnlab.CaptionTrace.load(first.trace).caption
    assert resume_state(first, {**run, "beams": 2}, figure=False).action is Resume.TODO  # other settings: redo
    first.figure.write_bytes(b"my own picture")
    refused = resume_state(first, run, figure=True)
    assert refused.action is Resume.REFUSED and "attnlab did not write it" in refused.reason and refused.header is None


def test_library_errors_name_library_arguments(model, folder, tmp_path):
    with pytest.raises(AttnlabError, match=r"^workers must be a whole number >= 0"):
        caption_folder(model, folder, tmp_path / "o", workers=-1, progress=False)


def test_shards_are_disjoint_and_name_like_the_whole_run(folder, tmp_path):
    whole = plan_run([folder], tmp_path / "o")
    names = [p.source.name for p in whole.plans]
    slices = [[p.source.name for p in plan_run([folder], tmp_path / "o", shard=(k, 3)).plans] for k in (1, 2, 3)]
    assert sorted(sum(slices, [])) == sorted(names) and sum(map(len, slices)) == len(names)
    assert slices == [shard_items(names, (k, 3)) for k in (1, 2, 3)]
    traces = {p.source.name: p.trace for p in whole.plans}
    for k in (1, 2, 3):
        for p in plan_run([folder], tmp_path / "o", shard=(k, 3)).plans:
            assert p.trace == traces[p.source.name]  # the same file name whatever the shard
    assert sidecar_names((3, 8)) == ("captions.3-of-8.jsonl", "errors.3-of-8.jsonl")
    assert sidecar_names((1, 1)) == ("captions.jsonl", "errors.jsonl")
    for bad in ("0/3", "4/3", "3", "a/b", "-1/2"):
        with pytest.raises(AttnlabError, match="K from 1 to N"):
            parse_shard(bad)


def test_shards_write_one_folder_and_stats_read_it_merged(model, folder, tmp_path):
    from attnlab import stats

    out = tmp_path / "merged"
    reports = [caption_folder(model, folder, out, shard=(k, 3), batch_size=4, workers=0, progress=False) for k in (1, 2, 3)]
    assert sum(r.captioned for r in reports) == GOOD and sum(r.failed for r in reports) == 1
    captions = [c for k in (1, 2, 3) for c in lines(out / f"captions.{k}-of-3.jsonl")]
    assert sorted(c["name"] for c in captions) == sorted(n for n in (i.name for i in find_images([folder])) if n != BROKEN)
    assert sum(len(lines(p)) for p in out.glob("errors.*-of-3.jsonl")) == 1
    assert not (out / "captions.jsonl").exists()
    merged = stats.aggregate(out)
    assert merged.traces == GOOD and merged.steps == sum(t.steps for t in attnlab.caption(model, [folder / c["name"] for c in captions]))


# ---------------------------------------------------------------------- interrupted and resumed
def test_interrupted_run_resumes_without_redoing_or_losing_images(model, folder, alone, tmp_path):
    out = tmp_path / "out"

    def stop_after_two(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt  # as if Ctrl-C came twice during the third batch's wait

    first = caption_folder(model, folder, out, batch_size=3, workers=1, progress=False, on_batch=stop_after_two)
    assert first.interrupted and first.captioned == 6
    assert no_temps(out) and not multiprocessing.active_children()  # no partial files, workers gone
    done = state_of(out)
    assert len(done) == 6
    assert sorted(c["name"] + ".npz" for c in lines(out / "captions.jsonl")) == sorted(done)

    second = caption_folder(model, folder, out, batch_size=3, workers=1, progress=False)
    assert not second.interrupted
    assert (second.skipped, second.captioned, second.failed) == (6, GOOD - 6, 1)
    after = state_of(out)
    assert {k: after[k] for k in done} == done  # not redone: same bytes, same file, same time
    assert len(after) == GOOD
    assert_equals_alone(out, alone)  # nothing lost, nothing wrong
    assert len(lines(out / "captions.jsonl")) == GOOD

    third = caption_folder(model, folder, out, batch_size=3, workers=0, progress=False)
    assert (third.skipped, third.captioned) == (GOOD, 0) and state_of(out) == after


def test_ctrl_c_finishes_the_batch_then_stops(model, folder, tmp_path, capsys):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c(n: int) -> None:
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process

    report = caption_folder(model, folder, out, batch_size=4, workers=1, progress=False, on_batch=ctrl_c)
    assert report.interrupted and report.captioned == 4
    assert "stopping after the current batch" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert len(state_of(out)) == 4 and no_temps(out) and not multiprocessing.active_children()
    rest = caption_folder(model, folder, out, batch_size=4, workers=0, progress=False)
    assert (rest.skipped, rest.captioned) == (4, GOOD - 4)


def test_other_settings_redo_and_an_edited_image_is_refused(model, folder, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    out = tmp_path / "out"
    short = caption_folder(model, photos, out, max_len=3, workers=0, progress=False)
    assert short.captioned == GOOD and attnlab.CaptionTrace.load(out / "drawing.jpg.npz").steps == 3
    full = caption_folder(model, photos, out, workers=0, progress=False)  # other settings: all done again
    assert (full.captioned, full.skipped) == (GOOD, 0)
    with_figures = caption_folder(model, photos, out, workers=0, figures=True, progress=False)
    assert with_figures.captioned == GOOD and len(list(out.rglob("*.attn.png"))) == GOOD

    edited = photos / "scene-11.png"
    pixels = np.array(Image.open(edited))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(edited)
    kept = (out / "scene-11.png.npz").read_bytes()
    again = caption_folder(model, photos, out, workers=0, figures=True, progress=False)
    assert (again.skipped, again.captioned, again.failed) == (GOOD - 1, 0, 2)
    reasons = {e["name"]: e["error"] for e in lines(out / "errors.jsonl")}
    assert "SHA-256 differs" in reasons["scene-11.png"] and "--overwrite" in reasons["scene-11.png"]
    assert (out / "scene-11.png.npz").read_bytes() == kept
    forced = caption_folder(model, photos, out, workers=0, figures=True, overwrite=True, progress=False)
    assert (forced.captioned, forced.failed) == (1, 1)


def test_files_attnlab_did_not_write_are_never_replaced(model, folder, tmp_path):
    out = tmp_path / "out"
    (out / "part-a").mkdir(parents=True)
    mine = out / "part-a" / "scene-01.png.npz"
    mine.write_bytes(b"my own numbers")
    report = caption_folder(model, folder, out, workers=0, progress=False)
    assert (report.captioned, report.failed) == (GOOD - 1, 2)
    assert mine.read_bytes() == b"my own numbers"
    reasons = {e["name"]: e["error"] for e in lines(out / "errors.jsonl")}
    assert "attnlab did not write it" in reasons["part-a/scene-01.png"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "captions.jsonl").write_text("my notes\n")
    with pytest.raises(AttnlabError, match="attnlab did not write it"):
        plan_run([folder], other)
    assert sorted(os.listdir(other)) == ["captions.jsonl"]


def test_out_inside_the_folder_never_takes_figures_as_inputs(model, folder, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    first = caption_folder(model, photos, photos / "attn", workers=0, figures=True, progress=False)
    second = caption_folder(model, photos, photos / "attn", workers=0, figures=True, progress=False)
    assert first.total == second.total == GOOD + 1 and (second.skipped, second.captioned) == (GOOD, 0)


# ---------------------------------------------------------------------- the command line
def test_cli_folder_with_figures_and_half(model, folder, alone, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["caption", str(folder), "--out", str(out), "--batch-size", "5", "--workers", "0", "--figures", "--half"]
    rc = main(argv)
    std = capsys.readouterr()
    assert rc == 1  # one image could not be read; the others are written
    assert f"captioned {GOOD} images" in std.out and "1 errors" in std.out
    last = std.err.strip().splitlines()[-1]
    assert last.startswith("attnlab: error: 1 images could not be captioned") and "errors.jsonl" in last
    assert "Traceback" not in std.err
    for name, single in alone.items():
        trace = attnlab.CaptionTrace.load(out / f"{name}.npz")
        assert trace.cross_attention.dtype == np.float16 and trace.logits.dtype == np.float32
        np.testing.assert_array_equal(trace.token_ids, single.token_ids)
        np.testing.assert_allclose(trace.cross_attention.astype(np.float32), single.cross_attention, atol=1e-3)
        assert (out / f"{name}.attn.png").is_file()
    from attnlab import plot

    fig = plot.word_grid(attnlab.CaptionTrace.load(out / "drawing.jpg.npz"))  # float16 maps draw
    assert fig.axes
    rc = main(argv)
    assert rc == 1 and f"{GOOD} done earlier" in capsys.readouterr().out


def test_cli_glob_pattern_and_shard(model, folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["caption", f"{folder}/**/*.png", "--out", str(out), "--shard", "2/3", "--workers", "0"])
    std = capsys.readouterr()
    assert rc in (0, 1), std.err
    names = [c["name"] for c in lines(out / "captions.2-of-3.jsonl")]
    pngs = [i.name for i in find_images([folder]) if i.name.endswith(".png")]
    assert names == [n for n in shard_items(pngs, (2, 3)) if n != BROKEN]  # the slice of the folder run's order
    assert all((out / f"{n}.npz").is_file() for n in names)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--out", "{tmp}/o", "--device", "cuda"], "CUDA is not available"),
        ([], "needs --out DIR"),
        (["--out", "{tmp}/o", "--shard", "4/3"], "K from 1 to N"),
        (["--out", "{tmp}/o", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
        (["--out", "{tmp}/o", "--json"], "captions.jsonl"),
        (["--out", "{tmp}/o", "--beams", "0"], "beams must be an integer"),
    ],
)
def test_cli_folder_errors_are_one_line(folder, tmp_path, capsys, extra, needle):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["caption", str(folder), *[e.format(tmp=tmp_path) for e in extra]])
    std = capsys.readouterr()
    lines_ = [line for line in std.err.strip().splitlines() if line.startswith("attnlab: error:")]
    assert rc == 2 and len(lines_) == 1 and needle in lines_[0] and "Traceback" not in std.err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.npz"))


def test_batch_flags_on_named_images_are_refused(folder, capsys):
    rc = main(["caption", str(folder / "scene-10.png"), "--shard", "1/2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--shard work on a folder or a glob pattern" in err


def test_half_keeps_logits_and_rounds_maps(model, alone):
    trace = next(iter(alone.values()))
    half = as_half(trace)
    assert half.cross_attention.dtype == np.float16 and half.logits.dtype == np.float32
    assert np.abs(half.cross_attention.astype(np.float32) - trace.cross_attention).max() <= 5e-4


# ---------------------------------------------------------------------- web pages (--html)
def test_html_pages_are_owned_resumed_and_never_foreign(model, folder, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("scene-10.png", "scene-11.png"):
        shutil.copy(folder / name, photos / name)
    out = tmp_path / "out"
    report = caption_folder(model, photos, out, workers=0, html=True, progress=False)
    assert report.captioned == 2
    for name in ("scene-10.png", "scene-11.png"):
        page = out / f"{name}.html"
        trace = attnlab.CaptionTrace.load(out / f"{name}.npz")
        assert trace.meta["html_sha256"] == hashlib.sha256(page.read_bytes()).hexdigest()
        assert page.read_text().startswith("<!DOCTYPE html>") and trace.caption.split()[0] in page.read_text()
    assert [c["html"] for c in lines(out / "captions.jsonl")] == ["scene-10.png.html", "scene-11.png.html"]
    again = caption_folder(model, photos, out, workers=0, html=True, progress=False)
    assert (again.skipped, again.captioned) == (2, 0)

    # a page that is not the one its trace records is not attnlab's: kept, listed as an error
    (out / "scene-11.png.html").write_text("<p>my notes</p>")
    third = caption_folder(model, photos, out, workers=0, html=True, max_len=4, progress=False)
    assert (third.captioned, third.failed) == (1, 1)
    assert (out / "scene-11.png.html").read_text() == "<p>my notes</p>"
    # other settings without --html: the trace is redone and attnlab's own page of the old trace goes
    fourth = caption_folder(model, photos, out, workers=0, max_len=3, progress=False)
    assert (fourth.captioned, fourth.failed) == (2, 0)  # no page is written: the user's page is not in the way
    assert not (out / "scene-10.png.html").exists() and attnlab.CaptionTrace.load(out / "scene-10.png.npz").steps == 3
    assert (out / "scene-11.png.html").read_text() == "<p>my notes</p>"  # not attnlab's: never removed

    # images named one by one: <stem>.html beside <stem>.npz and <stem>.attn.png
    single = tmp_path / "single"
    rc = main(["caption", str(photos / "scene-10.png"), "--out", str(single), "--html", "--max-len", "3"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(os.listdir(single)) == ["scene-10.attn.png", "scene-10.html", "scene-10.npz"]
    assert main(["caption", str(photos / "scene-10.png"), "--html"]) == 2
    assert "--html writes a web page per image into --out DIR" in capsys.readouterr().err


def test_save_scenes_writes_make_scenes_and_never_replaces(tmp_path):
    from attnlab.shapes import make_scenes, save_scenes

    paths = save_scenes(tmp_path / "s", 3, seed=4)
    assert [p.name for p in paths] == ["scene-00000.png", "scene-00001.png", "scene-00002.png"]
    for path, scene in zip(paths, make_scenes(3, seed=4, split="eval")):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), scene.image)  # PNG: lossless
    before = paths[0].read_bytes()
    with pytest.raises(AttnlabError, match="exists: save the scenes into an empty folder"):
        save_scenes(tmp_path / "s", 1, seed=5)
    assert paths[0].read_bytes() == before
