"""``attnlab.wrap`` on models written here as a student would: a timm ViT encoder with an
``nn.TransformerDecoder(batch_first=True)``, and a GPT-2-style decoder whose attention is
plain tensor code. Weights are recomputed here from the projection matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnlab
from attnlab import AttnlabError, AttentionTap
from attnlab.tokenizer import BPEVocab, Vocab, make_vocab

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WORDS = ["[PAD]", "[CLS]", "[SEP]", "a", "red", "green", "blue", "circle", "square", "left", "of", "the", "##s"]
BOS, EOS, V = 1, 2, len(WORDS)
SIDE, PATCH, D = 32, 8, 32
GRID = (SIDE // PATCH, SIDE // PATCH)


def causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).triu(1)  # True = may not attend


class Student(nn.Module):
    """timm ViT (CLS + 16 patch tokens) -> nn.TransformerDecoder(batch_first=True) -> linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        self.encoder = VisionTransformer(img_size=SIDE, patch_size=PATCH, embed_dim=D, depth=2, num_heads=2, num_classes=0)
        self.embed = nn.Embedding(V, D)
        self.pos = nn.Embedding(16, D)
        layer = nn.TransformerDecoderLayer(D, 4, 64, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(D, V)
        with torch.no_grad():
            self.head.bias[EOS] = -20.0  # captions run to max_len
        self.eval()

    def decode(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos.weight[:t]  # (N, t, D)
        return self.head(self.decoder(x, memory, tgt_mask=causal(t), tgt_is_causal=True))  # (N, t, V)


def wrap_student(model: Student, **kw):
    return attnlab.wrap(
        model, encode=model.encoder.forward_features, decode=model.decode,
        cross_attention="decoder.layers.*.multihead_attn", grid=GRID, image_size=SIDE,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bos=BOS, eos=EOS, vocab=WORDS, max_len=6, **kw,
    )  # fmt: skip


def photo(seed: int, h: int = 24, w: int = 40) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def model_input(img: np.ndarray) -> torch.Tensor:
    from PIL import Image

    x = torch.from_numpy(np.array(Image.fromarray(img).resize((SIDE, SIDE)))).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]  # (1, 3, 32, 32): "stretch"


@torch.no_grad()
def recompute_cross(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) from the in-projection weights: (N, heads, L, S)."""
    e, h = mha.embed_dim, mha.num_heads
    q = F.linear(query, mha.in_proj_weight[:e], mha.in_proj_bias[:e]).unflatten(-1, (h, e // h)).transpose(1, 2)
    k = F.linear(key, mha.in_proj_weight[e : 2 * e], mha.in_proj_bias[e : 2 * e]).unflatten(-1, (h, e // h)).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) / (e // h) ** 0.5, dim=-1)


def inputs_of(modules, run):
    """Call ``run()`` with forward pre-hooks of our own recording each module's (query, key) inputs."""
    seen = {}

    def recorder(i):
        def hook(mod, args, kwargs):
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            seen[i] = (query.detach(), key.detach())

        return hook

    handles = [m.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            out = run()
    finally:
        for hd in handles:
            hd.remove()
    return out, [seen[i] for i in range(len(modules))]


# --------------------------------------------------------------------------- the student model
def test_student_model_in_three_lines_matches_recomputation():
    model = Student()
    cap = wrap_student(model)
    assert cap.spec.prefix_tokens == 1  # the CLS token, reported
    img = photo(0)
    trace = attnlab.caption(cap, img)
    assert trace.steps == 6 and trace.grid == GRID and trace.model_name == "Student"

    # independent: greedy loop and teacher-forced weights recomputed from the projections
    x = model_input(img)
    with torch.no_grad():
        memory = model.encoder.forward_features(x)  # (1, 17, D)
        ids = [BOS]
        for _ in range(6):
            ids.append(int(model.decode(memory, torch.tensor([ids]))[0, -1].argmax()))
    assert trace.token_ids.tolist() == ids[1:]
    layers = [layer.multihead_attn for layer in model.decoder.layers]
    logits, qk = inputs_of(layers, lambda: model.decode(memory, torch.tensor([ids[:-1]])))
    for li, (mha, (query, key)) in enumerate(zip(layers, qk)):
        w = recompute_cross(mha, query, key)[0]  # (heads, steps, 17): row i is the query predicting ids[i + 1]
        np.testing.assert_allclose(trace.cross_attention[li], w[:, :, 1:].reshape(4, 6, *GRID).numpy(), atol=1e-5)
        np.testing.assert_allclose(trace.prefix_share[li], w[:, :, 0].numpy(), atol=1e-5)
        # the off-by-one students make: row i - 1 is a different map
        assert np.abs(trace.cross_attention[li, :, 1:] - w[:, :-1, 1:].reshape(4, 5, *GRID).numpy()).max() > 1e-3
    assert logits[0].argmax(-1).tolist() == trace.token_ids.tolist()  # row i predicts token i

    from attnlab import plot

    plot.word_grid(trace)
    explorer = attnlab.explore(trace)
    before = explorer.image.value
    explorer.slider.value = 2
    assert explorer.image.value != before


def test_student_batches_encoder_attention_and_training_mode_restored():
    model = Student(1)
    cap = wrap_student(model, encoder_attention="encoder.blocks.*.attn", self_attention="decoder.layers.*.self_attn")
    imgs = [photo(1), photo(2, 40, 24)]
    model.train()
    both = attnlab.caption(cap, imgs, record="all")
    assert model.training  # put back as it was
    model.eval()
    for img, got in zip(imgs, both):
        alone = attnlab.caption(cap, img, record="all")
        assert got.token_ids.tolist() == alone.token_ids.tolist()
        np.testing.assert_allclose(got.cross_attention, alone.cross_attention, atol=1e-5)
        assert got.encoder_self_attention.shape == (2, 2, 17, 17)  # CLS + 16 patches
        np.testing.assert_allclose(got.encoder_self_attention.sum(-1), 1, atol=1e-5)
        assert got.decoder_self_attention.shape == (2, 4, 6, 6)
        dec = got.decoder_self_attention
        assert np.allclose(dec[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]], 0)


# --------------------------------------------------------------------------- hand-written attention
class HandBlock(nn.Module):
    """A GPT-2-style decoder block in plain tensor code: causal self-attention, cross-attention."""

    def __init__(self, d: int, heads: int, tap: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.cq, self.ckv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.attn_dropout = nn.Dropout(0.1)
        self.cross_dropout = nn.Dropout(0.1)
        self.tap = AttentionTap(num_heads=heads) if tap else None
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def split(self, x):  # (N, L, D) -> (N, heads, L, dh)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, memory):
        h = self.ln1(x)
        q, (k, v) = self.split(self.q(h)), map(self.split, self.kv(h).chunk(2, -1))
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        att = att.masked_fill(causal(x.shape[1]), float("-inf")).softmax(-1)
        att = self.attn_dropout(att)
        x = x + (att @ v).transpose(1, 2).flatten(2)
        h = self.ln2(x)
        q, (k, v) = self.split(self.cq(h)), map(self.split, self.ckv(memory).chunk(2, -1))
        if self.tap is not None:  # merged-head layout, as bmm code has it
            n, heads, t, dh = q.shape
            att = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)) * dh**-0.5  # (N * heads, t, S)
            att = self.tap(att.softmax(-1))
            out = torch.bmm(att, v.flatten(0, 1)).unflatten(0, (n, heads))  # (N, heads, t, dh)
        else:
            att = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)  # (N, heads, t, S)
            out = self.cross_dropout(att) @ v
        return x + out.transpose(1, 2).flatten(2)


