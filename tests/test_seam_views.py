"""The seam's key layout of several views (issue 21): KeyLayout.of_views, the assembler, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.assemble import trace_from_rows
from attnlab.captioner import CaptionerSpec, Encoded, StepOutput
from attnlab.decode import decode_batch
from attnlab.errors import AttnlabError
from attnlab.keys import KeyLayout, View
from attnlab.tokenizer import IdVocab
from attnlab.trace import CaptionTrace

# a prompt of 12 keys: [special] [base 2x2 at 1..4] [high-res 1x3 at 5..7] [newline 8] [prompt 9, 10] [padding 11]
VIEWS = (View("base", (2, 2), (0.0, 0.0, 60.0, 40.0)), View("high-res", (1, 3), (-6.0, 0.0, 66.0, 40.0)))
KEYS = ([1, 2, 3, 4], [5, 6, 7])
KINDS = {"special": [0], "newline": [8], "prompt": [9, 10], "padding": [11], "prefix": []}


def layout() -> KeyLayout:
    return KeyLayout.of_views(VIEWS, KEYS, KINDS, 12)


def test_of_views_places_every_key_exactly_once_or_says_so_in_one_line():
    lay = layout()
    assert lay.grid == (2, 2) and lay.prefix == 0 and lay.keys == 12 and lay.views == VIEWS
    with pytest.raises(AttnlabError, match="not each of the 12 keys"):
        KeyLayout.of_views(VIEWS, KEYS, {**KINDS, "prompt": [9]}, 12)  # key 10 nowhere
    with pytest.raises(AttnlabError, match="not each of the 12 keys"):
        KeyLayout.of_views(VIEWS, KEYS, {**KINDS, "prompt": [9, 10, 4]}, 12)  # key 4 twice
    with pytest.raises(AttnlabError, match="h \\* w keys"):
        KeyLayout.of_views(VIEWS, ([1, 2, 3], [4, 5, 6, 7]), KINDS, 12)
    with pytest.raises(AttnlabError, match="split_views"):
        lay.split(np.zeros((1, 12)))


def test_split_views_takes_each_view_s_cells_row_major_and_sums_each_kind():
    rows = np.random.default_rng(1).random((2, 3, 12)).astype(np.float32)  # (heads, steps, K)
    maps, shares = layout().split_views(rows)
    np.testing.assert_array_equal(maps[0][1, 2], [[rows[1, 2, 1], rows[1, 2, 2]], [rows[1, 2, 3], rows[1, 2, 4]]])
    np.testing.assert_array_equal(maps[1][0, 1], [[rows[0, 1, 5], rows[0, 1, 6], rows[0, 1, 7]]])
    np.testing.assert_allclose(shares["prompt"], rows[..., 9] + rows[..., 10], rtol=1e-6)
    np.testing.assert_array_equal(shares["prefix"], np.zeros((2, 3), np.float32))
    total = maps[0].sum((-2, -1)) + maps[1].sum((-2, -1)) + sum(shares.values())
    np.testing.assert_allclose(total, rows.sum(-1), rtol=1e-6)
    t_maps, t_shares = layout().split_views(torch.from_numpy(rows))
    np.testing.assert_array_equal(t_maps[1].numpy(), maps[1])
    simple_maps, simple_shares = KeyLayout(1, (2, 2)).split_views(rows[..., :5])
    np.testing.assert_array_equal(simple_maps[0][0, 0].ravel(), rows[0, 0, 1:5])
    np.testing.assert_allclose(simple_shares["prefix"], rows[..., 0])


def spec() -> CaptionerSpec:
    return CaptionerSpec(name="views-toy", vocab=IdVocab({0: "[PAD]", 1: "[CLS]", 2: "[SEP]"}, 8), bos=1, eos=2, pad=0,
                         max_len=3, image_size=16, resize="stretch")


def test_trace_from_rows_with_a_layout_of_views_gives_a_multi_view_trace():
    rng = np.random.default_rng(2)
    rows = rng.random((2, 2, 3, 14)).astype(np.float32)  # 2 keys of batch padding past the layout's 12
    rows /= rows[..., :12].sum(-1, keepdims=True)
    photo = np.zeros((40, 60, 3), np.uint8)
    trace = trace_from_rows(spec(), [5, 6, 2], rows, (2, 2), photo, layout=layout())
    assert trace.views == VIEWS and set(trace.key_shares) == set(KINDS)
    np.testing.assert_array_equal(trace.view_attention("high-res")[1, 0, 2, 0], rows[1, 0, 2, 5:8])
    total = sum(trace.view_attention(i).sum((-2, -1)) for i in range(2)) + sum(trace.key_shares.values())
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    with pytest.raises(AttnlabError, match="view_attention"):
        trace.cross_attention


class _State:
    def __init__(self, n: int) -> None:
        self.idx = torch.arange(n)

    def select(self, indices: torch.Tensor) -> "_State":
        out = _State(0)
        out.idx = self.idx[indices]
        return out


class ViewsToy:
    """A captioner whose rows follow a layout of two views: step t of image b puts weight on fixed keys."""

    def __init__(self, layouts: list[KeyLayout] | None) -> None:
        self.spec = spec()
        self.layouts = layouts

    def begin(self, pixels, record) -> Encoded:
        return Encoded(_State(len(pixels)), [(2, 2)] * len(pixels), None, self.layouts)

    def step(self, state, ids, record) -> StepOutput:
        n = len(state.idx)
        logits = torch.full((n, 8), -5.0)
        logits[:, 5] = 0.0
        row = torch.arange(1, 13, dtype=torch.float32) + state.idx[:, None]  # (N, K): differs per image
        row = row / row.sum(-1, keepdim=True)
        cross = None if record == "none" else [row[:, None, :].expand(n, 2, 12).clone()]  # one layer: (N, heads, K)
        return StepOutput(logits, cross)


def test_decode_carries_each_image_s_layout_into_its_trace():
    pix = [torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)]
    shown = [np.zeros((40, 60, 3), np.uint8)] * 2
    traces = decode_batch(ViewsToy([layout(), layout()]), pix, shown, max_len=3)
    for b, trace in enumerate(traces):
        row = np.arange(1, 13, dtype=np.float64) + b
        row /= row.sum()
        assert trace.views == VIEWS and trace.steps == 3
        np.testing.assert_allclose(trace.view_attention(0)[0, 1, 2].ravel(), row[1:5], rtol=1e-6)
        np.testing.assert_allclose(trace.key_shares["newline"][0, 0], [row[8]] * 3, rtol=1e-6)
    with pytest.raises(AttnlabError, match="1 key layouts for 2 images"):
        decode_batch(ViewsToy([layout()]), pix, shown, max_len=3)


def test_centre_crop_box_follows_transformers_resize_then_crop():
    from types import SimpleNamespace

    from attnlab.adapters.hf.processor import centre_crop_box

    clip = SimpleNamespace(do_center_crop=True, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    # 640 x 480: short side 480 -> 224, long side int(224 * 640 / 480) = 298; left (298 - 224) // 2 = 37
    np.testing.assert_allclose(centre_crop_box(clip, 640, 480), (37 * 640 / 298, 0, 261 * 640 / 298, 480))
    # 480 x 640 (portrait): the crop runs down the middle
    np.testing.assert_allclose(centre_crop_box(clip, 480, 640), (0, 37 * 640 / 298, 480, 261 * 640 / 298))
    deit = SimpleNamespace(do_center_crop=True, size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224})
    # 1000 x 200 stretched to 256 x 256, centre 224: 16 px off each side of the square
    np.testing.assert_allclose(centre_crop_box(deit, 1000, 200), (16 * 1000 / 256, 16 * 200 / 256, 240 * 1000 / 256, 240 * 200 / 256))
    padded = SimpleNamespace(do_center_crop=True, size={"height": 20, "width": 20}, crop_size={"height": 25, "width": 25})
    np.testing.assert_allclose(centre_crop_box(padded, 40, 40), (-2 * 2, -2 * 2, 23 * 2, 23 * 2))  # overhangs: padding
    assert centre_crop_box(SimpleNamespace(do_center_crop=False, size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}), 9, 9) is None


def test_a_spec_with_a_crop_gives_one_view_with_the_crop_box_on_the_shown_image():
    cropped = CaptionerSpec(name="crop-toy", vocab=IdVocab({0: "[PAD]", 1: "[CLS]", 2: "[SEP]"}, 8), bos=1, eos=2, pad=0,
                            max_len=3, image_size=16, resize="stretch", prefix_tokens=1, crop=lambda w, h: (w / 4, 0.0, 3 * w / 4, h))
    enc = Encoded(_State(1), [(2, 2)])
    lay = enc.layout(0, cropped, np.zeros((30, 40, 3), np.uint8))
    assert lay.views == (View("image", (2, 2), (10.0, 0.0, 30.0, 30.0)),) and lay.prefix == 1 and lay.keys == 5
    rows = np.random.default_rng(3).random((1, 1, 2, 5)).astype(np.float32)
    trace = trace_from_rows(cropped, [5, 2], rows, (2, 2), np.zeros((30, 40, 3), np.uint8), layout=lay)
    assert trace.views == lay.views and trace.prefix_tokens == 1
    np.testing.assert_array_equal(trace.prefix_share, rows[..., 0])
    np.testing.assert_array_equal(trace.cross_attention.reshape(1, 1, 2, 4), rows[..., 1:])
    assert enc.layout(0, spec(), np.zeros((30, 40, 3), np.uint8)).views == ()  # no crop: the plain layout
    # without a layout (the explanation methods' call) the assembler asks the spec: the same box
    assert trace_from_rows(cropped, [5, 2], rows, (2, 2), np.zeros((30, 40, 3), np.uint8)).views == lay.views
