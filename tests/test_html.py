"""attnlab.export_html: one self-contained page per trace, checked as a file and driven in headless Chromium.

The browser test needs the ``playwright`` Python package and Debian's
Chromium (never ``playwright install``); without them it is skipped, unless
``ATTNLAB_REQUIRE_BROWSER=1`` (CI), where it fails, as in ``test_browser.py``.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import attnlab
from attnlab.errors import AttnlabError
from attnlab.trace import CaptionTrace
from test_browser import CHROMIUM_FLAGS, _prerequisites

MB = 1_000_000


def catr_size_trace(words: int = 15, seed: int = 0) -> CaptionTrace:
    """A trace of CATR's size: 6 layers x 8 heads, ``words`` steps, a 19 x 19 grid, a 299 x 299 photo-like image."""
    rng = np.random.default_rng(seed)
    att = rng.random((6, 8, words, 19, 19)) ** 6  # peaky maps, like trained heads
    att /= att.sum(axis=(-2, -1), keepdims=True)
    yy, xx = np.mgrid[0:299, 0:299]
    photo = np.stack([120 + 80 * np.sin(xx / 23.0), 140 + 60 * np.cos(yy / 31.0), 100 + 0.3 * (xx + yy)], axis=-1)
    photo += rng.normal(0, 12, photo.shape)  # sensor noise: hard to compress, as in a real photo
    vocab = [f"word{i}" for i in range(words - 1)] + ["[SEP]"]
    return CaptionTrace(
        token_ids=np.arange(words) + 1000, words=vocab, logits=rng.standard_normal((words, 30522)).astype(np.float32),
        cross_attention=att.astype(np.float32), grid=(19, 19), image=np.clip(photo, 0, 255).astype(np.uint8),
        model_name="catr-size", caption=" ".join(vocab[:-1]),
    )


def moving_spot_trace() -> CaptionTrace:
    """2 layers x 2 heads, 4 words; word t looks at patch (1, 2 t) in layer 1 and (4, 1) in layer 0."""
    att = np.zeros((2, 2, 4, 6, 8), dtype=np.float32)
    for t in range(4):
        att[1, :, t, 1, 2 * t] = 1.0
        att[0, :, t, 4, 1] = 1.0
    return CaptionTrace(token_ids=np.arange(4), words=["a", "red", "<b>box</b>", "[SEP]"],
                        logits=np.zeros((4, 5), dtype=np.float32), cross_attention=att, grid=(6, 8),
                        image=np.full((96, 128, 3), 128, dtype=np.uint8), model_name="toy", caption="a red <b>box</b>")


def page_data(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="attnlab-data">(.*?)</script>', html, flags=re.S)
    assert found, "no data block"
    return json.loads(found.group(1))


# ----------------------------------------------------------------- the file
def test_page_is_self_contained_and_holds_every_map(tmp_path):
    trace = moving_spot_trace()
    path = attnlab.export_html(trace, tmp_path / "report.html")
    assert path == tmp_path / "report.html" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    # nothing from elsewhere: no external scripts, styles or images, and a policy that forbids any request
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html)
    assert "http://" not in html and "https://" not in html
    assert "default-src 'none'" in html
    assert "<b>box</b>" not in html  # words are text, not markup
    data = page_data(html)
    raw = np.frombuffer(base64.b64decode(data["attention"]), dtype="<u2").reshape(2, 2, 4, 6, 8)
    np.testing.assert_allclose(raw / data["quant"], trace.cross_attention, atol=0.5 / 65535)
    assert data["words"] == trace.words and data["layerLabels"] == ["layer 0 (1st of 2)", "layer 1 (2nd of 2, last)"]
    image = re.search(r'id="source" alt="" hidden src="data:image/png;base64,([^"]+)"', html).group(1)
    with Image.open(io.BytesIO(base64.b64decode(image))) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), trace.image)


