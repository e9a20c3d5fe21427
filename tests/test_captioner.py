"""The captioner seam: a toy captioner written here (not with attnlab's classes) goes
through ``caption()``, the plots and the explorer; ``state.select``; the autograd path;
``CaptionTrace.from_attention``; argument checks; several threads on one model."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab import AttnlabError, CaptionTrace
from attnlab.captioner import CaptionerSpec, Encoded, StepOutput
from attnlab.models import CATRConfig, build_catr
from attnlab.tokenizer import Vocab

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WORDS = ["[PAD]", "[CLS]", "[SEP]", "a", "red", "green", "blue", "circle", "square", "on", "left", "the"]
PREFIX, SIDE, PATCH = 3, 32, 8  # CLS + 2 registers; a 32 px square input; 8 px patches -> 4 x 4
GRID = (SIDE // PATCH, SIDE // PATCH)


@dataclass
class ToyState:
    memory: torch.Tensor  # (N, K, D)
    position: int = 0

    def select(self, indices: torch.Tensor) -> "ToyState":
        return ToyState(self.memory.index_select(0, indices), self.position)


class ToyCaptioner(nn.Module):
    """A minimal captioner implementing the protocol directly: patch embedding with three
    prefix tokens, one cross-attention layer (nn.MultiheadAttention), a linear head."""

    def __init__(self, seed: int = 0, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, d, PATCH, PATCH)
        self.prefix = nn.Parameter(torch.randn(1, PREFIX, d))
        self.embed = nn.Embedding(len(WORDS), d)
        self.pos = nn.Embedding(8, d)
        self.cross = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, len(WORDS))
        with torch.no_grad():
            self.head.bias[2] = -50.0  # never end early: captions run to max_len
            self.head.bias[:3] -= 50.0
        self.eval()

    @property
    def spec(self) -> CaptionerSpec:
        return CaptionerSpec(
            name="toy", vocab=Vocab(WORDS, wordpiece=False), bos=1, eos=2, pad=0, max_len=6,
            image_size=SIDE, resize="stretch", prefix_tokens=PREFIX,
        )  # fmt: skip

    def memory(self, x: torch.Tensor) -> torch.Tensor:
        f = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, D)
        return torch.cat((self.prefix.expand(x.shape[0], -1, -1), f), dim=1)  # (N, 3 + 16, D)

    def begin(self, pixels, record):
        x = torch.stack(list(pixels))  # (N, 3, 32, 32): "stretch" makes every input square
        return Encoded(ToyState(self.memory(x)), [GRID] * len(pixels))

    def step(self, state, ids, record):
        q = self.embed(ids)[:, None] + self.pos.weight[state.position]  # (N, 1, D)
        out, w = self.cross(q, state.memory, state.memory, need_weights=True, average_attn_weights=False)
        state.position += 1
        logits = self.head(out[:, 0] + q[:, 0])  # (N, V)
        return StepOutput(logits, None if record == "none" else [w[:, :, 0]])


def photo(seed: int, h: int = 20, w: int = 40) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def toy_reference(model: ToyCaptioner, img: np.ndarray, steps: int):
    """Greedy decoding and the cross-attention written out here from the projection weights."""
    from PIL import Image

    x = torch.from_numpy(np.array(Image.fromarray(img).resize((SIDE, SIDE)))).permute(2, 0, 1).float() / 255
    x = ((x - 0.5) / 0.5)[None]  # (1, 3, 32, 32)
    mha = model.cross
    d, heads = mha.embed_dim, mha.num_heads
    wq, wk = mha.in_proj_weight[:d], mha.in_proj_weight[d : 2 * d]
    bq, bk = mha.in_proj_bias[:d], mha.in_proj_bias[d : 2 * d]
    with torch.no_grad():
        mem = model.memory(x)[0]  # (K, D)
        k = (mem @ wk.T + bk).view(-1, heads, d // heads).transpose(0, 1)  # (heads, K, dh)
        token, ids, rows = 1, [], []
        for t in range(steps):
            qv = model.embed.weight[token] + model.pos.weight[t]  # (D,)
            q = (qv @ wq.T + bq).view(heads, 1, d // heads)  # (heads, 1, dh)
            w = torch.softmax(q @ k.transpose(1, 2) / (d // heads) ** 0.5, dim=-1)[:, 0]  # (heads, K)
            out, _ = mha(qv[None, None], mem[None], mem[None])
            token = int(model.head(out[0, 0] + qv).argmax())
            ids.append(token)
            rows.append(w)
    return ids, torch.stack(rows, dim=1).numpy()  # (heads, steps, K)


# --------------------------------------------------------------------------- a foreign captioner
def test_toy_captioner_through_caption_plots_and_explorer(tmp_path):
    model = ToyCaptioner()
    img = photo(0)
    trace = attnlab.caption(model, img)
    ids, rows = toy_reference(model, img, trace.steps)
    assert trace.token_ids.tolist() == ids and trace.steps == 6
    assert trace.model_name == "toy" and trace.grid == GRID and trace.prefix_tokens == PREFIX
    # raw weights on the patch keys; the prefix keys' weight is kept, nothing renormalised
    np.testing.assert_allclose(trace.prefix_share[0], rows[:, :, :PREFIX].sum(-1), atol=1e-6)
    np.testing.assert_allclose(trace.cross_attention[0], rows[:, :, PREFIX:].reshape(2, 6, *GRID), atol=1e-6)
    np.testing.assert_allclose(trace.cross_attention.sum((-2, -1)) + trace.prefix_share, 1.0, atol=1e-6)
    assert (trace.prefix_share > 0.01).all()  # the prefix really takes weight: hiding it would mislead
    # "stretch": the model saw a 32 x 32 square; the figure shows the photo with its aspect
    assert trace.image.shape == (16, 32, 3)

    from attnlab import plot

    fig = plot.word_grid(trace)
    assert len([ax for ax in fig.axes if ax.images]) >= trace.steps
    explorer = attnlab.explore(trace)
    before = explorer.image.value
    explorer.slider.value = 3
    assert explorer.image.value != before

    back = CaptionTrace.load(trace.save(tmp_path / "toy.npz"))
    np.testing.assert_array_equal(back.prefix_share, trace.prefix_share)
    assert back.prefix_tokens == PREFIX


def test_batches_of_the_toy_equal_single_images():
    model = ToyCaptioner(1)
    imgs = [photo(1), photo(2, 40, 20), photo(3, 33, 33)]
    both = attnlab.caption(model, imgs, record="cross")
    for img, got in zip(imgs, both):
        alone = attnlab.caption(model, img)
        assert got.token_ids.tolist() == alone.token_ids.tolist()
        np.testing.assert_allclose(got.cross_attention, alone.cross_attention, atol=1e-6)
        np.testing.assert_allclose(got.prefix_share, alone.prefix_share, atol=1e-6)


def test_not_a_captioner_names_wrap():
    with pytest.raises(AttnlabError, match="attnlab.wrap"):
        attnlab.caption(nn.Linear(3, 3), photo(0))
    with pytest.raises(AttnlabError, match="template"):
        attnlab.caption(ToyCaptioner(), photo(0), mode="template")


# --------------------------------------------------------------------------- CATR: select and autograd
CFG = CATRConfig(
    backbone="small", d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
    vocab_size=len(WORDS), mlp_hidden=32, image_size=48, pad_token_id=0, start_token_id=1, end_token_id=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def catr():
    torch.manual_seed(3)
    model = build_catr(CFG, vocab=Vocab(WORDS, wordpiece=False), name="tiny")
    with torch.no_grad():
        model.mlp.layers[-1].bias[2] = -100.0  # no early end: captions run to max_len
    return model


def pixels_of(model, images):
    from attnlab.preprocess import prepare_for

    return prepare_for(images, model.spec)[0]


def test_select_keeps_and_reorders_entries(catr):
    images = [photo(4, 48, 36), photo(5, 30, 48), photo(6, 48, 48)]
    ids = [torch.tensor([1, 1, 1]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])]
    with torch.inference_mode():
        full = catr.begin(pixels_of(catr, images), "all")
        outs = [catr.step(full.state, ids[0], "all"), catr.step(full.state, ids[1], "all")]
        sub = catr.begin(pixels_of(catr, images), "all")
        catr.step(sub.state, ids[0], "all")
        picked = sub.state.select(torch.tensor([2, 0]))  # drop image 1, swap the others
        got = catr.step(picked, ids[1][[2, 0]], "all")
    torch.testing.assert_close(got.logits, outs[1].logits[[2, 0]], atol=1e-6, rtol=0)
    for a, b in zip(got.cross_attention, outs[1].cross_attention):  # per layer (M, heads, K)
        torch.testing.assert_close(a, b[[2, 0]], atol=1e-6, rtol=0)
    for a, b in zip(got.self_attention, outs[1].self_attention):  # per layer (M, heads, 2)
        torch.testing.assert_close(a, b[[2, 0]], atol=1e-6, rtol=0)
    assert full.grids == [(6, 5), (4, 6), (6, 6)]
    # padding keys of the shorter grids get exactly zero weight
    k = max(h * w for h, w in full.grids)
    for b, (h, w) in enumerate(full.grids):
        assert (outs[0].cross_attention[0][b, :, h * w :] == 0).all()
        assert outs[0].cross_attention[0].shape[-1] == k


def test_autograd_path_gives_gradients_of_the_same_weights(catr):
    images = [photo(7, 48, 40)]
    with torch.inference_mode():
        enc = catr.begin(pixels_of(catr, images), "all")
        fast = [catr.step(enc.state, torch.tensor([t]), "all") for t in (1, 4)]
    before = {k: v.clone() for k, v in catr.state_dict().items()}
    with torch.enable_grad():
        enc = catr.begin(pixels_of(catr, images), "all")
        slow = [catr.step(enc.state, torch.tensor([t]), "all") for t in (1, 4)]
        target = slow[1].logits[0, 5]
        wanted = [*slow[1].cross_attention, *slow[0].cross_attention, *slow[1].self_attention, *enc.encoder_attention]
        grads = torch.autograd.grad(target, wanted, allow_unused=True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.logits, b.logits.detach(), atol=1e-5, rtol=0)
        for x, y in zip(a.cross_attention, b.cross_attention):
            torch.testing.assert_close(x, y.detach(), atol=1e-6, rtol=0)
    layers = len(slow[1].cross_attention)
    # step 1's logit reaches every map of step 1, the encoder's, and step 0's maps of every
    # layer but the last (through the self-attention keys/values cached at position 0)
    unused = {2 * layers - 1}  # step 0, last layer: feeds only step 0's own logits
    for i, g in enumerate(grads):
        if i in unused:
            assert g is None
        else:
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, i
    for k, v in catr.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert all(p.grad is None for p in catr.parameters())


# --------------------------------------------------------------------------- from_attention
def test_from_attention_splits_prefix_and_checks_rows():
    rng = np.random.default_rng(0)
    raw = rng.random((2, 3, 4, PREFIX + 6))  # (layers, heads, steps, K) on a 2 x 3 grid
    raw /= raw.sum(-1, keepdims=True)
    img = photo(8, 20, 30)
    trace = CaptionTrace.from_attention(
        ["a", "red", "circle", "[SEP]"], [3, 4, 7, 2], torch.from_numpy(raw), (2, 3), img, prefix_tokens=PREFIX
    )
    np.testing.assert_allclose(trace.prefix_share, raw[..., :PREFIX].sum(-1), atol=1e-6)
    np.testing.assert_allclose(trace.cross_attention, raw[..., PREFIX:].reshape(2, 3, 4, 2, 3), atol=1e-6)
    assert trace.probabilities() is None and trace.logits is None
    np.testing.assert_array_equal(trace.image, img)
    # (steps, K) alone is one layer and one head
    one = CaptionTrace.from_attention(["a"], [3], raw[0, 0, :1, PREFIX:] / raw[0, 0, :1, PREFIX:].sum(), (2, 3), img)
    assert one.cross_attention.shape == (1, 1, 1, 2, 3) and one.prefix_share is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="sum to"):  # prefix dropped by the caller: rows do not sum to 1
            CaptionTrace.from_attention(["a"], [3], raw[0, 0, :1, PREFIX:], (2, 3), img)
    for bad in (
        dict(cross_attention=raw[..., :-1]),  # wrong number of keys
        dict(grid=(3, 3)),
        dict(token_ids=[3, 4, 7]),  # steps disagree
        dict(token_ids=[3.0, 4.0, 7.0, 2.0]),
        dict(cross_attention=-raw),
        dict(logits=np.zeros((3, 12))),
    ):
        kwargs = dict(words=["a", "red", "circle", "[SEP]"], token_ids=[3, 4, 7, 2], cross_attention=raw,
                      grid=(2, 3), image=img, prefix_tokens=PREFIX)  # fmt: skip
        kwargs.update(bad)
        with pytest.raises(AttnlabError):
            CaptionTrace.from_attention(**kwargs)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("tokens", ["a small", [None], [1.7], np.array([1.0, 2.0]), [[3, "a"]], 3.5, {"a": 1}])
def test_bad_tokens_are_one_line_errors(catr, tokens):
    with pytest.raises(AttnlabError) as info:
        attnlab.caption(catr, photo(9), tokens=tokens)
    assert "\n" not in str(info.value)


def test_numpy_integers_are_accepted(catr):
    a = attnlab.caption(catr, photo(9), max_len=np.int64(3))
    assert a.steps == 3
    b = attnlab.caption(catr, photo(9), tokens=np.array([3, 4], dtype=np.int32))
    assert b.token_ids.tolist() == [3, 4]
    with pytest.raises(AttnlabError):
        attnlab.caption(catr, photo(9), max_len=np.float64(3))


# --------------------------------------------------------------------------- threads
@pytest.mark.parametrize(("mode", "record"), [("template", "cross"), ("incremental", "all"), ("template", "all")])
def test_threads_sharing_a_model_get_sequential_results(catr, mode, record):
    images = [photo(10 + i, 48, 40 + i) for i in range(4)]
    expected = [attnlab.caption(catr, im, max_len=3, mode=mode, record=record) for im in images]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = attnlab.caption(catr, images[i], max_len=3, mode=mode, record=record)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        got = results[i]
        assert isinstance(got, CaptionTrace), got
        assert got.token_ids.tolist() == exp.token_ids.tolist()
        np.testing.assert_allclose(got.cross_attention, exp.cross_attention, atol=1e-6)
        if record == "all":
            np.testing.assert_allclose(got.encoder_self_attention, exp.encoder_self_attention, atol=1e-6)
    assert torch.backends.mha.get_fastpath_enabled()  # the flag the captures switched off is back
