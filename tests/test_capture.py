"""Tests of `attnlab.capture_attention`: every captured weight is checked against an
attention recomputed here from the module's own projection weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnlab import AttentionCapture, AttentionTap, AttnlabError, capture_attention

E, HEADS = 16, 4


# --------------------------------------------------------------------------- reference
def reference_weights(mha: nn.MultiheadAttention, query, key, key_padding_mask=None, attn_mask=None) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt(d)) written out from the module's parameters: ``(N, heads, L, S)``.

    query/key in the module's layout ((L, N, E), (N, L, E) or unbatched (L, E)); masks
    with nn.MultiheadAttention's meaning (bool True = not allowed, float = added).
    Computed in float64.
    """
    if query.dim() == 2:  # unbatched
        query, key = query[None], key[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # -> (N, L, E)
    query, key = query.double(), key.double()
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    if mha.in_proj_weight is not None:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q, b_k = mha.in_proj_bias[:e], mha.in_proj_bias[e : 2 * e]
    n, length, s = query.shape[0], query.shape[1], key.shape[1]
    q = (query @ w_q.double().T + b_q.double()).reshape(n, length, h, d).permute(0, 2, 1, 3)  # (N, h, L, d)
    k = (key @ w_k.double().T + b_k.double()).reshape(n, s, h, d).permute(0, 2, 1, 3)  # (N, h, S, d)
    scores = torch.einsum("nhld,nhsd->nhls", q, k) / math.sqrt(d)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(n, h, length, s)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(m, float("-inf"))
        else:
            scores = scores + m.double()
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).float()


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks, name
        assert not m._forward_pre_hooks, name
        assert not m._forward_hooks_with_kwargs, name
        assert not m._forward_pre_hooks_with_kwargs, name


def padding_mask(n: int, s: int) -> torch.Tensor:
    """(N, S): sample i has its last i keys padded (key 0 is never padded)."""
    kpm = torch.zeros(n, s, dtype=torch.bool)
    for i in range(n):
        if i:
            kpm[i, s - i :] = True
    return kpm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- nn.MultiheadAttention
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "bool_attn", "float_attn", "float_attn_3d", "both"])
def test_mha_weights_equal_recomputation(batch_first, mask_kind):
    n, length, s = 3, 5, 7
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).eval()
    q_in = torch.randn(n, length, E)
    kv_in = torch.randn(n, s, E)
    if not batch_first:
        q_in, kv_in = q_in.transpose(0, 1), kv_in.transpose(0, 1)
    kpm = padding_mask(n, s) if mask_kind in ("key_padding", "both") else None
    attn_mask = None
    if mask_kind in ("bool_attn", "both"):
        attn_mask = torch.rand(length, s) < 0.4
        attn_mask[:, 0] = False  # every query keeps key 0
    elif mask_kind == "float_attn":
        attn_mask = torch.randn(length, s)
        attn_mask[1, 3] = float("-inf")
    elif mask_kind == "float_attn_3d":
        attn_mask = torch.randn(n * HEADS, length, s)
    expected = reference_weights(mha, q_in, kv_in, kpm, attn_mask)

    with capture_attention(mha) as cap:
        out, avg = mha(q_in, kv_in, kv_in, key_padding_mask=kpm, attn_mask=attn_mask)
    ref_out, ref_avg = mha(q_in, kv_in, kv_in, key_padding_mask=kpm, attn_mask=attn_mask)

    assert cap.names == [""]
    (got,) = cap.weights[""]
    assert got.shape == (n, HEADS, length, s)
    torch.testing.assert_close(got, expected)
    if kpm is not None:
        assert bool((got[kpm[:, None, None, :].expand_as(got)] == 0).all())
    # the caller asked for the default head-averaged weights: exactly what it gets without capture
    assert torch.equal(out, ref_out)
    assert torch.equal(avg, ref_avg)
    assert avg.shape == (n, length, s)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_different_kdim_vdim(batch_first):
    n, length, s = 2, 4, 6
    mha = nn.MultiheadAttention(E, HEADS, kdim=6, vdim=10, batch_first=batch_first).eval()
    assert mha.in_proj_weight is None  # separate q/k/v projections
    q_in = torch.randn(n, length, E)
    k_in = torch.randn(n, s, 6)
    v_in = torch.randn(n, s, 10)
    if not batch_first:
        q_in, k_in, v_in = q_in.transpose(0, 1), k_in.transpose(0, 1), v_in.transpose(0, 1)
    kpm = padding_mask(n, s)
    with capture_attention(mha) as cap:
        out, _ = mha(q_in, k_in, v_in, key_padding_mask=kpm)
    torch.testing.assert_close(cap.last(""), reference_weights(mha, q_in, k_in, kpm))
    assert torch.equal(out, mha(q_in, k_in, v_in, key_padding_mask=kpm)[0])