def test_catr_size_trace_stays_under_2_mb(tmp_path):
    path = attnlab.export_html(catr_size_trace(), tmp_path / "catr.html")
    size = path.stat().st_size
    print(f"\n[html] 15 words, 6 layers x 8 heads, 19 x 19 grid, 299 x 299 image: {size / MB:.2f} MB ({size} bytes)")
    assert size < 2 * MB


def test_existing_files_are_never_replaced_unless_asked(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("my homework")
    with pytest.raises(AttnlabError, match="already exists") as info:
        attnlab.export_html(moving_spot_trace(), target)
    assert "\n" not in str(info.value) and "overwrite=True" in str(info.value)
    assert target.read_text() == "my homework" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    attnlab.export_html(moving_spot_trace(), target, overwrite=True)
    assert "attnlab-data" in target.read_text()


def test_a_failed_write_leaves_what_was_there(tmp_path, monkeypatch):
    import errno

    import attnlab.fileio as fileio
    import attnlab.plot.html as html_module

    real = fileio.atomic_write

    def disk_full(path, write):
        def half(fh):
            fh.write(b"<!DOCTYPE html> half a page")
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, half)

    monkeypatch.setattr(html_module, "atomic_write", disk_full)  # the overwrite=True path
    monkeypatch.setattr(fileio, "atomic_write", disk_full)  # atomic_create writes through it
    target = tmp_path / "report.html"
    target.write_text("old page")
    with pytest.raises(AttnlabError, match="No space left on device"):
        attnlab.export_html(moving_spot_trace(), target, overwrite=True)
    with pytest.raises(AttnlabError, match="No space left on device"):
        attnlab.export_html(moving_spot_trace(), tmp_path / "new.html")
    assert target.read_text() == "old page" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path": "x.png"}, ".html"),
        ({"path": "."}, ".html"),
        ({"layer": 5}, "layer 5"),
        ({"head": "max"}, "head"),
        ({"step": 9}, "step 9"),
        ({"scale": "log"}, "scale"),
        ({"size": 10}, "size"),
        ({"overwrite": "yes"}, "overwrite"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir.html").mkdir()
    kwargs = {"path": "out.html"} | kwargs
    with pytest.raises(AttnlabError, match=message) as info:
        attnlab.export_html(moving_spot_trace(), kwargs.pop("path"), **kwargs)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.html"]


def test_a_folder_named_like_a_page_is_refused(tmp_path):
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(AttnlabError, match="is a folder"):
        attnlab.export_html(moving_spot_trace(), tmp_path / "dir.html")


# -------------------------------------------------------------- in Chromium
def _canvas_pixels(page) -> np.ndarray:
    """The picture as shown: a screenshot of the canvas, cut to its own size (the element box may be a pixel taller)."""
    png = page.locator("#view").screenshot()
    width, height = page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)[:height, :width]  # (h, w, 3)


def _hot_patch(pixels: np.ndarray, grid: tuple[int, int]) -> tuple[int, int]:
    """The grid patch under the brightest pixel (inferno's top is near white-yellow)."""
    brightness = pixels.sum(axis=-1)
    i, j = np.unravel_index(np.argmax(brightness), brightness.shape)
    return int(i * grid[0] / pixels.shape[0]), int(j * grid[1] / pixels.shape[1])


