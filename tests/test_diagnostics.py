"""Sanity diagnostics (``trace.diagnostics()``) against sums written out here, padding recorded for
``resize="pad"`` captioners, and explanation traces in the figures, the explorer and the HTML page
(named by their method, never "layer 0 / head 0")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab import AttnlabError, CaptionTrace
from attnlab.diagnostics import padding_fraction

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def trace_of(maps: np.ndarray, prefix_share: np.ndarray | None = None, meta: dict | None = None) -> CaptionTrace:
    """A hand-made trace: maps (layers, heads, steps, h, w)."""
    steps = maps.shape[2]
    return CaptionTrace(
        token_ids=np.arange(3, 3 + steps), words=[f"w{i}" for i in range(steps)], logits=None,
        cross_attention=maps.astype(np.float32), grid=maps.shape[3:], image=np.zeros((32, 48, 3), np.uint8),
        prefix_tokens=0 if prefix_share is None else 1, prefix_share=None if prefix_share is None else prefix_share.astype(np.float32),
        meta=meta or {},
    )  # fmt: skip


def test_shares_entropy_and_sinks_against_sums_written_out():
    h, w = 4, 6
    maps = np.zeros((1, 2, 3, h, w))
    maps[0, 0, 0] = 0.9 / (h * w)  # uniform over the patches, 10% on CLS
    maps[0, 0, 1, 0, 0] = 0.8  # a corner patch holds 80%: a sink
    maps[0, 0, 1, 2, 3] = 0.2
    maps[0, 0, 2, 1, 1] = 0.3  # 70% on CLS
    maps[0, 1] = np.random.default_rng(0).dirichlet(np.ones(h * w), size=3).reshape(3, h, w) * 0.5
    share = np.array([[[0.1, 0.0, 0.7], [0.5, 0.5, 0.5]]])
    d = trace_of(maps, share).diagnostics()
    assert d.prefix.shape == (1, 3, 3)  # (layers, heads + mean, steps)
    ring = np.ones((h, w), bool)
    ring[1:-1, 1:-1] = False
    for head in range(2):
        for t in range(3):
            m = maps[0, head, t]
            assert d.border[0, head, t] == pytest.approx(m[ring].sum())
            assert d.prefix[0, head, t] == pytest.approx(share[0, head, t])
            p = m.reshape(-1) / m.sum()
            ent = -sum(x * math.log(x) for x in p if x > 0)
            assert d.entropy[0, head, t] == pytest.approx(ent / math.log(h * w))
    mean = maps[0].mean(0)  # the head mean is its own map, not a mean of the heads' numbers
    assert d.border[0, 2, 1] == pytest.approx(mean[1][ring].sum())
    assert d.entropy[0, 0, 0] == pytest.approx(1.0) and d.entropy[0, 0, 1] < 0.3
    # steady weight: per key (CLS, then each patch) the least any step gives it, summed over keys
    for head in range(2):
        rows = [[share[0, head, t], *maps[0, head, t].reshape(-1)] for t in range(3)]
        want = sum(min(rows[t][k] for t in range(3)) for k in range(1 + h * w))
        assert d.steady[0, head] == pytest.approx(want)
    # a corner patch holding 80% for one word, CLS 70% for another: no weight stays put, so no sink
    assert d.sink[0, 0].tolist() == [False, False, False] and d.steady[0, 0] < 0.1
    assert "CLS 10%" in d.line(0, 0, 0) and "entropy 1.00 of uniform" in d.line(0, 0, 0)
    assert "border 80%" in d.line(1, 0, 0) and not d.line(1, 0, 0).endswith("sink!")
    assert "padding" not in d.line(0, 0, "mean")


def test_a_key_that_keeps_its_weight_whatever_the_word_is_a_sink():
    h, w = 4, 6
    rng = np.random.default_rng(1)
    maps = rng.dirichlet(np.ones(h * w), size=(1, 2, 5)).reshape(1, 2, 5, h, w) * 0.4  # words differ
    maps[0, 0, :, 2, 3] += 0.6  # head 0: an inner patch keeps 60% at every step
    d = trace_of(maps).diagnostics()
    assert d.sink[0, 0].all() and not d.sink[0, 1].any()
    assert d.steady[0, 0] >= 0.6 and d.steady[0, 1] < 0.5
    assert d.line(3, 0, 0).endswith("sink!") and "steady" in d.line(3, 0, 0)
    cls = trace_of(maps * 0.3, prefix_share=np.full((1, 2, 5), 0.7)).diagnostics()  # CLS keeps 70% for every word
    assert cls.sink[0].all() and cls.steady[0, 0] == pytest.approx(0.7 + (maps[0, 0] * 0.3).min(0).sum(), abs=1e-6)
    short = trace_of(maps[:, :, :2]).diagnostics()  # two words cannot tell a sink from two words that agree
    assert not short.sink.any() and np.isnan(short.steady).all() and "steady" not in short.line(0, 0, 0)


def test_a_right_map_at_the_border_is_not_a_sink():
    from attnlab.shapes import outlines, sample_scene

    scene = sample_scene("scene-0.png")
    for name in ("shapes", "shapes-cptr"):
        trace = attnlab.caption(attnlab.load_model(name), attnlab.sample_path("scene-0.png"))
        assert trace.words[2] == "red"
        d = trace.diagnostics()
        (triangle,) = outlines(scene, words=[2])
        peak = np.unravel_index(trace.mean_heads()[-1, 2].argmax(), trace.grid)
        gh, gw = trace.grid
        block = triangle.reshape(gh, 128 // gh, gw, 128 // gw)[peak[0], :, peak[1], :]
        assert block.any(), name  # the last layer's peak for "red" is on the red triangle ...
        assert d.border[-1, -1, 2] > 0.2 or name != "shapes"  # ... which sits at the border
        assert not d.sink[:, :, 2].any(), (name, d.line(2))
        assert not d.line(2).endswith("sink!")


def test_padding_fraction_and_the_padding_share():
    # content 20 x 48 at the top of a 32 x 48 shown image; grid 4 x 6: 8 px rows
    frac = padding_fraction((4, 6), (32, 48), (20, 48))
    np.testing.assert_allclose(frac[:2], 0)
    np.testing.assert_allclose(frac[2], 4 / 8)  # rows 16..23: pixels 20..23 are padding
    np.testing.assert_allclose(frac[3], 1)
    maps = np.random.default_rng(1).dirichlet(np.ones(24), size=2).reshape(1, 1, 2, 4, 6)
    d = trace_of(maps, meta={"padding_fraction": frac.tolist()}).diagnostics()
    np.testing.assert_allclose(d.padding[0, 0], [(maps[0, 0, t] * frac).sum() for t in range(2)])
    assert "padding" in d.line(0)


class PadModel(nn.Module):
    """Patches of a 32 px padded square attend to by one query: a captioner wrapped with resize="pad"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.embed = nn.Embedding(6, 8)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 6)
        self.eval()

    def encode(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, 8)

    def decode(self, memory, ids):
        q = self.embed(ids)
        t = ids.shape[1]
        return self.head(self.cross(q, memory, memory)[0] + q)[:, :t]


