"""The CPTR-style captioner (timm ViT + transformer decoder) and the capture of timm's fused attention.

Incremental decoding through the captioner seam (``begin``/``step`` with a
key/value cache) is checked against the model's own full teacher-forced
forward, whose attention weights are read by hooks on the
``nn.MultiheadAttention`` modules and timm blocks; the capture itself is
checked against a recomputation from each block's qkv weights and against
timm's own ``AttentionExtract``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import AttnlabError, capture_attention
from attnlab.captioner import CaptionerSpec, as_captioner
from attnlab.models.cptr import CPTR, CPTRConfig, build_cptr
from attnlab.tokenizer import Vocab

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH, REG = 8, 2
PREFIX = 1 + REG  # class token + registers
TOKENS = [f"w{i}" for i in range(11)]


def tiny_config(**changes) -> CPTRConfig:
    """ViT of width 32 (patch 8, 2 blocks, 2 registers) + a width-24 decoder (a projection between)."""
    values = dict(
        encoder="vit_tiny_patch16_224",
        encoder_args={"patch_size": PATCH, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": REG},
        image_size=32,
        d_model=24,
        nheads=3,
        dec_layers=2,
        dim_feedforward=48,
        dropout=0.0,
        vocab_size=len(TOKENS),
        max_positions=9,
        pad_token_id=0,
        start_token_id=1,
        end_token_id=2,
    )
    values.update(changes)
    return CPTRConfig(**values)


@pytest.fixture(scope="module", params=[False, True], ids=["cptr", "key-positions"])
def model(request) -> CPTR:
    """Two tiny CPTRs: CPTR's layout, and with 2-D positions added to the cross-attention keys."""
    torch.manual_seed(0)
    return build_cptr(tiny_config(key_positions=request.param), vocab=Vocab(TOKENS, wordpiece=False), name="tiny-cptr")


def full_forward(model: CPTR, pixels: torch.Tensor, ids: torch.Tensor):
    """Logits ``(N, T, V)`` and per layer the captured decoder self/cross and encoder weights."""
    with capture_attention(model, ["layers.*.self_attn", "layers.*.cross_attn", "encoder.blocks.*"]) as cap:
        logits = model(pixels, ids)
    pick = lambda suffix: [cap.last(n) for n in cap.names if n.endswith(suffix)]  # noqa: E731
    return logits, pick("self_attn"), pick("cross_attn"), [cap.last(n) for n in cap.names if n.startswith("encoder.")]


def run_steps(model: CPTR, pixels: list[torch.Tensor], ids: torch.Tensor, record: str = "all"):
    """begin + one step per column of ids ``(N, T)``: per step the StepOutput."""
    enc = model.begin(pixels, record)
    return enc, [model.step(enc.state, ids[:, t], record) for t in range(ids.shape[1])]


# --------------------------------------------------------------------------- the seam
def test_spec_describes_the_model(model):
    spec = model.spec
    assert isinstance(spec, CaptionerSpec) and as_captioner(model) is model
    assert spec.name == "tiny-cptr" and spec.vocab.token(5) == "w5"
    assert (spec.bos, spec.eos, spec.pad, spec.max_len) == (1, 2, 0, 8)
    assert spec.image_size == 32 and spec.resize == "stretch" and spec.prefix_tokens == PREFIX
    assert model.encoder.num_prefix_tokens == PREFIX