class HandWritten(nn.Module):
    def __init__(self, tap: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patchify = nn.Conv2d(3, D, PATCH, PATCH)
        self.embed, self.pos = nn.Embedding(V, D), nn.Embedding(16, D)
        self.blocks = nn.ModuleList(HandBlock(D, 4, tap) for _ in range(2))
        self.head = nn.Linear(D, V)
        with torch.no_grad():
            self.head.bias[EOS] = -20.0
        self.eval()

    def encode(self, x):
        return self.patchify(x).flatten(2).transpose(1, 2)  # (N, 16, D): no prefix

    def decode(self, memory, ids):
        x = self.embed(ids) + self.pos.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, memory)
        return self.head(x)


@pytest.mark.parametrize("tap", [False, True])
def test_hand_written_attention_through_dropout_or_tap(tap):
    model = HandWritten(tap)
    pattern = "blocks.*.tap" if tap else "blocks.*.cross_dropout"
    cap = attnlab.wrap(
        model, encode=model.encode, decode=model.decode, cross_attention=pattern, grid=GRID,
        image_size=SIDE, mean=(0.5,) * 3, std=(0.5,) * 3, bos=BOS, eos=EOS, vocab=WORDS, max_len=5,
    )  # fmt: skip
    assert cap.spec.prefix_tokens == 0
    img = photo(3)
    trace = attnlab.caption(cap, img)
    x = model_input(img)
    with torch.no_grad():
        memory = model.encode(x)
    ids = [BOS, *trace.token_ids.tolist()[:-1]]
    # recompute from the projections, with the inputs of cq / ckv recorded by our own hooks
    seen = {}
    hooks = [b.cq.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("q", i), o)) for i, b in enumerate(model.blocks)]
    hooks += [b.ckv.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("kv", i), o)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            logits = model.decode(memory, torch.tensor([ids]))
    finally:
        for hd in hooks:
            hd.remove()
    assert logits[0].argmax(-1).tolist() == trace.token_ids.tolist()
    for i, block in enumerate(model.blocks):
        q = block.split(seen[("q", i)])
        k = block.split(seen[("kv", i)].chunk(2, -1)[0])
        w = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)[0]  # (heads, steps, 16)
        np.testing.assert_allclose(trace.cross_attention[i], w.reshape(4, trace.steps, *GRID).numpy(), atol=1e-5)
    from attnlab import plot

    plot.word_grid(trace)
    attnlab.explore(trace)