def test_mha_unbatched_input_gets_batch_of_one():
    length, s = 4, 6
    mha = nn.MultiheadAttention(E, HEADS).eval()
    q_in, kv_in = torch.randn(length, E), torch.randn(s, E)
    kpm = torch.tensor([False, False, False, True, False, True])
    with capture_attention(mha) as cap:
        out, avg = mha(q_in, kv_in, kv_in, key_padding_mask=kpm)
    got = cap.last("")
    assert got.shape == (1, HEADS, length, s)
    torch.testing.assert_close(got, reference_weights(mha, q_in, kv_in, kpm))
    ref_out, ref_avg = mha(q_in, kv_in, kv_in, key_padding_mask=kpm)
    assert avg.shape == (length, s)
    assert torch.equal(avg, ref_avg)
    assert torch.equal(out, ref_out)
    # per-head weights asked by the caller, unbatched: (heads, L, S)
    with capture_attention(mha) as cap:
        _, per_head = mha(q_in, kv_in, kv_in, key_padding_mask=kpm, average_attn_weights=False)
    assert per_head.shape == (HEADS, length, s)
    assert torch.equal(per_head, cap.last("")[0])


def test_need_weights_false_caller_gets_none_capture_gets_weights():
    mha = nn.MultiheadAttention(E, HEADS).eval()
    x = torch.randn(5, 2, E)
    kpm = padding_mask(2, 5)
    with capture_attention(mha) as cap:
        out, weights = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert weights is None
    ref_out, ref_weights = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert ref_weights is None
    # with weights asked torch takes its explicit-softmax path instead of the fused kernel
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(cap.last(""), reference_weights(mha, x, x, kpm))


def test_per_head_weights_asked_by_caller_are_passed_through():
    mha = nn.MultiheadAttention(E, HEADS).eval()
    x = torch.randn(5, 2, E)
    with capture_attention(mha) as cap:
        out, per_head = mha(x, x, x, average_attn_weights=False)
    ref_out, ref_per_head = mha(x, x, x, average_attn_weights=False)
    assert torch.equal(per_head, ref_per_head)
    assert torch.equal(out, ref_out)
    assert torch.equal(cap.last(""), ref_per_head)


