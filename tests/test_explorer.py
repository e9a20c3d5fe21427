"""attnlab.explorer: the widgets drive the figure, the figure is updated in place, the PNG is right."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ipywidgets = pytest.importorskip("ipywidgets")

from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.explorer import VIEW_AVERAGED, VIEW_GRID, encode_png, explore  # noqa: E402
from attnlab.plot import attention_map  # noqa: E402
from attnlab.trace import CaptionTrace  # noqa: E402

GRID = (7, 9)
IMAGE = (84, 108)  # 12 px per patch
GREY = 128
LAYERS, HEADS, STEPS = 2, 3, 4
WORDS = ["a", "red", "box", "[SEP]"]


def spot(layer: int, head: int, step: int) -> tuple[int, int]:
    """A different patch for every (layer, head, step)."""
    return (layer * 3 + step) % GRID[0], (head * 3 + step * 2 + layer) % GRID[1]


def make_trace() -> CaptionTrace:
    att = np.zeros((LAYERS, HEADS, STEPS, *GRID), dtype=np.float32)  # (layers, heads, steps, H, W)
    for l in range(LAYERS):
        for h in range(HEADS):
            for t in range(STEPS):
                att[(l, h, t, *spot(l, h, t))] = 1.0
    rng = np.random.default_rng(0)
    return CaptionTrace(
        token_ids=np.arange(STEPS),
        words=WORDS,
        logits=rng.standard_normal((STEPS, 9)).astype(np.float32),
        cross_attention=att,
        grid=GRID,
        image=np.full((*IMAGE, 3), GREY, dtype=np.uint8),
    )


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(np.int64)  # (h, w, 3)


def shown(amap: np.ndarray) -> np.ndarray:
    """What the explorer colours with its default shared scale: the weights themselves."""
    return amap.astype(np.float32)


def hot_location(heat, pixels: np.ndarray, alpha: float) -> tuple[float, float]:
    """Data (x, y) of the pixel in ``heat``'s Axes closest to the colour of the map's largest value, blended over grey.

    With the shared scale the colour bar's top is a whole patch's weight; bilinear upsampling puts a little
    less on any pixel, so the brightest colour drawn is the map's maximum over the scale's top.
    """
    ax = heat.axes
    value = float(np.max(heat.get_array())) / heat.get_clim()[1]
    hot = alpha * np.array(matplotlib.colormaps["inferno"](value)[:3]) * 255 + (1 - alpha) * GREY
    box = ax.get_window_extent()
    h = pixels.shape[0]
    r0, r1, c0, c1 = int(math.ceil(h - box.y1)), int(h - box.y0), int(math.ceil(box.x0)), int(box.x1)
    dist = np.linalg.norm(pixels[r0:r1, c0:c1] - hot, axis=-1)
    assert dist.min() < 12, "the hot colour is not drawn"
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    x, y = ax.transData.inverted().transform((c0 + j + 0.5, h - (r0 + i) - 0.5))
    return float(x), float(y)


def title_lines(w) -> list[str]:
    """The explorer figure's title: the word line, then the layer/head/model line."""
    return [t.get_text() for t in w.figure.texts]  # the suptitle (the word), then the second line


def in_patch(x: float, y: float, patch: tuple[int, int]) -> bool:
    ph, pw = IMAGE[0] / GRID[0], IMAGE[1] / GRID[1]
    r, c = patch
    return r * ph <= y <= (r + 1) * ph and c * pw <= x <= (c + 1) * pw


@pytest.fixture
def trace():
    return make_trace()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_explore_returns_a_vbox_with_its_controls(trace):
    w = explore(trace)
    assert isinstance(w, ipywidgets.VBox)
    assert isinstance(w.slider, ipywidgets.IntSlider)
    assert (w.slider.min, w.slider.max, w.slider.value) == (0, STEPS - 1, 0)
    assert isinstance(w.layer_dropdown, ipywidgets.Dropdown) and w.layer_dropdown.value == LAYERS - 1
    assert isinstance(w.head_dropdown, ipywidgets.Dropdown) and w.head_dropdown.value == "mean"
    assert list(w.head_dropdown.options) == [("mean", "mean"), ("0", 0), ("1", 1), ("2", 2)]
    assert isinstance(w.view_toggle, ipywidgets.ToggleButtons)
    assert list(w.view_toggle.options) == [VIEW_AVERAGED, VIEW_GRID]
    assert isinstance(w.alpha_slider, ipywidgets.FloatSlider)
    assert isinstance(w.smooth_slider, ipywidgets.FloatSlider)
    assert isinstance(w.save_button, ipywidgets.Button)
    assert isinstance(w.image, ipywidgets.Image) and w.image.format == "png"
    assert w.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a" in w.word_label.value


