"""Figures of multi-view traces (issue 21 item 2): views on the photo where their boxes say, shares printed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from attnlab import plot  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.keys import View  # noqa: E402
from attnlab.plot import multiview  # noqa: E402
from attnlab.trace import CaptionTrace  # noqa: E402


def tiles_and_base(layers=2, heads=2, steps=2, width=200, height=100, tweak=None, flat=False, words=("a", "cat"), starts=None):
    """Two tiles side by side (left 0..100, right 100..200, the right one overhanging by 20 px) and a base view
    of the whole photo. Step 0 of head 0 and 1: 40% on the left tile's patch (0, 1), 20% spread on the right
    tile, 10% on the base, 20% prompt, 10% special."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    if flat:
        image[:] = 128  # a flat grey photo: any coloured pixel is a map
    views = [View("tile 0", (2, 2), (0.0, 0.0, 100.0, 100.0)), View("tile 1", (2, 3), (100.0, 0.0, 220.0, 100.0)),
             View("base", (3, 3), (0.0, 0.0, 200.0, 100.0))]
    m = [np.zeros((layers, heads, steps) + v.grid, dtype=np.float32) for v in views]
    m[0][:, :, :, 0, 1] = 0.4
    m[1][:, :, :] = 0.2 / 6
    m[2][:, :, :] = 0.1 / 9
    shares = {"prompt": np.full((layers, heads, steps), 0.2, np.float32),
              "special": np.full((layers, heads, steps), 0.1, np.float32)}
    if tweak is not None:
        tweak(m)
    return CaptionTrace.from_views(list(words)[:steps], np.arange(steps), views, m, image, key_shares=shares,
                                   model_name="fake-vlm", word_starts=starts)


def test_place_views_puts_the_base_view_in_its_own_panel():
    tr = tiles_and_base()
    assert multiview.place_views(tr.views, (100, 200)) == [[0, 1], [2]]


def test_shares_line_prints_every_view_and_kind_and_adds_up():
    tr = tiles_and_base()
    line = multiview.shares_line(multiview.view_maps(tr, 0), multiview.key_share_values(tr, 0))
    assert line == "image 70.0% (tile 0 40.0% \u00b7 tile 1 20.0% \u00b7 base 10.0%) \u00b7 prompt 20.0% \u00b7 special 10.0%"
    shares = dict(multiview.key_share_values(tr, 0), special=0.05)  # 5% in no view and no share: said, not hidden
    line = multiview.shares_line(multiview.view_maps(tr, 0), shares)
    assert line.endswith("unaccounted 5.0%")


def test_off_photo_weight_is_the_overhanging_patch_area():
    tr = tiles_and_base()
    vms = multiview.view_maps(tr, 0)
    # tile 1: 3 columns of 40 px from x=100 to 220; the last column 200..240? no: 180..220, half off the photo
    assert vms[1].off_photo == pytest.approx(2 * (0.2 / 6) * 0.5)
    assert vms[0].off_photo == 0.0 and vms[2].off_photo == 0.0


