"""Figures written by folder runs (:mod:`attnlab.outputs`): they leave the user's matplotlib
backend as it was (a notebook keeps its inline figures), carry their ``attnlab`` PNG text
tag, and figures tagged the old way (a hand-spliced ``tEXt`` chunk) are still recognised.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

import attnlab
from attnlab.batch import caption_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    return attnlab.load_model()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from attnlab.shapes import make_scenes

    root = tmp_path_factory.mktemp("figures") / "photos"
    root.mkdir()
    for i, scene in enumerate(make_scenes(2, seed=5, split="eval")):
        Image.fromarray(scene.image).save(root / f"scene-{i}.png")
    return root


@pytest.fixture
def backend():
    """Switch matplotlib to a backend; the one before comes back afterwards."""
    before = matplotlib.get_backend()
    yield lambda name: matplotlib.use(name)
    matplotlib.use(before)


@pytest.mark.parametrize("name", ["svg", "module://matplotlib_inline.backend_inline"])
def test_figures_leave_the_matplotlib_backend_unchanged(model, photos, tmp_path, backend, name):
    if name.startswith("module://"):
        pytest.importorskip("matplotlib_inline")
    backend(name)
    report = caption_folder(model, photos, tmp_path / "out", workers=0, figures=True, progress=False)
    assert report.captioned == 2 and len(list((tmp_path / "out").glob("*.attn.png"))) == 2
    assert matplotlib.get_backend() == name


def _text_chunks(data: bytes) -> dict[str, str]:
    """Every tEXt chunk of a PNG file, read chunk by chunk (independent of PIL)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, at = {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            found[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + length
    return found


def _old_style(data: bytes, tag: dict) -> bytes:
    """The PNG as attnlab tagged it before (a tEXt chunk spliced in right after IHDR), without today's chunk."""
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunk = data[at : at + 12 + length]
        if chunk[4:8] != b"tEXt":
            chunks.append(chunk)
        at += 12 + length
    body = b"attnlab\x00" + json.dumps(tag).encode("ascii")
    text = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return data[:8] + chunks[0] + text + b"".join(chunks[1:])


def test_figures_carry_their_tag_and_old_tags_are_still_recognised(model, photos, tmp_path):
    out = tmp_path / "out"
    caption_folder(model, photos, out, workers=0, figures=True, progress=False)
    figure = out / "scene-0.png.attn.png"
    tag = json.loads(_text_chunks(figure.read_bytes())["attnlab"])
    meta = attnlab.CaptionTrace.load(out / "scene-0.png.npz").meta
    assert tag == {"source": meta["source"], "source_sha256": meta["source_sha256"]}
    assert tag["source"] == str(photos / "scene-0.png")
    assert tag["source_sha256"] == hashlib.sha256((photos / "scene-0.png").read_bytes()).hexdigest()

    old = _old_style(figure.read_bytes(), tag)
    assert "attnlab" in _text_chunks(old) and old != figure.read_bytes()
    figure.write_bytes(old)
    again = caption_folder(model, photos, out, workers=0, figures=True, progress=False)
    # recognised as attnlab's own (not refused), but no longer the figure whose SHA-256 the trace
    # records: drawn again (a run killed between the renames is redone the same way)
    assert (again.skipped, again.captioned, again.failed) == (1, 1, 0)
    assert figure.read_bytes() != old and json.loads(_text_chunks(figure.read_bytes())["attnlab"]) == tag

    untagged = _old_style(figure.read_bytes(), {})  # a tag without a source: not attnlab's figure of this input
    figure.write_bytes(untagged)
    third = caption_folder(model, photos, out, workers=0, figures=True, progress=False)
    assert (third.skipped, third.failed) == (1, 1) and figure.read_bytes() == untagged  # not its own: never replaced
