"""The trace's views and key shares (issue 21): the public contract, save/load, old files."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import attnlab
from attnlab.errors import AttnlabError
from attnlab.keys import View
from attnlab.trace import TRACE_VERSION, CaptionTrace

DATA = Path(__file__).parent / "data"
L, H, T = 2, 3, 4


def _rows(seed: int = 0) -> np.ndarray:
    """Softmax-like rows over 4 base keys, 6 high-res keys, 2 prompt keys, 1 newline, 2 special."""
    rng = np.random.default_rng(seed)
    raw = rng.random((L, H, T, 15)).astype(np.float32)
    return raw / raw.sum(-1, keepdims=True)


def _prefix_rows() -> np.ndarray:
    """Rows over one prefix key and a 2 x 3 grid, summing to 1."""
    rows = _rows()[..., :7]
    return rows / rows.sum(-1, keepdims=True)


def _multi(seed: int = 0) -> tuple[CaptionTrace, np.ndarray]:
    raw = _rows(seed)
    base, high = raw[..., :4].reshape(L, H, T, 2, 2), raw[..., 4:10].reshape(L, H, T, 2, 3)
    shares = {"prompt": raw[..., 10:12].sum(-1), "newline": raw[..., 12], "special": raw[..., 13:].sum(-1)}
    photo = np.full((40, 60, 3), 120, np.uint8)
    views = [View("base", (2, 2), (0, 0, 60, 40)), ("high-res", (2, 3), (-5.5, 0, 65.5, 40))]
    trace = CaptionTrace.from_views(list("abcd"), [1, 2, 3, 4], views, [base, high], photo, key_shares=shares)
    return trace, raw


def test_a_single_view_trace_has_one_whole_photo_view_and_its_prefix_share_as_a_key_share():
    rows = _prefix_rows()  # prefix key, then a 2 x 3 grid
    trace = CaptionTrace.from_attention(list("abcd"), [1, 2, 3, 4], rows, (2, 3), np.zeros((30, 45, 3), np.uint8), prefix_tokens=1)
    assert trace.views == (View("image", (2, 3), (0.0, 0.0, 45.0, 30.0)),)
    assert trace.view_attention(0) is trace.cross_attention
    assert trace.view_attention("image") is trace.cross_attention
    np.testing.assert_array_equal(trace.cross_attention, rows[..., 1:].reshape(L, H, T, 2, 3))
    assert list(trace.key_shares) == ["prefix"] and trace.key_shares["prefix"] is trace.prefix_share
    np.testing.assert_allclose(trace.key_shares["prefix"], rows[..., 0])
    no_prefix = CaptionTrace.from_attention(list("ab"), [1, 2], np.full((2, 6), 1 / 6), (2, 3), np.zeros((8, 8, 3), np.uint8))
    assert no_prefix.key_shares == {} and no_prefix.prefix_share is None


def test_views_maps_plus_key_shares_sum_to_one_and_nothing_is_renormalised():
    trace, raw = _multi()
    assert [v.name for v in trace.views] == ["base", "high-res"]
    assert trace.views[1] == View("high-res", (2, 3), (-5.5, 0.0, 65.5, 40.0))
    assert trace.view_attention(0).shape == (L, H, T, 2, 2) and trace.view_attention(-1).shape == (L, H, T, 2, 3)
    np.testing.assert_array_equal(trace.view_attention("high-res")[1, 2, 3].ravel(), raw[1, 2, 3, 4:10])
    total = sum(trace.view_attention(i).sum((-2, -1)) for i in range(2)) + sum(trace.key_shares.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert trace.prefix_share is None and "prefix" not in trace.key_shares
    assert (trace.num_layers, trace.num_heads, trace.check_layer(-1), trace.check_head(-1)) == (L, H, L - 1, H - 1)


def test_cross_attention_of_a_multi_view_trace_is_a_one_line_error_naming_view_attention():
    trace, _ = _multi()
    with pytest.raises(AttnlabError, match=r"view_attention") as err:
        trace.cross_attention
    assert "\n" not in str(err.value) and "'base', 'high-res'" in str(err.value)
    with pytest.raises(AttnlabError, match="view 2 does not exist"):
        trace.view_attention(2)
    with pytest.raises(AttnlabError, match="view 'tile' does not exist"):
        trace.view_attention("tile")


def test_from_views_refuses_mismatched_maps_in_one_line_and_warns_when_sums_are_off():
    raw = _rows()
    base = raw[..., :4].reshape(L, H, T, 2, 2)
    photo = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(AttnlabError, match="1 maps for 2 views"):
        CaptionTrace.from_views(list("abcd"), [1, 2, 3, 4], [("a", (2, 2), (0, 0, 10, 10)), ("b", (1, 1), (0, 0, 5, 5))], [base], photo)
    with pytest.raises(AttnlabError, match=r"view 'a' have shape .* expected"):
        CaptionTrace.from_views(list("abcd"), [1, 2, 3, 4], [("a", (2, 3), (0, 0, 10, 10))], [base], photo)
    with pytest.raises(AttnlabError, match="x0 < x1"):
        CaptionTrace.from_views(list("abcd"), [1, 2, 3, 4], [("a", (2, 2), (5, 0, 5, 10))], [base], photo)
    with pytest.warns(UserWarning, match="maps plus key_shares sum to"):  # the other keys' weight left out
        one = CaptionTrace.from_views(list("abcd"), [1, 2, 3, 4], [("crop", (2, 2), (1.5, 0, 8.5, 10))], [base], photo)
    np.testing.assert_array_equal(one.cross_attention, base)  # a single view: cross_attention as today
    assert one.views[0].box == (1.5, 0.0, 8.5, 10.0)


def test_a_multi_view_trace_saves_and_loads_with_its_views_and_shares(tmp_path):
    trace, raw = _multi()
    path = trace.save(tmp_path / "m.npz")
    with zipfile.ZipFile(path) as zf:
        header = json.loads(str(np.load(zf.open("header.npy"))))
    assert header["version"] == TRACE_VERSION == 3
    assert header["share_kinds"] == ["prompt", "newline", "special"]
    back = CaptionTrace.load(path)
    assert back.views == trace.views
    for i in range(2):
        np.testing.assert_array_equal(back.view_attention(i), trace.view_attention(i))
    assert list(back.key_shares) == list(trace.key_shares)
    np.testing.assert_array_equal(back.key_shares["newline"], raw[..., 12])
    with pytest.raises(AttnlabError, match="view_attention"):
        back.cross_attention


def test_by_word_averages_every_view_and_share_over_a_word_s_pieces():
    trace, raw = _multi()
    trace.word_starts = np.array([True, False, True, True])
    words = trace.by_word()
    assert words.steps == 3
    np.testing.assert_allclose(words.view_attention("high-res")[..., 0, :, :].reshape(L, H, 6), raw[..., :2, 4:10].mean(2), rtol=1e-6)
    np.testing.assert_allclose(words.key_shares["special"][..., 0], raw[..., :2, 13:].sum(-1).mean(2), rtol=1e-6)


def test_a_single_view_trace_with_a_prefix_round_trips_as_version_3(tmp_path):
    rows = _prefix_rows()
    trace = CaptionTrace.from_attention(list("abcd"), [1, 2, 3, 4], rows, (2, 3), np.zeros((30, 45, 3), np.uint8), prefix_tokens=1)
    back = CaptionTrace.load(trace.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.prefix_share, rows[..., 0])
    assert back.key_shares["prefix"] is back.prefix_share and back.views == trace.views
    np.testing.assert_array_equal(back.cross_attention, trace.cross_attention)


def test_a_version_2_file_written_before_views_still_loads():
    """tests/data/trace_v2.npz was written by the code of wave 2 (trace version 2, prefix_share member)."""
    trace = CaptionTrace.load(DATA / "trace_v2.npz")
    rng = np.random.default_rng(21)
    rows = rng.random((2, 2, 3, 7)).astype(np.float32)
    rows /= rows.sum(-1, keepdims=True)
    np.testing.assert_allclose(trace.key_shares["prefix"], rows[..., 0], rtol=1e-6)
    np.testing.assert_allclose(trace.view_attention(0), rows[..., 1:].reshape(2, 2, 3, 2, 3), rtol=1e-6)
    assert trace.views == (View("image", (2, 3), (0.0, 0.0, 30.0, 20.0)),)
    assert trace.model_name == "v2-sample"


def test_a_version_1_file_gets_one_whole_image_view():
    trace = attnlab.CaptionTrace.load(DATA / "trace_v1.npz")
    h, w = trace.image.shape[:2]
    assert trace.views == (View("image", trace.grid, (0.0, 0.0, float(w), float(h))),)
    assert trace.view_attention(0) is trace.cross_attention and trace.key_shares == {}


def _rewrite(path: Path, out: Path, header_change: dict, arrays_change: dict) -> Path:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"]))
    header.update(header_change)
    arrays.update(arrays_change, header=np.array(json.dumps(header)))
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize(
    "header_change, arrays_change, words",
    [
        ({"views": [{"name": "base", "grid": [2, 2], "box": [0, 0, "x", 40]}]}, {}, "is not {name"),
        ({"share_kinds": ["prompt", "prompt", "special"]}, {}, "share_kinds"),
        ({}, {"view_maps": np.zeros((2, 3, 4, 5), np.float32)}, "view_maps has shape"),
        ({}, {"key_shares": np.zeros((2, 2, 3, 4), np.float32)}, "key_shares has shape"),
        ({"grid": [2, 3]}, {}, "first view's grid"),
    ],
)
def test_a_damaged_version_3_file_is_refused_in_one_line(tmp_path, header_change, arrays_change, words):
    trace, _ = _multi()
    bad = _rewrite(trace.save(tmp_path / "m.npz"), tmp_path / "bad.npz", header_change, arrays_change)
    with pytest.raises(AttnlabError) as err:
        CaptionTrace.load(bad)
    assert words in str(err.value) and "damaged" in str(err.value) and "\n" not in str(err.value)


def test_a_multi_view_trace_without_attention_still_knows_its_views():
    trace = CaptionTrace(
        token_ids=[1], words=["a"], logits=None, cross_attention=None, grid=(2, 2), image=np.zeros((4, 4, 3), np.uint8),
        views=(View("base", (2, 2), (0, 0, 4, 4)), View("tile", (1, 1), (0, 0, 2, 2))),
    )
    assert trace.num_layers == 0 and len(trace.views) == 2
    with pytest.raises(AttnlabError, match="holds no attention"):
        trace.view_attention(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "views=" in repr(trace)


def test_old_code_paths_keep_working_on_multi_view_traces():
    """Half precision for folder runs (``dataclasses.replace`` with prefix_share), and diagnostics' one line."""
    from attnlab.batch.plan import as_half

    trace, raw = _multi()
    half = as_half(trace)
    assert half.view_attention(1).dtype == np.float16 and half.key_shares["prompt"].dtype == np.float16
    np.testing.assert_allclose(half.view_attention("high-res")[0, 0, 0].ravel(), raw[0, 0, 0, 4:10], atol=5e-4)
    from attnlab.diagnostics import diagnose

    assert type(trace.diagnostics()).__name__ == "VisionDiagnostics"  # issue 22: the sinks report (tests/test_vlm_sinks.py)
    with pytest.raises(AttnlabError, match="diagnose covers traces of one view") as err:
        diagnose(trace)
    assert "\n" not in str(err.value)
    single = CaptionTrace.from_attention(list("abcd"), [1, 2, 3, 4], _prefix_rows(), (2, 3), np.zeros((30, 45, 3), np.uint8), prefix_tokens=1)
    small = as_half(single)
    assert small.key_shares["prefix"] is small.prefix_share and small.prefix_share.dtype == np.float16