def test_page_in_chromium_word_slider_by_keyboard(tmp_path):
    chromium = _prerequisites()
    from playwright.sync_api import sync_playwright

    path = attnlab.export_html(moving_spot_trace(), tmp_path / "page.html")
    requests, problems = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(path.as_uri(), timeout=30_000)
            page.wait_for_function("document.body.dataset.step === '0'", timeout=30_000)
            assert page.inner_text("#label").startswith("0: a (p=0.20) \u00b7 layer 1 (2nd of 2, last) \u00b7 mean of 2 heads")
            before = _canvas_pixels(page)
            assert _hot_patch(before, (6, 8)) == (1, 0)

            page.focus("#word")
            page.keyboard.press("ArrowRight")
            page.wait_for_function("document.body.dataset.step === '1'", timeout=10_000)
            after = _canvas_pixels(page)
            changed = float((np.abs(after - before).max(axis=-1) > 24).mean())
            assert changed > 0.01, f"the picture did not change ({changed:.4f} of pixels)"
            assert _hot_patch(after, (6, 8)) == (1, 2)
            assert page.inner_text("#label").startswith("1: red (p=0.20)")
            assert page.input_value("#word") == "1"

            page.keyboard.press("ArrowRight")
            page.wait_for_function("document.body.dataset.step === '2'", timeout=10_000)
            assert page.inner_text("#label").startswith("2: <b>box</b>")  # shown as text
            page.select_option("#layer", "0")
            assert _hot_patch(_canvas_pixels(page), (6, 8)) == (4, 1)
            assert "layer 0 (1st of 2)" in page.inner_text("#label")
        finally:
            browser.close()
    assert requests == [path.as_uri()], f"the page asked for more than itself: {requests}"
    assert not problems, problems


def test_a_trace_without_scores_has_no_p_labels(tmp_path):
    trace = moving_spot_trace()
    trace.logits = None  # recorded without logits
    data = page_data(attnlab.export_html(trace, tmp_path / "p.html").read_text())
    assert data["probabilities"] is None and data["wordLabels"] == trace.words


def test_the_page_puts_the_photo_in_grey_under_the_map_and_outlines_objects(tmp_path):
    chromium = _prerequisites()
    from playwright.sync_api import sync_playwright

    trace = moving_spot_trace()
    trace.image = np.zeros((96, 128, 3), dtype=np.uint8) + np.array([230, 20, 20], dtype=np.uint8)  # a red photo
    mask = np.zeros((96, 128), dtype=bool)
    mask[32:64, 48:96] = True
    path = attnlab.export_html(trace, tmp_path / "page.html", alpha=0.0, outlines=[mask])
    data = page_data(path.read_text())
    assert data["start"]["underlay"] == "grey" and data["outlineCount"] == 1
    edge = np.frombuffer(base64.b64decode(data["outlines"]), dtype=np.uint8).reshape(96, 128)
    assert edge[32, 60] == 1 and edge[40, 60] == 0 and edge.sum() == 2 * (32 + 48) - 4  # the square's border pixels
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(path.as_uri(), timeout=30_000)
            page.wait_for_function("document.body.dataset.step === '0'", timeout=30_000)
            assert "photo in grey under the map, 1 object outline in cyan" in page.inner_text("#note")
            grey = _canvas_pixels(page)
            corner = grey[:20, :20].reshape(-1, 3)  # opacity 0: only the photo, in grey (BT.601 luminance)
            np.testing.assert_allclose(corner.mean(0), [0.299 * 230 + 0.587 * 20 + 0.114 * 20] * 3, atol=2)
            h, w = grey.shape[:2]
            line = grey[int(32.5 * h / 96), int(w * 72 / 128)]  # on the square's top edge
            assert abs(int(line[0]) - 0) < 30 and line[1] > 200 and line[2] > 220, line
            page.select_option("#underlay", "colour")
            np.testing.assert_allclose(_canvas_pixels(page)[:20, :20].reshape(-1, 3).mean(0), [230, 20, 20], atol=2)
            page.select_option("#underlay", "none")
            assert "map only, no photo" in page.inner_text("#note")
            none = _canvas_pixels(page)[:20, :20].reshape(-1, 3).mean(0)  # the map alone, opaque: inferno's 0
            np.testing.assert_allclose(none, [0, 0, 4], atol=4)
        finally:
            browser.close()
    with pytest.raises(AttnlabError, match="underlay='sepia'"):
        attnlab.export_html(trace, tmp_path / "bad.html", underlay="sepia")
