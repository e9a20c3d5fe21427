"""Batch runs, output files and pages against hostile folders and traces (issue 18, part 2):
the run lists are recognised by attnlab's own mark, never by their shape; an interrupted
multi-file write is redone; no pattern writes outside ``--out``; ``**`` over link loops
ends; non-finite outputs and damaged trace metadata give one-line errors, never a blank
page; odd file names, subfolders and a folder that stops being writable give one-line
errors and leave a folder the next run finishes.
"""

from __future__ import annotations

import hashlib
import json
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
from attnlab.batch import caption_folder, find_images, plan_run
from attnlab.cli import main
from helpers import assert_error

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    return attnlab.load_model()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[np.ndarray]:
    from attnlab.shapes import make_scenes

    return [s.image for s in make_scenes(3, seed=5, split="eval")]


def photos(root: Path, scenes, names=("a.png", "b.png", "c.png")) -> Path:
    for name, image in zip(names, scenes):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name)
    return root


def run_records(path: Path) -> list[dict]:
    """The image records of a run list (lines with a "name"), read as plain JSON lines."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "name" in r]


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def page_data(page: Path):
    """The JSON the page's script parses (strictly, as a browser's JSON.parse does)."""
    text = page.read_text(encoding="utf-8")
    opening = '<script type="application/json" id="attnlab-data">'
    start = text.index(opening) + len(opening)
    return strict_json(text[start : text.index("</script>", start)])


# ---------------------------------------------------------------------- 1. the run lists
USER_LISTS = {
    "blank-first-line": "\nMY NOTES\n",
    "ground-truth": '{"image":"train/1.jpg","caption":"a cat on a mat"}\n',
    "image-key-records": '{"image": "a.png", "name": "a.png", "caption": "mine"}\n',
    "empty": "",
}


@pytest.mark.parametrize("kind", ["captions", "errors"])
@pytest.mark.parametrize("case", sorted(USER_LISTS))
def test_a_users_run_list_is_never_replaced_or_deleted(scenes, tmp_path, kind, case):
    folder = photos(tmp_path / "photos", scenes)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / f"{kind}.jsonl"
    mine.write_text(USER_LISTS[case])
    before = mine.read_bytes()
    assert_error(lambda: plan_run([folder], out), str(mine), "--overwrite")
    rc = main(["caption", str(folder), "--out", str(out), "--workers", "0"])
    assert rc == 2 and mine.read_bytes() == before
    assert sorted(os.listdir(out)) == [mine.name]  # nothing else written either


def test_own_lists_are_replaced_edited_ones_are_not(model, scenes, tmp_path):
    folder = photos(tmp_path / "photos", scenes)
    (folder / "broken.png").write_text("not an image\n")
    out = tmp_path / "out"
    caption_folder(model, folder, out, workers=0, progress=False)
    from attnlab.runlist import read_run_list

    captions = read_run_list(out / "captions.jsonl", "captions")
    assert [c["name"] for c in captions] == ["a.png", "b.png", "c.png"]
    assert [e["name"] for e in read_run_list(out / "errors.jsonl", "errors")] == ["broken.png"]
    first = (out / "captions.jsonl").read_text().splitlines()[0]
    assert "attnlab_run_list" in first  # the mark
    report = caption_folder(model, folder, out, workers=0, progress=False)  # own lists: replaced, no --overwrite
    assert report.skipped == 3 and report.failed == 1
    (folder / "broken.png").unlink()
    caption_folder(model, folder, out, workers=0, progress=False)
    assert not (out / "errors.jsonl").exists()  # own list, all fixed: removed
    with (out / "captions.jsonl").open("a") as fh:
        fh.write("my note\n")  # edited since: no longer exactly attnlab's
    edited = (out / "captions.jsonl").read_bytes()
    assert_error(lambda: plan_run([folder], out), "captions.jsonl", "--overwrite")
    assert (out / "captions.jsonl").read_bytes() == edited
    report = caption_folder(model, folder, out, workers=0, progress=False, overwrite=True)
    assert report.skipped == 3 and [c["name"] for c in read_run_list(out / "captions.jsonl")] == ["a.png", "b.png", "c.png"]


def test_a_list_of_the_earlier_version_needs_overwrite(model, scenes, tmp_path):
    """Lists of earlier attnlab versions had no mark: refused like a user's file; --overwrite
    replaces them and keeps the finished traces (they are skipped, not redone)."""
    folder = photos(tmp_path / "photos", scenes)
    out = tmp_path / "out"
    caption_folder(model, folder, out, workers=0, progress=False)
    old = "".join(json.dumps(r) + "\n" for r in run_records(out / "captions.jsonl"))
    (out / "captions.jsonl").write_text(old)
    assert_error(lambda: plan_run([folder], out), "earlier", "--overwrite")
    report = caption_folder(model, folder, out, workers=0, progress=False, overwrite=True)
    assert (report.captioned, report.skipped) == (0, 3)
    assert [c["name"] for c in run_records(out / "captions.jsonl")] == ["a.png", "b.png", "c.png"]


# ---------------------------------------------------------------------- 2. interrupted multi-file writes
def _interrupt_commit(monkeypatch, renames: int):
    """The first commit renames only ``renames`` of its files, then the run is stopped (as a kill would)."""
    from attnlab.outputs import write

    real = write._commit
    calls = []

    def partial(pairs):
        if calls:
            return real(pairs)
        calls.append(pairs)
        for tmp, final in pairs[:renames]:
            os.replace(tmp, final)
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_commit", partial)


@pytest.mark.parametrize(("html", "renames"), [(False, 1), (True, 1), (True, 2)])  # every point between two renames
def test_a_run_killed_between_renames_is_redone(model, scenes, tmp_path, monkeypatch, html, renames):
    folder = photos(tmp_path / "photos", scenes[:2], names=("a.png", "b.png"))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    kwargs = dict(workers=0, progress=False, figures=True, html=html, batch_size=1)
    caption_folder(model, folder, out, **kwargs)  # complete, with the default max_len
    _interrupt_commit(monkeypatch, renames)
    report = caption_folder(model, folder, out, max_len=3, **kwargs)  # other settings, killed mid-commit
    assert report.interrupted
    monkeypatch.undo()
    report = caption_folder(model, folder, out, max_len=3, **kwargs)
    assert report.failed == 0, run_records(out / "errors.jsonl")
    caption_folder(model, folder, fresh, max_len=3, **kwargs)
    for name in ("a.png", "b.png"):
        trace, alone = (attnlab.CaptionTrace.load(d / f"{name}.npz") for d in (out, fresh))
        assert trace.meta["run"]["max_len"] == 3 and trace.caption == alone.caption
        assert (out / f"{name}.attn.png").read_bytes() == (fresh / f"{name}.attn.png").read_bytes()  # the new caption's figure
        if html:
            assert page_data(out / f"{name}.html")["caption"] == alone.caption
    assert caption_folder(model, folder, out, max_len=3, **kwargs).skipped == 2  # and now done


# ---------------------------------------------------------------------- 3. patterns that climb
def test_a_pattern_never_climbs_out_of_its_folder(model, scenes, tmp_path, monkeypatch):
    top = tmp_path / "top"
    photos(top / "d", scenes[:1], names=("inner.png",))
    photos(top, scenes[1:2], names=("x.png",))
    monkeypatch.chdir(top / "d")
    (top / "d" / "e").mkdir()
    for pattern in ("*/../../*.png", str(top / "d" / "*" / ".." / ".." / "*.png"), "e/**/../*.png"):
        assert_error(lambda: find_images([pattern]), "'..'", "climbs")
    assert_error(lambda: caption_folder(model, "*/../../*.png", "o", workers=0, progress=False), "climbs")
    assert sorted(p.name for p in top.rglob("*")) == ["d", "e", "inner.png", "x.png"]  # nothing written anywhere
    # '..' before the first wildcard is fine: names stay relative, without '..'
    assert [i.name for i in find_images(["../*.png"])] == ["x.png"]
    assert [i.name for i in find_images([str(top / "*" / "*.png")])] == ["d/inner.png"]


def test_outputs_never_follow_a_link_out_of_the_output_folder(model, scenes, tmp_path):
    folder = photos(tmp_path / "photos", scenes, names=("cats/a.png", "cats/b.png", "c.png"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "cats").symlink_to(elsewhere, target_is_directory=True)
    report = caption_folder(model, folder, out, workers=0, progress=False)
    assert (report.captioned, report.failed) == (1, 2)
    assert os.listdir(elsewhere) == []
    errors = run_records(out / "errors.jsonl")
    assert all("leads out of --out" in e["error"] for e in errors)
    for record in run_records(out / "captions.jsonl") + errors:
        assert ".." not in record["name"].split("/")


# ---------------------------------------------------------------------- 4. non-finite outputs
def test_a_model_with_minus_inf_logits_writes_no_blank_page(model, scenes, tmp_path):
    folder = photos(tmp_path / "photos", scenes[:1], names=("a.png",))
    bias = model.mlp.layers[2].bias
    before = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(-float("inf"))  # every token -inf: no probability exists
    try:
        report = caption_folder(model, folder, tmp_path / "out", workers=0, progress=False, html=True)
    finally:
        with torch.no_grad():
            bias.copy_(before)
    assert (report.captioned, report.failed) == (0, 1)
    (error,) = run_records(tmp_path / "out" / "errors.jsonl")
    assert "infinite" in error["error"] and "\n" not in error["error"]
    assert not list((tmp_path / "out").glob("a.png.*"))  # no trace, no page


def raw_trace(src: Path, dst: Path, edit_header=None, **arrays) -> Path:
    """A trace file with its header edited or arrays replaced, written without attnlab's checks."""
    with np.load(src, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    header = json.loads(str(members["header"]))
    if edit_header is not None:
        edit_header(header)
    members["header"] = np.array(json.dumps(header))
    members.update(arrays)
    with open(dst, "wb") as fh:
        np.savez_compressed(fh, **members)
    return dst


def loads_and_renders(path: Path, tmp_path: Path, *needles: str) -> None:
    """Every trace ``CaptionTrace.load`` accepts renders (page with strict JSON, word grid);
    one it refuses is refused with one line."""
    import matplotlib.pyplot as plt

    try:
        trace = attnlab.CaptionTrace.load(path)
    except AttnlabError as exc:
        assert "\n" not in str(exc) and all(n in str(exc) for n in needles), str(exc)
        return
    page = attnlab.export_html(trace, tmp_path / f"{path.stem}.html", overwrite=True)
    data = page_data(page)
    assert data["probabilities"] is None or all(0.0 <= p <= 1.0 for p in data["probabilities"])
    plt.close(attnlab.plot.word_grid(trace))


@pytest.fixture(scope="module")
def saved(model, scenes, tmp_path_factory) -> Path:
    trace = attnlab.caption(model, scenes[0])
    return trace.save(tmp_path_factory.mktemp("saved") / "t.npz")


def test_a_trace_with_a_row_of_minus_inf_logits_is_refused_or_drawn(saved, tmp_path):
    trace = attnlab.CaptionTrace.load(saved)
    row = trace.logits.copy()
    row[0, :] = -np.inf  # no token possible at step 0: softmax is NaN
    loads_and_renders(raw_trace(saved, tmp_path / "row.npz", logits=row), tmp_path, "-inf")
    assert_error(lambda: attnlab.export_html(replace(trace, logits=row), tmp_path / "m.html"), "NaN")
    one = trace.logits.copy()
    one[:, (trace.token_ids[0] + 1) % one.shape[1]] = -np.inf  # a masked token: allowed, drawn honestly
    loads_and_renders(raw_trace(saved, tmp_path / "one.npz", logits=one), tmp_path)


# ---------------------------------------------------------------------- 5. ** over link loops
class TooSlow(Exception):
    """Not an OSError (glob swallows those, TimeoutError included)."""


def _within(seconds: int, fn):
    def stop(signum, frame):
        raise TooSlow(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_double_star_over_link_loops_ends(scenes, tmp_path, monkeypatch):
    root = photos(tmp_path / "L", scenes, names=("a.png", "sub/b.png", "sub/deep/c.png"))
    os.symlink("..", root / "sub" / "up")
    os.symlink(".", root / "sub" / "self")
    os.symlink("..", root / "sub" / "deep" / "up2")
    monkeypatch.chdir(tmp_path)
    names = _within(20, lambda: [i.name for i in find_images(["L/**/*.png"])])
    assert names == ["a.png", "sub/b.png", "sub/deep/c.png"]
    assert _within(20, lambda: [i.name for i in find_images(["L"])]) == names  # the folder walk too
    # a wildcard part (not **) still goes through a link, one level per part: bounded
    assert [i.name for i in find_images(["L/sub/*/*.png"])] == ["deep/c.png", "self/b.png", "up/a.png"]


# ---------------------------------------------------------------------- 7. odd names, folders, full disks
def test_a_file_name_that_is_not_utf8_is_one_error_and_reruns_work(model, scenes, tmp_path):
    folder = photos(tmp_path / "photos", scenes[:2], names=("a.png", "b.png"))
    bad = os.path.join(os.fsencode(folder), b"bad\xff.png")
    shutil.copy(os.fsencode(folder / "a.png"), bad)
    out = tmp_path / "out"
    for _ in range(2):
        report = caption_folder(model, folder, out, workers=0, progress=False)
        assert (report.captioned + report.skipped, report.failed) == (2, 1)
        (error,) = run_records(out / "errors.jsonl")
        assert "UTF-8" in error["error"] and "\\xff" in error["name"]
        assert [c["name"] for c in run_records(out / "captions.jsonl")] == ["a.png", "b.png"]
        assert sorted(os.listdir(out)) == ["a.png.npz", "b.png.npz", "captions.jsonl", "errors.jsonl"]


def test_an_input_subfolder_named_like_a_run_list(model, scenes, tmp_path):
    folder = photos(tmp_path / "photos", scenes, names=("a.png", "captions.jsonl/b.png", "Errors.jsonl/c.png"))
    out = tmp_path / "out"
    for _ in range(2):
        report = caption_folder(model, folder, out, workers=0, progress=False)
        assert (report.captioned + report.skipped, report.failed) == (1, 2)
        assert (out / "captions.jsonl").is_file() and (out / "errors.jsonl").is_file()
        assert all("rename that input subfolder" in e["error"] for e in run_records(out / "errors.jsonl"))
        assert sorted(os.listdir(out)) == ["a.png.npz", "captions.jsonl", "errors.jsonl"]


def test_an_input_subfolder_named_like_another_images_trace(model, scenes, tmp_path):
    folder = photos(tmp_path / "photos", scenes[:2], names=("a.png", "a.png.npz/b.png"))
    out = tmp_path / "out"
    for _ in range(2):
        report = caption_folder(model, folder, out, workers=0, progress=False)
        assert (report.captioned + report.skipped, report.failed) == (1, 1)
        (error,) = run_records(out / "errors.jsonl")
        assert error["name"] == "a.png.npz/b.png" and "give another --out folder" in error["error"]
        assert attnlab.CaptionTrace.load(out / "a.png.npz").meta["source"] == str((folder / "a.png").resolve())


def test_an_output_folder_that_stops_being_writable(model, scenes, tmp_path, monkeypatch):
    from attnlab import fileio, outputs

    folder = photos(tmp_path / "photos", scenes)
    out = tmp_path / "out"
    full = []

    def no_room(path):
        if full:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    real = fileio.make_temp
    monkeypatch.setattr(fileio, "make_temp", no_room)
    monkeypatch.setattr(outputs.write, "make_temp", no_room)
    monkeypatch.setattr(outputs.naming, "make_temp", no_room)
    message = assert_error(
        lambda: caption_folder(model, folder, out, workers=0, progress=False, batch_size=1, on_batch=lambda n: full.append(n)),
        "run the same command again",
    )
    assert "Permission denied" in message
    assert sorted(p.name for p in out.iterdir()) == ["a.png.npz"]  # the one written; no lists, no temporary files
    monkeypatch.undo()
    report = caption_folder(model, folder, out, workers=0, progress=False)
    assert (report.captioned, report.skipped, report.failed) == (2, 1, 0)
    assert [c["name"] for c in run_records(out / "captions.jsonl")] == ["a.png", "b.png", "c.png"]


# ---------------------------------------------------------------------- 11. damaged page metadata
WORD_PROBABILITIES = {
    "one-string": lambda steps: ["x"],
    "strings": lambda steps: ["x"] * steps,
    "too-short": lambda steps: [0.5] * (steps - 1),
    "dict": lambda steps: {"a": 1},
    "nan": lambda steps: [float("nan")] * steps,
    "above-1": lambda steps: [2.0] * steps,
}


@pytest.mark.parametrize("case", sorted(WORD_PROBABILITIES))
def test_word_probabilities_that_are_not_one_per_word(saved, tmp_path, case):
    trace = attnlab.CaptionTrace.load(saved)
    bad = WORD_PROBABILITIES[case](trace.steps)

    def edit(header):
        header["meta"]["word_probabilities"] = bad

    path = raw_trace(saved, tmp_path / "wp.npz", edit)
    # without logits, the words' probabilities come from meta (as in a by-word trace)
    no_logits = tmp_path / "wp-no-logits.npz"
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files if k != "logits"}
    with open(no_logits, "wb") as fh:
        np.savez_compressed(fh, **members)
    for p in (path, no_logits):
        loads_and_renders(p, tmp_path, "word_probabilities")
    in_memory = replace(trace, logits=None, meta={"word_probabilities": bad})
    assert_error(lambda: attnlab.export_html(in_memory, tmp_path / "m.html"), "word_probabilities")
    assert_error(lambda: attnlab.plot.word_grid(in_memory), "word_probabilities")


def test_a_word_with_a_lone_surrogate(saved, tmp_path):
    trace = attnlab.CaptionTrace.load(saved)
    words = ["\udcff" + trace.words[0], *trace.words[1:]]

    def edit(header):
        header["words"] = words

    loads_and_renders(raw_trace(saved, tmp_path / "s.npz", edit), tmp_path, "surrogate")
    odd = replace(trace, words=words)
    assert_error(lambda: odd.save(tmp_path / "odd.npz"), "surrogate")
    assert_error(lambda: attnlab.export_html(odd, tmp_path / "odd.html"), "surrogate")
    assert not (tmp_path / "odd.npz").exists() and not (tmp_path / "odd.html").exists()
