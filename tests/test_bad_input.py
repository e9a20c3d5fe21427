"""Every way an input can be odd, wrong or hostile.

Images through ``attnlab.caption`` and ``load_image``: odd but valid images (tiny,
extreme aspect, 16 bit, alpha, palette, animated, CMYK, EXIF-rotated, huge) must
caption, and the resized RGB image the trace holds must show what a viewer shows.
Broken inputs must raise one-line AttnlabErrors.

Issue 7 (the second half of this file): the command line never loses a user's file
(outputs never over inputs or foreign files, unique names, a failed write keeps
what was there; each checked by file hashes before and after a real CLI run);
downloads are verified before they are cached and a bad cache heals; hostile trace
files and checkpoint configs are refused before they allocate much memory;
training fails before work; misleading messages are gone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnlab
from attnlab.errors import AttnlabError
from attnlab.models import CATR, CATRConfig
from attnlab.preprocess import load_image, resized_size
from helpers import assert_error
from local_http import cache, serve  # noqa: F401 (fixtures)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = CATRConfig(
        backbone="small", d_model=32, enc_layers=1, dec_layers=1, dim_feedforward=64, mlp_hidden=32,
        vocab_size=30, max_positions=8, start_token_id=1, end_token_id=2, image_size=299,
    )
    return CATR(config).eval()


def run(model, image) -> attnlab.CaptionTrace:
    trace = attnlab.caption(model, image, max_len=1)
    assert isinstance(trace, attnlab.CaptionTrace)
    assert trace.image.dtype == np.uint8 and trace.image.ndim == 3 and trace.image.shape[2] == 3
    return trace


def near(pixel, colour, tol=12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour)) <= tol))


# ---------------------------------------------------------------- broken files
def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope.jpg"


def _directory(tmp_path: Path) -> Path:
    d = tmp_path / "folder.png"
    d.mkdir()
    return d


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    return p


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    return p


def _truncated_jpeg(tmp_path: Path) -> Path:
    full = tmp_path / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(full, quality=95)
    data = full.read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    return p


BROKEN = {
    "missing": (_missing, "no image file"),
    "directory": (_directory, "directory"),
    "empty": (_empty, "empty"),
    "text named .png": (_text, "not an image"),
    "truncated jpeg": (_truncated_jpeg, "truncated"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_file_is_one_line_error_naming_the_path(model, tmp_path, kind):
    make, needle = BROKEN[kind]
    path = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    assert_error(lambda: attnlab.caption(model, path), str(path), needle)
    assert_error(lambda: attnlab.caption(model, str(path)), str(path), needle)
    assert_error(lambda: load_image(path), str(path), needle)
    assert sorted(tmp_path.iterdir()) == before  # nothing written beside it


def test_bad_image_in_a_batch_fails_the_call(model, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), RED).save(good)
    assert_error(lambda: attnlab.caption(model, [good, _text(tmp_path)]), "notes.png")


def test_huge_header_is_refused_before_decoding(tmp_path):
    """A PNG whose header claims 20000 x 15000 px (300 MP): refused without decoding it."""
    p = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(p)
    data = bytearray(p.read_bytes())
    ihdr = 8 + 8  # signature, then IHDR length + type
    data[ihdr : ihdr + 8] = struct.pack(">II", 20000, 15000)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))  # over type + 13 data bytes
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    p.write_bytes(bytes(data))
    assert_error(lambda: load_image(p), str(p), "downscale")


# ---------------------------------------------------------------- odd sizes
def test_one_pixel_image(model, tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(p)
    trace = run(model, p)
    assert trace.image.shape == (299, 299, 3)
    assert near(trace.image[150, 150], (10, 200, 30), tol=2)
    assert trace.cross_attention.shape[-2:] == trace.grid


def test_needle_image_10_by_2000(model, tmp_path):
    p = tmp_path / "needle.png"
    Image.new("RGB", (10, 2000), BLUE).save(p)  # W x H
    trace = run(model, p)
    assert trace.image.shape == (299, 1, 3)  # H = 299, W = int(10 * 299 / 2000) -> 1
    assert near(trace.image[100, 0], BLUE, tol=2)


def test_huge_flat_jpeg_12000_by_9000(model, tmp_path):
    p = tmp_path / "huge.jpg"
    Image.new("L", (12000, 9000), 90).save(p, quality=50)  # grey; cheap to write and to decode
    trace = run(model, p)
    assert trace.image.shape == (224, 299, 3)
    assert np.abs(trace.image.astype(int) - 90).max() <= 3


# ---------------------------------------------------------------- odd modes
def test_16_bit_grayscale_png_is_scaled_not_clipped(model, tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)  # (256,)
    p = tmp_path / "ramp16.png"
    Image.fromarray(np.tile(ramp, (8, 1))).save(p)  # (8, 256): a left-to-right ramp
    assert Image.open(p).mode.startswith("I")  # really stored with 16 bits

    rgb = np.asarray(load_image(p))  # (8, 256, 3)
    expected = np.round(ramp / 257.0).astype(np.uint8)  # 0..65535 -> 0..255
    assert np.array_equal(rgb[0, :, 0], expected)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])

    trace = run(model, p)
    assert trace.image.shape == (9, 299, 3)  # 8 * 299 / 256 = 9.34
    row = trace.image[4, :, 0].astype(int)
    assert row[0] <= 5 and row[-1] >= 250  # spans the 8-bit range
    assert np.corrcoef(row, np.linspace(0, 255, 299))[0, 1] > 0.999  # still a ramp
    assert (trace.image < 250).mean() > 0.9  # not saturated to white


def test_16_bit_array_is_scaled(model):
    arr = np.zeros((4, 6), np.uint16)
    arr[:, 3:] = 65535
    arr[0, 0] = 32896  # 128 * 257
    rgb = np.asarray(load_image(arr))
    assert rgb[1, 1].tolist() == [0, 0, 0] and rgb[1, 4].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [128, 128, 128]


def test_rgba_transparent_pixels_become_white(model, tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)  # fully transparent black
    rgba[:, :30] = (255, 0, 0, 255)  # opaque red on the left
    rgba[:20, 30:] = (0, 0, 0, 128)  # half-transparent black, top right
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)

    rgb = np.asarray(load_image(p))
    assert rgb[10, 10].tolist() == list(RED)
    assert rgb[30, 50].tolist() == list(WHITE)  # transparent black over white is white, not black
    assert abs(int(rgb[10, 50, 0]) - 127) <= 2  # half black over white is mid grey

    trace = run(model, p)
    assert trace.image.shape == (199, 299, 3)
    assert near(trace.image[150, 50], RED) and near(trace.image[180, 250], WHITE)


def test_palette_png_colours(model, tmp_path):
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 255, 0, 255, 0, 255] + [0] * 762)  # 0 = green, 1 = magenta
    img.paste(1, (20, 0, 40, 20))
    p = tmp_path / "palette.png"
    img.save(p)
    assert Image.open(p).mode == "P"
    trace = run(model, p)
    assert trace.image.shape == (149, 299, 3)
    assert near(trace.image[75, 40], GREEN) and near(trace.image[75, 260], (255, 0, 255))


def test_palette_png_with_transparent_index(model, tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = black (transparent), 1 = blue
    img.paste(1, (0, 0, 10, 20))
    p = tmp_path / "ptrans.png"
    img.save(p, transparency=0)
    rgb = np.asarray(load_image(p))
    assert rgb[5, 3].tolist() == list(BLUE) and rgb[5, 15].tolist() == list(WHITE)


def test_animated_gif_uses_first_frame(model, tmp_path):
    frames = [Image.new("RGB", (30, 30), c) for c in (GREEN, RED, BLUE)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(p).n_frames == 3
    trace = run(model, p)
    assert trace.image.shape == (299, 299, 3)
    assert near(trace.image.reshape(-1, 3).mean(axis=0), GREEN, tol=3)

    opened = Image.open(p)
    opened.seek(2)  # a PIL image left on another frame still gives the first one
    assert near(np.asarray(load_image(opened))[15, 15], GREEN, tol=3)


def test_cmyk_jpeg_is_converted_to_rgb(model, tmp_path):
    colour = (200, 40, 30)
    p = tmp_path / "cmyk.jpg"
    Image.new("RGB", (40, 30), colour).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    trace = run(model, p)
    assert trace.image.shape == (224, 299, 3)
    assert near(trace.image[112, 150], colour, tol=15)


def _upright() -> np.ndarray:
    """80 wide x 120 tall: top half red, bottom half blue, a green square top left."""
    up = np.zeros((120, 80, 3), np.uint8)
    up[:60] = RED
    up[60:] = BLUE
    up[:30, :20] = GREEN
    return up


@pytest.mark.parametrize(
    "orientation, stored_from_upright",
    [
        (6, lambda a: np.rot90(a, 1)),  # viewers rotate it 90 degrees clockwise
        (8, lambda a: np.rot90(a, -1)),  # viewers rotate it 90 degrees counter-clockwise
        (3, lambda a: np.rot90(a, 2)),  # upside down
    ],
)
def test_exif_orientation_is_applied(model, tmp_path, orientation, stored_from_upright):
    stored = np.ascontiguousarray(stored_from_upright(_upright()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(stored).save(p, quality=95, exif=exif.tobytes())
    assert Image.open(p).size == (stored.shape[1], stored.shape[0])

    assert load_image(p).size == (80, 120)  # upright: 80 wide, 120 tall
    trace = run(model, p)
    img = trace.image
    assert img.shape == (299, 199, 3)  # portrait: H = 299, W = int(80 * 299 / 120)
    assert near(img[100, 150], RED, tol=30)  # top half, right of the green square
    assert near(img[250, 100], BLUE, tol=30)  # bottom half
    assert near(img[30, 20], GREEN, tol=30)  # top-left corner


# ---------------------------------------------------------------- arrays and objects
@pytest.mark.parametrize(
    "arr, needle",
    [
        (np.full((8, 8, 3), 1.5), "[0, 1]"),
        (np.full((8, 8, 3), -0.25), "[0, 1]"),
        (np.full((8, 8, 3), 255.0, dtype=np.float32), "[0, 1]"),
        (np.full((8, 8, 3), np.nan), "NaN"),
        (np.zeros((8, 8, 2), np.uint8), "(8, 8, 2)"),
        (np.zeros((8,), np.uint8), "(8,)"),
        (np.zeros((2, 8, 8, 3), np.uint8), "(2, 8, 8, 3)"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.zeros((8, 8, 3), np.int64), "int64"),
        (np.zeros((8, 8, 3), np.complex64), "complex64"),
    ],
    ids=["above1", "negative", "float255", "nan", "2chan", "1d", "4d", "empty", "int64", "complex"],
)
def test_bad_arrays(model, arr, needle):
    assert_error(lambda: attnlab.caption(model, arr), needle)
    assert_error(lambda: load_image(arr), needle)


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(5, 8, 8), torch.zeros(1, 3, 8, 8), torch.full((3, 8, 8), 2.0), torch.zeros(8)],
    ids=["5chan", "4d", "above1", "1d"],
)
def test_bad_tensors(model, tensor):
    assert_error(lambda: attnlab.caption(model, tensor))
    assert_error(lambda: load_image(tensor))


@pytest.mark.parametrize("obj", [3, 2.5, {"image": 1}, b"\x89PNG", None, object()], ids=lambda o: type(o).__name__)
def test_unknown_object_types(model, obj):
    name = type(obj).__name__
    assert_error(lambda: attnlab.caption(model, obj), name)
    assert_error(lambda: load_image(obj), name)


def test_good_arrays_and_tensors(model):
    float_img = np.zeros((20, 40, 3), np.float32)
    float_img[:, :20] = 1.0  # left white, right black
    trace = run(model, float_img)
    assert trace.image.shape == (149, 299, 3)
    assert near(trace.image[70, 30], WHITE, tol=2) and near(trace.image[70, 270], (0, 0, 0), tol=2)

    chw = torch.zeros(3, 40, 20)
    chw[2] = 1.0  # blue, (C, H, W) like torchvision
    trace = run(model, chw)
    assert trace.image.shape == (299, 149, 3) and near(trace.image[100, 70], BLUE, tol=2)

    bf16 = chw.to(torch.bfloat16)  # no NumPy dtype: must still work
    assert near(np.asarray(load_image(bf16))[10, 10], BLUE, tol=2)

    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    rgb = np.asarray(load_image(mask))
    assert rgb[2, 2].tolist() == [255, 255, 255] and rgb[7, 7].tolist() == [0, 0, 0]


# ---------------------------------------------------------------- the resize rule
def _catr_size(w: int, h: int) -> tuple[int, int]:
    """Independent statement of CATR's rule, in exact integer arithmetic."""
    long, short = max(w, h), min(w, h)
    new_short = max(1, (short * 299) // long)
    return (299, new_short) if w >= h else (new_short, 299)


def test_resized_size_follows_catr_rule():
    assert resized_size(320, 240, 299) == (299, 224)
    assert resized_size(240, 320, 299) == (224, 299)
    assert resized_size(1, 1, 299) == (299, 299)
    assert resized_size(10, 2000, 299) == (1, 299)
    assert resized_size(2000, 10, 299) == (299, 1)
    assert resized_size(12000, 9000, 299) == (299, 224)
    assert resized_size(640, 480, 299) == (299, 224)
    assert resized_size(500, 375, 299) == (299, 224)
    assert resized_size(640, 427, 299) == (299, 199)

    sizes = [(w, h) for w in range(1, 700, 7) for h in range(1, 700, 11)]
    rng = random.Random(0)
    sizes += [(rng.randint(1, 20000), rng.randint(1, 20000)) for _ in range(2000)]
    for w, h in sizes:
        assert resized_size(w, h, 299) == _catr_size(w, h), (w, h)


@pytest.mark.parametrize("size", [(320, 240), (33, 517), (300, 299)])
def test_caption_resizes_by_the_rule(model, size):
    w, h = size
    trace = run(model, np.full((h, w, 3), 77, np.uint8))
    rw, rh = _catr_size(w, h)
    assert trace.image.shape == (rh, rw, 3)


# ======================================================================================
# Issue 7: never lose a user's file, a cache that heals, bounded memory on hostile files
# ======================================================================================
def photo(path: Path, colour=(200, 60, 40), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def hashes(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones included) -> its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The real command line, in this process (the bundled shapes model, two words)."""
    from attnlab.cli import main

    rc = main([*argv])
    out, err = capsys.readouterr()
    return rc, out, err


def caption_cli(capsys, *argv: str) -> tuple[int, str, str]:
    return cli(capsys, "caption", *argv, "--max-len", "2")


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("attnlab: warning:")]
    assert len(lines) == 1 and lines[0].startswith("attnlab: error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- 1. inputs are never overwritten
def test_caption_out_dot_never_overwrites_the_photos(tmp_path, capsys):
    """``cd d && attnlab caption *.png --out .`` once replaced each photo by its figure."""
    d = tmp_path / "d"
    photo(d / "x.png", (200, 60, 40))
    photo(d / "y.png", (40, 60, 200))
    photos = hashes(d)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab", "caption", "x.png", "y.png", "--out", ".", "--max-len", "2"],
        cwd=d, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    after = hashes(d)
    assert {k: after[k] for k in photos} == photos  # the photos are untouched
    assert sorted(after) == ["x.attn.png", "x.npz", "x.png", "y.attn.png", "y.npz", "y.png"]

    # a second run over *.png would caption the figures and plan x.attn.png for x.png: refused before any work
    everything = hashes(d)
    rc, out, err = caption_cli(capsys, *[str(p) for p in sorted(d.glob("*.png"))], "--out", str(d))
    line = error_line(err)
    assert rc == 2 and out == "" and "x.attn.png" in line and "one of the inputs" in line
    assert hashes(d) == everything

    # the first command again: attnlab's own outputs for the same photos may be replaced
    rc, out, err = caption_cli(capsys, str(d / "x.png"), str(d / "y.png"), "--out", str(d))
    assert rc == 0, err
    assert {k: v for k, v in hashes(d).items() if k in photos} == photos
    trace = attnlab.CaptionTrace.load(d / "x.npz")
    assert trace.meta["source"] == str((d / "x.png").resolve())
    assert trace.meta["source_sha256"] == photos["x.png"]


# ---------------------------------------------------------------- 2. names are unique by construction
def test_output_names_are_unique_for_clashing_inputs(tmp_path, capsys):
    """``a/x.png b/x.png x-2.png`` once gave two images the name x-2 (one overwrote the other)."""
    inputs = [
        photo(tmp_path / "a" / "x.png", (250, 0, 0)),
        photo(tmp_path / "b" / "x.png", (0, 250, 0)),
        photo(tmp_path / "x-2.png", (0, 0, 250)),
        photo(tmp_path / "c" / "X.png", (250, 250, 0)),  # differs only in case
        photo(tmp_path / "x.jpg", (0, 250, 250)),
        photo(tmp_path / "d" / "x.attn.png", (250, 0, 250)),  # already carries a suffix
    ]
    out_dir = tmp_path / "o"
    rc, out, err = caption_cli(capsys, *map(str, inputs), "--out", str(out_dir), "--json")
    assert rc == 0, err
    results = json.loads(out)
    files = [f for r in results for f in r["files"]]
    assert len(files) == 12 and len({f.casefold() for f in files}) == 12
    assert sorted(os.listdir(out_dir)) == sorted(Path(f).name for f in files)
    for r, image in zip(results, inputs):
        trace_file, figure_file = map(Path, r["files"])
        assert trace_file.suffix == ".npz" and figure_file.name.endswith(".attn.png")
        trace = attnlab.CaptionTrace.load(trace_file)
        assert trace.meta["source"] == str(image.resolve())
        assert trace.meta["source_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert near(trace.image[5, 5], Image.open(image).convert("RGB").getpixel((5, 5)), tol=3)


def test_unique_stems_on_random_input_lists():
    from attnlab.outputs import unique_stems

    rng = random.Random(7)
    pieces = ["x", "X", "x-2", "x-3", "X-2", "x.attn", "y", ".x", ""]
    for _ in range(500):
        names = [f"{rng.choice(pieces)}{rng.choice(['.png', '.jpg', '.PNG'])}" for _ in range(rng.randint(1, 9))]
        stems = unique_stems(names)
        assert len({s.casefold() for s in stems}) == len(stems), (names, stems)
        plain = [Path(n).stem.lstrip(".") or "image" for n in names]
        for i, (name, stem) in enumerate(zip(plain, stems)):
            clashes = [p for p in plain if p.casefold() == name.casefold()]
            first = [p.casefold() for p in plain].index(name.casefold()) == i
            if len(clashes) == 1 or first:
                assert stem == name, (names, stems)  # no clash, or the first of a group: the plain stem
            else:
                assert stem.casefold() not in {p.casefold() for p in plain}, (names, stems)


# ---------------------------------------------------------------- files attnlab did not write
def test_files_attnlab_did_not_write_are_kept_unless_overwrite(tmp_path, capsys):
    x = photo(tmp_path / "x.png")
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "x.npz").write_bytes(b"my own numbers")
    photo(out_dir / "x.attn.png", (1, 2, 3))  # the user's own picture
    before = hashes(out_dir)
    rc, out, err = caption_cli(capsys, str(x), "--out", str(out_dir))
    line = error_line(err)
    assert rc == 2 and "attnlab did not write it" in line and "--overwrite" in line
    assert hashes(out_dir) == before

    rc, out, err = caption_cli(capsys, str(x), "--out", str(out_dir), "--overwrite")
    assert rc == 0, err
    assert attnlab.CaptionTrace.load(out_dir / "x.npz").meta["source"] == str(x.resolve())


def test_outputs_of_another_or_an_edited_image_are_kept(tmp_path, capsys):
    a = photo(tmp_path / "a" / "x.png", (250, 0, 0))
    b = photo(tmp_path / "b" / "x.png", (0, 250, 0))
    out_dir = tmp_path / "o"
    assert caption_cli(capsys, str(a), "--out", str(out_dir))[0] == 0
    before = hashes(out_dir)

    rc, out, err = caption_cli(capsys, str(b), "--out", str(out_dir))  # same name, another image
    assert rc == 2 and "another image" in error_line(err) and str(a.resolve()) in err
    assert hashes(out_dir) == before

    photo(a, (0, 0, 250))  # the photo was edited since
    rc, out, err = caption_cli(capsys, str(a), "--out", str(out_dir))
    assert rc == 2 and "earlier version" in error_line(err)
    assert hashes(out_dir) == before
    assert caption_cli(capsys, str(a), "--out", str(out_dir), "--overwrite")[0] == 0
    assert attnlab.CaptionTrace.load(out_dir / "x.npz").meta["source_sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()


# ---------------------------------------------------------------- 3. a failed write keeps what was there
def test_a_folder_in_the_way_keeps_the_older_trace(tmp_path, capsys):
    x = photo(tmp_path / "x.png")
    pd = tmp_path / "pd"
    assert caption_cli(capsys, str(x), "--out", str(pd))[0] == 0
    for figure in ("x.attn.png", "x.png"):  # folders where the figure goes (and where attnlab 0.1 put it)
        (pd / figure).unlink(missing_ok=True)
        (pd / figure).mkdir()
    before = hashes(pd)
    rc, out, err = caption_cli(capsys, str(x), "--out", str(pd))
    line = error_line(err)
    assert rc == 2 and "folder in the way" in line and "x.attn.png" in line
    assert hashes(pd) == before and (pd / "x.npz").is_file()


def test_a_failed_rename_puts_the_older_pair_back(tmp_path, capsys, monkeypatch):
    """The trace is renamed into place first; when the figure's rename then fails, the old trace returns."""
    import errno

    import attnlab.outputs

    x = photo(tmp_path / "x.png")
    out_dir = tmp_path / "o"
    assert caption_cli(capsys, str(x), "--out", str(out_dir))[0] == 0
    before = hashes(out_dir)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp.png"):  # the new figure
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(attnlab.outputs.write.os, "replace", failing_replace)
    rc, out, err = cli(capsys, "caption", str(x), "--out", str(out_dir), "--max-len", "1")  # another trace
    monkeypatch.undo()
    line = error_line(err)
    assert rc == 1 and "Input/output error" in line and "unchanged" in line
    assert hashes(out_dir) == before  # same two files, same bytes, no temporary file left


# ---------------------------------------------------------------- 7-8. trace files
DATA = Path(__file__).parent / "data"


def test_trace_written_by_attnlab_0_1_still_loads():
    """tests/data/trace_v1.npz was written by attnlab 0.1 (trace version 1)."""
    trace = attnlab.CaptionTrace.load(DATA / "trace_v1.npz")
    assert trace.words == ["red", "circle", "[SEP]"] and trace.caption == "red circle"
    assert trace.grid == (2, 3) and trace.cross_attention.shape == (2, 2, 3, 2, 3)
    np.testing.assert_allclose(trace.cross_attention.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    assert trace.encoder_self_attention.shape == (1, 2, 6, 6) and trace.decoder_self_attention.shape == (2, 2, 3, 3)
    assert trace.prefix_tokens == 0 and trace.prefix_share is None
    assert trace.logits.shape == (3, 7) and trace.probabilities().shape == (3,)
    assert trace.meta["note"].endswith("(trace version 1)")


def _prefix_trace(logits: bool = True) -> attnlab.CaptionTrace:
    """Two layers, three heads, four steps, a 2 x 3 grid and one prefix key (a ViT's CLS)."""
    rng = np.random.default_rng(3)
    full = rng.random((2, 3, 4, 1 + 6)).astype(np.float32)  # (layers, heads, steps, P + S)
    full /= full.sum(-1, keepdims=True)
    enc = rng.random((1, 3, 7, 7)).astype(np.float32)
    enc /= enc.sum(-1, keepdims=True)
    return attnlab.CaptionTrace(
        token_ids=np.array([3, 4, 5, 2]), words=["a", "b", "c", "[SEP]"],
        logits=rng.standard_normal((4, 9)).astype(np.float32) if logits else None,
        cross_attention=full[..., 1:].reshape(2, 3, 4, 2, 3), grid=(2, 3),
        image=np.zeros((20, 30, 3), np.uint8), prefix_tokens=1, prefix_share=full[..., 0],
        encoder_self_attention=enc,
    )


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "no-logits"])
def test_trace_version_2_round_trip(tmp_path, logits):
    trace = _prefix_trace(logits)
    back = attnlab.CaptionTrace.load(trace.save(tmp_path / "t.npz"))
    assert back.prefix_tokens == 1
    np.testing.assert_array_equal(back.prefix_share, trace.prefix_share)
    np.testing.assert_array_equal(back.encoder_self_attention, trace.encoder_self_attention)
    # nothing renormalised: map + prefix share = 1
    np.testing.assert_allclose(back.cross_attention.sum(axis=(-2, -1)) + back.prefix_share, 1.0, rtol=1e-5)
    if logits:
        np.testing.assert_array_equal(back.logits, trace.logits)
        assert back.probabilities().shape == (4,)
    else:
        assert back.logits is None and back.probabilities() is None


def _rewrite(src: Path, dst: Path, header: dict | None = None, header_text=None, **arrays) -> Path:
    """A copy of trace ``src`` with header keys / arrays replaced (``None`` drops an array)."""
    with np.load(src) as data:
        members = {k: data[k] for k in data.files}
    h = json.loads(str(members["header"]))
    h.update(header or {})
    members["header"] = np.array(header_text(h) if header_text else json.dumps(h))
    for k, v in arrays.items():
        if v is None:
            members.pop(k, None)
        else:
            members[k] = v
    np.savez_compressed(dst, **members)
    return dst


def _damaged_cases(trace: attnlab.CaptionTrace):
    steps = trace.steps
    nan = trace.cross_attention.copy()
    nan[0, 0, 0, 0, 0] = np.nan
    inf = trace.cross_attention.copy()
    inf[-1, -1, -1, -1, -1] = np.inf
    ids = trace.token_ids.copy()
    ids[0] = trace.logits.shape[1]
    return {
        "string-version": (dict(header={"version": "2"}), "version"),
        "grid-1e999": (dict(header_text=lambda h: json.dumps(h).replace('"grid": [', '"grid": [1e999, 8], "was": [')), "grid"),
        "short-logits": (dict(logits=trace.logits[: steps - 1]), "logits"),
        "id-beyond-vocab": (dict(token_ids=ids), "beyond the vocabulary"),
        "negative-id": (dict(token_ids=-trace.token_ids - 1), "negative"),
        "nan-attention": (dict(cross_attention=nan), "NaN"),
        "inf-attention": (dict(cross_attention=inf), "infinite"),
        "words-not-list": (dict(header={"words": "a b"}), "words"),
        "attention-wrong-grid": (dict(cross_attention=trace.cross_attention[..., :5]), "cross_attention"),
        "object-array": (dict(image=np.array([object()] * 3, dtype=object)), "dtype"),
        "prefix-share-wrong-shape": (dict(prefix_share=np.zeros((1, 1, steps), np.float32)), "prefix_share"),
    }


DAMAGED = [
    "string-version", "grid-1e999", "short-logits", "id-beyond-vocab", "negative-id", "nan-attention",
    "inf-attention", "words-not-list", "attention-wrong-grid", "object-array", "prefix-share-wrong-shape",
]


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_trace_is_refused_on_load(model, tmp_path, case):
    trace = attnlab.caption(model, np.full((18, 24, 3), 90, np.uint8), max_len=3)
    good = trace.save(tmp_path / "good.npz")
    changes, needle = _damaged_cases(trace)[case]
    bad = _rewrite(good, tmp_path / "bad.npz", **changes)
    assert_error(lambda: attnlab.CaptionTrace.load(bad), str(bad), needle)


def _zip_with(src: Path, dst: Path, members: dict[str, object]) -> Path:
    """Copy trace ``src`` with members added or replaced: bytes as they are, or a shape for a
    float32 array of zeros that is streamed (nothing that big is ever held in memory here)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for info in zin.infolist():
            if info.filename[:-4] not in members:
                zout.writestr(info.filename, zin.read(info))
        for name, content in members.items():
            if isinstance(content, bytes):
                zout.writestr(f"{name}.npy", content)
                continue
            with zout.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": content})
                left, block = int(np.prod(content)) * 4, bytes(1 << 20)
                while left:
                    fh.write(block[: min(left, len(block))])
                    left -= min(left, len(block))
    return dst


def _peak_mib(fn) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_trace_with_an_unknown_200_mib_member_is_refused_unread(model, tmp_path):
    good = attnlab.caption(model, np.full((60, 80, 3), 90, np.uint8), max_len=2).save(tmp_path / "good.npz")
    bomb = _zip_with(good, tmp_path / "bomb.npz", {"extra": (50, 1024, 1024)})  # 200 MiB of zeros
    assert bomb.stat().st_size < 2 * 2**20
    errors = []
    peak = _peak_mib(lambda: errors.append(pytest.raises(AttnlabError, attnlab.CaptionTrace.load, bomb)))
    assert "unknown member 'extra.npy'" in str(errors[0].value) and str(bomb) in str(errors[0].value)
    assert peak < 20, f"{peak:.0f} MiB allocated"


def test_trace_over_the_memory_budget_is_refused_unread(model, tmp_path):
    trace = attnlab.caption(model, np.full((299, 299, 3), 90, np.uint8), max_len=2)
    good = trace.save(tmp_path / "good.npz")
    per_map = trace.steps * trace.grid[0] * trace.grid[1] * 4  # bytes of one (layer, head)
    shape = (-(-200 * 2**20 // (128 * per_map)), 128, trace.steps, *trace.grid)  # consistent with the header
    declared = int(np.prod(shape)) * 4
    assert 200 * 2**20 <= declared < 220 * 2**20
    bomb = _zip_with(good, tmp_path / "bomb.npz", {"cross_attention": shape})
    errors = []
    peak = _peak_mib(lambda: errors.append(pytest.raises(AttnlabError, attnlab.CaptionTrace.load, bomb, max_bytes=64 * 2**20)))
    message = str(errors[0].value)
    assert "max_bytes" in message and "64 MiB" in message and "\n" not in message
    assert peak < 5, f"{peak:.1f} MiB allocated"
    # the same layout at a sane size loads under the same budget
    small = _zip_with(good, tmp_path / "small.npz", {"cross_attention": (8, 8, trace.steps, *trace.grid)})
    assert attnlab.CaptionTrace.load(small, max_bytes=64 * 2**20).cross_attention.shape == (8, 8, trace.steps, *trace.grid)


def test_trace_member_declaring_more_than_its_zip_entry_holds(model, tmp_path):
    import io

    trace = attnlab.caption(model, np.full((60, 80, 3), 90, np.uint8), max_len=2)
    good = trace.save(tmp_path / "good.npz")
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (trace.steps, 900_000)})
    buf.write(trace.logits.tobytes())  # the real (small) data behind a header that claims 7 MB
    lying = _zip_with(good, tmp_path / "lying.npz", {"logits": buf.getvalue()})
    assert_error(lambda: attnlab.CaptionTrace.load(lying), str(lying), "logits declares")


def test_trace_save_stores_numpy_values_in_meta(tmp_path):
    trace = _prefix_trace()
    trace.meta.update({"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(3), "ok": np.bool_(True), "p": tmp_path})
    back = attnlab.CaptionTrace.load(trace.save(tmp_path / "t.npz"))
    assert back.meta == {"n": 3, "x": 0.5, "a": [0, 1, 2], "ok": True, "p": str(tmp_path)}
    trace.meta["bad"] = object()
    assert_error(lambda: trace.save(tmp_path / "u.npz"), "meta", "JSON")
    assert not (tmp_path / "u.npz").exists()


# ---------------------------------------------------------------- 6. hostile checkpoint configs
def _attnlab_checkpoint(model, path: Path, config_changes: dict | None = None, drop_config=False, config=None,
                        weights=None) -> Path:
    attnlab.save_checkpoint(model, path)
    obj = torch.load(path, weights_only=True)
    obj["config"].update(config_changes or {})
    if drop_config:
        del obj["config"]
    if config is not None:
        obj["config"] = config
    if weights is not None:
        obj["model"] = weights
    torch.save(obj, path)
    return path


HOSTILE_CONFIGS = {
    "vocab-3M-in-2KB": (dict(config_changes={"vocab_size": 3_000_000}, weights={"mlp.layers.2.weight": torch.zeros(2, 2)}), "vocab_size=3000000"),
    "vocab-900k-in-2KB": (dict(config_changes={"vocab_size": 900_000}, weights={"x.weight": torch.zeros(2, 2)}), "does not fit"),
    "image-size-30000": (dict(config_changes={"image_size": 30000}), "image_size=30000"),
    "nheads-3": (dict(config_changes={"nheads": 3}), "nheads=3"),
    "dropout-5": (dict(config_changes={"dropout": 5}), "dropout=5"),
    "start-id--1": (dict(config_changes={"start_token_id": -1}), "start_token_id=-1"),
    "end-id-beyond": (dict(config_changes={"end_token_id": 30}), "end_token_id=30"),
    "missing-config": (dict(drop_config=True), "no usable config"),
    "string-config": (dict(config="d_model=32"), "no usable config"),
    "string-d-model": (dict(config_changes={"d_model": "32"}), "d_model='32'"),
    "bool-layers": (dict(config_changes={"dec_layers": True}), "dec_layers=True"),
    "nan-eps": (dict(config_changes={"layer_norm_eps": float("nan")}), "layer_norm_eps"),
    "two-means": (dict(config_changes={"mean": [0.5, 0.5]}), "mean"),
    "unknown-backbone": (dict(config_changes={"backbone": "vgg"}), "backbone='vgg'"),
    "vocab-disagrees-with-weights": (dict(config_changes={"vocab_size": 25}), "vocab_size=25"),
    "layers-disagree-with-weights": (dict(config_changes={"dec_layers": 3}), "does not fit"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_hostile_checkpoint_config_is_refused_before_building(model, tmp_path, monkeypatch, case):
    import attnlab.hub

    kwargs, needle = HOSTILE_CONFIGS[case]
    path = _attnlab_checkpoint(model, tmp_path / "hostile.pt", **kwargs)

    def never(*args, **kw):
        raise AssertionError("a model was built from a config that was not checked")

    monkeypatch.setattr(attnlab.hub, "CATR", never)  # the real model class: nothing may be built
    assert_error(lambda: attnlab.load_model(checkpoint=path), str(path), needle)


def test_a_checked_config_still_loads(model, tmp_path):
    path = _attnlab_checkpoint(model, tmp_path / "fine.pt")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no vocabulary")
        loaded = attnlab.load_model(checkpoint=path)
    assert loaded.config.to_dict() == model.config.to_dict()


# ---------------------------------------------------------------- 4-5. downloads and the cache
DOWNLOAD_VOCAB = ["[PAD]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(27)]  # 30 tokens, like the model above


@pytest.fixture
def published(model) -> tuple[bytes, bytes]:
    """The small model in CATR's published layout, and its vocabulary, as bytes."""
    import io

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "epoch": 3}, buf)
    return buf.getvalue(), ("\n".join(DOWNLOAD_VOCAB) + "\n").encode()


