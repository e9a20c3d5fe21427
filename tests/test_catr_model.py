"""Tests of the CATR model code (`attnlab.models`) against independent implementations:
the published state-dict layout, torchvision's ResNet-101, a position embedding and a
whole forward pass written here from the CATR facts, and the original decoding loop."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import attnlab
from attnlab.models import CATRConfig, build_catr
from attnlab.models.backbone import FrozenBatchNorm2d
from attnlab.preprocess import prepare, resized_size

DATA = Path(__file__).parent / "data"
NUM_ELEMENTS = 84_392_954  # published CATR checkpoints (v1-v3)

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    model = build_catr()
    return model.requires_grad_(False)


def randomize_frozen_bn(body: torch.nn.Module, seed: int) -> None:
    """Non-trivial batch-norm statistics (the builders leave 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.shape[0]
                m.weight.copy_(0.2 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))


def torchvision_resnet(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision's dilated ResNet-101 with its own FrozenBatchNorm2d, loaded with our ``backbone.0.body.*``."""
    net = torchvision.models.resnet101(
        weights=None, replace_stride_with_dilation=[False, False, True], norm_layer=torchvision.ops.FrozenBatchNorm2d
    )
    prefix = "backbone.0.body."
    body = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    result = net.load_state_dict(body, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    return net.eval().requires_grad_(False)


def torchvision_layer4(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def reference_position_embedding(mask: np.ndarray, feats: int = 128, temperature: float = 10000.0) -> np.ndarray:
    """CATR's sine embedding from the README facts, in float64 loops: ``(N, 2*feats, h, w)``."""
    n, h, w = mask.shape
    out = np.zeros((n, 2 * feats, h, w))
    for b in range(n):
        valid = ~mask[b]
        y = np.zeros((h, w))
        x = np.zeros((h, w))
        for c in range(w):
            y[:, c] = np.cumsum(valid[:, c])
        for r in range(h):
            x[r, :] = np.cumsum(valid[r, :])
        y = y / (y[-1:, :] + 1e-6) * 2 * math.pi
        x = x / (x[:, -1:] + 1e-6) * 2 * math.pi
        for i in range(feats):
            freq = temperature ** (2 * (i // 2) / feats)
            f = np.sin if i % 2 == 0 else np.cos
            out[b, i] = f(y / freq)  # y features first
            out[b, feats + i] = f(x / freq)
    return out


def nearest_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H, W) -> (N, h, w): nearest neighbour, source index floor(i * H / h)."""
    big_h, big_w = mask.shape[-2:]
    rows = [i * big_h // h for i in range(h)]
    cols = [j * big_w // w for j in range(w)]
    return mask[:, rows][:, :, cols]


# --------------------------------------------------------------------------- reference forward
def _layer_norm(x, sd, prefix, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]


def _attention(sd, prefix, q_in, k_in, v_in, heads, key_padding_mask=None, causal=False):
    """Seq-first multi-head attention with explicit matmuls. q_in (L, N, E), k_in/v_in (S, N, E)."""
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    e = w.shape[1]
    d = e // heads
    length, n, s = q_in.shape[0], q_in.shape[1], k_in.shape[0]
    q = (q_in @ w[:e].T + b[:e]).reshape(length, n, heads, d).permute(1, 2, 0, 3)  # (N, h, L, d)
    k = (k_in @ w[e : 2 * e].T + b[e : 2 * e]).reshape(s, n, heads, d).permute(1, 2, 0, 3)  # (N, h, S, d)
    v = (v_in @ w[2 * e :].T + b[2 * e :]).reshape(s, n, heads, d).permute(1, 2, 0, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (N, h, L, S)
    if causal:
        scores = scores.masked_fill(torch.ones(length, s, dtype=torch.bool).triu(1), float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).permute(2, 0, 1, 3).reshape(length, n, e)  # (L, N, E)
    return out @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def _ffn(sd, prefix, x):
    hidden = torch.relu(x @ sd[prefix + "linear1.weight"].T + sd[prefix + "linear1.bias"])
    return hidden @ sd[prefix + "linear2.weight"].T + sd[prefix + "linear2.bias"]


def reference_encode(sd, cfg, features, feat_mask):
    """features (N, 2048, h, w) float64, feat_mask (N, h, w) -> memory (S, N, E), pos (S, N, E), mask (N, S)."""
    pos = torch.from_numpy(reference_position_embedding(feat_mask.numpy(), cfg.d_model // 2))  # (N, E, h, w)
    src = F.conv2d(features, sd["input_proj.weight"], sd["input_proj.bias"])  # (N, E, h, w)
    x = src.flatten(2).permute(2, 0, 1)  # (S, N, E)
    pos = pos.flatten(2).permute(2, 0, 1)
    mask = feat_mask.flatten(1)
    for layer in range(cfg.enc_layers):
        p = f"transformer.encoder.layers.{layer}."
        h = _layer_norm(x, sd, p + "norm1.")
        x = x + _attention(sd, p + "self_attn.", h + pos, h + pos, h, cfg.nheads, key_padding_mask=mask)
        x = x + _ffn(sd, p, _layer_norm(x, sd, p + "norm2."))
    return _layer_norm(x, sd, "transformer.encoder.norm."), pos, mask


def reference_decode(sd, cfg, memory, pos, mask, target, target_mask):
    """target, target_mask (N, T) -> logits (N, T, V)."""
    length = target.shape[1]
    words = sd["transformer.embeddings.word_embeddings.weight"][target]  # (N, T, E)
    positions = sd["transformer.embeddings.position_embeddings.weight"][:length]  # (T, E)
    x = _layer_norm(words + positions, sd, "transformer.embeddings.LayerNorm.", eps=cfg.layer_norm_eps)
    x = x.transpose(0, 1)  # (T, N, E)
    query_pos = positions[:, None, :]
    for layer in range(cfg.dec_layers):
        p = f"transformer.decoder.layers.{layer}."
        h = _layer_norm(x, sd, p + "norm1.")
        x = x + _attention(
            sd, p + "self_attn.", h + query_pos, h + query_pos, h, cfg.nheads, key_padding_mask=target_mask, causal=True
        )
        h = _layer_norm(x, sd, p + "norm2.")
        x = x + _attention(sd, p + "multihead_attn.", h + query_pos, memory + pos, memory, cfg.nheads, key_padding_mask=mask)
        x = x + _ffn(sd, p, _layer_norm(x, sd, p + "norm3."))
    x = _layer_norm(x, sd, "transformer.decoder.norm.").transpose(0, 1)  # (N, T, E)
    for i in range(3):
        x = x @ sd[f"mlp.layers.{i}.weight"].T + sd[f"mlp.layers.{i}.bias"]
        if i < 2:
            x = torch.relu(x)
    return x


SMALL = CATRConfig(
    enc_layers=2,
    dec_layers=2,
    vocab_size=50,
    d_model=64,
    nheads=4,
    dim_feedforward=128,
    mlp_hidden=96,
    image_size=64,
    start_token_id=1,
    end_token_id=2,
)


@pytest.fixture(scope="module")
def small_model():
    """A reduced CATR (ResNet-101 backbone) with random weights, varied BN stats and a livelier head."""
    torch.manual_seed(2)
    model = build_catr(SMALL)
    randomize_frozen_bn(model.backbone[0].body, seed=2)
    with torch.no_grad():
        model.input_proj.weight.mul_(8.0)  # ResNet features of random weights are small
        for lin in model.mlp.layers:
            torch.nn.init.normal_(lin.weight, std=2 / lin.in_features**0.5)
            torch.nn.init.zeros_(lin.bias)
    model.requires_grad_(False)
    sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    net = torchvision_resnet(model.state_dict())
    return model, sd, net


# --------------------------------------------------------------------------- tests
def test_state_dict_keys_order_shapes_and_size(full_model):
    expected = json.loads((DATA / "catr_state_dict_keys.json").read_text())
    assert len(expected) == 716
    got = full_model.state_dict()
    assert list(got) == list(expected)
    assert [list(v.shape) for v in got.values()] == list(expected.values())
    assert sum(v.numel() for v in got.values()) == NUM_ELEMENTS
    assert sum(math.prod(s) for s in expected.values()) == NUM_ELEMENTS


def test_backbone_equals_torchvision_dilated_resnet101(full_model):
    body = full_model.backbone[0].body
    randomize_frozen_bn(body, seed=1)
    net = torchvision_resnet(full_model.state_dict())
    torch.manual_seed(1)
    x = torch.randn(1, 3, 75, 99)
    mask = torch.zeros(1, 75, 99, dtype=torch.bool)
    mask[:, :, 80:] = True
    expected = torchvision_layer4(net, x)
    assert expected.shape == (1, 2048, 5, 7)  # stride 16 with the dilated last stage
    features, feat_mask = full_model.backbone[0](x, mask)
    torch.testing.assert_close(features, expected)
    assert torch.equal(feat_mask, nearest_mask(mask, 5, 7))
    assert feat_mask[0, :, :6].logical_not().all() and feat_mask[0, :, 6].all()  # column 6 samples x = 84 >= 80, column 5 x = 70
    # the BN-folded inference copy: the same convolutions with W' = s*W, c' = s*c + t. In
    # float32 each of the ~100 layers changes the rounding of every sum (up to 4608 terms)
    # by a few ulp (~1e-7 relative); accumulated over the depth this is ~1e-6 of the largest
    # activation (9e-7 measured here), so 1e-4 of the largest value bounds it with a wide
    # margin while any real folding mistake (a missed BN, a wrong eps or shift) is O(1).
    with torch.no_grad():
        fused = full_model._inference_body.get(x)
        assert fused is not None and fused is not body
        folded = fused(x)
    scale = expected.abs().max()
    assert float((folded - expected).abs().max() / scale) < 1e-4
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())


def test_position_embedding_matches_spec(full_model):
    mask = torch.zeros(3, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True  # bottom rows padded
    mask[1, :, 4:] = True  # right columns padded
    mask[2, :, 6:] = True
    got = full_model.backbone[1](mask)
    assert got.shape == (3, 256, 5, 7)
    expected = torch.from_numpy(reference_position_embedding(mask.numpy())).float()
    torch.testing.assert_close(got, expected)


def test_reference_forward_gives_same_logits(small_model):
    model, sd, net = small_model
    torch.manual_seed(5)
    images = torch.randn(2, 3, 80, 80)
    mask = torch.zeros(2, 80, 80, dtype=torch.bool)
    mask[0, :, 64:] = True  # image 0 is 80x64, image 1 is 64x80: zero-padded to 80x80
    mask[1, 64:, :] = True
    images = images.masked_fill(mask[:, None], 0.0)
    target = torch.randint(3, SMALL.vocab_size, (2, 9))
    target[:, 0] = SMALL.start_token_id
    target_mask = torch.zeros(2, 9, dtype=torch.bool)
    target_mask[1, 6:] = True
    target[1, 6:] = 0

    logits = model(images, target, target_mask, mask=mask)
    assert logits.shape == (2, 9, SMALL.vocab_size)

    with torch.no_grad():
        features = torchvision_layer4(net, images).double()  # (2, 2048, 5, 5)
    feat_mask = nearest_mask(mask, *features.shape[-2:])
    assert feat_mask[0, :, 4].all() and feat_mask[1, 4, :].all()
    memory, pos, kpm = reference_encode(sd, SMALL, features, feat_mask)
    expected = reference_decode(sd, SMALL, memory, pos, kpm, target, target_mask)
    assert float(expected.std()) > 1.0  # logits are not flat
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)


def reference_caption(sd, cfg, net, pixels, max_len):
    """The decoding loop of the original write-up, on the reference forward:
    a 128-long template (start token, zeros) with a key padding mask; step i reads position i."""
    with torch.no_grad():
        features = torchvision_layer4(net, pixels).double()
    feat_mask = torch.zeros(1, *features.shape[-2:], dtype=torch.bool)
    memory, pos, kpm = reference_encode(sd, cfg, features, feat_mask)
    caption = torch.zeros(1, cfg.max_positions, dtype=torch.long)
    cap_mask = torch.ones(1, cfg.max_positions, dtype=torch.bool)
    caption[:, 0] = cfg.start_token_id
    cap_mask[:, 0] = False
    out = []
    for i in range(max_len):
        predictions = reference_decode(sd, cfg, memory, pos, kpm, caption, cap_mask)[:, i, :]
        predicted_id = int(torch.argmax(predictions, dim=-1)[0])
        out.append(predicted_id)
        if predicted_id == cfg.end_token_id:
            break
        caption[:, i + 1] = predicted_id
        cap_mask[:, i + 1] = False
    return out


def test_template_loop_gives_same_tokens_as_caption(small_model):
    model, sd, net = small_model
    rng = np.random.default_rng(7)
    img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)  # already at the model's size: no resize
    pixels = (torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255.0 - 0.5) / 0.5
    assert torch.equal(prepare([img], SMALL.image_size).pixels, pixels)
    max_len = 5
    expected = reference_caption(sd, SMALL, net, pixels, max_len)
    assert len(set(expected)) > 1  # a caption that is not one token repeated
    assert SMALL.end_token_id not in expected
    for mode in ("template", "incremental"):
        trace = attnlab.caption(model, img, max_len=max_len, mode=mode)
        assert trace.token_ids.tolist() == expected, mode
        assert trace.grid == (3, 4)

    # make a token emitted mid-caption the end token: both loops must stop right there
    k = next(k for k in range(1, max_len) if expected[k] not in expected[:k])
    cfg = dataclasses.replace(SMALL, end_token_id=expected[k])
    stopped = reference_caption(sd, cfg, net, pixels, max_len)
    assert stopped == expected[: k + 1]
    model.config = cfg
    try:
        for mode in ("template", "incremental"):
            trace = attnlab.caption(model, img, max_len=max_len, mode=mode)
            assert trace.token_ids.tolist() == stopped, mode
    finally:
        model.config = SMALL


def test_non_square_image_grid(full_model):
    assert resized_size(320, 240, 299) == (299, 224)
    img = np.zeros((240, 320, 3), dtype=np.uint8)
    batch = prepare([img], 299)
    assert batch.pixels.shape == (1, 3, 224, 299)
    assert batch.images[0].shape == (224, 299, 3)
    mask = torch.zeros(1, 224, 299, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory, feat_mask, pos, grid = full_model.encode(torch.randn(1, 3, 224, 299), mask)
    assert grid == (14, 19)
    assert memory.shape == (266, 1, 256)
    assert pos.shape == (266, 1, 256)
    assert feat_mask.shape == (1, 266) and not feat_mask.any()
