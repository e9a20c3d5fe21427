"""Every way an image can be odd or wrong, through ``attnlab.caption`` and ``load_image``.

Odd but valid images (tiny, extreme aspect, 16 bit, alpha, palette, animated,
CMYK, EXIF-rotated, huge) must caption, and the resized RGB image the trace holds
must show what a viewer shows. Broken inputs must raise one-line AttnlabErrors.
"""

from __future__ import annotations

import random
import struct
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


def assert_error(fn, *needles: str) -> str:
    with pytest.raises(AttnlabError) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


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