def test_positional_need_weights_argument():
    # forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights)
    mha = nn.MultiheadAttention(E, HEADS).eval()
    x = torch.randn(5, 2, E)
    with capture_attention(mha) as cap:
        out, weights = mha(x, x, x, None, False)
    assert weights is None
    torch.testing.assert_close(out, mha(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(cap.last(""), reference_weights(mha, x, x))


def test_multiple_calls_one_entry_each():
    mha = nn.MultiheadAttention(E, HEADS).eval()
    inputs = [torch.randn(length, 2, E) for length in (3, 4, 6)]
    with capture_attention(mha) as cap:
        for x in inputs:
            mha(x, x, x)
    calls = cap.weights[""]
    assert len(calls) == 3
    for x, w in zip(inputs, calls):
        torch.testing.assert_close(w, reference_weights(mha, x, x))
    assert cap.last("") is calls[-1]
    assert cap[""] is calls
    cap.clear()
    assert cap.weights == {"": []}
    with pytest.raises(AttnlabError):
        cap.last("")


def test_detach_false_keeps_graph():
    mha = nn.MultiheadAttention(E, HEADS)
    x = torch.randn(4, 1, E)
    with capture_attention(mha, detach=False) as cap:
        mha(x, x, x, need_weights=False)
    w = cap.last("")
    assert w.requires_grad
    w[0, 0, 0, 1].backward()
    assert mha.in_proj_weight.grad is not None and bool(mha.in_proj_weight.grad.abs().sum() > 0)
    with capture_attention(mha) as cap:
        mha(x, x, x)
    assert not cap.last("").requires_grad


# --------------------------------------------------------------------------- torch transformer layers
def _record_inputs(module: nn.MultiheadAttention, store: list):
    def pre_hook(mod, args, kwargs):
        store.append((args[0].detach().clone(), args[1].detach().clone()))

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def test_transformer_encoder_fast_path_is_bypassed():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    n, s = 3, 6
    src = torch.randn(n, s, E)
    kpm = padding_mask(n, s)  # right-padded, as the nested-tensor path requires
    with torch.no_grad():
        plain = encoder(src, src_key_padding_mask=kpm)
        # the fused nested-tensor path ran: it returns exactly 0 on padded positions
        assert bool((plain[kpm] == 0).all())
        inputs = {i: [] for i in range(2)}
        handles = [_record_inputs(encoder.layers[i].self_attn, inputs[i]) for i in range(2)]
        with capture_attention(encoder) as cap:
            captured = encoder(src, src_key_padding_mask=kpm)
        for h in handles:
            h.remove()
    assert cap.names == ["layers.0.self_attn", "layers.1.self_attn"]
    torch.testing.assert_close(captured[~kpm], plain[~kpm])
    for i in range(2):
        assert len(cap[f"layers.{i}.self_attn"]) == 1
        (x, k), = inputs[i]
        assert x.shape == (n, s, E)
        expected = reference_weights(encoder.layers[i].self_attn, x, k, kpm)
        torch.testing.assert_close(cap.last(f"layers.{i}.self_attn"), expected)
    # layer 0 sees the raw input
    assert torch.equal(inputs[0][0][0], src)


def test_transformer_encoder_layer_alone():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    n, s = 2, 5
    src = torch.randn(n, s, E)
    kpm = padding_mask(n, s)
    with torch.no_grad():
        plain = layer(src, src_key_padding_mask=kpm)
        with capture_attention(layer) as cap:
            captured = layer(src, src_key_padding_mask=kpm)
    torch.testing.assert_close(captured[~kpm], plain[~kpm])
    # norm_first=False: self_attn sees the layer input itself
    torch.testing.assert_close(cap.last("self_attn"), reference_weights(layer.self_attn, src, src, kpm))


def test_transformer_decoder_layer():
    torch.manual_seed(3)
    layer = nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0).eval()  # seq-first
    t, s, n = 4, 6, 2
    tgt, memory = torch.randn(t, n, E), torch.randn(s, n, E)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # True above the diagonal
    tgt_kpm = torch.tensor([[False] * t, [False] * (t - 1) + [True]])
    mem_kpm = padding_mask(n, s)
    kwargs = dict(tgt_mask=causal, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=mem_kpm)
    with torch.no_grad():
        plain = layer(tgt, memory, **kwargs)
        self_in, cross_in = [], []
        handles = [_record_inputs(layer.self_attn, self_in), _record_inputs(layer.multihead_attn, cross_in)]
        with capture_attention(layer) as cap:
            captured = layer(tgt, memory, **kwargs)
        for h in handles:
            h.remove()
    assert cap.names == ["self_attn", "multihead_attn"]
    torch.testing.assert_close(captured, plain)
    q, k = self_in[0]
    assert torch.equal(q, tgt)
    expected_self = reference_weights(layer.self_attn, q, k, tgt_kpm, causal)
    torch.testing.assert_close(cap.last("self_attn"), expected_self)
    assert bool((cap.last("self_attn")[:, :, 0, 1:] == 0).all())  # causal
    q, k = cross_in[0]
    assert torch.equal(k, memory)
    torch.testing.assert_close(cap.last("multihead_attn"), reference_weights(layer.multihead_attn, q, k, mem_kpm))


# --------------------------------------------------------------------------- timm
def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5).eval()
    for block in vit.blocks:
        block.attn.fused_attn = True  # what timm picks by default on torch 2; made explicit
    return vit


