"""Figures that do not mislead: colour scales, flat patches, labels, layout, extreme shapes, PDF.

Pixel tests render with Agg and compare colours with the colormap's own
colours blended over a uniform grey image (an independent computation of what
each value must look like).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import attnlab  # noqa: E402
from attnlab import plot  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.plot.maps import head_label, layer_label  # noqa: E402
from attnlab.trace import CaptionTrace  # noqa: E402

GREY = 128
GRID = (6, 8)
IMAGE = (192, 256)  # 32 px per patch


def make_trace(att: np.ndarray, image_hw=IMAGE, words=None, logits: bool = True) -> CaptionTrace:
    layers, heads, steps, H, W = att.shape
    words = words or [f"w{t}" for t in range(steps)]
    rng = np.random.default_rng(0)
    return CaptionTrace(
        token_ids=np.arange(steps) % 5,
        words=words,
        logits=rng.standard_normal((steps, 5)).astype(np.float32) if logits else np.zeros((steps, 5), np.float32),
        cross_attention=att.astype(np.float32),
        grid=(H, W),
        image=np.full((*image_hw, 3), GREY, dtype=np.uint8),
        model_name="toy",
        caption=" ".join(words),
    )


def render(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64)  # (h_px, w_px, 3)


def colour(cmap: str, value: float, alpha: float = 1.0) -> np.ndarray:
    """RGB (0..255) of ``value`` (0..1 along the colormap) blended over the grey image."""
    return alpha * np.array(matplotlib.colormaps[cmap](value)[:3]) * 255.0 + (1 - alpha) * GREY


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


def colorbar_of(fig):
    return next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")


def pixel_box(ax, pixels: np.ndarray, box: tuple[float, float, float, float], inset: int = 2) -> np.ndarray:
    """The figure pixels showing the data box (row0, row1, col0, col1) of ``ax``, ``inset`` pixels in from its edges."""
    r0, r1, c0, c1 = box
    h = pixels.shape[0]
    (x0, y0), (x1, y1) = ax.transData.transform([(c0, r0), (c1, r1)])
    rows = slice(int(math.ceil(h - y0)) + inset, int(h - y1) - inset)
    cols = slice(int(math.ceil(x0)) + inset, int(x1) - inset)
    return pixels[rows, cols].reshape(-1, 3)


def patch_box(r: int, c: int, grid=GRID, image_hw=IMAGE) -> tuple[float, float, float, float]:
    H, W = grid
    h, w = image_hw
    return r * h / H, (r + 1) * h / H, c * w / W, (c + 1) * w / W


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def strong_and_weak() -> CaptionTrace:
    """Step 0: all weight on patch (1, 2); step 1: 0.2 on patch (4, 5), the rest spread evenly."""
    S = GRID[0] * GRID[1]
    att = np.zeros((1, 1, 2, *GRID))
    att[0, 0, 0, 1, 2] = 1.0
    att[0, 0, 1] = 0.8 / (S - 1)
    att[0, 0, 1, 4, 5] = 0.2
    return make_trace(att, words=["red", "a"])


# ================================================================ colour scales
def test_shared_scale_keeps_a_weak_word_dark():
    trace = strong_and_weak()
    fig = plot.word_grid(trace, alpha=1.0, interp="nearest")
    strong, weak = panels(fig)[1:]
    bar = colorbar_of(fig)
    assert bar.get_ylabel() == "attention weight of a patch"
    assert bar.get_ylim() == pytest.approx((0.0, 1.0))  # one scale: the figure's largest patch weight
    pixels = render(fig)
    # flat patches: the strong patch is the top colour, the weak word's best patch only 0.2 of the way up
    top = pixel_box(strong, pixels, patch_box(1, 2))
    np.testing.assert_allclose(top, np.broadcast_to(colour("inferno", 1.0), top.shape), atol=3)
    np.testing.assert_allclose(pixel_box(weak, pixels, patch_box(4, 5)).mean(0), colour("inferno", 0.2), atol=3)
    hot = colour("inferno", 1.0)
    assert np.linalg.norm(pixel_box(weak, pixels, (0, IMAGE[0], 0, IMAGE[1])) - hot, axis=1).min() > 100


def test_panel_scale_brightens_each_panel_and_prints_its_peak():
    trace = strong_and_weak()
    fig = plot.word_grid(trace, alpha=1.0, interp="nearest", scale="panel")
    strong, weak = panels(fig)[1:]
    assert colorbar_of(fig).get_ylabel() == "fraction of the panel's own peak"
    assert [t.get_text() for t in strong.texts] == ["peak 1.000"]
    assert [t.get_text() for t in weak.texts] == ["peak 0.200"]
    pixels = render(fig)
    for ax, patch in ((strong, (1, 2)), (weak, (4, 5))):
        np.testing.assert_allclose(pixel_box(ax, pixels, patch_box(*patch)).mean(0), colour("inferno", 1.0), atol=3)


def test_uniform_scale_shows_no_preference_as_the_flat_middle_colour():
    S = GRID[0] * GRID[1]
    att = np.full((1, 1, 2, *GRID), 1.0 / S)  # step 0: uniform
    att[0, 0, 1] = 0.0
    att[0, 0, 1, 2, 3] = 1.0  # step 1: one patch, S times the uniform weight
    trace = make_trace(att, words=["the", "cat"])
    fig = plot.word_grid(trace, alpha=1.0, scale="uniform")
    flat, focused = panels(fig)[1:]
    bar = colorbar_of(fig)
    assert bar.get_ylabel() == f"weight / uniform (1/{S}), log scale"
    k = math.ceil(math.log2(S))  # 48 patches: the strongest map is 48x uniform, the scale reaches 2**6 = 64x
    assert bar.get_ylim() == pytest.approx((-k, k))
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert "1x" in labels and f"{2**k}x" in labels and f"1/{2**k}" in labels
    pixels = render(fig)
    middle = colour("RdBu_r", 0.5)
    whole = pixel_box(flat, pixels, (0, IMAGE[0], 0, IMAGE[1]))
    assert np.abs(whole - middle).max() <= 3  # every pixel: the neutral colour
    # the focused word: S x uniform at its patch centre (red side), far below uniform elsewhere (blue side)
    centre = pixel_box(focused, pixels, (patch_box(2, 3)[0] + 12, patch_box(2, 3)[1] - 12,
                                         patch_box(2, 3)[2] + 12, patch_box(2, 3)[3] - 12), inset=0)
    assert (centre[:, 0] > centre[:, 2] + 40).all()  # red
    far = pixel_box(focused, pixels, patch_box(5, 0))
    np.testing.assert_allclose(far.mean(0), colour("RdBu_r", 0.0), atol=3)


def test_scales_agree_between_every_view():
    trace = strong_and_weak()
    for make in (lambda s: plot.head_grid(trace, scale=s), lambda s: plot.layer_head_grid(trace, 1, scale=s),
                 lambda s: plot.overlay(trace, 1, scale=s)):
        shared, panel = make("shared"), make("panel")
        assert colorbar_of(shared).get_ylabel() == "attention weight of a patch"
        assert colorbar_of(panel).get_ylabel() == "fraction of the panel's own peak"


# ================================================================== flat patches
@pytest.mark.parametrize("patch", [(0, 0), (2, 5), (5, 7)])
def test_nearest_draws_flat_patches_with_sharp_edges(patch):
    r, c = patch
    att = np.zeros((1, 1, 1, *GRID))
    att[0, 0, 0, r, c] = 1.0
    trace = make_trace(att)
    fig = plot.overlay(trace, 0, alpha=1.0, interp="nearest")
    ax = panels(fig)[0]
    pixels = render(fig)
    inside = pixel_box(ax, pixels, patch_box(r, c), inset=2)  # 2: the axes frame covers the image's outer pixel
    np.testing.assert_allclose(inside, np.broadcast_to(colour("inferno", 1.0), inside.shape), atol=2)
    # every other patch, up to two pixels from its border: the bottom colour
    for rr in range(GRID[0]):
        for cc in range(GRID[1]):
            if (rr, cc) != (r, c):
                other = pixel_box(ax, pixels, patch_box(rr, cc), inset=2)
                np.testing.assert_allclose(other, np.broadcast_to(colour("inferno", 0.0), other.shape), atol=2)
    assert "flat patches" in fig._suptitle.get_text() and "6 x 8 patches" in fig._suptitle.get_text()


def test_nearest_map_matches_torch_nearest_exact():
    att = np.random.default_rng(1).random((1, 2, 2, 7, 9))
    att /= att.sum(axis=(-2, -1), keepdims=True)
    trace = make_trace(att, image_hw=(100, 130))
    got = plot.attention_map(trace, 1, head=1, interp="nearest")
    ref = torch.nn.functional.interpolate(torch.from_numpy(att[0, 1, 1])[None, None], size=(100, 130), mode="nearest-exact")
    np.testing.assert_allclose(got, ref[0, 0].numpy(), rtol=1e-6)


def test_grid_lines_sit_on_the_patch_borders():
    trace = strong_and_weak()
    fig = plot.overlay(trace, 0, interp="nearest", grid_lines=True)
    ax = panels(fig)[0]
    hlines, vlines = ax.collections
    ys = sorted({round(seg[0][1], 6) for seg in hlines.get_segments()})
    xs = sorted({round(seg[0][0], 6) for seg in vlines.get_segments()})
    assert ys == [32.0 * i for i in range(1, 6)] and xs == [32.0 * i for i in range(1, 8)]


# ======================================================================== labels
def test_layer_names_are_unambiguous_at_any_depth():
    assert layer_label(0, 1) == "layer 0 (1st of 1, last)"
    assert layer_label(2, 3) == "layer 2 (3rd of 3, last)"
    assert layer_label(1, 12) == "layer 1 (2nd of 12)"
    assert layer_label(10, 12) == "layer 10 (11th of 12)"
    assert layer_label(11, 12) == "layer 11 (12th of 12, last)"
    assert layer_label(21, 24) == "layer 21 (22nd of 24)"
    assert head_label(None, 8) == "mean of 8 heads" and head_label(3, 8) == "head 3"


def test_titles_say_what_every_number_is():
    att = np.random.default_rng(2).random((3, 2, 3, *GRID))
    att /= att.sum(axis=(-2, -1), keepdims=True)
    trace = make_trace(att, words=["a", "red", "[SEP]"])
    z = trace.logits.astype(np.float64)
    p = np.exp(z[np.arange(3), trace.token_ids] - z.max(1)) / np.exp(z - z.max(1, keepdims=True)).sum(1)
    fig = plot.word_grid(trace)
    titles = [ax.get_title() for ax in panels(fig)]
    assert titles == ["image (colour)", f"a (p={p[0]:.2f})", f"red (p={p[1]:.2f})"]
    top = fig._suptitle.get_text().split("\n")
    assert top[0] == "\u201ca red [SEP]\u201d"
    assert top[1] == ("model toy \u00b7 layer 2 (3rd of 3, last) \u00b7 mean of 2 heads \u00b7 6 x 8 patches, bilinear upsampling"
                      " \u00b7 photo in grey under the map")


def test_without_scores_the_p_label_is_left_out():
    trace = strong_and_weak()
    trace.logits = None  # a trace recorded without logits
    assert [ax.get_title() for ax in panels(plot.word_grid(trace))][1:] == ["red", "a"]
    assert "(p=" not in plot.overlay(trace, 0)._suptitle.get_text()
    assert plot.layer_head_grid(trace, 1) is not None and plot.attention_row(trace, 0) is not None


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("steps", [2, 5, 14])
def test_figure_title_never_touches_panel_titles(steps):
    att = np.random.default_rng(3).random((1, 2, steps, *GRID))
    att /= att.sum(axis=(-2, -1), keepdims=True)
    trace = make_trace(att, words=[f"word{t}" for t in range(steps)])
    for fig in (plot.word_grid(trace), plot.head_grid(trace, words=[0, 1]), plot.layer_head_grid(trace, 0),
                plot.word_grid(trace, font_scale=1.8)):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        top = fig._suptitle.get_window_extent(renderer)
        assert top.y1 <= fig.bbox.y1 + 0.5 and top.x0 >= -0.5 and top.x1 <= fig.bbox.x1 + 0.5  # inside the figure
        for ax in panels(fig):
            for text in (ax.title, ax.yaxis.label):
                if text.get_text():
                    box = text.get_window_extent(renderer)
                    assert not _overlaps(top, box), (text.get_text(), top, box)
                    assert not _overlaps(box, ax.get_window_extent(renderer)) or text is ax.yaxis.label
            for other in panels(fig):
                if other is not ax:
                    assert not _overlaps(ax.get_window_extent(renderer).shrunk(0.99, 0.99), other.get_window_extent(renderer))


def test_font_scale_and_figsize_for_slides():
    trace = strong_and_weak()
    normal, big = plot.word_grid(trace), plot.word_grid(trace, font_scale=1.6)
    assert panels(big)[1].title.get_fontsize() == pytest.approx(1.6 * panels(normal)[1].title.get_fontsize())
    assert colorbar_of(big).yaxis.label.get_fontsize() == pytest.approx(1.6 * colorbar_of(normal).yaxis.label.get_fontsize())
    fixed = plot.word_grid(trace, figsize=(10, 4))
    assert tuple(fixed.get_size_inches()) == pytest.approx((10, 4))
    with pytest.raises(AttnlabError, match="too small"):
        plot.word_grid(trace, figsize=(1, 1))


# ============================================================ extreme aspect ratios
EXTREMES = [(1, 128), (128, 1), (1, 299), (299, 2), (3, 2000)]


@pytest.mark.parametrize("image_hw", EXTREMES)
def test_extreme_aspect_ratios_give_bounded_figures(image_hw, tmp_path):
    H = 1 if image_hw[0] < image_hw[1] else 8
    W = 8 if image_hw[0] < image_hw[1] else 1
    att = np.random.default_rng(4).random((2, 3, 4, H, W))
    att /= att.sum(axis=(-2, -1), keepdims=True)
    trace = make_trace(att, image_hw=image_hw, words=["a", "long", "strip", "[SEP]"])
    figures = {
        "overlay": plot.overlay(trace, 1), "word_grid": plot.word_grid(trace), "head_grid": plot.head_grid(trace),
        "layer_head_grid": plot.layer_head_grid(trace, 0), "attention_row": plot.attention_row(trace, 1),
        "attention_matrix": plot.attention_matrix(trace),
    }
    for name, fig in figures.items():
        w, h = fig.get_size_inches() * fig.dpi
        assert w <= 4000 and h <= 4000 and w * h <= 8e6, (name, w, h)
        path = plot.save_figure(fig, tmp_path / f"{name}.png")
        with Image.open(path) as im:
            assert max(im.size) <= 4000
    assert "drawn stretched" in figures["word_grid"]._suptitle.get_text()
    gif = plot.save_gif(trace, tmp_path / "a.gif")
    with Image.open(gif) as im:
        assert max(im.size) <= 2000
    explorer = attnlab.explore(trace)
    for view in ("averaged", "per-head grid"):
        explorer.view_toggle.value = view
        w, h = explorer.figure.canvas.get_width_height()
        assert w <= 700 and h <= 1000, (view, w, h)


def test_a_1x10000_photo_end_to_end(tmp_path):
    """The reliability issue's case: a 1 x 10000 image through the bundled model, then the default figure."""
    model = attnlab.load_model()
    trace = attnlab.caption(model, np.full((1, 10000, 3), 200, dtype=np.uint8), max_len=4)
    path = plot.save_figure(plot.word_grid(trace), tmp_path / "strip.png")
    with Image.open(path) as im:
        assert im.size[0] <= 3000 and im.size[1] <= 3000
    assert path.stat().st_size < 2_000_000


