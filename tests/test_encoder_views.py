"""attnlab.plot's encoder views: the CLS row vs the word rows, a patch's map, rollout; drawn from hand-built traces."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import attnlab  # noqa: E402
from attnlab import plot as encoder_views  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.trace import CaptionTrace  # noqa: E402

GRID = (2, 3)  # non-square
IMAGE_HW = (40, 60)
PREFIX = 2  # CLS + one register
K = PREFIX + GRID[0] * GRID[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def upsample(grid_map: np.ndarray) -> np.ndarray:
    """Independent reference: torch's bilinear interpolate of an ``(h, w)`` map to the image."""
    t = torch.from_numpy(np.asarray(grid_map, dtype=np.float64))[None, None]  # (1, 1, h, w)
    return torch.nn.functional.interpolate(t, size=IMAGE_HW, mode="bilinear", align_corners=False)[0, 0].numpy()


def key(r: int, c: int) -> int:
    """Index of patch (r, c) among the keys: prefix tokens first, then row-major patches."""
    return PREFIX + r * GRID[1] + c


def make_trace(prefix_tokens: int = PREFIX) -> CaptionTrace:
    """3 words; encoder: 2 layers x 2 heads; the CLS token puts 30% on itself, 70% on patch (0, 1)
    in the last layer; words 0/1/2 look at patches (0, 1), (1, 2) and half/half at (0, 0), (0, 1)."""
    k = prefix_tokens + GRID[0] * GRID[1]
    enc = np.zeros((2, 2, k, k))
    enc[..., np.arange(k), np.arange(k)] = 1.0  # everything attends to itself...
    if prefix_tokens:
        enc[1, :, 0] = 0.0
        enc[1, :, 0, 0] = 0.3  # ...except the CLS token in the last layer
        enc[1, :, 0, key(0, 1)] = 0.7
    cross = np.zeros((3, 2, 3, *GRID), dtype=np.float32)  # (layers, heads, steps, h, w)
    cross[:, :, 0, 0, 1] = 0.9
    cross[:, :, 1, 1, 2] = 0.9
    cross[:, :, 2, 0, 0] = cross[:, :, 2, 0, 1] = 0.45
    share = np.full((3, 2, 3), 0.1, dtype=np.float32) if prefix_tokens else None
    return CaptionTrace(
        token_ids=np.array([5, 6, 2]),
        words=["red", "star", "[SEP]"],
        logits=np.zeros((3, 8), dtype=np.float32),
        cross_attention=cross,
        grid=GRID,
        image=np.full((*IMAGE_HW, 3), 128, dtype=np.uint8),
        model_name="toy-vit",
        encoder_self_attention=enc.astype(np.float32),
        prefix_tokens=prefix_tokens,
        prefix_share=share,
    )


def heat(ax) -> matplotlib.image.AxesImage:
    return ax.images[1]  # images[0] is the picture, images[1] the map over it


def test_cls_vs_words_draws_the_cls_row_and_the_word_rows_on_one_scale():
    trace = make_trace()
    fig = encoder_views.cls_vs_words(trace, words=[0, 1, 2])
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 4  # CLS + three words
    cls = np.zeros(GRID)
    cls[0, 1] = 0.7
    np.testing.assert_allclose(heat(axes[0]).get_array(), upsample(cls), atol=1e-7)
    np.testing.assert_allclose(heat(axes[2]).get_array(), upsample(trace.cross_attention[-1, :, 1].mean(axis=0)), atol=1e-7)
    assert all(heat(ax).get_clim() == (0.0, pytest.approx(0.9)) for ax in axes)  # one scale for all panels
    assert "30% on CLS + registers" in axes[0].get_title()
    # overlap = histogram intersection of the normalised maps: word 0 is the CLS map, word 1 disjoint
    assert "overlap with CLS 1.00" in axes[1].get_title()
    assert "overlap with CLS 0.00" in axes[2].get_title()
    assert "overlap with CLS 0.50" in axes[3].get_title()
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(bars) == 1 and "attention weight" in bars[0].get_ylabel()


def test_cls_vs_words_default_words_drop_the_end_token():
    fig = encoder_views.cls_vs_words(make_trace())
    assert len([ax for ax in fig.axes if ax.images]) == 3


def test_patch_attention_shows_the_query_patch_row():
    trace = make_trace()
    fig = encoder_views.patch_attention(trace, (1, 2), layer=0)
    ax = fig.axes[0]
    one_hot = np.zeros(GRID)
    one_hot[1, 2] = 1.0  # in layer 0 every patch attends to itself
    np.testing.assert_allclose(heat(ax).get_array(), upsample(one_hot), atol=1e-7)
    (box,) = ax.patches  # the outline of the query patch, in image pixels
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == pytest.approx((40.0, 20.0, 20.0, 20.0))
    assert "0% on CLS" in ax.get_title()
    assert "attention weight" in fig.axes[1].get_ylabel()