def test_timm_vit_fused_attention_captured():
    vit = _tiny_vit()
    img = torch.randn(2, 3, 32, 32)
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(i):
        def pre_hook(mod, args):
            inputs[i] = args[0].detach().clone()

        return pre_hook

    handles = [b.attn.register_forward_pre_hook(keep_input(i)) for i, b in enumerate(vit.blocks)]
    with torch.no_grad():
        plain = vit(img)
        with capture_attention(vit) as cap:
            assert not any(b.attn.fused_attn for b in vit.blocks)
            captured = vit(img)
    for h in handles:
        h.remove()
    assert all(b.attn.fused_attn for b in vit.blocks)
    torch.testing.assert_close(captured, plain)
    assert cap.names == [f"blocks.{i}.attn" for i in range(3)]
    tokens = 1 + (32 // 8) ** 2
    for i, block in enumerate(vit.blocks):
        x = inputs[i].double()  # (B, N, C)
        attn = block.attn
        b, n, c = x.shape
        qkv = F.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())  # (B, N, 3C)
        qkv = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]  # (B, heads, N, d)
        expected = ((q @ k.transpose(-2, -1)) * (c // attn.num_heads) ** -0.5).softmax(dim=-1).float()
        got = cap.last(f"blocks.{i}.attn")
        assert got.shape == (2, 3, tokens, tokens)
        torch.testing.assert_close(got, expected)
    assert_no_hooks(vit)


def test_timm_flags_restored_per_block():
    vit = _tiny_vit()
    vit.blocks[1].attn.fused_attn = False
    with capture_attention(vit, "blocks.[01].attn"):
        assert [b.attn.fused_attn for b in vit.blocks] == [False, False, True]
    assert [b.attn.fused_attn for b in vit.blocks] == [True, False, True]


# --------------------------------------------------------------------------- selection and errors
class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0) for _ in range(2)
        )
        self.head = nn.Linear(E, 3)

    def forward(self, x, memory):
        for layer in self.layers:
            x = layer(x, memory)
        return self.head(x)


def test_include_patterns_select_modules():
    model = TwoLayer().eval()
    x, memory = torch.randn(3, 1, E), torch.randn(5, 1, E)
    with capture_attention(model, "layers.*.multihead_attn") as cap:
        model(x, memory)
    assert cap.names == ["layers.0.multihead_attn", "layers.1.multihead_attn"]
    assert all(len(v) == 1 and v[0].shape == (1, HEADS, 3, 5) for v in cap.weights.values())
    with capture_attention(model, ["layers.1.*", "layers.0.self_attn"]) as cap:
        model(x, memory)
    assert cap.names == ["layers.0.self_attn", "layers.1.self_attn", "layers.1.multihead_attn"]
    with capture_attention(model) as cap:
        model(x, memory)
    assert len(cap.names) == 4
    assert isinstance(cap, AttentionCapture)


def test_no_match_error_lists_existing_names():
    model = TwoLayer()
    with pytest.raises(AttnlabError) as info:
        with capture_attention(model, "decoder.*"):
            pass
    msg = str(info.value)
    assert "decoder.*" in msg
    assert "layers.0.self_attn" in msg
    assert_no_hooks(model)
    assert torch.backends.mha.get_fastpath_enabled()


def test_model_without_attention_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(AttnlabError, match="Sequential"):
        with capture_attention(model):
            pass