def test_caption_records_padding_for_padded_models():
    model = PadModel()
    cap = attnlab.wrap(model, encode=model.encode, decode=model.decode, cross_attention="cross", grid=(4, 4), image_size=32,
                       mean=(0.5,) * 3, std=(0.5,) * 3, bos=1, eos=2, vocab=["[PAD]", "[CLS]", "[SEP]", "a", "b", "c"],
                       max_len=3, resize="pad")  # fmt: skip
    photo = (np.random.default_rng(2).random((16, 32, 3)) * 255).astype(np.uint8)  # wide: the bottom half is padding
    trace = attnlab.caption(cap, photo)
    frac = np.array(trace.meta["padding_fraction"])
    np.testing.assert_allclose(frac, np.repeat([[0.0], [0.0], [1.0], [1.0]], 4, axis=1))
    d = trace.diagnostics()
    np.testing.assert_allclose(d.padding[:, :-1], trace.cross_attention[..., 2:, :].sum((-2, -1)), atol=1e-6)
    assert (d.padding > 0.05).any()  # this random model really looks at padding, and the trace says so
    assert "padding_fraction" not in attnlab.caption(attnlab.load_model(), photo).meta  # "long": no padding
    explained = attnlab.explain(cap, photo, "raw")
    assert explained.meta["padding_fraction"] == trace.meta["padding_fraction"]