def _rgb(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


def test_figure_draws_each_view_inside_its_box_on_the_photo():
    tr = tiles_and_base(flat=True)
    fig = plot.overlay(tr, 0, interp="nearest", underlay="colour", alpha=1.0)
    ax = fig.axes[0]
    texts = [t.get_text() for t in fig.texts] + [t.get_text() for t in ax.texts]
    assert any("tile 0 40.0%" in t for t in texts) and any("tile 1 20.0%, 3.3% off the photo" in t for t in texts)
    assert any("prompt 20.0%" in t and "special 10.0%" in t for t in texts)
    assert ax.get_xlim() == (0.0, 200.0) and ax.get_ylim() == (100.0, 0.0)  # clipped to the photo
    extents = [tuple(im.get_extent()) for im in ax.get_images()[1:]]
    assert extents == [(0.0, 100.0, 100.0, 0.0), (100.0, 220.0, 100.0, 0.0)]
    # the pixels of the scale's top colour (weight 0.4) lie in tile 0's patch (0, 1): x 50..100, y 0..50
    top = np.array(matplotlib.colormaps["inferno"](1.0)[:3]) * 255
    rgb = _rgb(fig).astype(int)
    bb = ax.get_window_extent()
    H = rgb.shape[0]
    panel = rgb[int(H - bb.y1) + 2:int(H - bb.y0) - 2, int(bb.x0) + 2:int(bb.x1) - 2]
    ys, xs = np.nonzero(np.abs(panel - top).max(axis=2) <= 6)
    assert len(xs) > 0.1 * panel.shape[0] * panel.shape[1]  # the patch is an eighth of the panel
    px = xs / panel.shape[1] * 200
    py = ys / panel.shape[0] * 100
    assert px.min() >= 49 and px.max() <= 101 and py.max() <= 51
    assert fig.axes[1].get_title() == "view 'base' (3 x 3 patches of 66.7 x 33.3 px): 10.0%"


def test_single_view_traces_are_not_multiview():
    whole = SimpleNamespace(name="image", grid=(2, 2), box=(0.0, 0.0, 200.0, 100.0))
    assert not multiview.is_multiview(SimpleNamespace(views=(whole,), image=np.zeros((100, 200, 3), np.uint8)))
    assert not multiview.is_multiview(SimpleNamespace())
    prefix = SimpleNamespace(views=(whole,), image=np.zeros((100, 200, 3), np.uint8), key_shares={"prefix": None})
    assert not multiview.is_multiview(prefix)  # a ViT captioner's CLS share: one grid, its share on the figure already


def test_a_prompted_trace_of_one_whole_view_is_drawn_with_its_shares():
    """A VLM trace of one grid over the whole photo (Qwen-VL, the bundled shapes-vlm) still puts part of each row
    on the prompt and earlier words: its figures are the multi-view ones, which print every share."""
    views = [View("image", (2, 2), (0.0, 0.0, 40.0, 40.0))]
    m = [np.full((1, 1, 1, 2, 2), 0.15, np.float32)]
    tr = CaptionTrace.from_views(["a"], np.arange(1), views, m, np.full((40, 40, 3), 128, np.uint8),
                                 key_shares={"prompt": np.full((1, 1, 1), 0.4, np.float32)}, model_name="fake-vlm")
    assert multiview.is_multiview(tr)
    fig = plot.overlay(tr, 0)
    texts = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
    assert "image 60.0% \u00b7 prompt 40.0%" in texts
    matplotlib.pyplot.close(fig)


def test_bad_layer_and_head_get_one_line():
    tr = tiles_and_base()
    with pytest.raises(AttnlabError, match="layer 5 does not exist"):
        plot.overlay(tr, 0, layer=5)
    with pytest.raises(AttnlabError, match="head 'max'"):
        plot.overlay(tr, 0, head="max")


def test_explorer_of_a_multiview_trace_draws_every_view_and_keeps_one_scale(tmp_path):
    pytest.importorskip("ipywidgets")
    from attnlab.explorer import explore

    def stronger(m):  # step 1 of the last layer: a stronger patch; step 0's colours must know it
        m[0][1, :, 1, 0, 0], m[0][1, :, 1, 0, 1], m[1][1, :, 1] = 0.6, 0.0, 0.0  # (the row still sums to 1)

    tr = tiles_and_base(tweak=stronger)
    ex = explore(tr)
    assert type(ex).__name__ == "ViewsExplorer" and bytes(ex.image.value).startswith(b"\x89PNG")
    titles = [t.get_text() for t in ex.figure.texts]
    assert any(t.startswith("step 0: a") for t in titles) and any("prompt 20.0%" in t for t in titles)
    assert ex.figure.axes[-1].get_ylim()[1] == pytest.approx(0.6)  # the colour bar: every word of the layer
    ex.slider.value = 1
    assert any(t.startswith("step 1: cat") for t in (x.get_text() for x in ex.figure.texts))
    assert any("tile 0 60.0%" in t.get_text() for t in ex.figure.axes[0].texts)
    saved = ex.save(str(tmp_path / "w.png"))
    assert saved.stat().st_size > 0
    (tmp_path / "mine.png").write_bytes(b"keep")
    with pytest.raises(AttnlabError, match="already exists"):
        ex.save(str(tmp_path / "mine.png"))
    assert (tmp_path / "mine.png").read_bytes() == b"keep"
    with pytest.raises(AttnlabError, match="scale= is not drawn for a trace with several views"):
        explore(tr, scale="panel")


def _page_data(path):
    import json
    import re

    found = re.search(r'<script type="application/json" id="attnlab-data">(.*?)</script>', path.read_text(), flags=re.S)
    return json.loads(found.group(1))


def test_html_page_of_a_multiview_trace_holds_every_view_box_and_share(tmp_path):
    import base64

    import attnlab

    tr = tiles_and_base()
    path = attnlab.export_html(tr, tmp_path / "v.html")
    d = _page_data(path)
    assert [v["box"] for v in d["views"]] == [list(v.box) for v in tr.views] and d["groups"] == [[0, 1], [2]]
    for v, a in zip(d["views"], (tr.view_attention(i) for i in range(3))):
        got = np.frombuffer(base64.b64decode(v["attention"]), dtype="<u2").reshape(a.shape) / d["quant"]
        assert np.abs(got - a).max() <= 0.5 / d["quant"] + 1e-9
        share = np.asarray(v["share"]).reshape(2, 3, 2)  # (layers, heads + mean, steps)
        assert np.allclose(share[:, :2], a.sum(axis=(-2, -1)), atol=1e-6)
        assert np.allclose(share[:, 2], a.mean(axis=1).sum(axis=(-2, -1)), atol=1e-6)
    assert np.allclose(np.asarray(d["views"][1]["off"]).reshape(2, 3, 2), 2 * (0.2 / 6) * 0.5, atol=1e-6)
    assert np.allclose(d["shares"]["prompt"], 0.2, atol=1e-6)
    with pytest.raises(AttnlabError, match="one shared scale"):
        attnlab.export_html(tr, tmp_path / "w.html", scale="panel")
    assert not (tmp_path / "w.html").exists()


def test_html_page_of_a_multiview_trace_in_chromium(tmp_path):
    from test_browser import CHROMIUM_FLAGS, _prerequisites

    chromium = _prerequisites()
    from playwright.sync_api import sync_playwright

    import attnlab

    tr = tiles_and_base()
    path = attnlab.export_html(tr, tmp_path / "v.html", interp="nearest", underlay="none")
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.goto(path.as_uri(), timeout=30_000)
            page.wait_for_function("document.body.dataset.step === '0'", timeout=30_000)
            line = multiview.shares_line(multiview.view_maps(tr, 0), multiview.key_share_values(tr, 0))
            sink = tr.diagnostics().line()  # a caption of fewer than 3 words: "sink: n/a (...)"
            assert sink.startswith("sink: n/a")
            assert page.inner_text("#label") == "0: a \u00b7 layer 1 (2nd of 2, last) \u00b7 mean of 2 heads \u00b7 " + line + " \u00b7 " + sink
            assert page.locator("canvas.panel").count() == 2
            caps = page.locator("figcaption").all_inner_texts()
            assert caps == ["2 views on the photo (10 patches): 60.0%", "view 'base' (3 x 3 patches of 66.7 x 33.3 px): 10.0%"]
            page.locator("canvas.panel").first.screenshot(path=str(tmp_path / "panel.png"))
            w, h = page.evaluate("[document.querySelector('canvas.panel').width, document.querySelector('canvas.panel').height]")
        finally:
            browser.close()
    assert not problems, problems
    from PIL import Image

    with Image.open(tmp_path / "panel.png") as im:
        px = np.asarray(im.convert("RGB")).astype(int)[:h, :w]
    top = np.array(matplotlib.colormaps["inferno"](1.0)[:3]) * 255
    ys, xs = np.nonzero(np.abs(px - top).max(axis=2) <= 6)  # the top colour: tile 0's patch (0, 1) only
    assert len(xs) > 0.1 * w * h
    assert xs.min() >= 0.25 * w - 2 and xs.max() <= 0.5 * w + 2 and ys.max() <= 0.5 * h + 2


@pytest.mark.parametrize("view", ["head_grid", "attention_matrix", "head_stats", "layer_head_grid",
                                  "attention_row", "save_gif"])
def test_one_grid_figures_refuse_a_multiview_trace_naming_those_that_draw_it(view, tmp_path):
    args = {"layer_head_grid": (0,), "attention_row": (0,), "save_gif": (tmp_path / "x.gif",)}.get(view, ())
    with pytest.raises(AttnlabError, match=r"3 views of its image: use plot.overlay\(trace, step\)"):
        getattr(plot, view)(tiles_and_base(), *args)
    assert list(tmp_path.iterdir()) == []


def test_pieces_are_merged_into_words_and_a_saved_trace_draws_the_same(tmp_path):
    tr = tiles_and_base(steps=3, words=("a", "c", "##at"), starts=[True, True, False])
    fig = plot.overlay(tr, 1)  # words: "a", "cat" (the mean of its two pieces' maps)
    assert fig.texts[0].get_text().startswith("step 1: cat\n")
    assert plot.overlay(tr, 2, pieces=True).texts[0].get_text().startswith("step 2: ##at\n")
    back = CaptionTrace.load(tr.save(tmp_path / "t.npz"))
    texts = lambda f: [t.get_text() for t in f.texts] + [t.get_text() for ax in f.axes for t in ax.texts]  # noqa: E731
    assert texts(plot.overlay(back, 0)) == texts(plot.overlay(tr, 0))


def test_one_view_of_a_crop_is_drawn_on_the_crop_and_figures_of_the_whole_image_refuse():
    image = np.full((100, 200, 3), 128, np.uint8)
    m = np.zeros((1, 1, 1, 2, 2), np.float32)
    m[..., 1, 1] = 0.9
    tr = CaptionTrace.from_views(["a"], [0], [("image", (2, 2), (50.0, 0.0, 150.0, 100.0))], [m], image,
                                 key_shares={"prefix": np.full((1, 1, 1), 0.1, np.float32)})
    fig = plot.overlay(tr, 0)
    assert [tuple(im.get_extent()) for im in fig.axes[0].get_images()[1:]] == [(50.0, 150.0, 100.0, 0.0)]
    assert "\nimage 90.0% \u00b7 prefix 10.0%\n" in fig.texts[0].get_text()
    assert "1 view, box in cyan" in fig.texts[0].get_text()
    with pytest.raises(AttnlabError, match="one view of a part of its image"):
        plot.head_grid(tr)
    assert len(plot.word_grid(tr).axes) == 1 + 1 + 1  # the photo with the crop's box, the word, the colour bar
    whole = CaptionTrace.from_views(["a"], [0], [("image", (2, 2), (0.0, 0.0, 200.0, 100.0))], [m], image,
                                    key_shares={"prefix": np.full((1, 1, 1), 0.1, np.float32)})
    assert not multiview.is_multiview(whole)  # a view of the whole image: today's figures


def test_word_grid_of_a_multiview_trace_has_the_photo_row_then_a_row_per_word_with_its_shares():
    tr = tiles_and_base(steps=2)
    fig = plot.word_grid(tr, pyplot=False)
    import matplotlib.pyplot as plt

    assert fig not in [plt.figure(n) for n in plt.get_fignums()]  # pyplot never saw it (folder runs)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 * 2  # rows: the photo, "a", "cat"; columns: the photo's views, the base view
    assert len(panels[0].get_images()) == 1  # the photo row: the photo in colour and the boxes, no map
    for row, t in ((1, 0), (2, 1)):
        line = multiview.shares_line(multiview.view_maps(tr, t), multiview.key_share_values(tr, t))
        assert panels[2 * row].get_title(loc="left") == f"{tr.words[t]}: {line}"
        assert [tuple(im.get_extent()) for im in panels[2 * row].get_images()[1:]] == [(0, 100, 100, 0), (100, 220, 100, 0)]
    with pytest.raises(AttnlabError, match="ncols= is not drawn"):
        plot.word_grid(tr, ncols=3)


def test_html_page_of_one_crop_view_in_chromium(tmp_path):
    from test_browser import CHROMIUM_FLAGS, _prerequisites

    chromium = _prerequisites()
    from playwright.sync_api import sync_playwright

    import attnlab

    m = np.zeros((1, 1, 1, 2, 2), np.float32)
    m[..., 1, 1] = 0.9
    tr = CaptionTrace.from_views(["a"], [0], [("image", (2, 2), (50.0, 0.0, 150.0, 100.0))], [m],
                                 np.full((100, 200, 3), 128, np.uint8),
                                 key_shares={"prefix": np.full((1, 1, 1), 0.1, np.float32)})
    path = attnlab.export_html(tr, tmp_path / "c.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(path.as_uri(), timeout=30_000)
            page.wait_for_function("document.body.dataset.step === '0'", timeout=30_000)
            assert page.inner_text("#label").endswith("\u00b7 image 90.0% \u00b7 prefix 10.0% \u00b7 " + tr.diagnostics().line())
            assert page.locator("figcaption").all_inner_texts() == ["view 'image' (2 x 2 patches of 50 x 50 px): 90.0%"]
        finally:
            browser.close()


def six_tiles_and_an_empty_kind():
    """Six 1 x 1 tiles in a row, 10% each; prompt 40%; no newline keys at all (share exactly 0)."""
    views = [View(f"tile {i}", (1, 1), (20.0 * i, 0.0, 20.0 * (i + 1), 20.0)) for i in range(6)]
    m = [np.full((1, 1, 1, 1, 1), 0.1, np.float32) for _ in views]
    shares = {"prompt": np.full((1, 1, 1), 0.4, np.float32), "newline": np.zeros((1, 1, 1), np.float32)}
    image = np.full((20, 120, 3), 128, np.uint8)
    return CaptionTrace.from_views(["a"], np.arange(1), views, m, image, key_shares=shares, model_name="fake-vlm")


def test_many_views_and_empty_kinds_in_one_short_line():
    tr = six_tiles_and_an_empty_kind()
    line = multiview.shares_line(multiview.view_maps(tr, 0), multiview.key_share_values(tr, 0))
    assert line == "image 60.0% (6 views, each one's share on its box) \u00b7 prompt 40.0% \u00b7 none on newline"
    fig = multiview.views_figure(tr, 0)
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert any(line in t for t in texts)
    assert sum(t.startswith("tile ") and t.endswith(" 10.0%") for t in texts) == 6  # each share on its box
    matplotlib.pyplot.close(fig)


def test_html_page_of_many_views_prints_the_same_short_line(tmp_path):
    from test_browser import CHROMIUM_FLAGS, _prerequisites

    chromium = _prerequisites()
    from playwright.sync_api import sync_playwright

    import attnlab

    tr = six_tiles_and_an_empty_kind()
    path = attnlab.export_html(tr, tmp_path / "six.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(path.as_uri(), timeout=30_000)
            page.wait_for_function("document.body.dataset.step === '0'", timeout=30_000)
            label = page.inner_text("#label")
        finally:
            browser.close()
    assert label.endswith("image 60.0% (6 views, each one's share on its box) \u00b7 prompt 40.0% \u00b7 none on newline"
                          " \u00b7 " + tr.diagnostics().line())


def test_word_grid_of_one_view_flows_words_into_rows_and_no_heading_runs_over_a_panel():
    words = [f"word{i}" for i in range(9)]
    views = [View("image", (4, 4), (0.0, 0.0, 64.0, 64.0))]
    m = [np.full((1, 1, 9, 4, 4), 0.5 / 16, np.float32)]
    shares = {k: np.full((1, 1, 9), 0.5 / 5, np.float32) for k in ("prompt", "special", "generated", "newline", "prefix")}
    image = np.full((64, 64, 3), 128, np.uint8)
    tr = CaptionTrace.from_views(words, np.arange(9), views, m, image, key_shares=shares, model_name="fake-vlm")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = multiview.views_word_grid(tr, pyplot=False)
    FigureCanvasAgg(fig).draw()
    panels = [ax for ax in fig.axes if ax.get_images() or ax.patches]
    assert len(panels) == 10  # the photo and nine words
    grid = {(round(ax.get_position().x0, 3), round(ax.get_position().y0, 3)) for ax in panels}
    assert len({x for x, _ in grid}) == multiview.WORDS_PER_ROW and len({y for _, y in grid}) == 3  # 4 + 4 + 2
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_window_extent(renderer) for ax in panels]
    for ax in panels:
        title = ax.title if ax.title.get_text() else ax._left_title
        text = title.get_window_extent(renderer)
        assert title.get_text().count("\n") >= 1  # the long shares line is wrapped ...
        assert not any(text.overlaps(b) for b in boxes)  # ... and never runs over a panel
        assert text.x0 >= 0 and text.x1 <= fig.bbox.width


def test_outlines_are_drawn_on_every_views_panel_and_said_in_the_title():
    tr = six_tiles_and_an_empty_kind()
    mask = np.zeros((20, 120), bool)
    mask[5:15, 30:50] = True  # one object across tiles 1 and 2
    fig = plot.word_grid(tr, outlines=[mask])
    contours = [c for ax in fig.axes for c in ax.collections if type(c).__name__ in ("QuadContourSet", "ContourSet")]
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(contours) == len(panels) == 2  # the photo and the one word
    xs = np.concatenate([p.vertices[:, 0] for c in contours[:1] for p in c.get_paths()])
    assert xs.min() == pytest.approx(30, abs=1) and xs.max() == pytest.approx(50, abs=1)  # where the object is, in photo pixels
    assert "1 object outline in cyan" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)
    fig = plot.overlay(tr, 0, outlines=[mask])
    assert "1 object outline in cyan" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)