def test_rollout_map_draws_the_rollout_row():
    trace = make_trace()
    a = trace.encoder_self_attention.astype(np.float64).mean(axis=1)  # (layers, K, K)
    r = np.eye(K)
    for layer in a:  # independent: (A + I) row-normalised, multiplied first layer first
        step = layer + np.eye(K)
        r = (step / step.sum(axis=1, keepdims=True)) @ r
    fig = encoder_views.rollout_map(trace, "cls")
    ax = fig.axes[0]
    np.testing.assert_allclose(heat(ax).get_array(), upsample(r[0, PREFIX:].reshape(GRID)), atol=1e-7)
    assert f"{r[0, :PREFIX].sum():.0%} on CLS + registers" in ax.get_title()
    assert heat(ax).get_clim() == (0.0, pytest.approx(r[0, PREFIX:].max()))
    fig = encoder_views.rollout_map(trace, (0, 2))
    np.testing.assert_allclose(heat(fig.axes[0]).get_array(), upsample(r[key(0, 2), PREFIX:].reshape(GRID)), atol=1e-7)


def test_views_on_a_cnn_trace_without_prefix_tokens():
    trace = make_trace(prefix_tokens=0)
    fig = encoder_views.rollout_map(trace, (0, 0))  # rollout works for any encoder
    assert "CLS" not in fig.axes[0].get_title()
    with pytest.raises(AttnlabError, match="no class token"):
        encoder_views.cls_vs_words(trace)
    with pytest.raises(AttnlabError, match="no class token"):
        encoder_views.rollout_map(trace, "cls")


def test_bad_inputs_are_one_line_errors():
    trace = make_trace()
    with pytest.raises(AttnlabError, match="not on the 2 x 3 grid"):
        encoder_views.patch_attention(trace, (2, 0))
    with pytest.raises(AttnlabError, match="layer 5 does not exist"):
        encoder_views.patch_attention(trace, (0, 0), layer=5)
    with pytest.raises(AttnlabError, match="alpha"):
        encoder_views.rollout_map(trace, alpha=2)
    with pytest.raises(AttnlabError, match="words="):
        encoder_views.cls_vs_words(trace, words=[7])
    trace.encoder_self_attention = None
    with pytest.raises(AttnlabError, match="record='all'"):
        encoder_views.rollout_map(trace)
    with pytest.raises(AttnlabError, match="CaptionTrace"):
        encoder_views.patch_attention("trace.npz", (0, 0))


def test_views_on_a_real_vit_trace_read_the_encoder_rows(one_thread):
    """caption(record='all') of a random tiny CPTR: the CLS panel is row 0 of the last block's head mean."""
    from attnlab.models.cptr import CPTRConfig, build_cptr

    torch.manual_seed(0)
    config = CPTRConfig(
        encoder="vit_tiny_patch16_224",
        encoder_args={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        image_size=32, d_model=32, nheads=2, dec_layers=2, dim_feedforward=64, dropout=0.0,
        vocab_size=6, max_positions=5, pad_token_id=0, start_token_id=1, end_token_id=2,
    )
    model = build_cptr(config, vocab=attnlab.tokenizer.Vocab(["[PAD]", "[CLS]", "[SEP]", "a", "b", "c"], wordpiece=False))
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    trace = attnlab.caption(model, image, tokens=[3, 4, 2], record="all")
    assert trace.prefix_tokens == 1 and trace.encoder_self_attention.shape == (2, 2, 17, 17)
    with torch.no_grad():
        pixels = torch.from_numpy(trace.image.copy()).permute(2, 0, 1).float() / 255 * 2 - 1  # (3, 32, 32), mean/std 0.5
        enc = model.begin([pixels], "all")
    row = enc.encoder_attention[-1][0].mean(dim=0)[0].double().numpy()  # (K,): the CLS row, head mean
    fig = encoder_views.cls_vs_words(trace)
    got = fig.axes[0].images[1].get_array()
    t = torch.from_numpy(row[1:].reshape(4, 4))[None, None]
    want = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    encoder_views.patch_attention(trace, (3, 0))
    encoder_views.rollout_map(trace)


def test_encoder_views_draw_the_photo_as_asked_and_say_so():
    trace = make_trace()
    trace.image = np.zeros_like(trace.image) + np.array([200, 30, 60], dtype=np.uint8)  # a coloured photo
    luma = round(0.299 * 200 + 0.587 * 30 + 0.114 * 60)
    for view, args in ((encoder_views.rollout_map, ("cls",)), (encoder_views.patch_attention, ((0, 1),))):
        ax = view(trace, *args).axes[0]
        base = ax.images[0].get_array()  # the photo under the map: grey by default
        assert np.all(base == luma) and ax.get_title().endswith("photo in grey under the map")
        ax = view(trace, *args, underlay="colour").axes[0]
        assert np.array_equal(ax.images[0].get_array()[0, 0], [200, 30, 60])
        assert heat(view(trace, *args, underlay="none").axes[0]).get_alpha() == 1.0  # the map alone, opaque
    fig = encoder_views.cls_vs_words(trace, underlay="colour")
    assert fig._suptitle.get_text().endswith("photo in colour under the map")
    with pytest.raises(AttnlabError, match="underlay="):
        encoder_views.rollout_map(trace, underlay="sepia")