def test_png_in_the_widget_is_the_figure(trace):
    w = explore(trace, layer=0, head=1)
    w.slider.value = 2
    shown = decode(w.image.value)
    # a full redraw of the same figure gives the same pixels as the incremental redraw
    w.figure.canvas.draw()
    full = np.asarray(w.figure.canvas.buffer_rgba())[..., :3].astype(np.int64)
    assert shown.shape == full.shape
    np.testing.assert_array_equal(shown, full)


def test_encode_png_round_trips():
    rgba = np.random.default_rng(1).integers(0, 256, size=(37, 53, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode_png(rgba)), rgba[..., :3])


def test_slider_redraws_in_place_with_the_new_word(trace):
    w = explore(trace, layer=1, head=2)
    fig, heat, title = w.figure, w.heat_image, w.figure._suptitle
    seen = {w.image.value}
    for step in (1, 2, 0, 3):
        before = w.image.value
        w.slider.value = step
        assert w.image.value != before
        seen.add(w.image.value)
        assert w.figure is fig and w.heat_image is heat and w.figure._suptitle is title
        assert heat in fig.axes[0].images and len(fig.axes[0].images) == 2  # nothing added
        first, second = title_lines(w)
        assert first.startswith(f"step {step}: {WORDS[step]} (p=")
        assert second == "layer 1 (2nd of 2, last) \u00b7 head 2 \u00b7 model unknown \u00b7 photo in grey"
        assert w.word_label.value.startswith(f"{step}: {WORDS[step]} ")
        np.testing.assert_allclose(heat.get_array(), shown(attention_map(trace, step, layer=1, head=2)), rtol=1e-6)
        x, y = hot_location(heat, decode(w.image.value), w.alpha_slider.value)
        assert in_patch(x, y, spot(1, 2, step)), (step, x, y)
    assert len(seen) == 4


def test_head_and_layer_dropdowns_update(trace):
    w = explore(trace)
    heat = w.heat_image
    before = w.image.value
    w.head_dropdown.value = 0
    assert w.image.value != before
    assert w.heat_image is heat
    np.testing.assert_allclose(heat.get_array(), shown(attention_map(trace, 0, layer=-1, head=0)), rtol=1e-6)
    x, y = hot_location(w.heat_image, decode(w.image.value), w.alpha_slider.value)
    assert in_patch(x, y, spot(LAYERS - 1, 0, 0))

    before = w.image.value
    w.layer_dropdown.value = 0
    assert w.image.value != before
    np.testing.assert_allclose(heat.get_array(), shown(attention_map(trace, 0, layer=0, head=0)), rtol=1e-6)
    x, y = hot_location(w.heat_image, decode(w.image.value), w.alpha_slider.value)
    assert in_patch(x, y, spot(0, 0, 0))
    assert "layer 0" in w.word_label.value and "head 0" in w.word_label.value

    w.head_dropdown.value = "mean"
    mean = np.mean([attention_map(trace, 0, layer=0, head=h) for h in range(HEADS)], axis=0)
    np.testing.assert_allclose(heat.get_array(), shown(mean), rtol=1e-6)


def test_alpha_and_smoothing_sliders(trace):
    w = explore(trace, head=1)
    heat = w.heat_image
    before = w.image.value
    w.alpha_slider.value = 0.25
    assert heat.get_alpha() == 0.25 and w.image.value != before
    before = w.image.value
    w.smooth_slider.value = 1.5
    assert w.image.value != before and w.heat_image is heat
    np.testing.assert_allclose(heat.get_array(), shown(attention_map(trace, 0, head=1, smooth=1.5)), rtol=1e-6)