def _point_at(monkeypatch, server, ckpt="/w.pth", vocab="/vocab.txt") -> None:
    from attnlab import hub

    monkeypatch.setitem(hub.CHECKPOINT_URLS, "catr-v3", server.url(ckpt))
    monkeypatch.setattr(hub, "VOCAB_URL", server.url(vocab))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


HTML = b"<!DOCTYPE html><html><body>Sign in to the campus network</body></html>\n"


@pytest.mark.parametrize(
    "ckpt_route, vocab_route, needle, kept",
    [
        ("html", None, "web page", []),
        ("html-as-octets", None, "not a PyTorch checkpoint", []),
        ("cut-without-length", None, "not a usable catr-v3.pth", []),
        (None, "html-vocab", "web page", ["catr-v3.pth", "catr-v3.pth.sha256"]),
    ],
    ids=["html-page", "html-as-octet-stream", "cut-without-content-length", "html-vocabulary"],
)
def test_bad_download_never_enters_the_cache(serve, cache, monkeypatch, published, ckpt_route, vocab_route, needle, kept):
    from local_http import send

    ckpt, vocab = published
    routes = {
        "html": lambda h: send(h, HTML, content_type="text/html; charset=utf-8"),
        "html-as-octets": lambda h: send(h, HTML),
        "cut-without-length": lambda h: send(h, ckpt[: len(ckpt) // 2], length=False),
        "html-vocab": lambda h: send(h, HTML, content_type="text/plain"),
    }
    srv = serve({"/w.pth": routes.get(ckpt_route, ckpt), "/vocab.txt": routes.get(vocab_route, vocab)})
    _point_at(monkeypatch, srv)
    message = assert_error(lambda: attnlab.load_model("catr-v3"), needle)
    assert "nothing was kept" in message
    assert _names(cache) == kept
    requests = len(srv.requests)
    assert_error(lambda: attnlab.load_model("catr-v3"), needle)  # and the next run asks again
    assert len(srv.requests) > requests


def test_a_bad_cached_file_is_set_aside_and_fetched_again(serve, cache, monkeypatch, published):
    ckpt, vocab = published
    cache.mkdir()
    (cache / "catr-v3.pth").write_bytes(HTML)  # what attnlab 0.1 cached from a captive portal
    srv = serve({"/w.pth": ckpt, "/vocab.txt": vocab})
    _point_at(monkeypatch, srv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = attnlab.load_model("catr-v3")
    assert any("catr-v3.pth.bad" in str(w.message) and "downloaded again" in str(w.message) for w in caught)
    assert loaded.config.vocab_size == 30 and loaded.spec.vocab.tokens == DOWNLOAD_VOCAB
    assert (cache / "catr-v3.pth").read_bytes() == ckpt
    assert (cache / "catr-v3.pth.bad").read_bytes() == HTML  # kept, never deleted

    # a cached file whose bytes changed since it was downloaded: its SHA-256 tells
    data = bytearray(ckpt)
    data[-100] ^= 0xFF
    (cache / "catr-v3.pth").write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnlab.load_model("catr-v3")
    assert any("SHA-256" in str(w.message) for w in caught)
    assert (cache / "catr-v3.pth").read_bytes() == ckpt
    assert (cache / "catr-v3.pth.bad-2").read_bytes() == bytes(data)


def test_a_bad_cached_file_offline_names_both_files(cache, monkeypatch, published):
    from attnlab import hub

    cache.mkdir()
    (cache / "catr-v3.pth").write_bytes(HTML)
    (cache / hub.VOCAB_FILE).write_bytes(published[1])
    monkeypatch.setitem(hub.CHECKPOINT_URLS, "catr-v3", "http://127.0.0.1:9/w.pth")  # nothing listens there
    message = assert_error(lambda: attnlab.load_model("catr-v3"), str(cache / "catr-v3.pth"), str(cache / "catr-v3.pth.bad"))
    assert "could not download" in message
    assert (cache / "catr-v3.pth.bad").read_bytes() == HTML and not (cache / "catr-v3.pth").exists()


def test_download_deadline_and_stall_bar(serve, tmp_path, monkeypatch, capsys):
    import time

    from attnlab import download as dl

    def trickle(h):  # 10 bytes every 0.1 s of a promised 100 kB: no read ever times out
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(60):
            h.wfile.write(b"z" * 10)
            h.wfile.flush()
            time.sleep(0.1)

    def stall(h):  # half, a pause, the rest
        h.send_response(200)
        h.send_header("Content-Length", "2000")
        h.end_headers()
        h.wfile.write(b"s" * 1000)
        h.wfile.flush()
        time.sleep(1.5)
        h.wfile.write(b"s" * 1000)

    srv = serve({"/slow": trickle, "/stall": stall})
    start = time.monotonic()
    message = assert_error(lambda: dl.download(srv.url("/slow"), tmp_path / "slow.bin", deadline=0.5, progress=False), "longer than 0.5 s")
    assert time.monotonic() - start < 3 and srv.url("/slow") in message
    assert _names(tmp_path) == []

    monkeypatch.setattr(dl, "STALL_AFTER_S", 0.3)
    capsys.readouterr()
    dl.download(srv.url("/stall"), tmp_path / "stall.bin", progress=True)
    assert (tmp_path / "stall.bin").read_bytes() == b"s" * 2000
    assert "stalled" in capsys.readouterr().err


def test_full_cache_disk_is_not_called_no_network(serve, tmp_path, monkeypatch, published):
    from attnlab import download as dl

    srv = serve({"/w.pth": published[0]})

    def dev_full(path):  # writes fail as on a full disk (ENOSPC)
        return os.open("/dev/full", os.O_WRONLY), tmp_path / "never.tmp"

    monkeypatch.setattr(dl, "make_temp", dev_full)
    message = assert_error(lambda: dl.download(srv.url("/w.pth"), tmp_path / "c" / "w.pth", progress=False), "No space left on device")
    assert "cannot write into" in message and "could not download" not in message and "network" not in message


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporary_files_are_removed_live_ones_kept(serve, cache, monkeypatch, published, tmp_path):
    import time

    from attnlab.fileio import _host, remove_stale_temps

    def make(folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "dead": folder / f".catr-v3.pth.abcd1234.pid{_dead_pid()}.{_host()}.tmp",  # a killed run
            "live": folder / f".catr-v3.pth.efgh5678.pid{os.getpid()}.{_host()}.tmp",  # a run going on now
            "old": folder / ".catr-v3.pth.ijkl9012.tmp",  # attnlab 0.1's name, 7 hours old
            "fresh": folder / ".catr-v3.pth.mnop3456.tmp",  # attnlab 0.1's name, just written
            "other-host": folder / f".x.npz.qrst7890.pid{_dead_pid()}.elsewhere.tmp",
            "figure": folder / f".x.attn.png.uvwx1234.pid{_dead_pid()}.{_host()}.tmp.png",  # a killed caption --out
            "users": folder / ".holiday.abcd1234.tmp",  # not a name attnlab makes
        }
        for p in files.values():
            p.write_bytes(b"partial")
        hours_ago = time.time() - 7 * 3600
        os.utime(files["old"], (hours_ago, hours_ago))
        os.utime(files["users"], (hours_ago, hours_ago))
        return files

    files = make(cache)
    srv = serve({"/w.pth": published[0], "/vocab.txt": published[1]})
    _point_at(monkeypatch, srv)
    attnlab.load_model("catr-v3")  # the cache on the next run
    left = {k for k, p in files.items() if p.exists()}
    assert left == {"live", "fresh", "other-host", "users"}

    files = make(tmp_path / "training")  # and the folder of training outputs
    from attnlab.shapes.train import TrainConfig, train

    train(tmp_path / "training" / "s.pt", cfg=TrainConfig(steps=1, batch_size=2, warmup=1), progress=False)
    assert {k for k, p in files.items() if p.exists()} == {"live", "fresh", "other-host", "users"}
    assert remove_stale_temps(tmp_path / "nowhere") == []


# ---------------------------------------------------------------- 10. training fails early
def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root ignores permission bits: use /sys then)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            open(candidate / "attnlab-probe", "wb").close()
        except OSError:
            return candidate
    pytest.skip("no folder this process cannot write in")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--batch-size", "0"], "batch-size"),
        (["--lr", "nan"], "lr"),
        (["--lr", "-1"], "lr"),
        (["--steps", "0"], "steps"),
        (["--minutes", "-2"], "minutes"),
        (["--out", "{adir}"], "is a folder"),
        (["--out", "{ro}/X.pt"], "cannot write"),
        (["--out", "{file}/X.pt"], "is a file"),
    ],
    ids=["batch-0", "lr-nan", "lr-negative", "steps-0", "minutes-negative", "out-dir", "out-unwritable", "out-under-a-file"],
)
def test_training_refuses_before_work(tmp_path, capsys, monkeypatch, extra, needle):
    import attnlab.shapes.train as train_module

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "build_model", never)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    subs = {"adir": tmp_path / "adir", "ro": _unwritable(tmp_path) if "{ro}" in " ".join(extra) else "", "file": tmp_path / "afile"}
    argv = [a.format(**subs) for a in extra]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "s.pt")]
    before = hashes(tmp_path)
    rc, out, err = cli(capsys, "train", "shapes", *argv)
    assert rc == 2 and needle in error_line(err)
    assert hashes(tmp_path) == before


