"""``attnlab.stats``: per-word mean maps on a common grid, entropy and border peaks per head,
checked against computations written out here (supersampling, loops over patches)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlab import AttnlabError, CaptionTrace, stats
from attnlab.shapes import word_class


def supersampled(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The density by brute force: split patches and cells into a common fine grid, count the weight."""
    (h, w), (rows, cols) = grid_map.shape, size
    fy, fx = math.lcm(h, rows), math.lcm(w, cols)
    fine = np.kron(grid_map, np.ones((fy // h, fx // w))) / ((fy // h) * (fx // w))  # weight per fine cell
    mass = fine.reshape(rows, fy // rows, cols, fx // cols).sum(axis=(1, 3))  # (rows, cols)
    return mass / (1.0 / (rows * cols))  # weight / cell area


@pytest.mark.parametrize("grid, size", [((3, 5), (4, 6)), ((8, 8), (16, 16)), ((7, 2), (3, 3)), ((1, 1), (5, 2))])
def test_normalised_map_equals_supersampling(grid, size):
    g = np.random.default_rng(0).random(grid)
    g /= g.sum()
    d = stats.normalised_map(g, size)
    np.testing.assert_allclose(d, supersampled(g, size), atol=1e-12)
    assert d.mean() == pytest.approx(1.0)  # uniform-on-average: the weight is all kept
    np.testing.assert_allclose(stats.normalised_map(np.full(grid, 1 / np.prod(grid)), size), 1.0, atol=1e-12)


def make_trace(rng, words, grid, layers=2, heads=2, peaks=None) -> CaptionTrace:
    steps = len(words)
    ca = rng.random((layers, heads, steps, *grid)) ** 4  # (layers, heads, steps, H, W), peaked
    ca /= ca.sum(axis=(-2, -1), keepdims=True)
    if peaks:
        for (layer, head, step), (i, j) in peaks.items():
            ca[layer, head, step] = 0.0
            ca[layer, head, step, i, j] = 1.0
    return CaptionTrace(
        token_ids=np.arange(steps), words=words, logits=None, cross_attention=ca.astype(np.float32), grid=grid,
        image=np.zeros((20, 30, 3), np.uint8), model_name="hand",
    )  # fmt: skip


@pytest.fixture
def traces():
    rng = np.random.default_rng(1)
    return [
        make_trace(rng, ["a", "red", "circle", "[SEP]"], (2, 2), peaks={(1, 0, 1): (1, 1)}),
        make_trace(rng, ["a", "blue", "square", "left", "of", "a", "red", "star", "[SEP]"], (3, 4), peaks={(0, 1, 0): (1, 2)}),
        make_trace(rng, ["red", "[SEP]"], (5, 3)),
    ]


def expected(traces, layer, size, group=lambda w: w):
    """Per key mean density, entropy / log S and border share per (layer, head), written as loops."""
    sums, counts = {}, {}
    layers, heads = traces[0].cross_attention.shape[:2]
    ent, border, steps, base = np.zeros((layers, heads)), np.zeros((layers, heads)), 0, 0.0
    for t in traces:
        ca = t.cross_attention.astype(np.float64)
        h, w = t.grid
        for s, word in enumerate(t.words):
            steps += 1
            base += sum(1 for i in range(h) for j in range(w) if i in (0, h - 1) or j in (0, w - 1)) / (h * w)
            for li in range(layers):
                for hi in range(heads):
                    m = ca[li, hi, s] / ca[li, hi, s].sum()
                    ent[li, hi] += -sum(p * math.log(p) for p in m.flat if p > 0) / math.log(h * w)
                    i, j = np.unravel_index(np.argmax(m), m.shape)
                    border[li, hi] += i in (0, h - 1) or j in (0, w - 1)
            key = group(word)
            if key is None:
                continue
            d = supersampled(ca[layer, :, s].mean(0), size)
            sums[key] = sums.get(key, 0) + d
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}, counts, ent / steps, border / steps, base / steps


def test_aggregate_equals_loops(traces):
    got = stats.aggregate(traces, layer=-1, size=(6, 4))
    maps, counts, ent, border, base = expected(traces, 1, (6, 4))
    assert got.traces == 3 and got.steps == 15 and got.layer == 1 and got.size == (6, 4)
    assert set(got.maps) == set(maps)
    for key, m in got.maps.items():
        assert m.count == counts[key]
        np.testing.assert_allclose(m.density, maps[key], atol=1e-9)
    np.testing.assert_allclose(got.entropy, ent, atol=1e-9)
    np.testing.assert_allclose(got.border, border, atol=1e-12)
    assert got.border_share == pytest.approx(base)
    assert got.top(2)[0].key in ("a", "red", "[SEP]") and got.top(2)[0].count == 3
    assert "entropy / log(S)" in got.summary() and "random patch" in got.summary()


def test_a_folder_of_shards_gives_the_same_as_the_traces(traces, tmp_path):
    for i, t in enumerate(traces):
        t.save(tmp_path / f"shard-{i % 2}" / "sub" / f"t{i}.npz")
    (tmp_path / ".hidden").mkdir()
    traces[0].save(tmp_path / ".hidden" / "x.npz")  # hidden folders are left out
    a = stats.aggregate(tmp_path, layer=0, size=(5, 5), group=word_class)
    b = stats.aggregate(traces, layer=0, size=(5, 5), group=word_class)
    assert a.traces == 3 and set(a.maps) == set(b.maps) == {"article", "colour", "shape", "relation", "end"}
    for key in a.maps:
        np.testing.assert_allclose(a.maps[key].density, b.maps[key].density, atol=1e-6)  # saved as float32
    maps, counts, *_ = expected(traces, 0, (5, 5), word_class)
    for key in maps:
        assert b.maps[key].count == counts[key]
        np.testing.assert_allclose(b.maps[key].density, maps[key], atol=1e-9)


def test_float16_traces_aggregate(traces):
    from attnlab.batch import as_half

    a = stats.aggregate([as_half(t) for t in traces])
    b = stats.aggregate(traces)
    for key in a.maps:
        np.testing.assert_allclose(a.maps[key].density, b.maps[key].density, atol=5e-3)


def test_bad_inputs_are_one_line_errors(traces, tmp_path):
    rng = np.random.default_rng(2)
    other = make_trace(rng, ["a"], (2, 2), layers=3)
    for call, needle in [
        (lambda: stats.aggregate([*traces, other]), "the traces mix models"),
        (lambda: stats.aggregate(traces, layer=2), "layer 2 does not exist"),
        (lambda: stats.aggregate([]), "no traces to aggregate"),
        (lambda: stats.aggregate(tmp_path), "no traces (.npz) below"),
        (lambda: stats.aggregate(tmp_path / "nope"), "no folder at"),
        (lambda: stats.aggregate(traces, size=(0, 3)), "size must be"),
        (lambda: stats.word_maps(stats.aggregate(traces), ["zebra"]), "no map for ['zebra']"),
        (lambda: stats.word_maps("x"), "draws what attnlab.stats.aggregate returns"),
    ]:
        with pytest.raises(AttnlabError) as info:
            call()
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_word_maps_figure_has_one_scale_and_says_what_it_means(traces):
    result = stats.aggregate(traces, size=(8, 8))
    fig = stats.word_maps(result, ["a", "red", "[SEP]"], columns=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["a  (n=3)", "red  (n=3)", "[SEP]  (n=3)"]
    limits = {ax.images[0].get_clim() for ax in panels}
    assert len(limits) == 1 and min(limits)[0] == 0.0  # one colour scale, from 0
    bars = [ax for ax in fig.axes if "uniform" in ax.get_ylabel()]
    assert len(bars) == 1 and "1 = uniform" in bars[0].get_ylabel()
    import matplotlib.pyplot as plt

    plt.close(fig)