def test_per_head_grid_view(trace):
    w = explore(trace, layer=0)
    averaged_fig, heat = w.figure, w.heat_image
    assert w.grid_images == []  # built only when first shown
    w.view_toggle.value = VIEW_GRID
    grid_fig = w.figure
    assert grid_fig is not averaged_fig
    assert w.head_dropdown.disabled
    assert len(w.grid_images) == HEADS + 1
    titles = [img.axes.get_title() for img in w.grid_images]
    assert titles == ["head 0", "head 1", "head 2", "mean"]
    images = list(w.grid_images)
    pixels = decode(w.image.value)
    assert pixels.shape[:2] == tuple(reversed(grid_fig.canvas.get_width_height()))
    for h, img in enumerate(images[:HEADS]):
        np.testing.assert_allclose(img.get_array(), shown(attention_map(trace, 0, layer=0, head=h)), rtol=1e-6)
        x, y = hot_location(img, pixels, w.alpha_slider.value)
        assert in_patch(x, y, spot(0, h, 0)), (h, x, y)
    assert not np.allclose(images[0].get_array(), images[1].get_array())
    mean = np.mean([attention_map(trace, 0, layer=0, head=h) for h in range(HEADS)], axis=0)
    np.testing.assert_allclose(images[HEADS].get_array(), shown(mean), rtol=1e-6)

    before, n_axes = w.image.value, len(grid_fig.axes)
    assert n_axes == HEADS + 2  # the panels and the colour bar
    w.slider.value = 2
    assert w.image.value != before
    assert w.grid_images == images and all(a is b for a, b in zip(w.grid_images, images))
    assert len(grid_fig.axes) == n_axes  # nothing added
    pixels = decode(w.image.value)
    for h, img in enumerate(images[:HEADS]):
        x, y = hot_location(img, pixels, w.alpha_slider.value)
        assert in_patch(x, y, spot(0, h, 2)), (h, x, y)
    grid_fig.canvas.draw()
    np.testing.assert_array_equal(pixels, np.asarray(grid_fig.canvas.buffer_rgba())[..., :3])

    w.view_toggle.value = VIEW_AVERAGED
    assert w.figure is averaged_fig and w.heat_image is heat and not w.head_dropdown.disabled
    np.testing.assert_allclose(heat.get_array(), shown(attention_map(trace, 2, layer=0)), rtol=1e-6)


def test_save_button_writes_the_current_figure(trace, tmp_path):
    w = explore(trace)
    w.slider.value = 1
    target = tmp_path / "sub" / "view.png"
    w.path_text.value = str(target)
    w.save_button.click()
    assert target.is_file()
    assert str(target) in w.status.value and w.status.value.startswith("saved to")
    with Image.open(target) as im:
        assert im.format == "PNG"
        fw, fh = w.figure.get_size_inches()
        assert im.size == (int(fw * 150), int(fh * 150))  # save_dpi; Agg truncates
        saved = np.asarray(im.convert("RGB")).astype(np.int64)
    assert saved.std() > 10
    # after the save (a redraw at another dpi) the widget still shows the right, full picture
    w.slider.value = 2
    shown = decode(w.image.value)
    w.figure.canvas.draw()
    np.testing.assert_array_equal(shown, np.asarray(w.figure.canvas.buffer_rgba())[..., :3])
    x, y = hot_location(w.heat_image, shown, w.alpha_slider.value)
    # head "mean": each head puts 1/3 on its own patch, so the peak is on one of those patches
    assert any(in_patch(x, y, spot(LAYERS - 1, h, 2)) for h in range(HEADS))


