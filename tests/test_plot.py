"""attnlab.plot: maps land on the right pixels, every view draws what it says, exports parse."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.plot import (  # noqa: E402
    attention_map,
    attention_matrix,
    head_entropy,
    head_grid,
    head_peak,
    head_stats,
    layer_head_grid,
    overlay,
    save_figure,
    save_gif,
    word_grid,
)
from attnlab.trace import CaptionTrace  # noqa: E402

GREY = 128


# ----------------------------------------------------------------- helpers
def make_trace(attention: np.ndarray, image_hw: tuple[int, int], words=None, seed: int = 0, image=None) -> CaptionTrace:
    """A trace around ``attention`` ``(layers, heads, steps, H, W)`` and a uniform grey image."""
    layers, heads, steps, H, W = attention.shape
    rng = np.random.default_rng(seed)
    if words is None:
        words = [f"w{t}" for t in range(steps)]
    if image is None:
        image = np.full((*image_hw, 3), GREY, dtype=np.uint8)  # (height, width, 3)
    return CaptionTrace(
        token_ids=np.arange(steps) % 7,
        words=words,
        logits=rng.standard_normal((steps, 7)).astype(np.float32),  # (steps, vocab)
        cross_attention=attention.astype(np.float32),
        grid=(H, W),
        image=image,
    )


def one_hot(shape: tuple[int, ...], spots: dict[tuple[int, int, int], tuple[int, int]]) -> np.ndarray:
    """``(layers, heads, steps, H, W)``: all weight of map [l, h, t] on patch ``spots[(l, h, t)]``."""
    att = np.zeros(shape, dtype=np.float32)
    for (l, h, t), (r, c) in spots.items():
        att[l, h, t, r, c] = 1.0
    return att


def random_attention(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``(layers, heads, steps, H, W)`` random maps, each summing to 1."""
    att = np.random.default_rng(seed).random(shape) ** 4
    return (att / att.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def patch_box(r: int, c: int, grid: tuple[int, int], image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel box (row0, row1, col0, col1) of patch (r, c): the grid is stretched over the image."""
    H, W = grid
    height, width = image_hw
    return r * height / H, (r + 1) * height / H, c * width / W, (c + 1) * width / W


def torch_upsample(grid_map: np.ndarray, image_hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Independent reference: torch's interpolate of an ``(H, W)`` map to ``(height, width)``."""
    t = torch.from_numpy(np.asarray(grid_map, dtype=np.float64))[None, None]  # (1, 1, H, W)
    out = torch.nn.functional.interpolate(t, size=image_hw, mode=mode, align_corners=False)
    return out[0, 0].clamp(min=0).numpy()  # (height, width)


def render(fig) -> np.ndarray:
    """The figure's pixels ``(height_px, width_px, 3)`` uint8 as Agg draws them."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def blend(cmap_name: str, value: float, alpha: float) -> np.ndarray:
    """The RGB (0..255) a map value shows as over the grey image."""
    rgb = np.array(matplotlib.colormaps[cmap_name](value)[:3]) * 255.0
    return alpha * rgb + (1 - alpha) * GREY


def pixel_to_data(ax, pixels: np.ndarray, row: int, col: int) -> tuple[float, float]:
    """Data (x, y) = (image column, image row) under the figure pixel at buffer (row, col)."""
    height_px = pixels.shape[0]
    x, y = ax.transData.inverted().transform((col + 0.5, height_px - row - 0.5))
    return float(x), float(y)


def data_to_pixel(ax, pixels: np.ndarray, x: float, y: float) -> tuple[int, int]:
    """Buffer (row, col) of the figure pixel showing data point (x, y)."""
    dx, dy = ax.transData.transform((x, y))
    return int(pixels.shape[0] - dy), int(dx)


def closest_pixel(ax, pixels: np.ndarray, colour: np.ndarray) -> tuple[float, float, float]:
    """Inside ``ax``'s box: data (x, y) of the pixel closest to ``colour``, and its distance."""
    box = ax.get_window_extent()
    height_px = pixels.shape[0]
    r0, r1 = int(math.ceil(height_px - box.y1)), int(height_px - box.y0)
    c0, c1 = int(math.ceil(box.x0)), int(box.x1)
    region = pixels[r0:r1, c0:c1].astype(np.float64)  # (rows, cols, 3)
    dist = np.linalg.norm(region - colour, axis=-1)  # (rows, cols)
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    x, y = pixel_to_data(ax, pixels, r0 + i, c0 + j)
    return x, y, float(dist[i, j])


def panels_of(fig) -> list:
    """The figure's visible panels, in order (not its colour bar)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


def inside(x: float, y: float, box: tuple[float, float, float, float]) -> bool:
    row0, row1, col0, col1 = box
    return row0 <= y <= row1 and col0 <= x <= col1


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ============================================================ attention_map
GRID = (14, 19)
IMAGE = (224, 299)


@pytest.mark.parametrize("patch", [(0, 0), (3, 15), (7, 9), (13, 18), (13, 0), (0, 18)])
def test_single_patch_lights_up_its_box_on_a_non_square_grid(patch):
    r, c = patch
    trace = make_trace(one_hot((1, 2, 1, *GRID), {(0, 0, 0): patch, (0, 1, 0): patch}), IMAGE)
    amap = attention_map(trace, 0)
    assert amap.shape == IMAGE

    row0, row1, col0, col1 = patch_box(r, c, GRID, IMAGE)
    i, j = np.unravel_index(np.argmax(amap), amap.shape)
    assert row0 <= i < row1 and col0 <= j < col1

    rows = np.arange(IMAGE[0])[:, None] + 0.5  # pixel centres
    cols = np.arange(IMAGE[1])[None, :] + 0.5
    ph, pw = IMAGE[0] / GRID[0], IMAGE[1] / GRID[1]
    # bilinear spreads a patch over +-1 patch from its centre: nothing beyond half a patch past its box
    near = (rows > row0 - ph / 2 - 1) & (rows < row1 + ph / 2 + 1) & (cols > col0 - pw / 2 - 1) & (cols < col1 + pw / 2 + 1)
    assert amap[~near].max() == 0.0
    # most of the mass is inside the box: a bilinear tent keeps 3/4 of its mass within +-half a patch
    # per axis (9/16 in 2-D, more at the image border), a bit less once sampled at ~16 pixels per patch
    in_box = (rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1)
    assert amap[in_box].sum() / amap.sum() > 0.5


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_attention_map_matches_torch_interpolate(mode):
    att = random_attention((2, 3, 4, *GRID), seed=1)
    trace = make_trace(att, IMAGE)
    for layer, head, step in [(0, 0, 0), (1, 2, 3), (-1, 1, 2)]:
        got = attention_map(trace, step, layer=layer, head=head, interp=mode)
        want = torch_upsample(att[layer, head, step], IMAGE, mode)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_head_mean_is_the_mean_over_heads():
    att = random_attention((2, 4, 3, *GRID), seed=2)
    trace = make_trace(att, IMAGE)
    for step in range(3):
        got = attention_map(trace, step, layer=0, head="mean")
        want = torch_upsample(att[0, :, step].astype(np.float64).mean(axis=0), IMAGE)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        per_head = np.stack([attention_map(trace, step, layer=0, head=h) for h in range(4)])
        np.testing.assert_allclose(got, per_head.mean(axis=0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got, torch_upsample(trace.mean_heads()[0, step], IMAGE), rtol=1e-5, atol=1e-8)


def test_layer_selection_picks_that_layer():
    spots = {(0, h, 0): (2, 3) for h in range(2)} | {(1, h, 0): (11, 16) for h in range(2)}
    spots |= {(2, h, 0): (6, 1) for h in range(2)}
    trace = make_trace(one_hot((3, 2, 1, *GRID), spots), IMAGE)
    for layer, patch in [(0, (2, 3)), (1, (11, 16)), (2, (6, 1)), (-1, (6, 1)), (-3, (2, 3))]:
        amap = attention_map(trace, 0, layer=layer)
        i, j = np.unravel_index(np.argmax(amap), amap.shape)
        row0, row1, col0, col1 = patch_box(*patch, GRID, IMAGE)
        assert row0 <= i < row1 and col0 <= j < col1, (layer, patch, (i, j))


def test_smoothing_is_a_reflecting_gaussian_on_the_grid():
    att = one_hot((1, 1, 1, *GRID), {(0, 0, 0): (1, 17)})
    trace = make_trace(att, IMAGE)
    sigma = 1.3
    # independent reference: pad with half-sample symmetric reflection, convolve rows then columns
    radius = int(math.ceil(4 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(att[0, 0, 0].astype(np.float64), radius, mode="symmetric")
    blurred = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, padded)
    blurred = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, blurred)  # (H, W)
    assert blurred.shape == GRID
    np.testing.assert_allclose(blurred.sum(), 1.0, rtol=1e-12)  # reflection keeps the weight
    got = attention_map(trace, 0, smooth=sigma)
    np.testing.assert_allclose(got, torch_upsample(blurred, IMAGE), rtol=1e-6, atol=1e-12)
    sharp = attention_map(trace, 0)
    assert got.max() < sharp.max()
    i, j = np.unravel_index(np.argmax(got), got.shape)
    row0, row1, col0, col1 = patch_box(1, 17, GRID, IMAGE)
    assert row0 <= i < row1 and col0 <= j < col1


def test_padded_batch_entry_maps_patches_to_their_pixels():
    # a 240x304 image padded into a 256x320 batch: its own grid is the cropped 15x19 of the batch's 16x20
    grid, image_hw = (15, 19), (240, 304)
    spots = {(0, 0, 0): (14, 18), (0, 0, 1): (0, 0), (0, 0, 2): (7, 9), (0, 0, 3): (14, 0)}
    trace = make_trace(one_hot((1, 1, 4, *grid), spots), image_hw)
    for step, (r, c) in enumerate(spots.values()):
        amap = attention_map(trace, step)
        i, j = np.unravel_index(np.argmax(amap), amap.shape)
        assert (16 * r <= i < 16 * r + 16) and (16 * c <= j < 16 * c + 16), (step, (r, c), (i, j))
        fig = overlay(trace, step, alpha=1.0)
        pixels = render(fig)
        # shared scale: the top colour is a whole patch's weight (1); bilinear puts a bit less at any pixel
        x, y, dist = closest_pixel(fig.axes[0], pixels, blend("inferno", amap.max(), 1.0))
        assert dist < 12
        assert inside(x, y, patch_box(r, c, grid, image_hw)), (step, (r, c), (x, y))
        plt.close(fig)


# =================================================================== views
def test_overlay_puts_the_hot_colour_on_the_patch():
    patch, far = (3, 15), (11, 2)
    alpha = 0.7
    trace = make_trace(one_hot((1, 1, 2, *GRID), {(0, 0, 0): (0, 0), (0, 0, 1): patch}), IMAGE, words=["a", "dog"])
    fig = overlay(trace, 1, alpha=alpha)
    ax = fig.axes[0]
    assert fig._suptitle.get_text().startswith("step 1: dog (p=")
    assert len(fig.axes) == 2  # the image and its colorbar
    pixels = render(fig)

    hot = blend("inferno", attention_map(trace, 1).max(), alpha)  # scale 0..1 (the patch's weight)
    x, y, dist = closest_pixel(ax, pixels, hot)
    # the map's peak is ~1 at the patch centre: a pixel there shows the top of the colormap
    assert dist < 12, f"hot colour {hot} not drawn (closest {dist:.1f} away)"
    assert inside(x, y, patch_box(*patch, GRID, IMAGE)), (x, y)

    row0, row1, col0, col1 = patch_box(*far, GRID, IMAGE)
    r, c = data_to_pixel(ax, pixels, (col0 + col1) / 2, (row0 + row1) / 2)
    np.testing.assert_allclose(pixels[r, c], blend("inferno", 0.0, alpha), atol=2)


def test_overlay_draws_attention_map_data():
    att = random_attention((2, 3, 3, *GRID), seed=3)
    trace = make_trace(att, IMAGE)
    fig = overlay(trace, 2, layer=0, head=1, smooth=0.5, cmap="viridis", alpha=0.3)
    heat = fig.axes[0].images[1]
    want = attention_map(trace, 2, layer=0, head=1, smooth=0.5)
    np.testing.assert_allclose(heat.get_array(), want, rtol=1e-6)
    assert heat.get_alpha() == 0.3
    assert heat.get_cmap().name == "viridis"
    # one panel, shared scale: 0 to the map's largest patch weight (the blurred grid's peak, >= the upsampled peak)
    grid = att[0, 1, 2].astype(np.float64)
    assert heat.get_clim()[0] == 0.0 and heat.get_clim()[1] >= want.max() - 1e-12
    assert heat.get_clim()[1] <= grid.max()


def test_overlay_into_a_given_axes():
    trace = make_trace(random_attention((1, 2, 2, *GRID)), IMAGE)
    fig, ax = plt.subplots()
    assert overlay(trace, 0, ax=ax, colorbar=False) is fig
    assert len(ax.images) == 2


def test_word_grid_panels_titles_and_hot_spots():
    spots = {(0, 0, 0): (1, 2), (0, 0, 1): (12, 4), (0, 0, 2): (6, 17)}
    words = ["a", "cat", "sits", "[SEP]"]
    att = one_hot((1, 1, 4, *GRID), spots | {(0, 0, 3): (0, 0)})
    trace = make_trace(att, IMAGE, words=words)
    fig = word_grid(trace, alpha=1.0, ncols=2)
    panels = panels_of(fig)
    assert len(panels) == 4  # the image + 3 words: the trailing [SEP] is left out
    assert panels[0].get_title() == "image (colour)"  # the photo as the model saw it; the maps lie over it in grey
    z = trace.logits.astype(np.float64)
    probs = np.exp(z[np.arange(4), trace.token_ids]) / np.exp(z).sum(axis=1)
    pixels = render(fig)
    for ax, step in zip(panels[1:], range(3)):
        assert ax.get_title() == f"{words[step]} (p={probs[step]:.2f})"
        np.testing.assert_allclose(ax.images[1].get_array(), attention_map(trace, step), rtol=1e-6)
        x, y, dist = closest_pixel(ax, pixels, blend("inferno", attention_map(trace, step).max(), 1.0))
        assert dist < 12
        assert inside(x, y, patch_box(*spots[(0, 0, step)], GRID, IMAGE)), (step, x, y)


def test_word_grid_word_selection_in_given_order():
    trace = make_trace(random_attention((1, 1, 4, *GRID)), IMAGE, words=["a", "b", "c", "[SEP]"])
    fig = word_grid(trace, words=[3, 1])
    titles = [ax.get_title() for ax in panels_of(fig)]
    assert [t.split(" ")[0] for t in titles] == ["image", "[SEP]", "b"]


def test_head_grid_shows_each_head_and_the_mean():
    heads, steps = 3, 2
    spots = {(0, h, t): (2 + 4 * h, 3 + 7 * t) for h in range(heads) for t in range(steps)}
    trace = make_trace(one_hot((1, heads, steps, *GRID), spots), IMAGE, words=["red", "box"])
    fig = head_grid(trace, alpha=1.0)
    axes = np.array(panels_of(fig)).reshape(heads + 1, steps)
    assert [a.get_ylabel() for a in axes[:, 0]] == ["head 0", "head 1", "head 2", "mean"]
    assert [a.get_title().split(" ")[0] for a in axes[0]] == ["red", "box"]
    fig.set_dpi(200)  # 1.6-inch panels at 200 dpi: every pixel of the 299-pixel-wide maps is on screen
    pixels = render(fig)
    hot = blend("inferno", attention_map(trace, 0, head=0).max(), 1.0)  # every one-hot map peaks the same
    for h in range(heads):
        for t in range(steps):
            x, y, dist = closest_pixel(axes[h, t], pixels, hot)
            assert dist < 12
            assert inside(x, y, patch_box(*spots[(0, h, t)], GRID, IMAGE)), (h, t, x, y)
    # the heads' panels really differ, and the mean row holds the mean of the heads' maps
    for t in range(steps):
        maps = [axes[h, t].images[1].get_array() for h in range(heads)]
        assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])
        np.testing.assert_allclose(axes[heads, t].images[1].get_array(), np.mean(maps, axis=0), rtol=1e-6, atol=1e-9)


def test_layer_head_grid_is_layers_by_heads_plus_mean():
    att = random_attention((2, 3, 3, *GRID), seed=4)
    trace = make_trace(att, IMAGE)
    fig = layer_head_grid(trace, 1)
    axes = np.array(panels_of(fig)).reshape(2, 4)
    assert [a.get_title() for a in axes[0]] == ["head 0", "head 1", "head 2", "mean"]
    assert [a.get_ylabel() for a in axes[:, 0]] == ["layer 0", "layer 1, last"]
    for layer in range(2):
        for col, head in enumerate([0, 1, 2, "mean"]):
            want = torch_upsample(att[layer, :, 1].mean(axis=0) if head == "mean" else att[layer, head, 1], IMAGE)
            np.testing.assert_allclose(axes[layer, col].images[1].get_array(), want, rtol=1e-5, atol=1e-9)


def test_attention_matrix_rows_are_words_and_columns_patches():
    att = random_attention((2, 3, 4, *GRID), seed=5)
    words = ["a", "big", "dog", "[SEP]"]
    trace = make_trace(att, IMAGE, words=words)
    fig = attention_matrix(trace, layer=0, head="mean", tick_every=19)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    want = att[0, :, :3].astype(np.float64).mean(axis=0).reshape(3, GRID[0] * GRID[1])  # (steps, S)
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(want.shape), want, rtol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0: a", "1: big", "2: dog"]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"({s // 19},{s % 19})" for s in range(0, 266, 19)]
    assert labels[1] == "(1,0)"  # row-major over a 14x19 grid: patch 19 starts row 1

    fig2 = attention_matrix(trace, layer=1, head=2, words=[3, 0], tick_every=7)
    mesh2 = fig2.axes[0].collections[0]
    np.testing.assert_allclose(
        np.asarray(mesh2.get_array()).reshape(2, -1), att[1, 2, [3, 0]].reshape(2, -1), rtol=1e-6
    )
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()][:3] == ["(0,0)", "(0,7)", "(0,14)"]


def test_head_entropy_and_peak_known_values():
    S = GRID[0] * GRID[1]
    att = np.zeros((2, 2, 2, *GRID), dtype=np.float32)
    att[0, 0, :, 4, 4] = 1.0  # one patch: entropy 0, peak 1
    att[0, 1] = 1.0 / S  # uniform: entropy log S, peak 1/S
    att[1, 0, :, 0, 0] = 0.5  # two patches: entropy log 2, peak 1/2
    att[1, 0, :, 13, 18] = 0.5
    att[1, 1, :, 0, :4] = 0.25  # four patches: log 4, 1/4
    trace = make_trace(att, IMAGE)
    ent, peak = head_entropy(trace), head_peak(trace)
    assert ent.shape == peak.shape == (2, 2, 2)
    want_ent = np.array([[0.0, math.log(S)], [math.log(2), math.log(4)]])[:, :, None].repeat(2, axis=2)
    want_peak = np.array([[1.0, 1.0 / S], [0.5, 0.25]])[:, :, None].repeat(2, axis=2)
    np.testing.assert_allclose(ent, want_ent, atol=1e-6)
    np.testing.assert_allclose(peak, want_peak, rtol=1e-6)


def test_head_stats_shows_the_mean_over_words():
    att = random_attention((3, 4, 5, *GRID), seed=6)
    trace = make_trace(att, IMAGE, words=["a", "b", "c", "d", "[SEP]"])
    fig = head_stats(trace)
    by_title = {ax.get_title().split(" ")[0]: ax for ax in fig.axes if ax.get_title()}
    ent_mesh, peak_mesh = by_title["entropy"].collections[0], by_title["peak"].collections[0]
    p = att[:, :, :4].reshape(3, 4, 4, -1).astype(np.float64)  # the [SEP] step is left out
    want_ent = (-(p * np.log(p)).sum(axis=-1)).mean(axis=-1)  # (layers, heads)
    want_peak = p.max(axis=-1).mean(axis=-1)
    np.testing.assert_allclose(np.asarray(ent_mesh.get_array()).reshape(3, 4), want_ent, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(peak_mesh.get_array()).reshape(3, 4), want_peak, rtol=1e-6)


# ================================================================== export
def test_save_figure_png_and_svg_parse(tmp_path):
    trace = make_trace(random_attention((1, 2, 2, *GRID)), IMAGE)
    fig = overlay(trace, 0, figsize=(4, 3))
    png = save_figure(fig, tmp_path / "out" / "map.png", dpi=50)
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == (200, 150)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    assert oct(os.stat(png).st_mode & 0o777) != "0o600"  # ordinary permissions, not mkstemp's

    svg = save_figure(fig, tmp_path / "map.SVG")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert len([e for e in root.iter() if e.tag.endswith("image")]) >= 2  # the picture and the map
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.SVG", "out"]


@pytest.mark.parametrize("name", ["map.jpg", "map", "map.eps"])
def test_save_figure_refuses_other_suffixes(tmp_path, name):
    fig = plt.figure()
    with pytest.raises(AttnlabError, match=r"\.png or \.svg or \.pdf"):
        save_figure(fig, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_figure_leaves_no_partial_file(tmp_path, monkeypatch):
    fig = plt.figure()
    target = tmp_path / "map.png"
    target.write_bytes(b"old")

    def broken(fh, **kwargs):
        fh.write(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_save_gif_one_frame_per_word_following_the_words(tmp_path):
    spots = {(0, 0, 0): (7, 1), (0, 0, 1): (7, 9), (0, 0, 2): (7, 17), (0, 0, 3): (0, 0)}
    trace = make_trace(one_hot((1, 1, 4, *GRID), spots), IMAGE, words=["a", "b", "c", "[SEP]"])
    path = save_gif(trace, tmp_path / "words.gif", fps=4, alpha=1.0)
    frames = []
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == 3
        for i in range(im.n_frames):
            im.seek(i)
            assert im.info["duration"] == 250
            frames.append(np.asarray(im.convert("RGB")).astype(np.int64))
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(frames[i] - frames[j]).sum() > 0
    # the hot spot (top of the colormap) walks left to right with the words; pixels that stay about
    # the same in every frame (the colorbar's gradient, which also holds the hot colour, changes only
    # by each frame's palette quantisation) are left out
    changing = np.any(np.stack([np.abs(f - frames[0]).max(axis=-1) > 40 for f in frames[1:]]), axis=0)
    hot = blend("inferno", attention_map(trace, 0).max(), 1.0)
    xs = []
    for frame in frames:
        dist = np.where(changing, np.linalg.norm(frame - hot, axis=-1), np.inf)
        assert dist.min() < 20  # the hot colour is drawn (GIF palettes quantise it a little)
        xs.append(np.unravel_index(np.argmin(dist), dist.shape)[1])
    assert xs[0] < xs[1] < xs[2]
    assert [p.name for p in tmp_path.iterdir()] == ["words.gif"]


def test_save_gif_leaves_no_partial_file(tmp_path, monkeypatch):
    trace = make_trace(random_attention((1, 1, 2, *GRID)), IMAGE)

    def broken(self, fp, *args, **kwargs):
        fp.write(b"GIF89a")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError):
        save_gif(trace, tmp_path / "x.gif")
    assert list(tmp_path.iterdir()) == []


# ================================================================== errors
def _small_trace():
    return make_trace(random_attention((2, 3, 4, *GRID)), IMAGE, words=["a", "b", "c", "[SEP]"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: attention_map(t, 4), "step 4 does not exist"),
        (lambda t: attention_map(t, -5), "step -5 does not exist"),
        (lambda t: attention_map(t, True), "step True"),
        (lambda t: attention_map(t, 0, head=3), "head 3 does not exist"),
        (lambda t: attention_map(t, 0, head="max"), "head 'max'"),
        (lambda t: attention_map(t, 0, layer=2), "layer 2 does not exist"),
        (lambda t: attention_map(t, 0, layer="last"), "layer 'last'"),
        (lambda t: attention_map(t, 0, smooth=-1), "smooth"),
        (lambda t: attention_map(t, 0, interp="cubic"), "interp"),
        (lambda t: word_grid(t, smooth=1e300), "smooth"),
        (lambda t: overlay(t, 0, smooth=float("nan")), "smooth"),
        (lambda t: word_grid(t, scale="log"), "scale"),
        (lambda t: word_grid(t, font_scale=0), "font_scale"),
        (lambda t: word_grid(t, figsize=(1e6, 3)), "figsize"),
        (lambda t: head_grid(t, figsize=(0.5, 0.5)), "too small"),
        (lambda t: save_gif(t, "x.gif", dpi=1e5), "dpi"),
        (lambda t: save_figure(word_grid(t), "x.png", dpi=1e5), "dpi"),
        (lambda t: save_figure(word_grid(t, figsize=(20, 20)), "x.png", dpi=1000), "million pixels"),
        (lambda t: save_gif(t, ".", words=[0]), ".gif"),
        (lambda t: overlay(t, 0, alpha=1.5), "alpha"),
        (lambda t: overlay(t, 0, cmap="no-such-map"), "cmap"),
        (lambda t: overlay(t, 0, ax=plt.figure().add_subplot(), figsize=(3, 3)), "either ax or figsize"),
        (lambda t: overlay(t, 0, ax="axes"), "not a matplotlib Axes"),
        (lambda t: word_grid(t, words=[]), "selects nothing"),
        (lambda t: word_grid(t, words=[0, 9]), "step 9 does not exist"),
        (lambda t: word_grid(t, words="abc"), "list of step indices"),
        (lambda t: head_grid(t, layer=-3), "layer -3 does not exist"),
        (lambda t: layer_head_grid(t, 10), "step 10 does not exist"),
        (lambda t: attention_matrix(t, head=-4), "head -4 does not exist"),
        (lambda t: word_grid(t, figsize=(0, 3)), "figsize"),
        (lambda t: save_gif(t, "x.png"), ".gif"),
        (lambda t: save_gif(t, "x.gif", fps=0), "fps"),
        (lambda t: save_figure("not a figure", "x.png"), "matplotlib Figure"),
    ],
)
def test_bad_inputs_raise_attnlab_error(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AttnlabError, match=message) as info:
        call(_small_trace())
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_trace_without_attention_is_refused():
    trace = _small_trace()
    trace.cross_attention = None
    for call in (lambda: attention_map(trace, 0), lambda: word_grid(trace), lambda: head_entropy(trace)):
        with pytest.raises(AttnlabError, match="no attention"):
            call()