# --------------------------------------------------------------------------- restoration
@pytest.mark.parametrize("fastpath_before", [True, False])
def test_restoration_after_block_and_after_exception(fastpath_before):
    model = TwoLayer().eval()
    x, memory = torch.randn(3, 1, E), torch.randn(5, 1, E)
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath_before)
    try:
        with capture_attention(model) as cap:
            assert torch.backends.mha.get_fastpath_enabled() is False
            assert model.layers[0].self_attn._forward_hooks  # hooks are installed inside
            model(x, memory)
        assert torch.backends.mha.get_fastpath_enabled() is fastpath_before
        assert_no_hooks(model)
        assert len(cap.last("layers.0.self_attn")) == 1

        with pytest.raises(RuntimeError, match="boom"):
            with capture_attention(model):
                model(x, memory)
                raise RuntimeError("boom")
        assert torch.backends.mha.get_fastpath_enabled() is fastpath_before
        assert_no_hooks(model)

        # an exception inside the model's forward
        with pytest.raises(AssertionError, match="embedding dimension"):
            with capture_attention(model):
                model(torch.randn(3, 1, E + 1), memory)
        assert torch.backends.mha.get_fastpath_enabled() is fastpath_before
        assert_no_hooks(model)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def test_timm_restoration_after_exception():
    vit = _tiny_vit()
    with pytest.raises(ValueError):
        with capture_attention(vit):
            raise ValueError
    assert all(b.attn.fused_attn for b in vit.blocks)
    assert_no_hooks(vit)


@pytest.mark.parametrize("call", ["default", "need_weights_false", "per_head"])
def test_nested_captures(call):
    mha = nn.MultiheadAttention(E, HEADS).eval()
    x = torch.randn(5, 2, E)
    kpm = padding_mask(2, 5)
    kwargs = {"default": {}, "need_weights_false": {"need_weights": False}, "per_head": {"average_attn_weights": False}}[call]
    ref_out, ref_w = mha(x, x, x, key_padding_mask=kpm, **kwargs)
    expected = reference_weights(mha, x, x, kpm)
    with capture_attention(mha) as outer:
        with capture_attention(mha) as inner:
            out, w = mha(x, x, x, key_padding_mask=kpm, **kwargs)
        assert_no_hooks_left = len(mha._forward_hooks) == 1 and len(mha._forward_pre_hooks) == 1
        assert assert_no_hooks_left
        mha(x, x, x, key_padding_mask=kpm, **kwargs)  # only the outer capture is active now
    assert_no_hooks(mha)
    if call == "need_weights_false":
        assert w is None
        torch.testing.assert_close(out, ref_out)
    else:
        assert torch.equal(w, ref_w)
        assert torch.equal(out, ref_out)
    assert len(inner[""]) == 1 and len(outer[""]) == 2
    for got in (inner.last(""), *outer[""]):
        assert got.shape == (2, HEADS, 5, 5)
        torch.testing.assert_close(got, expected)


def test_nested_timm_captures():
    vit = _tiny_vit()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with capture_attention(vit, "blocks.0.attn") as outer:
            with capture_attention(vit) as inner:
                vit(img)
            assert not vit.blocks[0].attn.fused_attn and vit.blocks[1].attn.fused_attn
    assert all(b.attn.fused_attn for b in vit.blocks)
    assert_no_hooks(vit)
    assert torch.equal(outer.last("blocks.0.attn"), inner.last("blocks.0.attn"))
    assert len(inner.names) == 3