def test_training_init_from_a_bare_state_dict(tmp_path):
    from attnlab.shapes.model import build_shapes_model
    from attnlab.shapes.train import TrainConfig, train

    bare = tmp_path / "bare.pt"
    torch.save(build_shapes_model(5).state_dict(), bare)
    result = train(tmp_path / "ft.pt", cfg=TrainConfig(steps=1, batch_size=2, warmup=1), progress=False, init=bare)
    assert result["steps"] == 1
    saved = torch.load(tmp_path / "ft.pt", weights_only=True)
    assert saved["meta"]["init"] == str(bare)
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    assert_error(lambda: train(tmp_path / "x.pt", cfg=TrainConfig(steps=1, batch_size=2), progress=False, init=tmp_path / "other.pt"),
                 "does not fit")


def test_training_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    """A user's file named like --out (or like its resume state) survives; --overwrite replaces it;
    a rerun replaces training's own earlier outputs. Hashes are compared before and after."""
    from attnlab.cli import main

    notes = tmp_path / "notes.pt"
    notes.write_text("my notes, not a model")
    before = hashlib.sha256(notes.read_bytes()).hexdigest()
    args = ["train", "shapes", "--steps", "1", "--batch-size", "2"]
    assert main([*args, "--out", str(notes)]) != 0
    err = capsys.readouterr().err.strip()
    assert "did not write it" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert hashlib.sha256(notes.read_bytes()).hexdigest() == before and not (tmp_path / "notes.pt.train").exists()

    (tmp_path / "m.pt.train").write_text("a user's file named like the resume state")
    assert main([*args, "--out", str(tmp_path / "m.pt")]) != 0
    assert "m.pt.train exists" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()
    (tmp_path / "m.pt.train").unlink()

    assert main([*args, "--out", str(tmp_path / "m.pt")]) == 0  # training's own outputs ...
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "m.pt")]) == 0  # ... are replaced by a rerun
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"]["train_config"]["seed"] == 1
    assert main([*args, "--out", str(notes), "--overwrite"]) == 0  # asked for
    assert torch.load(notes, weights_only=True)["format"] == "attnlab-catr"