# ======================================================================= the matrix
def test_attention_row_draws_every_row_and_the_chosen_one_as_a_map():
    att = np.random.default_rng(5).random((2, 3, 4, *GRID))
    att /= att.sum(axis=(-2, -1), keepdims=True)
    trace = make_trace(att, words=["a", "red", "box", "[SEP]"])
    fig = plot.attention_row(trace, 2, layer=0, head="mean")
    matrix_ax, map_ax = panels(fig)
    want = att[0].mean(axis=0).reshape(4, -1)  # (steps, S): the head mean, row-major patches
    np.testing.assert_allclose(np.ma.getdata(matrix_ax.images[0].get_array()), want, rtol=1e-6)
    outline = matrix_ax.patches[0]
    assert (outline.get_y(), outline.get_height(), outline.get_width()) == (2, 1, GRID[0] * GRID[1])
    np.testing.assert_allclose(map_ax.images[1].get_array(), plot.attention_map(trace, 2, layer=0), rtol=1e-5)
    labels = [t.get_text() for t in matrix_ax.get_yticklabels()]
    assert "2: box" in labels
    assert matrix_ax.images[0].get_clim() == map_ax.images[1].get_clim()  # one scale for both


def test_matrix_row_greys_the_rows_without_a_word():
    weights = np.random.default_rng(6).dirichlet(np.ones(20), size=12)  # (L, S) = (12, 20)
    fig = plot.matrix_row(weights, 1, grid=(4, 5), filled=2)
    shown = panels(fig)[0].images[0].get_array()
    assert not shown.mask[:2].any() and shown.mask[2:].all()
    assert panels(fig)[0].images[0].get_clim()[1] == pytest.approx(weights[:2].max())
    for bad, message in [({"filled": 0}, "filled"), ({"grid": (3, 5)}, "20 columns"), ({"row": 5, "filled": 2}, "row")]:
        with pytest.raises(AttnlabError, match=message):
            plot.matrix_row(weights, **({"row": 1, "grid": (4, 5)} | bad))