def test_incremental_equals_full_forward(model):
    """Every logit and every attention row of begin/step equals the teacher-forced forward (1e-5)."""
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 5, 7, 3, 9, 2], [1, 4, 4, 10, 6, 8]])  # (N, T)
    with torch.no_grad():
        logits, selfs, cross, enc_full = full_forward(model, pixels, ids)
        enc, outs = run_steps(model, list(pixels), ids)
    keys = PREFIX + (32 // PATCH) ** 2
    assert enc.grids == [(4, 4), (4, 4)]
    assert len(enc.encoder_attention) == 2 and len(cross) == 2
    for got, want in zip(enc.encoder_attention, enc_full):
        assert got.shape == (2, 2, keys, keys)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for t, out in enumerate(outs):
        torch.testing.assert_close(out.logits, logits[:, t], atol=1e-5, rtol=0)
        for layer in range(2):
            assert out.cross_attention[layer].shape == (2, 3, keys)
            torch.testing.assert_close(out.cross_attention[layer], cross[layer][:, :, t], atol=1e-5, rtol=0)
            assert out.self_attention[layer].shape == (2, 3, t + 1)
            torch.testing.assert_close(out.self_attention[layer], selfs[layer][:, :, t, : t + 1], atol=1e-5, rtol=0)
            assert float(selfs[layer][:, :, t, t + 1 :].abs().sum()) == 0.0  # the full forward is causal too


def test_records_none_and_cross_give_the_same_logits(model):
    torch.manual_seed(2)
    pixels = list(torch.randn(2, 3, 32, 32))
    ids = torch.tensor([[1, 5, 7], [1, 3, 3]])
    with torch.no_grad():
        _, all_ = run_steps(model, pixels, ids, "all")
        enc, none = run_steps(model, pixels, ids, "none")
        _, cross = run_steps(model, pixels, ids, "cross")
    assert enc.encoder_attention is None
    for a, n, c in zip(all_, none, cross):
        torch.testing.assert_close(n.logits, a.logits, atol=1e-5, rtol=0)
        assert n.cross_attention is None and n.self_attention is None
        assert c.self_attention is None
        for x, y in zip(c.cross_attention, a.cross_attention):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_mixed_sizes_equal_single_images(model):
    """A batch of three sizes (not multiples of the patch) gives each image what it gets alone."""
    torch.manual_seed(3)
    images = [torch.randn(3, 32, 32), torch.randn(3, 37, 29), torch.randn(3, 32, 32), torch.randn(3, 20, 50)]
    grids = [(4, 4), (4, 3), (4, 4), (2, 6)]
    ids = torch.tensor([[1, 5, 7], [1, 4, 9], [1, 8, 8], [1, 2, 3]])
    with torch.no_grad():
        enc, outs = run_steps(model, images, ids)
        assert enc.grids == grids
        keys = PREFIX + 16
        for b, image in enumerate(images):
            alone, alone_outs = run_steps(model, [image], ids[b : b + 1])
            k = PREFIX + grids[b][0] * grids[b][1]
            assert alone.grids == [grids[b]]
            for layer in range(2):
                got = enc.encoder_attention[layer][b]  # (heads, K, K)
                assert got.shape == (2, keys, keys)
                torch.testing.assert_close(got[:, :k, :k], alone.encoder_attention[layer][0], atol=1e-5, rtol=0)
                assert float(got[:, k:].abs().sum() + got[:, :, k:].abs().sum()) == 0.0
            for out, single in zip(outs, alone_outs):
                torch.testing.assert_close(out.logits[b], single.logits[0], atol=1e-5, rtol=0)
                for layer in range(2):
                    row = out.cross_attention[layer][b]  # (heads, K)
                    torch.testing.assert_close(row[:, :k], single.cross_attention[layer][0], atol=1e-5, rtol=0)
                    assert float(row[:, k:].sum()) == 0.0


def test_select_reorders_and_drops(model):
    """select([2, 0]) continues exactly like a fresh decode of those two images."""
    torch.manual_seed(4)
    images = list(torch.randn(3, 3, 32, 32))
    first = torch.tensor([1, 1, 1])
    later = torch.tensor([[6, 9], [4, 3]])  # (M, steps) after selection
    with torch.no_grad():
        enc = model.begin(images, "all")
        model.step(enc.state, first, "all")
        state = enc.state.select(torch.tensor([2, 0]))
        fresh = model.begin([images[2], images[0]], "all")
        model.step(fresh.state, first[:2], "all")
        for t in range(later.shape[1]):
            got = model.step(state, later[:, t], "all")
            want = model.step(fresh.state, later[:, t], "all")
            torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
            for g, w in zip(got.cross_attention + got.self_attention, want.cross_attention + want.self_attention):
                assert g.shape[0] == 2
                torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
        dropped = enc.state.select(torch.tensor([1]))
        assert dropped.layers[0].cross_k.shape[0] == 1 and dropped.layers[0].self_k.shape == (1, 3, 1, 8)


def _grads(model: CPTR, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of a logit w.r.t. every returned weight of begin + two steps (autograd on)."""
    enc = model.begin(images, "all")
    model.step(enc.state, torch.tensor([1] * len(images)), "all")
    out = model.step(enc.state, torch.tensor([5] * len(images)), "all")
    decoder = [*out.cross_attention, *out.self_attention]
    return decoder, list(torch.autograd.grad(out.logits[:, 3].sum(), [*enc.encoder_attention, *decoder]))


def test_gradients_flow_to_the_returned_weights(model):
    """With autograd on, the returned weights are in the graph of the logits (not copies)."""
    torch.manual_seed(5)
    params = [p.detach().clone() for p in model.parameters()]
    _, grads = _grads(model, [torch.randn(3, 32, 32), torch.randn(3, 32, 32)])
    assert len(grads) == 2 + 2 + 2
    for g in grads:
        assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    # images of several sizes: the decoder's weights still are the model's own
    enc = model.begin([torch.randn(3, 32, 32), torch.randn(3, 24, 40)], "cross")
    out = model.step(enc.state, torch.tensor([1, 1]), "cross")
    (g,) = torch.autograd.grad(out.logits[:, 4].sum(), [out.cross_attention[-1]])
    assert float(g.abs().sum()) > 0
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))


def test_cross_attention_gradient_is_the_value_product(model):
    """d logit / d A of the last layer equals (d logit / d out) V^T: A is what multiplies V."""
    torch.manual_seed(7)
    enc = model.begin([torch.randn(3, 32, 32)], "cross")
    layer = model.layers[-1]
    outs = []
    handle = layer.cross_attn.out_proj.register_forward_pre_hook(lambda m, args: outs.append(args[0]))
    try:
        out = model.step(enc.state, torch.tensor([1]), "cross")
    finally:
        handle.remove()
    target = out.logits[0, 6]
    weights = out.cross_attention[-1]  # (1, heads, K)
    g_w, g_out = torch.autograd.grad(target, [weights, outs[0]])  # g_out: (1, 1, E), heads concatenated
    v = enc.state.layers[-1].cross_v  # (1, heads, K, Dh)
    heads = v.shape[1]
    expected = torch.einsum("nhd,nhkd->nhk", g_out[:, 0].view(1, heads, -1), v)  # (1, heads, K)
    torch.testing.assert_close(g_w, expected, atol=1e-6, rtol=1e-5)


def test_other_input_sizes_use_interpolated_positions(model):
    """dynamic_img_size: a 48 x 64 input gives a 6 x 8 grid (plumbing, not quality)."""
    with torch.no_grad():
        enc = model.begin([torch.randn(3, 48, 64)], "all")
        out = model.step(enc.state, torch.tensor([1]), "cross")
    assert enc.grids == [(6, 8)]
    assert out.cross_attention[0].shape == (1, 3, PREFIX + 48)
    assert enc.encoder_attention[0].shape == (1, 2, PREFIX + 48, PREFIX + 48)
    torch.testing.assert_close(out.cross_attention[0].sum(-1), torch.ones(1, 3))


def test_bad_inputs_get_one_line_errors(model):
    with pytest.raises(AttnlabError, match="record"):
        model.begin([torch.zeros(3, 32, 32)], "most")
    with pytest.raises(AttnlabError, match=r"\(3, h, w\)"):
        model.begin([torch.zeros(32, 32)], "cross")
    with pytest.raises(AttnlabError, match="no image"):
        model.begin([], "cross")
    with pytest.raises(AttnlabError, match="smaller than one patch"):
        model.begin([torch.zeros(3, 4, 40)], "cross")
    with torch.no_grad():
        enc = model.begin([torch.zeros(3, 32, 32)], "none")
        for _ in range(9):
            model.step(enc.state, torch.tensor([4]), "none")
        with pytest.raises(AttnlabError, match="at most 9 positions"):
            model.step(enc.state, torch.tensor([4]), "none")


def test_config_errors_are_one_line():
    with pytest.raises(AttnlabError, match="timm has no model"):
        CPTR(tiny_config(encoder="no_such_vit"))
    with pytest.raises(AttnlabError, match="CPTR needs a ViT"):
        CPTR(tiny_config(encoder="resnet18", encoder_args={}))
    with pytest.raises(AttnlabError, match="'no_such_arg' is not a ViT size or layout keyword"):
        CPTR(tiny_config(encoder_args={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "no_such_arg": 1}))
    with pytest.raises(AttnlabError, match="divisible"):
        CPTR(tiny_config(nheads=5))
    with pytest.raises(AttnlabError, match="vocab_size"):
        CPTRConfig.from_dict({**tiny_config().to_dict(), "end_token_id": 11})
    with pytest.raises(AttnlabError, match="plain values"):
        CPTRConfig.from_dict({**tiny_config().to_dict(), "encoder_args": {"depth": {"x": 1}}})
    with pytest.raises(AttnlabError, match="tokens but the model predicts"):
        CPTR(tiny_config(), vocab=Vocab(["a", "b"], wordpiece=False))


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(model, tmp_path):
    path = attnlab.save_checkpoint(model, tmp_path / "tiny.pt")
    loaded = attnlab.load_model("cptr", checkpoint=path)
    assert isinstance(loaded, CPTR) and not loaded.training
    a, b = loaded.spec, model.spec
    assert (a.name, a.bos, a.eos, a.pad, a.max_len, a.prefix_tokens) == (b.name, b.bos, b.eos, b.pad, b.max_len, b.prefix_tokens)
    assert loaded.vocab.tokens == TOKENS and loaded.config == model.config
    pixels, ids = torch.randn(1, 3, 32, 32), torch.tensor([[1, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, ids), model(pixels, ids), atol=0, rtol=0)
    again = attnlab.load_model(checkpoint=path)  # the file says what it is
    assert isinstance(again, CPTR)


def test_checkpoint_of_the_other_kind_is_refused(model, tmp_path):
    cptr_file = attnlab.save_checkpoint(model, tmp_path / "tiny.pt")
    with pytest.raises(AttnlabError, match="CPTR"):
        attnlab.load_model("catr", checkpoint=cptr_file)
    catr_file = tmp_path / "catr.pt"
    catr = attnlab.load_model()  # the bundled CATR-style model
    attnlab.save_checkpoint(catr, catr_file)
    with pytest.raises(AttnlabError, match="not a CPTR checkpoint"):
        attnlab.load_model("cptr", checkpoint=catr_file)


def test_hostile_cptr_config_is_refused_before_building(model, tmp_path):
    """A config asking for a far larger encoder than the weights fails on shapes, not after allocating it."""
    obj = torch.load(attnlab.save_checkpoint(model, tmp_path / "t.pt"), weights_only=True)
    obj["config"]["encoder_args"] = {**obj["config"]["encoder_args"], "embed_dim": 8192, "depth": 64, "num_heads": 2}
    torch.save(obj, tmp_path / "hostile.pt")
    with pytest.raises(AttnlabError, match="does not fit"):
        attnlab.load_model("cptr", checkpoint=tmp_path / "hostile.pt")


# --------------------------------------------------------------------------- timm's fused attention
def _vit(**changes):
    import timm

    torch.manual_seed(6)
    args = dict(patch_size=8, embed_dim=48, depth=3, num_heads=3, reg_tokens=4, img_size=32, dynamic_img_size=True, num_classes=0)
    args.update(changes)
    vit = timm.create_model("vit_tiny_patch16_224", **args).eval()
    assert all(b.attn.fused_attn for b in vit.blocks)  # timm's default on torch 2
    return vit


def _recompute(block_attn, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from the block's qkv weights (and q/k norms), in float64: ``(B, heads, N, N)``."""
    attn = copy.deepcopy(block_attn).double()
    b, n, c = x.shape
    qkv = F.linear(x.double(), attn.qkv.weight, attn.qkv.bias)  # (B, N, 3C)
    qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q @ k.transpose(-2, -1)) * attn.head_dim**-0.5).softmax(dim=-1).float()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_timm_attention_matches_recomputation_and_attention_extract(qk_norm):
    from timm.utils import AttentionExtract

    vit = _vit(qk_norm=qk_norm)
    x = torch.randn(2, 3, 32, 48)  # non-square: a 4 x 6 grid + 5 prefix tokens
    inputs = {}
    handles = [
        b.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
        for i, b in enumerate(vit.blocks)
    ]
    try:
        with torch.no_grad():
            plain = vit.forward_features(x)
            with capture_attention(vit) as cap:
                captured = vit.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    assert all(b.attn.fused_attn for b in vit.blocks)  # restored
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    unfused = copy.deepcopy(vit)
    for b in unfused.blocks:
        b.attn.fused_attn = False  # AttentionExtract reads the softmax node, which fused blocks skip
    with torch.no_grad():
        extracted = AttentionExtract(unfused, method="fx")(x)  # {"blocks.i.attn.softmax": (B, heads, N, N)}
    assert list(extracted) == [f"blocks.{i}.attn.softmax" for i in range(3)]
    for i in range(3):
        got = cap.last(f"blocks.{i}.attn")
        assert got.shape == (2, 3, 5 + 24, 5 + 24)
        torch.testing.assert_close(got, _recompute(vit.blocks[i].attn, inputs[i]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, extracted[f"blocks.{i}.attn.softmax"], atol=1e-5, rtol=1e-5)


def test_cptr_encoder_attention_is_timms(model):
    """begin(record='all') returns what AttentionExtract reads from the same encoder."""
    from timm.utils import AttentionExtract

    image = torch.randn(3, 40, 32)
    with torch.no_grad():
        enc = model.begin([image], "all")
        unfused = copy.deepcopy(model.encoder)
        for b in unfused.blocks:
            b.attn.fused_attn = False
        extracted = AttentionExtract(unfused, method="fx")(image[None])
    assert all(b.attn.fused_attn for b in model.encoder.blocks)
    for got, want in zip(enc.encoder_attention, extracted.values()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