def test_broad_patterns_never_capture_dropouts():
    model = HandWritten(False)
    with pytest.raises(AttnlabError):  # "blocks.*" names no attention module and no exact dropout
        with attnlab.capture_attention(model, "blocks.*"):
            pass
    with attnlab.capture_attention(model, "blocks.0.cross_dropout") as cap:
        model.decode(model.encode(torch.zeros(1, 3, SIDE, SIDE)), torch.tensor([[BOS, 3]]))
    assert cap.names == ["blocks.0.cross_dropout"] and cap.last("blocks.0.cross_dropout").shape == (1, 4, 2, 16)


# --------------------------------------------------------------------------- geometry
class Spotter(nn.Module):
    """Attends to the brightest patch: keys are patch brightness, the query is a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(PATCH)
        self.cross = nn.MultiheadAttention(4, 1, batch_first=True)
        with torch.no_grad():
            self.cross.in_proj_weight.zero_()
            self.cross.in_proj_bias.zero_()
            self.cross.in_proj_bias[0] = 30.0  # q = (30, 0, 0, 0)
            self.cross.in_proj_weight[4, 0] = 1.0  # k = (brightness, 0, 0, 0)
        self.head = nn.Linear(4, V)

    def encode(self, x):
        b = self.pool(x.mean(1, keepdim=True)).flatten(2).transpose(1, 2)  # (N, 16, 1) brightest pixel per patch
        return F.pad(b, (0, 3))  # (N, 16, 4)

    def decode(self, memory, ids):
        q = torch.zeros(ids.shape[0], ids.shape[1], 4)
        out, _ = self.cross(q, memory, memory)
        return self.head(out)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_patch_box_covers_the_pixels_it_saw(resize):
    model = Spotter().eval()
    cap = attnlab.wrap(
        model, encode=model.encode, decode=model.decode, cross_attention="cross", grid=GRID, image_size=SIDE,
        mean=(0.5,) * 3, std=(0.5,) * 3, bos=BOS, eos=EOS, vocab=WORDS, max_len=1, resize=resize,
    )  # fmt: skip
    img = np.zeros((30, 90, 3), dtype=np.uint8)  # a wide photo, dark
    img[2:7, 70:85] = 255  # one bright square, inside one patch of the model input
    trace = attnlab.caption(cap, img)
    amap = trace.cross_attention[0, 0, 0]  # (4, 4)
    r, c = np.unravel_index(amap.argmax(), amap.shape)
    assert amap[r, c] > 0.5
    # the patch's box on the shown image (grid stretched over it) covers the square's pixels
    h, w = trace.image.shape[:2]
    scale = w / 90  # shown image keeps the aspect (pad: then padding below)
    ys, xs = np.nonzero(img[..., 0] == 255)
    cy, cx = (ys.mean() + 0.5) * scale, (xs.mean() + 0.5) * scale
    assert r * h / GRID[0] <= cy < (r + 1) * h / GRID[0]
    assert c * w / GRID[1] <= cx < (c + 1) * w / GRID[1]
    box = trace.image[int(r * h / 4) : int((r + 1) * h / 4), int(c * w / 4) : int((c + 1) * w / 4)]
    assert box.max() == 255  # the bright pixels are inside the drawn patch
    if resize == "pad":
        assert trace.image.shape == (SIDE, SIDE, 3) and (trace.image[12:] == 128).all()  # mean-colour padding shown


# --------------------------------------------------------------------------- vocabularies and bad arguments
def test_vocabularies():
    wp = make_vocab(WORDS)
    assert isinstance(wp, Vocab) and wp.wordpiece
    ids = [WORDS.index(w) for w in ("a", "red", "circle", "##s", "[SEP]")]
    assert wp.decode(ids) == "a red circles" and wp.word_starts(ids) == [True, True, True, False, True]
    bpe = make_vocab(["<|endoftext|>", "Ġa", "Ġcat", ".", "Ġsit", "ting", "Ġcaf", "Ã©"])
    assert isinstance(bpe, BPEVocab)
    seq = [1, 2, 3, 4, 5, 6, 7, 0]
    assert bpe.decode(seq) == "a cat. sitting café"
    assert [bpe.token(i) for i in seq] == ["a", "cat", ".", "sit", "ting", "caf", "é", "<|endoftext|>"]
    assert bpe.word_starts(seq) == [True, True, False, True, False, True, False, True]
    fn = make_vocab(lambda ids: "-".join(map(str, ids)))
    assert fn.decode([1, 2]) == "1-2" and fn.token(5) == "5"
    with pytest.raises(AttnlabError):
        make_vocab(42)


def test_wrap_reports_mistakes_in_one_line():
    model = Student()
    good = dict(
        encode=model.encoder.forward_features, decode=model.decode, cross_attention="decoder.layers.*.multihead_attn",
        grid=GRID, image_size=SIDE, mean=(0.5,) * 3, std=(0.5,) * 3, bos=BOS, eos=EOS, vocab=WORDS,
    )  # fmt: skip
    cases = {
        "encode": dict(encode=lambda x: x),  # pixels back, not tokens
        "cross_attention": dict(cross_attention="decoder.nothing.*"),
        "self-attention": dict(cross_attention="decoder.layers.*.self_attn"),
        "grid": dict(grid=(5, 5)),  # 25 patches > 17 tokens
        "vocab": dict(vocab=WORDS[:-1]),
        "bos": dict(bos=1.5),
        "resize": dict(resize="long"),
        "mean": dict(mean=(0.5, 0.5)),
        "decode": dict(decode=lambda m, ids: m),
    }
    for label, change in cases.items():
        with pytest.raises(AttnlabError) as info:
            attnlab.wrap(model, **{**good, **change})
        assert "\n" not in str(info.value), label
    with pytest.raises(AttnlabError, match="nn.Module"):
        attnlab.wrap(model.decode, **good)
    assert attnlab.wrap(model, **{**good, "grid": lambda h, w: (h // PATCH, w // PATCH)}).spec.prefix_tokens == 1


# --------------------------------------------------------------------------- pieces and words
def test_pieces_merge_into_words_in_figures(tmp_path):
    model = Student(2)
    cap = wrap_student(model)
    ids = [WORDS.index(w) for w in ("a", "red", "circle", "##s", "[SEP]")]
    trace = attnlab.caption(cap, photo(4), tokens=ids)
    assert trace.words == ["a", "red", "circle", "##s", "[SEP]"]  # the trace keeps the pieces
    assert trace.word_starts.tolist() == [True, True, True, False, True]
    words = trace.by_word()
    assert words.words == ["a", "red", "circles", "[SEP]"] and words.meta["pieces"] == [[0, 1], [1, 2], [2, 4], [4, 5]]
    np.testing.assert_allclose(words.cross_attention[:, :, 2], trace.cross_attention[:, :, 2:4].mean(axis=2), atol=1e-7)
    np.testing.assert_allclose(words.prefix_share[:, :, 2], trace.prefix_share[:, :, 2:4].mean(axis=2), atol=1e-7)
    p = trace.probabilities()
    np.testing.assert_allclose(words.probabilities(), [p[0], p[1], p[2] * p[3], p[4]], rtol=1e-6)
    back = attnlab.CaptionTrace.load(trace.save(tmp_path / "pieces.npz"))
    assert back.word_starts.tolist() == trace.word_starts.tolist()

    from attnlab import plot

    def titles(fig):
        return [ax.get_title() for ax in fig.axes if ax.get_title()]

    merged = titles(plot.word_grid(trace))
    assert any(t.startswith("circles") for t in merged) and not any("##s" in t for t in merged)
    split = titles(plot.word_grid(trace, pieces=True))
    assert any(t.startswith("##s") for t in split)
    explorer = attnlab.explore(trace)
    assert explorer.slider.max == 3  # four words, the end token the last
    with pytest.raises(AttnlabError):
        plot.word_grid(trace, pieces="yes")


# --------------------------------------------------------------------------- gradients (the seam's autograd rule)
def full_forward_gradients(model, patterns, memory, ids, step, token) -> dict:
    """Module name -> (weights (1, heads, t, S), their gradient or None) of one full teacher-forced
    forward's logit[step, token], the weights handed back by capture_attention so they are the
    tensors each module multiplied."""
    with torch.enable_grad(), attnlab.capture_attention(model, patterns, detach=False, substitute=lambda n, w: w) as cap:
        logits = model.decode(memory, torch.tensor([ids]))
        mats = [cap.last(n) for n in cap.names]
        grads = torch.autograd.grad(logits[0, step, token], mats, allow_unused=True)
    return {n: (m, g) for n, m, g in zip(cap.names, mats, grads)}


@pytest.mark.parametrize("kind", ["student", "tap", "dropout"])
def test_rows_given_with_autograd_are_the_ones_the_model_multiplies(kind):
    if kind == "student":
        model = Student(2)
        cap = wrap_student(model, self_attention="decoder.layers.*.self_attn")
        cross = [f"decoder.layers.{i}.multihead_attn" for i in range(2)]
        selfs = [f"decoder.layers.{i}.self_attn" for i in range(2)]
        memory_of = model.encoder.forward_features
    else:
        model = HandWritten(kind == "tap", seed=2)
        cross = [f"blocks.{i}.{'tap' if kind == 'tap' else 'cross_dropout'}" for i in range(2)]
        selfs = [f"blocks.{i}.attn_dropout" for i in range(2)]
        memory_of = model.encode
        cap = attnlab.wrap(model, encode=model.encode, decode=model.decode, cross_attention=cross, self_attention=selfs,
                           grid=GRID, image_size=SIDE, mean=(0.5,) * 3, std=(0.5,) * 3, bos=BOS, eos=EOS, vocab=WORDS, max_len=5)  # fmt: skip
    x = model_input(photo(4))
    ids = [BOS, 4, 7, 9]
    with torch.no_grad():
        memory = memory_of(x)
        state = cap.begin([x[0]], "all").state
        fast = [cap.step(state, torch.tensor([t]), "all") for t in ids]
    with torch.enable_grad():
        state = cap.begin([x[0]], "all").state
        slow = [cap.step(state, torch.tensor([t]), "all") for t in ids]
        rows = [(s, li, kind_, r) for s, out in enumerate(slow)
                for kind_, per_layer in (("cross", out.cross_attention), ("self", out.self_attention))
                for li, r in enumerate(per_layer)]  # fmt: skip
        grads = torch.autograd.grad(slow[3].logits[0, 5], [r for *_, r in rows], allow_unused=True)
    for a, b in zip(fast, slow):  # the values are unchanged
        torch.testing.assert_close(a.logits, b.logits.detach(), atol=1e-5, rtol=0)
        for p, q in zip(a.cross_attention + a.self_attention, b.cross_attention + b.self_attention):
            torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)
    full = full_forward_gradients(model, cross + selfs, memory, ids, 3, 5)
    reached = 0
    for (s, li, kind_, r), g in zip(rows, grads):
        m, want = full[(cross if kind_ == "cross" else selfs)[li]]
        want = torch.zeros_like(m[:, :, s]) if want is None else want[:, :, s]  # (1, heads, S): query row s
        if kind_ == "self":
            want = want[..., : s + 1]
        got = torch.zeros_like(want) if g is None else g
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        reached += int(s < 3 and got.abs().sum() > 0)
    assert reached > 0  # the last step's score reaches rows handed out at earlier steps
    assert all(p.grad is None for p in model.parameters())


def test_a_decoder_without_causal_mask_is_refused_with_autograd():
    model = Student(3)

    def leaky(memory, ids):  # no causal mask: earlier positions see later tokens
        t = ids.shape[1]
        return model.head(model.decoder(model.embed(ids) + model.pos.weight[:t], memory))

    cap = attnlab.wrap(model, encode=model.encoder.forward_features, decode=leaky, cross_attention="decoder.layers.*.multihead_attn",
                       self_attention="decoder.layers.*.self_attn", grid=GRID, image_size=SIDE, mean=(0.5,) * 3,
                       std=(0.5,) * 3, bos=BOS, eos=EOS, vocab=WORDS, max_len=4)  # fmt: skip
    attnlab.caption(cap, photo(5))  # captioning reads the rows as they are
    with pytest.raises(AttnlabError, match="not causal"):
        attnlab.explain(cap, photo(5), "relevance")


def test_wrap_probe_keeps_every_training_flag_of_a_half_frozen_model():
    from attnlab.adapters.module import ModuleCaptioner

    model = Student(1).train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    frozen.eval()
    before = [m.training for m in model.modules()]
    cap = wrap_student(model)  # runs encode and decode once, in eval mode
    assert isinstance(cap, ModuleCaptioner)
    assert [m.training for m in model.modules()] == before and not frozen.training  # model.train(True) would unfreeze it