def test_student_training_never_replaces_a_file_it_did_not_write(tmp_path):
    from attnlab.shapes.student import train_student

    photo = tmp_path / "photo.pt"
    photo.write_bytes(b"\x89PNG not really")
    assert_error(lambda: train_student(photo, steps=1, batch_size=2), "did not write it")
    assert photo.read_bytes() == b"\x89PNG not really"


def test_best_head_command_on_a_non_checkpoint_is_one_line(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    before = photo.read_bytes()
    done = subprocess.run([sys.executable, "-m", "attnlab.shapes.grounding", str(photo)], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("attnlab: error:") and len(done.stderr.strip().splitlines()) == 1
    assert photo.read_bytes() == before


def test_ctrl_c_saves_a_resumable_state(tmp_path, capsys, monkeypatch):
    import attnlab.shapes.train as train_module
    from attnlab.shapes.train import TrainConfig, train

    real_step = train_module.train_step
    calls = []

    def step_then_ctrl_c(*args):
        calls.append(1)
        result = real_step(*args)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return result

    def callers_handler(signum, frame):  # the handler the caller had: training must put it back, whatever it was
        raise AssertionError("the caller's SIGINT handler ran during training")

    monkeypatch.setattr(train_module, "train_step", step_then_ctrl_c)
    out = tmp_path / "s.pt"
    argv = ["train", "shapes", "--steps", "4", "--batch-size", "4", "--warmup", "1", "--seed", "3", "--out", str(out)]
    inherited = signal.signal(signal.SIGINT, callers_handler)  # "ignore" when pytest runs in the background
    try:
        rc, _, err = cli(capsys, *argv)
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert rc == 130 and "saved step 2 of 4" in err.strip().splitlines()[-1] and "--resume" in err
    assert torch.load(out.with_name("s.pt.train"), weights_only=True)["step"] == 2
    assert restored is callers_handler  # the handler was put back

    monkeypatch.setattr(train_module, "train_step", real_step)
    assert cli(capsys, *argv, "--resume")[0] == 0
    train(tmp_path / "whole.pt", cfg=TrainConfig(steps=4, batch_size=4, warmup=1, seed=3), progress=False)
    resumed = torch.load(out, weights_only=True)["model"]
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


# ---------------------------------------------------------------- 11. arguments that raised tracebacks
def test_capture_include_must_be_patterns(model):
    for include in (123, [None], b"transformer.*", ["x", 3]):
        assert_error(lambda: attnlab.capture_attention(model, include=include).__enter__(), "include=", "glob pattern")


@pytest.mark.parametrize("device, needle", [("meta", "meta"), ("mps", "MPS"), ("cuda:7", "CUDA")])
def test_unavailable_devices(device, needle):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert_error(lambda: attnlab.load_model(device=device), needle, "cpu")


# ---------------------------------------------------------------- 12. messages that misled
def _truncated_png(tmp_path: Path) -> Path:
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(full)
    p = tmp_path / "cut.png"
    p.write_bytes(full.read_bytes()[:-300])
    return p


def _animated_gif(tmp_path: Path) -> Path:
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (30, 30), c) for c in (GREEN, RED, BLUE)]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return p