# ========================================================================== export
def test_save_figure_writes_pdf(tmp_path):
    fig = plot.word_grid(strong_and_weak())
    path = plot.save_figure(fig, tmp_path / "slides.PDF")
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]
    assert [p.name for p in tmp_path.iterdir()] == ["slides.PDF"]


def test_save_gif_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "out.gif").mkdir()
    with pytest.raises(AttnlabError, match="is a folder") as info:
        plot.save_gif(strong_and_weak(), tmp_path / "out.gif")
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["out.gif"] and not any((tmp_path / "out.gif").iterdir())


def test_gif_frames_share_one_scale(tmp_path):
    path = plot.save_gif(strong_and_weak(), tmp_path / "w.gif", alpha=1.0, interp="nearest")
    frames = []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")).astype(np.float64))
    changed = np.abs(frames[1] - frames[0]).max(axis=-1) > 40  # the map (the colour bar stays)
    weak = frames[1][changed]  # (n, 3) the second word's map
    # the weak word's best patch is drawn 0.2 of the way up the colormap, nothing at the top
    assert np.linalg.norm(weak - colour("inferno", 0.2), axis=-1).min() < 12
    assert np.linalg.norm(weak - colour("inferno", 1.0), axis=-1).min() > 60


def test_the_numbers_need_no_matplotlib():
    """attnlab.plot.maps is numpy only, and importing attnlab.plot loads no plotting library until a view draws."""
    import subprocess
    import sys

    code = ("import sys, attnlab, attnlab.plot, attnlab.plot.maps; "
            "print(sorted(m for m in ('matplotlib', 'seaborn', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ================================================================ under the map
RED = (230, 20, 20)


def red_photo_trace() -> CaptionTrace:
    """A red photo; step 0 all weight on patch (1, 2), so every other patch is the colour map's 0."""
    att = np.zeros((1, 1, 1, *GRID))
    att[0, 0, 0, 1, 2] = 1.0
    trace = make_trace(att, words=["red"])
    trace.image = np.zeros((*IMAGE, 3), dtype=np.uint8) + np.array(RED, dtype=np.uint8)
    return trace


@pytest.mark.parametrize("underlay", ["grey", "colour", "none"])
def test_the_photo_lies_under_the_map_in_grey_by_default(underlay):
    trace = red_photo_trace()
    options = {} if underlay == "grey" else {"underlay": underlay}
    fig = plot.overlay(trace, 0, alpha=0.5, interp="nearest", **options)
    (ax,) = panels(fig)
    zero = np.array(matplotlib.colormaps["inferno"](0.0)[:3]) * 255.0  # a patch with no weight
    luma = 0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2]  # BT.601, written out here
    under = {"grey": np.full(3, round(luma)), "colour": np.array(RED, float), "none": None}[underlay]
    want = zero if under is None else 0.5 * zero + 0.5 * under  # "none": the map alone, opaque
    got = pixel_box(ax, render(fig), patch_box(4, 6))
    np.testing.assert_allclose(got.mean(0), want, atol=3)
    if underlay == "grey":
        assert np.ptp(got.mean(0) - 0.5 * zero) < 3  # no trace of the photo's red
    note = {"grey": "photo in grey under the map", "colour": "photo in colour under the map", "none": "map only, no photo"}
    assert fig._suptitle.get_text().split("\n")[-1].endswith(note[underlay])


