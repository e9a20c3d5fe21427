"""Tests of `attnlab.caption` and `CaptionTrace` on small random CATR-layout models:
the two decoding modes against each other and against attention recomputed here with
hooks of our own on the model's `nn.MultiheadAttention` modules."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import attnlab
from attnlab import AttnlabError, CaptionTrace, capture_attention
from attnlab.models import CATRConfig, build_catr
from attnlab.tokenizer import Vocab

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")

WORDS = [
    "[PAD]", "[CLS]", "[SEP]", "a", "red", "green", "blue", "yellow", "small", "big", "circle", "square",
    "triangle", "star", "on", "the", "left", "right", "of", "above", "below", "and", "near", "with",
]  # fmt: skip
PAD, START, END = 0, 1, 2
CFG = CATRConfig(
    backbone="small",
    d_model=32,
    nheads=4,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=64,
    vocab_size=len(WORDS),
    mlp_hidden=64,
    image_size=64,
    pad_token_id=PAD,
    start_token_id=START,
    end_token_id=END,
)
LAYERS, HEADS = CFG.dec_layers, CFG.nheads
ATOL = 1e-5


def make_model(seed: int = 2, suppress_end: bool = True):
    torch.manual_seed(seed)
    model = build_catr(CFG, vocab=Vocab(WORDS, wordpiece=False), name="tiny-test")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.backbone[0].body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        for lin in model.mlp.layers:  # a livelier head than the default init: varied greedy tokens
            torch.nn.init.normal_(lin.weight, std=2 / lin.in_features**0.5)
            torch.nn.init.zeros_(lin.bias)
        if suppress_end:
            model.mlp.layers[-1].bias[END] = -100.0
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def image(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def pixels_and_mask(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images already at the model's size (long side 64): normalise and zero-pad, written out here."""
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    pixels = torch.zeros(len(images), 3, height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for b, im in enumerate(images):
        assert max(im.shape[:2]) == CFG.image_size
        x = torch.from_numpy(im).permute(2, 0, 1).float() / 255.0
        pixels[b, :, : im.shape[0], : im.shape[1]] = (x - 0.5) / 0.5
        mask[b, : im.shape[0], : im.shape[1]] = False
    return pixels, mask


def own_template_run(model, pixels, mask, prefixes, steps):
    """The template loop run here with our own hooks: at step i the 128-long template holds
    the start token and ``prefixes[b][:i]``. Each layer's cross-attention is recomputed by
    calling its ``nn.MultiheadAttention.forward`` again with per-head weights asked for.

    Returns cross ``(layers, N, heads, steps, S)`` (row i of every step) and logits ``(N, steps, V)``.
    """
    layers = model.transformer.decoder.layers
    store: dict[int, torch.Tensor] = {}

    def make_hook(index):
        def hook(mod, args, kwargs, output):
            kw = dict(kwargs, need_weights=True, average_attn_weights=False)
            store[index] = mod.forward(*args, **kw)[1]  # (N, heads, 128, S)

        return hook

    handles = [layer.multihead_attn.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    n = pixels.shape[0]
    rows, logits = [], []
    try:
        for i in range(steps):
            template = torch.zeros(n, CFG.max_positions, dtype=torch.long)
            template_mask = torch.ones(n, CFG.max_positions, dtype=torch.bool)
            template[:, 0] = START
            template_mask[:, 0] = False
            for b in range(n):
                template[b, 1 : i + 1] = torch.as_tensor(prefixes[b][:i])
                template_mask[b, 1 : i + 1] = False
            with torch.no_grad():
                out = model(pixels, template, template_mask, mask=mask)  # (N, 128, V)
            logits.append(out[:, i])
            rows.append(torch.stack([store[l][:, :, i] for l in range(len(layers))]))  # (layers, N, heads, S)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows, dim=3), torch.stack(logits, dim=1)


def assert_traces_close(a: CaptionTrace, b: CaptionTrace, record_all: bool = False) -> None:
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert a.words == b.words and a.caption == b.caption and a.grid == b.grid
    np.testing.assert_array_equal(a.image, b.image)
    torch.testing.assert_close(torch.from_numpy(a.logits), torch.from_numpy(b.logits))
    np.testing.assert_allclose(a.cross_attention, b.cross_attention, rtol=0, atol=ATOL)
    if record_all:
        np.testing.assert_allclose(a.encoder_self_attention, b.encoder_self_attention, rtol=0, atol=ATOL)
        np.testing.assert_allclose(a.decoder_self_attention, b.decoder_self_attention, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- modes agree
def test_modes_agree_greedy_record_all(model):
    img = image(0)
    inc = attnlab.caption(model, img, max_len=5, record="all")
    tpl = attnlab.caption(model, img, max_len=5, mode="template", record="all")
    assert inc.meta["mode"] == "incremental" and tpl.meta["mode"] == "template"
    assert inc.steps == 5
    assert len(set(inc.token_ids.tolist())) > 1  # not one token repeated
    assert_traces_close(inc, tpl, record_all=True)
    s = 6 * 8
    assert inc.encoder_self_attention.shape == (CFG.enc_layers, HEADS, s, s)
    assert inc.decoder_self_attention.shape == (LAYERS, HEADS, 5, 5)
    np.testing.assert_allclose(inc.encoder_self_attention.sum(-1), 1.0, rtol=0, atol=1e-5)
    dec = inc.decoder_self_attention
    np.testing.assert_allclose(dec.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert (dec[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0).all()  # row t sees steps 0..t
    # record="cross" records the same cross-attention, record="none" the same tokens and none
    # (record="all" runs the encoder's attention on torch's explicit-softmax path, not the fused kernel)
    cross = attnlab.caption(model, img, max_len=5)
    np.testing.assert_allclose(cross.cross_attention, inc.cross_attention, rtol=0, atol=ATOL)
    assert cross.encoder_self_attention is None and cross.decoder_self_attention is None
    none = attnlab.caption(model, img, max_len=5, record="none")
    assert none.cross_attention is None and none.token_ids.tolist() == inc.token_ids.tolist()


def test_modes_agree_teacher_forced(model):
    img = image(1)
    tokens = model.spec.vocab.encode("a red circle left of the big square") + [END]
    inc = attnlab.caption(model, img, tokens=tokens, record="all")
    tpl = attnlab.caption(model, img, tokens=tokens, mode="template", record="all")
    assert inc.token_ids.tolist() == tokens
    assert_traces_close(inc, tpl, record_all=True)


# --------------------------------------------------------------------------- independent recomputation
@pytest.mark.parametrize("mode", ["incremental", "template"])
def test_cross_attention_equals_own_recomputation(model, mode):
    img = image(2)
    trace = attnlab.caption(model, img, max_len=4, mode=mode)
    pixels, mask = pixels_and_mask([img])
    cross, logits = own_template_run(model, pixels, mask, [trace.token_ids.tolist()], trace.steps)
    # greedy: the token of step i is the argmax of our own logits at row i
    assert logits[0].argmax(dim=-1).tolist() == trace.token_ids.tolist()
    torch.testing.assert_close(torch.from_numpy(trace.logits), logits[0])
    expected = cross[:, 0].reshape(LAYERS, HEADS, trace.steps, 6, 8).numpy()
    np.testing.assert_allclose(trace.cross_attention, expected, rtol=0, atol=ATOL)


def test_trace_shapes_sums_and_views(model):
    trace = attnlab.caption(model, image(3), max_len=4)
    ca = trace.cross_attention
    assert ca.dtype == np.float32
    assert ca.shape == (LAYERS, HEADS, 4, 6, 8)
    assert trace.grid == (6, 8)
    assert (trace.num_layers, trace.num_heads, trace.steps) == (LAYERS, HEADS, 4)
    np.testing.assert_allclose(ca.sum(axis=(-2, -1)), 1.0, rtol=0, atol=1e-5)
    assert (ca >= 0).all()
    np.testing.assert_array_equal(trace.mean_heads(), ca.mean(axis=1))
    assert trace.mean_heads().shape == (LAYERS, 4, 6, 8)
    np.testing.assert_array_equal(trace.layer(-1), ca[LAYERS - 1])
    np.testing.assert_array_equal(trace.layer(0), ca[0])
    for bad in (LAYERS, -LAYERS - 1):
        with pytest.raises(AttnlabError):
            trace.layer(bad)
    assert trace.words == [WORDS[t] for t in trace.token_ids]
    assert trace.caption == " ".join(WORDS[t] for t in trace.token_ids)
    assert trace.logits.shape == (4, len(WORDS))
    assert trace.image.shape == (48, 64, 3) and trace.image.dtype == np.uint8
    assert trace.model_name == "tiny-test"


# --------------------------------------------------------------------------- teacher forcing
@pytest.mark.parametrize("mode", ["incremental", "template"])
def test_teacher_forcing_logits_come_from_prefix(model, mode):
    img = image(4)
    tokens = model.spec.vocab.encode("a green star") + [END] + model.spec.vocab.encode("near the")  # END mid-way: no stop
    trace = attnlab.caption(model, img, tokens=tokens, mode=mode)
    assert trace.token_ids.tolist() == tokens
    assert trace.steps == len(tokens)
    assert trace.words == ["a", "green", "star", "[SEP]", "near", "the"]
    assert trace.caption == "a green star near the"
    # the model's own forward on the whole sequence: position i sees start + tokens[:i]
    pixels, mask = pixels_and_mask([img])
    target = torch.tensor([[START] + tokens[:-1]])
    with torch.inference_mode():
        full = model(pixels, target, torch.zeros_like(target, dtype=torch.bool), mask=mask)[0]  # (T, V)
    torch.testing.assert_close(torch.from_numpy(trace.logits), full)


def test_teacher_forcing_batched_per_image_tokens(model):
    imgs = [image(5), image(6)]
    per_image = [model.spec.vocab.encode("a red square"), model.spec.vocab.encode("the blue star above a circle")]
    traces = attnlab.caption(model, imgs, tokens=per_image)
    assert [t.token_ids.tolist() for t in traces] == per_image
    assert [t.cross_attention.shape[2] for t in traces] == [3, 6]
    shared = attnlab.caption(model, imgs, tokens=per_image[0])
    assert [t.token_ids.tolist() for t in shared] == [per_image[0]] * 2
    for alone_tokens, img, got in zip(per_image, imgs, traces):
        alone = attnlab.caption(model, img, tokens=alone_tokens)
        assert_traces_close(alone, got)
    with pytest.raises(AttnlabError):
        attnlab.caption(model, imgs, tokens=[per_image[0]] * 3)
    with pytest.raises(AttnlabError):
        attnlab.caption(model, imgs[0], tokens=[len(WORDS)])
    with pytest.raises(AttnlabError):
        attnlab.caption(model, imgs[0], tokens=[])


def test_tokens_given_as_arrays_or_tensors(model):
    img = image(4)
    greedy = attnlab.caption(model, img, max_len=4)
    ids = greedy.token_ids.tolist()
    for tokens in (greedy.token_ids, torch.tensor(ids), np.array([ids]), [torch.tensor(ids)], [np.int64(i) for i in ids]):
        forced = attnlab.caption(model, img, tokens=tokens)
        # re-tracing the greedy caption by teacher forcing reproduces its trace
        assert_traces_close(forced, greedy)
    both = attnlab.caption(model, [img, image(5)], tokens=np.array([ids, ids[::-1]]))
    assert [t.token_ids.tolist() for t in both] == [ids, ids[::-1]]


# --------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("mode", ["incremental", "template"])
def test_greedy_stops_at_end_token(mode):
    model = make_model(suppress_end=False)
    with torch.no_grad():
        model.mlp.layers[-1].bias[END] = 1e4  # the end token wins at the first step
    trace = attnlab.caption(model, image(7), max_len=5, mode=mode)
    assert trace.token_ids.tolist() == [END]
    assert trace.words == ["[SEP]"] and trace.caption == ""
    assert trace.cross_attention.shape == (LAYERS, HEADS, 1, 6, 8)
    assert trace.stopped == "end" and trace.meta["stopped"] == "end"


@pytest.mark.parametrize("mode", ["incremental", "template"])
def test_greedy_stops_at_first_end_token_mid_caption(model, mode):
    img = image(8)
    free = attnlab.caption(model, img, max_len=6, mode=mode).token_ids.tolist()
    assert END not in free and len(free) == 6
    k = next(k for k in range(1, 6) if free[k] not in free[:k])
    original = model.config
    model.config = dataclasses.replace(CFG, end_token_id=free[k])
    try:
        trace = attnlab.caption(model, img, max_len=6, mode=mode)
    finally:
        model.config = original
    assert trace.token_ids.tolist() == free[: k + 1]
    assert trace.steps == k + 1


@pytest.mark.parametrize("mode", ["incremental", "template"])
@pytest.mark.parametrize("max_len", [1, 3])
def test_greedy_stops_at_max_len(model, mode, max_len):
    trace = attnlab.caption(model, image(9), max_len=max_len, mode=mode)
    assert trace.steps == max_len
    assert trace.cross_attention.shape[2] == max_len
    assert END not in trace.token_ids.tolist() and trace.stopped == "max_len" == trace.meta["stopped"]
    beam = attnlab.caption(model, image(9), max_len=max_len, mode=mode, beams=2)
    assert END not in beam.token_ids.tolist() and beam.stopped == "max_len"
    forced = attnlab.caption(model, image(9), tokens=trace.token_ids.tolist())
    assert forced.stopped == "given"  # teacher forcing: the given caption decides where it ends


def test_how_a_caption_stopped_is_read_from_old_traces_too(model, tmp_path):
    trace = attnlab.caption(model, image(9), max_len=2)
    for ids, want in (([3, END], "end"), ([3, 4], "max_len")):
        trace.token_ids = np.array(ids)
        trace.meta = {"mode": "incremental", "end_token": END}  # saved before "stopped" was recorded
        trace.save(tmp_path / f"old-{want}.npz")
        assert attnlab.CaptionTrace.load(tmp_path / f"old-{want}.npz").stopped == want
    trace.meta = {}
    assert trace.stopped is None  # nothing to tell from


def test_bad_arguments(model):
    for bad in (0, CFG.max_positions, 2.0):
        with pytest.raises(AttnlabError):
            attnlab.caption(model, image(0), max_len=bad)
    with pytest.raises(AttnlabError):
        attnlab.caption(model, image(0), mode="beam")
    with pytest.raises(AttnlabError):
        attnlab.caption(model, image(0), record="some")
    with pytest.raises(AttnlabError):
        attnlab.caption(model, [])


def test_training_mode_is_restored(model):
    model.train()
    try:
        attnlab.caption(model, image(0), max_len=1)
        assert model.training and model.transformer.training
    finally:
        model.eval()
    attnlab.caption(model, image(0), max_len=1)
    assert not model.training


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("mode", ["incremental", "template"])
def test_batch_of_different_sizes_equals_each_image_alone(model, mode):
    """Mixed sizes (some not divisible by the stride 8): every image gets exactly what it gets
    alone; checked against our own template run on the unpadded image too."""
    imgs = [image(10, 48, 64), image(11, 64, 40), image(12, 37, 64), image(13, 48, 64), image(14, 64, 21)]
    traces = attnlab.caption(model, imgs, max_len=3, mode=mode)
    assert isinstance(traces, list) and len(traces) == len(imgs)
    for trace, img in zip(traces, imgs):
        alone = attnlab.caption(model, img, max_len=3, mode=mode)
        assert_traces_close(alone, trace)
        np.testing.assert_array_equal(trace.image, img)
        # the grid is what the image alone gives: ceil(side / 8) per axis of the small CNN
        assert trace.grid == (-(-img.shape[0] // 8), -(-img.shape[1] // 8))
        np.testing.assert_allclose(trace.cross_attention.sum(axis=(-2, -1)), 1.0, rtol=0, atol=1e-5)
        pixels, mask = pixels_and_mask([img])
        cross, logits = own_template_run(model, pixels, mask, [trace.token_ids.tolist()], trace.steps)
        expected = cross[:, 0].reshape(LAYERS, HEADS, trace.steps, *trace.grid).numpy()
        np.testing.assert_allclose(trace.cross_attention, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(torch.from_numpy(trace.logits), logits[0])


def test_batch_record_all_and_forced_equal_alone(model):
    imgs = [image(15, 64, 40), image(16, 48, 64)]
    per_image = [model.spec.vocab.encode("a red square"), model.spec.vocab.encode("the blue star above a circle")]
    both = attnlab.caption(model, imgs, tokens=per_image, record="all")
    for img, ids, got in zip(imgs, per_image, both):
        assert_traces_close(attnlab.caption(model, img, tokens=ids, record="all"), got, record_all=True)
        s = got.grid[0] * got.grid[1]
        assert got.encoder_self_attention.shape == (CFG.enc_layers, HEADS, s, s)


def test_alone_equals_batched_with_same_size_image(model):
    img, other = image(12), image(13)
    for mode in ("incremental", "template"):
        alone = attnlab.caption(model, img, max_len=4, mode=mode, record="all")
        batched = attnlab.caption(model, [img, other], max_len=4, mode=mode, record="all")
        assert_traces_close(alone, batched[0], record_all=True)
        assert batched[1].token_ids.tolist() != [] and batched[1].grid == (6, 8)


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip(model, tmp_path):
    trace = attnlab.caption(model, image(14), max_len=3, record="all")
    trace.meta["note"] = "round trip"
    path = trace.save(tmp_path / "trace")
    assert path == tmp_path / "trace.npz" and path.is_file()
    back = CaptionTrace.load(path)
    for name in ("token_ids", "logits", "cross_attention", "image", "encoder_self_attention", "decoder_self_attention"):
        a, b = getattr(trace, name), getattr(back, name)
        assert a.dtype == b.dtype, name
        assert np.array_equal(a, b), name
    assert back.words == trace.words
    assert back.caption == trace.caption
    assert back.grid == trace.grid
    assert back.model_name == "tiny-test"
    assert back.meta == {"mode": "incremental", "end_token": END, "stopped": "max_len", "note": "round trip"}
    # a trace without optional arrays
    bare = attnlab.caption(model, image(14), max_len=2, record="none")
    back = CaptionTrace.load(bare.save(tmp_path / "bare.npz"))
    assert back.cross_attention is None and back.encoder_self_attention is None
    assert np.array_equal(back.logits, bare.logits)


def test_load_rejects_foreign_and_corrupt_files(model, tmp_path):
    with pytest.raises(AttnlabError):
        CaptionTrace.load(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
    with pytest.raises(AttnlabError):
        CaptionTrace.load(corrupt)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros((3, 3)))
    with pytest.raises(AttnlabError):
        CaptionTrace.load(foreign)
    other_format = tmp_path / "other.npz"
    np.savez(other_format, header=np.array(json.dumps({"format": "something-else", "version": 1})))
    with pytest.raises(AttnlabError):
        CaptionTrace.load(other_format)
    # a real trace whose header says it comes from a newer attnlab
    path = attnlab.caption(model, image(15), max_len=1).save(tmp_path / "real.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays["header"]))
    header["version"] = 99
    arrays["header"] = np.array(json.dumps(header))
    newer = tmp_path / "newer.npz"
    np.savez(newer, **arrays)
    with pytest.raises(AttnlabError, match="newer"):
        CaptionTrace.load(newer)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AttnlabError):
        CaptionTrace.load(truncated)


# --------------------------------------------------------------------------- capture around the model
def test_model_outputs_unchanged_by_capture(model):
    pixels, mask = pixels_and_mask([image(16)])
    target = torch.tensor([[START] + model.spec.vocab.encode("a small circle")])
    target_mask = torch.zeros_like(target, dtype=torch.bool)
    with torch.no_grad():
        plain = model(pixels, target, target_mask, mask=mask)
        with capture_attention(model) as cap:
            captured = model(pixels, target, target_mask, mask=mask)
    torch.testing.assert_close(captured, plain)
    s, t = 6 * 8, target.shape[1]
    assert sorted(cap.names) == sorted(
        [f"transformer.encoder.layers.{i}.self_attn" for i in range(CFG.enc_layers)]
        + [f"transformer.decoder.layers.{i}.{m}" for i in range(LAYERS) for m in ("self_attn", "multihead_attn")]
    )
    for name in cap.names:
        (w,) = cap[name]
        if name.startswith("transformer.encoder"):
            assert w.shape == (1, HEADS, s, s)
        elif name.endswith("multihead_attn"):
            assert w.shape == (1, HEADS, t, s)
        else:
            assert w.shape == (1, HEADS, t, t)
            assert (w[0][:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0).all()