@pytest.mark.parametrize("make", [_truncated_jpeg, _truncated_png, _animated_gif], ids=["jpeg", "png", "gif"])
def test_image_files_are_closed_on_every_path(tmp_path, make):
    path = make(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_image(path)
        except AttnlabError:
            pass
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_not_called_empty(model, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    message = assert_error(lambda: load_image(fifo), str(fifo), "not a regular file")
    assert "empty" not in message
    assert "not a regular file" in assert_error(lambda: attnlab.load_model(checkpoint=fifo))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_blocked_checkpoint_says_so(tmp_path):
    import pickle

    torch.save({"model": {"w": torch.zeros(2)}, "x": _RunsCode()}, tmp_path / "code.pt")
    message = assert_error(lambda: attnlab.load_model(checkpoint=tmp_path / "code.pt"), "refused", "system")
    assert "not a PyTorch checkpoint" not in message
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump({"model": {"w": [0.0, 1.0]}}, fh)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's, about this very file
        assert_error(lambda: attnlab.load_model(checkpoint=tmp_path / "plain.pkl"), "plain Python pickle")


def test_a_vocabulary_with_a_byte_order_mark(tmp_path):
    from attnlab.tokenizer import Vocab

    path = tmp_path / "vocab.txt"
    path.write_bytes("\ufeff[PAD]\n[CLS]\n[SEP]\ndog\n".encode("utf-8"))
    vocab = Vocab.from_file(path)
    assert vocab.tokens == ["[PAD]", "[CLS]", "[SEP]", "dog"]
    assert vocab.decode([1, 3, 0, 2]) == "dog"


def test_float_tiff_in_0_1_is_not_black(model, tmp_path):
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1))  # (16, 64) in [0, 1]
    p = tmp_path / "ramp.tif"
    Image.fromarray(ramp, mode="F").save(p)
    assert Image.open(p).mode == "F"
    rgb = np.asarray(load_image(p))[..., 0].astype(int)  # (16, 64)
    np.testing.assert_allclose(rgb[0], np.round(ramp[0] * 255), atol=1)
    assert near(run(model, p).image[3, -3], WHITE, tol=8)
    p255 = tmp_path / "ramp255.tif"
    Image.fromarray(ramp * 200, mode="F").save(p255)  # 0..200: already 8-bit values
    np.testing.assert_allclose(np.asarray(load_image(p255))[0, :, 0], np.round(ramp[0] * 200), atol=1)
    bad = tmp_path / "neg.tif"
    Image.fromarray(ramp - 0.5, mode="F").save(bad)
    assert_error(lambda: load_image(bad), str(bad), "-0.5")


def test_an_all_nan_checkpoint_warns_and_the_cli_names_the_outputs(model, tmp_path, capsys):
    nan_model = CATR(model.config).eval()
    with torch.no_grad():
        for p in nan_model.parameters():
            p.fill_(float("nan"))
    path = attnlab.save_checkpoint(nan_model, tmp_path / "nan.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnlab.load_model(checkpoint=path)
    assert any("NaN or infinite weights" in str(w.message) for w in caught)
    x = photo(tmp_path / "x.png")
    rc, out, err = caption_cli(capsys, str(x), "--checkpoint", str(path), "--out", str(tmp_path / "o"))
    assert rc == 1 and out == ""
    assert "warning" in err and "NaN or infinite weights" in err
    line = error_line(err)
    assert str(x) in line and "logits" in line and "cross_attention" in line and "nothing written" in line
    assert _names(tmp_path / "o") == []