# --------------------------------------------------------------------------- handing weights back (substitute=)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kv_dims", [None, (6, 10)])
def test_substitute_identity_keeps_outputs_and_puts_the_weights_in_the_graph(batch_first, kv_dims):
    kdim, vdim = kv_dims or (E, E)
    mha = nn.MultiheadAttention(E, HEADS, kdim=kv_dims and kdim, vdim=kv_dims and vdim, batch_first=batch_first).eval()
    q_in, k_in, v_in = torch.randn(2, 4, E), torch.randn(2, 6, kdim), torch.randn(2, 6, vdim)
    if not batch_first:
        q_in, k_in, v_in = q_in.transpose(0, 1), k_in.transpose(0, 1), v_in.transpose(0, 1)
    kpm = padding_mask(2, 6)
    want, want_avg = mha(q_in, k_in, v_in, key_padding_mask=kpm)
    with capture_attention(mha, detach=False, substitute=lambda n, w: w) as cap:
        got, avg = mha(q_in, k_in, v_in, key_padding_mask=kpm)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(avg, want_avg)
    w = cap.last("")  # (2, heads, 4, 6): what the output was computed from
    (g,) = torch.autograd.grad(got.sum(), w)
    # d out / d w[n, h, l, s] = (v_s projected, head h) . (d out / d out_head): written out here
    e = E // HEADS
    v = v_in if batch_first else v_in.transpose(0, 1)  # (2, 6, vdim)
    w_v = mha.in_proj_weight[2 * E :] if mha.in_proj_weight is not None else mha.v_proj_weight
    vals = (v @ w_v.T + mha.in_proj_bias[2 * E :]).view(2, 6, HEADS, e).transpose(1, 2)  # (2, heads, 6, e)
    upstream = mha.out_proj.weight.sum(0).view(HEADS, e)  # d sum(out) / d (head h's mixed value)
    expected = torch.einsum("nhse,he->nhs", vals, upstream)[:, :, None].expand(-1, -1, 4, -1)
    torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5)
    assert_no_hooks(mha)


def test_substitute_hands_the_module_other_weights():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    q_in, kv_in = torch.randn(1, 3, E), torch.randn(1, 5, E)
    one_hot = torch.zeros(1, HEADS, 3, 5)
    one_hot[..., 2] = 1.0  # every query on key 2
    with capture_attention(mha, substitute=lambda n, w: one_hot) as cap:
        out, avg = mha(q_in, kv_in, kv_in)
    # the output is then key 2's value, projected, for every query
    v = kv_in @ mha.in_proj_weight[2 * E :].T + mha.in_proj_bias[2 * E :]  # (1, 5, E)
    torch.testing.assert_close(out[0], mha.out_proj(v[0, 2]).expand(3, -1), atol=1e-6, rtol=0)
    assert torch.equal(cap.last(""), one_hot) and torch.equal(avg, one_hot.mean(1))
    with pytest.raises(AttnlabError, match="keep their shape"):
        with capture_attention(mha, substitute=lambda n, w: w[:, :1]):
            mha(q_in, kv_in, kv_in)
    assert_no_hooks(mha)


@pytest.mark.parametrize("heads", [None, 2])
def test_substitute_at_a_tap_in_the_callers_layout(heads):
    tap = AttentionTap(num_heads=heads)
    weights = torch.rand(2 * (heads or 1), 3, 4) if heads else torch.rand(2, 3, 4)  # merged or single-head
    seen = []
    with capture_attention(tap, substitute=lambda n, w: (seen.append(w.shape), w * 2)[1]) as cap:
        out = tap(weights)
    assert seen == [(2, heads or 1, 3, 4)]
    torch.testing.assert_close(out, weights * 2)  # handed back in the layout the code uses
    assert cap.last("").shape == (2, heads or 1, 3, 4)


def test_substitute_in_timm_blocks():
    vit = _tiny_vit()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = vit(img)
        with capture_attention(vit, substitute=lambda n, w: w) as cap:
            same = vit(img)
        uniform = lambda n, w: torch.full_like(w, 1.0 / w.shape[-1])  # noqa: E731
        with capture_attention(vit, "blocks.0.attn", substitute=uniform) as cap:
            other = vit(img)
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(other, plain)
    torch.testing.assert_close(cap.last("blocks.0.attn"), torch.full((1, 3, 17, 17), 1 / 17))
    assert all(b.attn.fused_attn for b in vit.blocks)