def test_batch_runs_record_padding_like_caption(tmp_path):
    """A folder run reads images in workers and decodes them in batches: its traces record the same padding."""
    from PIL import Image

    from attnlab.batch import caption_folder

    model = PadModel()
    cap = attnlab.wrap(model, encode=model.encode, decode=model.decode, cross_attention="cross", grid=(4, 4), image_size=32,
                       mean=(0.5,) * 3, std=(0.5,) * 3, bos=1, eos=2, vocab=["[PAD]", "[CLS]", "[SEP]", "a", "b", "c"],
                       max_len=3, resize="pad")  # fmt: skip
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for name, shape in (("wide", (16, 32, 3)), ("tall", (32, 8, 3)), ("square", (32, 32, 3))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(tmp_path / "in" / f"{name}.png")
    report = caption_folder(cap, tmp_path / "in", tmp_path / "out", batch_size=3, workers=0, progress=False)
    assert report.captioned == 3
    for name in ("wide", "tall", "square"):
        got = CaptionTrace.load(tmp_path / "out" / f"{name}.png.npz")
        alone = attnlab.caption(cap, tmp_path / "in" / f"{name}.png")
        assert got.meta["padding_fraction"] == alone.meta["padding_fraction"]
    wide = np.array(CaptionTrace.load(tmp_path / "out" / "wide.png.npz").meta["padding_fraction"])
    np.testing.assert_allclose(wide, np.repeat([[0.0], [0.0], [1.0], [1.0]], 4, axis=1))


# --------------------------------------------------------------------------- explanations in the views
@pytest.fixture(scope="module")
def explained():
    model = attnlab.load_model()
    return attnlab.explain(model, attnlab.sample_path("scene-1.png"), "relevance")


def test_figures_name_the_method_not_a_layer(explained):
    from attnlab import plot

    fig = plot.word_grid(explained)
    title = fig._suptitle.get_text()
    assert "relevance (Chefer et al. 2021)" in title and "layer" not in title and "head" not in title
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    assert bar.get_ylabel() == "share of relevance of a patch"
    over = plot.overlay(explained, 1)._suptitle.get_text()
    assert "relevance" in over and "layer" not in over
    assert "relevance" in plot.attention_matrix(explained).axes[0].get_title()
    for view in (plot.head_grid, plot.head_stats):
        with pytest.raises(AttnlabError, match="one map per word"):
            view(explained)
    with pytest.raises(AttnlabError, match="one map per word"):
        plot.layer_head_grid(explained, 0)


def test_explorer_and_html_take_an_explanation(explained, tmp_path):
    w = attnlab.explore(explained)
    assert w.layer_dropdown.options[0][0] == "relevance (Chefer et al. 2021)" and w.layer_dropdown.disabled
    assert w.head_dropdown.disabled and w.view_toggle.disabled
    label = w.word_label.value
    assert "relevance" in label and "layer" not in label and "entropy" in label and "border" in label
    assert "layer" not in w.figure.texts[-1].get_text()
    trace = attnlab.caption(attnlab.load_model(), attnlab.sample_path("scene-1.png"))
    plain = attnlab.explore(trace).word_label.value
    assert "layer 2 (3rd of 3, last)" in plain and "entropy" in plain  # attention: the diagnostics too
    page = attnlab.export_html(explained, tmp_path / "e.html").read_text()
    assert '"method":"relevance (Chefer et al. 2021)"' in page and "share of relevance of a patch" in page
    back = CaptionTrace.load(explained.save(tmp_path / "e.npz"))
    assert back.meta["method"] == "relevance" and np.array_equal(back.cross_attention, explained.cross_attention)