def test_save_button_reports_a_bad_path(trace, tmp_path):
    w = explore(trace)
    w.path_text.value = str(tmp_path / "view.jpg")
    w.save_button.click()
    assert w.status.value.startswith("not saved") and ".png" in w.status.value
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [({"head": 3}, "head 3"), ({"layer": 5}, "layer 5"), ({"step": 9}, "step 9"), ({"alpha": 2}, "alpha")],
)
def test_bad_arguments(trace, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        explore(trace, **kwargs)


# ------------------------------------------------------------- colour scales, size, saving
def two_layer_trace(model_name: str = "toy") -> CaptionTrace:
    """Layer 0: every map has a peak of 0.5 (two patches); layer 1: one patch (peak 1). Heads agree."""
    att = np.zeros((2, 2, 3, *GRID), dtype=np.float32)  # (layers, heads, steps, H, W)
    for t in range(3):
        att[0, :, t, 1, t] = att[0, :, t, 5, t + 3] = 0.5
        att[1, :, t, 3, 2 * t] = 1.0
    return CaptionTrace(token_ids=np.arange(3), words=["a", "b", "c"], logits=np.zeros((3, 4), dtype=np.float32),
                        cross_attention=att, grid=GRID, image=np.full((*IMAGE, 3), GREY, dtype=np.uint8),
                        model_name=model_name)


def test_shared_scale_holds_across_words_and_follows_the_layer():
    w = explore(two_layer_trace(), layer=0)
    assert w.heat_image.get_clim() == (0.0, 0.5)  # the largest patch weight of layer 0, any word
    colorbar = w.figure.axes[-1]
    assert colorbar.get_label() == "<colorbar>" and colorbar.get_ylabel() == "attention weight of a patch"
    for step in (1, 2):
        w.slider.value = step
        assert w.heat_image.get_clim() == (0.0, 0.5)
        assert "peak weight 0.500" in w.word_label.value
    w.layer_dropdown.value = 1
    assert w.heat_image.get_clim() == (0.0, 1.0)
    assert "peak weight 1.000" in w.word_label.value
    # after the scale changed, the blitted picture still equals a full redraw (the colour bar was redrawn)
    shown_px = decode(w.image.value)
    w.figure.canvas.draw()
    np.testing.assert_array_equal(shown_px, np.asarray(w.figure.canvas.buffer_rgba())[..., :3])


def test_panel_scale_divides_by_each_maps_own_peak():
    trace = two_layer_trace()
    w = explore(trace, layer=0, scale="panel")
    assert w.heat_image.get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(w.heat_image.get_array(), attention_map(trace, 0, layer=0) / 0.5, rtol=1e-6)
    assert "peak weight 0.500" in w.word_label.value  # the label keeps the real peak
    assert any(t.get_text() == "peak 0.500" for t in w.figure.axes[0].texts)


def test_nearest_draws_the_patch_grid_itself():
    trace = two_layer_trace()
    w = explore(trace, layer=1, interp="nearest")
    np.testing.assert_array_equal(w.heat_image.get_array(), trace.cross_attention[1, :, 0].mean(axis=0))


def test_size_is_configurable_and_bounded(trace):
    w = explore(trace, width_inches=10, dpi=100)
    assert w.figure.canvas.get_width_height()[0] == 1000
    assert w.image.layout.width == "1000px"
    for kwargs, message in [({"dpi": 1e5}, "dpi"), ({"dpi": float("nan")}, "dpi"), ({"width_inches": 1000}, "width_inches"),
                            ({"save_dpi": 0}, "save_dpi"), ({"smooth": 1e300}, "smooth"), ({"scale": "log"}, "scale")]:
        with pytest.raises(AttnlabError, match=message) as info:
            explore(trace, **kwargs)
        assert "\n" not in str(info.value)


def test_saved_figure_names_word_layer_head_and_model(tmp_path):
    trace = two_layer_trace("my-captioner")
    w = explore(trace, layer=0, head=1)
    w.slider.value = 2
    saved = w.save(tmp_path / "view.png")
    title = " / ".join(title_lines(w))
    assert "step 2: c" in title and "layer 0 (1st of 2)" in title and "head 1" in title and "my-captioner" in title
    with Image.open(saved) as im:
        assert im.size == tuple(int(v * 150) for v in w.figure.get_size_inches())
    w.view_toggle.value = VIEW_GRID
    assert "every head" in title_lines(w)[1] and "my-captioner" in title_lines(w)[1]


def test_default_save_name_is_unique_per_trace(tmp_path, monkeypatch):
    a, b = two_layer_trace(), make_trace()
    name_a, name_b = explore(a).path_text.value, explore(b).path_text.value
    assert name_a != name_b and name_a != "attention.png"
    assert name_a.startswith("attention-toy-") and name_a.endswith(".png")
    assert explore(two_layer_trace()).path_text.value == name_a  # the same trace, the same name
    c = two_layer_trace()
    c.image = c.image.copy()
    c.image[0, 0] = 0  # another picture
    assert explore(c).path_text.value != name_a


def test_save_never_replaces_a_file_it_did_not_write(trace, tmp_path):
    target = tmp_path / "mine.png"
    target.write_bytes(b"a photo")
    w = explore(trace)
    w.path_text.value = str(target)
    w.save_button.click()
    assert w.status.value.startswith("not saved") and "already exists" in w.status.value
    assert target.read_bytes() == b"a photo"
    w.path_text.value = str(tmp_path / "new.png")
    w.save_button.click()
    first = (tmp_path / "new.png").read_bytes()
    w.slider.value = 2
    w.save_button.click()  # its own file: replaced
    assert w.status.value.startswith("saved to") and (tmp_path / "new.png").read_bytes() != first
    w.save(target, overwrite=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_explorer_draws_the_photo_as_asked_and_says_so():
    trace = make_trace()
    mask = np.zeros(trace.image.shape[:2], dtype=bool)
    mask[10:30, 10:30] = True
    w = explore(trace, underlay="none", outlines=[mask])
    assert title_lines(w)[1].endswith("\u00b7 map only, no photo, 1 outline")
    w.alpha_slider.value = 0.2
    assert w.heat_image.get_alpha() == 1.0  # no photo under it: the map stays opaque whatever the slider
    assert title_lines(explore(trace, underlay="colour"))[1].endswith("photo in colour")
    grey = explore(trace)
    base = next(im for im in grey.figure.axes[0].images if im is not grey.heat_image).get_array()
    assert np.ptp(np.asarray(base), axis=-1).max() == 0  # the photo under the map: R = G = B
    with pytest.raises(AttnlabError, match="underlay="):
        explore(trace, underlay="sepia")