def test_every_map_view_takes_underlay_and_says_it():
    trace = red_photo_trace()
    for view in (plot.word_grid, plot.head_grid):
        assert "photo in colour under the map" in view(trace, underlay="colour")._suptitle.get_text()
    assert "photo in grey" in plot.layer_head_grid(trace, 0)._suptitle.get_text()
    fig = plot.attention_row(trace, 0, underlay="none")
    assert any("map only, no photo" in ax.get_title() for ax in fig.axes)
    with pytest.raises(AttnlabError, match="underlay='sepia' is not supported: use 'grey'"):
        plot.word_grid(trace, underlay="sepia")


def test_outlines_are_drawn_in_cyan_on_the_object_border_only():
    trace = red_photo_trace()
    mask = np.zeros(IMAGE, dtype=bool)
    mask[64:128, 96:160] = True  # patches (2..3, 3..4): 32 px each
    fig = plot.overlay(trace, 0, alpha=1.0, interp="nearest", underlay="none", outlines=[mask])
    (ax,) = panels(fig)
    assert "1 object outline in cyan" in fig._suptitle.get_text()
    pixels = render(fig)
    cyan = np.array([0, 229, 255], float)
    border = pixel_box(ax, pixels, (60, 68, 100, 156), inset=0)  # along the top edge of the square
    inside = pixel_box(ax, pixels, (76, 116, 108, 148))  # well inside: the map's 0, no line
    assert np.linalg.norm(border - cyan, axis=1).min() < 40
    assert np.linalg.norm(inside - cyan, axis=1).min() > 150
    with pytest.raises(AttnlabError, match="2-D boolean mask"):
        plot.overlay(trace, 0, outlines=[np.zeros((2, 2, 2))])


def test_the_gif_says_what_lies_under_the_map(tmp_path):
    trace = red_photo_trace()
    path = plot.save_gif(trace, tmp_path / "a.gif", underlay="colour")
    with Image.open(path) as gif:
        assert gif.size[0] > 0
    with pytest.raises(AttnlabError, match="underlay="):
        plot.save_gif(trace, tmp_path / "b.gif", underlay=3)


def test_a_caption_cut_at_the_length_limit_says_so_in_the_title(tmp_path):
    trace = red_photo_trace()
    assert plot.word_grid(trace)._suptitle.get_text().split("\n")[0] == "\u201cred\u201d"  # the trace cannot tell
    trace.meta = {"stopped": "max_len"}
    assert plot.word_grid(trace)._suptitle.get_text().split("\n")[0] == "\u201cred\u201d (cut at the length limit: no end token)"
    page = attnlab.export_html(trace, tmp_path / "p.html").read_text()
    assert '<h1 id="caption">red (cut at the length limit: no end token)</h1>' in page
    trace.meta = {"stopped": "end"}
    assert "cut at" not in plot.word_grid(trace)._suptitle.get_text()
