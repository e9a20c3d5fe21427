"""``attnlab.explain``: every method on a toy whose right answer is known, relevance against a
straightforward implementation of the rules written here on a tiny hand-built encoder-decoder
(full teacher-forced forward, gradients of its own attention matrices), the same through
``attnlab.wrap``, on CATR and CPTR against their full forward passes, and the model left as it was."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab import AttentionTap, AttnlabError
from attnlab.captioner import CaptionerSpec, Encoded, StepOutput
from attnlab.explain import METHODS
from attnlab.explain.kinds import KINDS
from attnlab.explain import rules
from attnlab.tokenizer import Vocab
from reference_rules import plain_bar, plain_norm, plain_relevance

ENCODER_DECODER = [m for m in METHODS if not KINDS[m].prompted]  # contrast needs a prompt (tests/test_vlm_explain.py)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WORDS = ["[PAD]", "[CLS]", "[SEP]", "a", "red", "blue", "circle", "square", "left", "of"]
BOS, EOS = 1, 2
SIDE, PATCH = 16, 4
GRID = (SIDE // PATCH, SIDE // PATCH)  # 4 x 4 patches after one CLS key
K = 1 + GRID[0] * GRID[1]


def patches(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, 16, 16) -> (N, 16, 48): 4 x 4 pixel patches, row-major."""
    n = x.shape[0]
    return x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3 * PATCH * PATCH)


def photo(seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def pixels_of(img: np.ndarray) -> torch.Tensor:
    """What spec "stretch" at 16 px with mean = std = 0.5 makes of a 16 x 16 photo: (1, 3, 16, 16)."""
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]


# --------------------------------------------------------------------------- a tiny encoder-decoder
def split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, L, D) -> (N, heads, L, dh)


def attend(q, k, v, tap, mask=None):
    """Plain attention; the weights go through ``tap`` (an AttentionTap) and are what multiplies ``v``."""
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    a = tap(s.softmax(-1))  # (N, heads, L, S)
    return a @ v, a


class EncLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.ln1, self.qkv, self.proj = heads, nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.ff1, self.ff2, self.tap = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), AttentionTap()

    def forward(self, x):
        q, k, v = (split(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        out, a = attend(q, k, v, self.tap)
        x = x + self.proj(out.transpose(1, 2).flatten(2))
        return x + self.ff2(torch.relu(self.ff1(self.ln2(x)))), a


class DecLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj1, self.self_tap = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), AttentionTap()
        self.ln2, self.q, self.kv, self.proj2, self.cross_tap = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d), AttentionTap()
        self.ln3, self.ff1, self.ff2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def memory_kv(self, memory):
        return tuple(split(t, self.heads) for t in self.kv(memory).chunk(2, -1))  # (N, heads, K, dh) twice

    def forward(self, x, memory):
        """Teacher-forced: x (N, T, D) -> (N, T, D), self-attention (N, h, T, T), cross (N, h, T, K)."""
        t = x.shape[1]
        q, k, v = (split(z, self.heads) for z in self.qkv(self.ln1(x)).chunk(3, -1))
        out, a_s = attend(q, k, v, self.self_tap, torch.ones(t, t, dtype=torch.bool).triu(1))
        x = x + self.proj1(out.transpose(1, 2).flatten(2))
        mk, mv = self.memory_kv(memory)
        out, a_c = attend(split(self.q(self.ln2(x)), self.heads), mk, mv, self.cross_tap)
        x = x + self.proj2(out.transpose(1, 2).flatten(2))
        return x + self.ff2(torch.relu(self.ff1(self.ln3(x)))), a_s, a_c

    def step(self, x, cache: dict):
        """One new position x (N, 1, D) over the cached keys/values; rows (N, h, t) and (N, h, K)."""
        q, k, v = (split(z, self.heads) for z in self.qkv(self.ln1(x)).chunk(3, -1))
        cache["k"] = k if "k" not in cache else torch.cat((cache["k"], k), 2)
        cache["v"] = v if "v" not in cache else torch.cat((cache["v"], v), 2)
        s = (q @ cache["k"].transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (N, h, 1, t)
        row_s = s[:, :, 0]  # (N, h, t): the tensor handed out is the one multiplied below
        x = x + self.proj1((row_s[:, :, None] @ cache["v"]).transpose(1, 2).flatten(2))
        s = (split(self.q(self.ln2(x)), self.heads) @ cache["mk"].transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        row_c = s[:, :, 0]  # (N, h, K)
        x = x + self.proj2((row_c[:, :, None] @ cache["mv"]).transpose(1, 2).flatten(2))
        return x + self.ff2(torch.relu(self.ff1(self.ln3(x)))), row_s, row_c


@dataclass
class TinyState:
    caches: list[dict]
    position: int = 0

    def select(self, indices):
        return TinyState([{k: v.index_select(0, indices) for k, v in c.items()} for c in self.caches], self.position)


class Tiny(nn.Module):
    """CLS + 4 x 4 patches, 2 encoder and 2 decoder layers of 2 heads: the captioner seam with a
    key/value cache (``begin``/``step``), and ``full`` (the teacher-forced forward) beside it."""

    def __init__(self, seed: int = 0, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Linear(3 * PATCH * PATCH, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, K, d))
        self.enc = nn.ModuleList(EncLayer(d, heads) for _ in range(2))
        self.embed, self.qpos = nn.Embedding(len(WORDS), d), nn.Parameter(torch.randn(8, d))
        self.dec = nn.ModuleList(DecLayer(d, heads) for _ in range(2))
        self.head = nn.Linear(d, len(WORDS))
        with torch.no_grad():
            self.head.bias[EOS] = -30.0  # captions run to max_len
        self.eval()

    @property
    def spec(self) -> CaptionerSpec:
        return CaptionerSpec(name="tiny", vocab=Vocab(WORDS, wordpiece=False), bos=BOS, eos=EOS, pad=0, max_len=6,
                             image_size=SIDE, resize="stretch", prefix_tokens=1)  # fmt: skip

    def encode(self, x):
        """(N, 3, 16, 16) -> memory (N, K, D) and the encoder's attention, per layer (N, h, K, K)."""
        z = torch.cat((self.cls.expand(x.shape[0], -1, -1), self.patch(patches(x))), 1) + self.pos
        atts = []
        for layer in self.enc:
            z, a = layer(z)
            atts.append(a)
        return z, atts

    def memory(self, x):
        return self.encode(x)[0]

    def decode(self, memory, ids):
        return self.full_decode(memory, ids)[0]

    def full_decode(self, memory, ids):
        x = self.embed(ids) + self.qpos[: ids.shape[1]]
        selfs, crosses = [], []
        for layer in self.dec:
            x, a_s, a_c = layer(x, memory)
            selfs.append(a_s)
            crosses.append(a_c)
        return self.head(x), selfs, crosses

    def begin(self, pixels, record):
        memory, atts = self.encode(torch.stack(list(pixels)))
        caches = [dict(zip(("mk", "mv"), layer.memory_kv(memory))) for layer in self.dec]
        return Encoded(TinyState(caches), [GRID] * len(pixels), atts if record == "all" else None)

    def step(self, state, ids, record):
        x = self.embed(ids)[:, None] + self.qpos[state.position]
        selfs, crosses = [], []
        for layer, cache in zip(self.dec, state.caches):
            x, r_s, r_c = layer.step(x, cache)
            selfs.append(r_s)
            crosses.append(r_c)
        state.position += 1
        return StepOutput(self.head(x[:, 0]), crosses if record != "none" else None, selfs if record == "all" else None)


def wrapped(model: Tiny):
    """The same model through ``attnlab.wrap`` (its decode re-runs the whole prefix, no cache)."""
    return attnlab.wrap(
        model, encode=model.memory, decode=model.decode, cross_attention="dec.*.cross_tap", self_attention="dec.*.self_tap",
        encoder_attention="enc.*.tap", grid=GRID, image_size=SIDE, mean=(0.5,) * 3, std=(0.5,) * 3, bos=BOS, eos=EOS,
        vocab=WORDS, max_len=6, name="tiny-wrapped",
    )  # fmt: skip


# --------------------------------------------------------------------------- the rules, written out plainly
def reference_relevance(model: Tiny, img: np.ndarray, ids: list[int]) -> np.ndarray:
    """(T, K): for every step i, row i of R^qi from one full teacher-forced forward pass and the
    gradients of logit[i, ids[i]] with respect to its attention matrices, by the rules as stated."""
    x = pixels_of(img)
    rows = []
    for i in range(len(ids)):
        with torch.enable_grad():
            memory, enc = model.encode(x)
            logits, selfs, crosses = model.full_decode(memory, torch.tensor([[BOS, *ids[:-1]]]))
            mats = [*enc, *selfs, *crosses]
            grads = torch.autograd.grad(logits[0, i, ids[i]], mats)
        pairs = [(m[0].detach().double().numpy(), t[0].double().numpy()) for m, t in zip(mats, grads)]
        E, L = len(enc), len(selfs)
        rows.append(plain_relevance(pairs[:E], pairs[E : E + L], pairs[E + L :], len(ids), K)[i])
    return np.array(rows)


def as_rows(trace) -> np.ndarray:
    """An explanation trace back to rows (T, K): prefix share, then the patches."""
    maps = trace.cross_attention[0, 0].reshape(trace.steps, -1)  # (T, S)
    return np.concatenate([trace.prefix_share[0, 0][:, None], maps], axis=1)


def normalised(rows: np.ndarray) -> np.ndarray:
    return rows / rows.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny():
    return Tiny(3)


def test_relevance_equals_the_rules_applied_to_one_full_forward(tiny):
    img = photo(1)
    trace = attnlab.explain(tiny, img, "relevance")
    assert trace.cross_attention.shape == (1, 1, 6, *GRID) and trace.meta["method"] == "relevance"
    want = normalised(reference_relevance(tiny, img, trace.token_ids.tolist()))
    np.testing.assert_allclose(as_rows(trace), want, atol=1e-5)
    # relevance is not the attention: it really moves weight
    raw = attnlab.explain(tiny, img, "raw")
    assert np.abs(as_rows(raw) - want).max() > 0.05


def test_wrapped_model_gives_the_same_explanations(tiny):
    cap = wrapped(tiny)
    img = photo(2)
    ids = [4, 6, 8, 9, 5, 7]
    for name in ("relevance", "grad_attn", "rollout", "raw"):
        direct = attnlab.explain(tiny, img, name, tokens=ids)
        through = attnlab.explain(cap, img, name, tokens=ids)
        np.testing.assert_allclose(as_rows(through), as_rows(direct), atol=1e-5, err_msg=name)
        assert through.model_name == "tiny-wrapped"
    np.testing.assert_allclose(as_rows(attnlab.explain(cap, img, "relevance", tokens=ids)),
                               normalised(reference_relevance(tiny, img, ids)), atol=1e-5)  # fmt: skip


def test_grad_attn_is_gradient_times_attention_of_one_layer(tiny):
    img = photo(3)
    ids = attnlab.caption(tiny, img).token_ids.tolist()
    for layer in (0, -1):
        trace = attnlab.explain(tiny, img, "grad_attn", layer=layer)
        want = []
        for i in range(len(ids)):
            with torch.enable_grad():
                memory, _ = tiny.encode(pixels_of(img))
                logits, _, crosses = tiny.full_decode(memory, torch.tensor([[BOS, *ids[:-1]]]))
                g = torch.autograd.grad(logits[0, i, ids[i]], crosses[layer])[0]
            want.append(plain_bar(crosses[layer][0, :, i:i + 1].detach().double().numpy(), g[0, :, i:i + 1].double().numpy())[0])
        np.testing.assert_allclose(as_rows(trace), normalised(np.array(want)), atol=1e-5)
        assert trace.meta["layer"] == layer % 2


def chefer_roll(a: np.ndarray) -> np.ndarray:
    """Rollout as Chefer et al.'s ``compute_rollout_attention`` writes it, on ``(layers, heads, n, n)``:
    per layer the head mean plus I, rows renormalised, later layers multiplied on the left."""
    r = np.eye(a.shape[-1])
    for layer in a.mean(axis=1):
        step = layer + np.eye(a.shape[-1])
        r = (step / step.sum(1, keepdims=True)) @ r
    return r


def test_rollout_against_the_formula_and_rollout_rows_sum_to_one(tiny):
    img = photo(4)
    trace = attnlab.explain(tiny, img, "rollout")
    reference = attnlab.explain(tiny, img, "chefer_rollout")
    full = attnlab.caption(tiny, img, record="all")
    T = full.steps

    r_qq, r_ii = chefer_roll(full.decoder_self_attention.astype(np.float64)), chefer_roll(full.encoder_self_attention.astype(np.float64))
    np.testing.assert_allclose(r_qq.sum(1), 1, atol=1e-9)
    np.testing.assert_allclose(r_ii.sum(1), 1, atol=1e-9)
    assert np.allclose(np.triu(r_qq, 1), 0)  # a causal decoder: word i's state comes from words 0..i only
    last = np.concatenate([full.prefix_share[-1][..., None], full.cross_attention[-1].reshape(2, T, -1)], -1).mean(0)  # (T, K)
    # "rollout": R_qq . A_qi . R_ii, causal, rows already sum to 1
    np.testing.assert_allclose(r_qq @ last @ r_ii, normalised(r_qq @ last @ r_ii), atol=1e-9)
    np.testing.assert_allclose(as_rows(trace), r_qq @ last @ r_ii, atol=1e-5)
    # "chefer_rollout": generate_rollout's R_qi = R_qq^T . A_qi . R_ii (DETR), rows renormalised
    np.testing.assert_allclose(as_rows(reference), normalised(r_qq.T @ last @ r_ii), atol=1e-5)
    assert np.abs(as_rows(reference)[:-1] - as_rows(trace)[:-1]).max() > 1e-3  # they differ before the last word
    for t in (trace, reference):
        np.testing.assert_allclose(t.cross_attention.sum((-2, -1)) + t.prefix_share, 1, atol=1e-5)
    assert trace.meta["method"] == "rollout" and reference.meta["method"] == "chefer_rollout"
    # the library's own rollout (attnlab.rollout) is what the method uses: rows sum to 1
    from attnlab.rollout import rollout

    np.testing.assert_allclose(rollout(full.decoder_self_attention).sum(1), 1, atol=1e-9)


def test_causal_rollout_of_a_word_does_not_depend_on_later_words(tiny):
    img = photo(6)
    ids = attnlab.caption(tiny, img).token_ids.tolist()
    other = ids[:2] + [w for w in (4, 6, 8, 9, 5, 7) if w != ids[2]][:1] + ids[3:]  # word 2 and after: changed
    for method, same in (("rollout", True), ("chefer_rollout", False)):
        a = as_rows(attnlab.explain(tiny, img, method, tokens=ids))
        b = as_rows(attnlab.explain(tiny, img, method, tokens=other))
        assert np.allclose(a[:2], b[:2], atol=1e-6) is same, method  # words 0 and 1 were written before the change


def test_rules_keep_rows_that_nothing_reached():
    r = np.eye(3)
    r[1] = [0.4, 1.5, 0.6]  # R - I = [0.4, 0.5, 0.6], summing to 1.5
    got = rules.residual_normalised(torch.tensor(r)).numpy()
    np.testing.assert_allclose(got[0], [1, 0, 0])  # R - I all zero: unchanged, no 0/0
    np.testing.assert_allclose(got[1], [0.4 / 1.5, 1 + 0.5 / 1.5, 0.6 / 1.5])
    np.testing.assert_allclose(got, plain_norm(r))


def test_raw_layer_mean_and_named_head(tiny):
    img = photo(5)
    full = attnlab.caption(tiny, img)
    np.testing.assert_allclose(attnlab.explain(tiny, img, "raw").cross_attention[0, 0], full.cross_attention[-1].mean(0), atol=1e-6)
    np.testing.assert_allclose(attnlab.explain(tiny, img, "raw", layer=0, head=1).cross_attention[0, 0], full.cross_attention[0, 1], atol=1e-6)
    np.testing.assert_allclose(attnlab.explain(tiny, img, "layer_mean").cross_attention[0, 0], full.cross_attention.mean((0, 1)), atol=1e-6)
    best = attnlab.explain(tiny, img, "best_head", layer=1, head=0)
    np.testing.assert_allclose(best.cross_attention[0, 0], full.cross_attention[1, 0], atol=1e-6)
    assert best.meta["method_label"] == "best head (layer 1, head 0)"


def test_gradient_methods_leave_the_model_as_it_was(tiny):
    model = Tiny(4)
    model.enc[0].requires_grad_(False)  # a partly frozen model (a frozen encoder is common)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    for name in ("relevance", "grad_attn"):
        attnlab.explain(model, photo(6), name)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
    cap = wrapped(model)
    attnlab.explain(cap, photo(6), "relevance")
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- a toy whose answer is known
@dataclass
class PointerState:
    memory: torch.Tensor  # (N, K, D)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (N, t, D)
    position: int = 0

    def select(self, indices):
        return PointerState(self.memory.index_select(0, indices), [k.index_select(0, indices) for k in self.keys], self.position)


class Pointer(nn.Module):
    """An identity encoder (memory = the patches' own positive features, a zero CLS key) and two
    decoder layers whose cross-attention is forced onto patch ``target`` (every head, every word);
    every weight is positive, so a word's score grows with the weight on that patch."""

    def __init__(self, target: int, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.target, self.heads = target, heads
        self.embed = nn.Parameter(torch.rand(len(WORDS), 3 * PATCH * PATCH))
        self.head = nn.Parameter(torch.rand(3 * PATCH * PATCH, len(WORDS)))
        self.eval()

    @property
    def spec(self) -> CaptionerSpec:
        return CaptionerSpec(name="pointer", vocab=Vocab(WORDS, wordpiece=False), bos=BOS, eos=EOS, pad=0, max_len=5,
                             image_size=SIDE, resize="stretch", prefix_tokens=1)  # fmt: skip

    def begin(self, pixels, record):
        f = patches(torch.stack(list(pixels))) + 1.5  # (N, 16, 48), all > 0
        memory = torch.cat((torch.zeros_like(f[:, :1]), f), 1)  # (N, K, 48)
        return Encoded(PointerState(memory), [GRID] * len(pixels), None)

    def step(self, state, ids, record):
        x = self.embed[ids]  # (N, 48)
        n = x.shape[0]
        forced = torch.full((n, self.heads, K), float("-inf"))
        forced[..., 1 + self.target] = 0.0
        cross, selfs = [], []
        for layer in range(2):
            keys = torch.cat([state.keys[layer], x[:, None]], 1) if len(state.keys) > layer else x[:, None]  # (N, t, 48)
            if len(state.keys) > layer:
                state.keys[layer] = keys
            else:
                state.keys.append(keys)
            s = torch.zeros(n, self.heads, keys.shape[1], requires_grad=False).softmax(-1) * 1.0  # uniform over the past
            s = s + 0 * x.sum()  # in the graph of this step
            x = x + (s.mean(1)[:, :, None] * keys).sum(1)
            a = (forced + 0 * x.sum()).softmax(-1)  # (N, heads, K): one-hot on the target patch
            x = x + (a.mean(1)[:, :, None] * state.memory).sum(1)
            selfs.append(s)
            cross.append(a)
        state.position += 1
        return StepOutput(x @ self.head, cross if record != "none" else None, selfs if record == "all" else None)


@pytest.mark.parametrize("target", [0, 5, 15])
def test_every_method_finds_the_patch_the_toy_looks_at(target):
    model = Pointer(target)
    img = photo(7)
    for name in ENCODER_DECODER:
        kw = {"layer": 1, "head": 0} if name == "best_head" else {}
        trace = attnlab.explain(model, img, name, **kw)
        maps = trace.cross_attention[0, 0].reshape(trace.steps, -1)  # (T, S)
        assert (maps.argmax(1) == target).all(), name
        np.testing.assert_allclose(maps[:, target], 1.0, atol=1e-6, err_msg=name)  # all of it: nothing elsewhere
        assert trace.meta["method"] == name


# --------------------------------------------------------------------------- CATR and CPTR
def catr_tiny():
    from attnlab.models import CATRConfig, build_catr

    torch.manual_seed(5)
    cfg = CATRConfig(backbone="small", d_model=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
                     vocab_size=len(WORDS), mlp_hidden=32, image_size=48, pad_token_id=0, start_token_id=1, end_token_id=2)  # fmt: skip
    return build_catr(cfg, vocab=Vocab(WORDS, wordpiece=False), name="tiny-catr")


def cptr_tiny():
    from attnlab.models.cptr import CPTRConfig, build_cptr

    torch.manual_seed(6)
    cfg = CPTRConfig(encoder="vit_tiny_patch16_224", encoder_args={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                     pretrained=False, image_size=32, d_model=32, nheads=4, dec_layers=2, dim_feedforward=64,
                     vocab_size=len(WORDS), max_positions=8, pad_token_id=0, start_token_id=1, end_token_id=2)  # fmt: skip
    return build_cptr(cfg, vocab=Vocab(WORDS, wordpiece=False), name="tiny-cptr")


def full_forward_relevance(model, kind: str, img: np.ndarray, ids: list[int]) -> np.ndarray:
    """Row i of R^qi per step from the model's own teacher-forced forward (no cache), its
    attention matrices handed back by capture_attention, the rules as in reference_relevance."""
    from attnlab.preprocess import prepare_for

    x = prepare_for([img], model.spec)[0][0][None]
    target = torch.tensor([[BOS, *ids[:-1]]])
    if kind == "catr":
        enc, dec_self, dec_cross = "transformer.encoder.layers.*.self_attn", "transformer.decoder.layers.*.self_attn", "transformer.decoder.layers.*.multihead_attn"
        run = lambda: model(x, target, torch.zeros_like(target, dtype=torch.bool))  # noqa: E731
        prefix = 0
    else:
        enc, dec_self, dec_cross = "encoder.blocks.*.attn", "layers.*.self_attn", "layers.*.cross_attn"
        run = lambda: model(x, target)  # noqa: E731
        prefix = 1
    rows = []
    for i in range(len(ids)):
        with torch.enable_grad(), attnlab.capture_attention(model, [enc, dec_self, dec_cross], detach=False, substitute=lambda n, w: w) as cap:
            logits = run()
        names = cap.names
        mats = [cap.last(n) for n in names]
        grads = torch.autograd.grad(logits[0, i, ids[i]], mats, allow_unused=True)
        pairs = {n: (m[0].detach().double().numpy(), np.zeros(m.shape[1:]) if g is None else g[0].double().numpy()) for n, m, g in zip(names, mats, grads)}
        e_pairs = [pairs[n] for n in names if "encoder" in n]
        s_pairs = [pairs[n] for n in names if "self_attn" in n and "encoder" not in n]
        c_pairs = [pairs[n] for n in names if "multihead_attn" in n or "cross_attn" in n]
        rows.append(plain_relevance(e_pairs, s_pairs, c_pairs, len(ids), c_pairs[0][0].shape[-1])[i])
    assert prefix == model.spec.prefix_tokens
    return np.array(rows)


@pytest.mark.parametrize("kind", ["catr", "cptr"])
def test_catr_and_cptr_cached_decoding_explains_like_their_full_forward(kind):
    model = catr_tiny() if kind == "catr" else cptr_tiny()
    img = photo(8, 40, 48)
    ids = [4, 6, 8, 9, 5]
    trace = attnlab.explain(model, img, "relevance", tokens=ids)
    got = trace.cross_attention[0, 0].reshape(len(ids), -1)
    if trace.prefix_tokens:
        got = np.concatenate([trace.prefix_share[0, 0][:, None], got], 1)
    np.testing.assert_allclose(got, normalised(full_forward_relevance(model, kind, img, ids)), atol=1e-5)
    for name in ENCODER_DECODER:
        kw = {"layer": 0, "head": 1} if name == "best_head" else {}
        t = attnlab.explain(model, img, name, tokens=ids, **kw)
        assert t.cross_attention.shape[:3] == (1, 1, len(ids)) and np.isfinite(t.cross_attention).all()
    assert all(p.grad is None for p in model.parameters())


def test_one_line_errors():
    model = Tiny(0)
    with pytest.raises(AttnlabError, match="not an explanation method"):
        attnlab.explain(model, photo(0), "saliency")
    with pytest.raises(AttnlabError, match="no best-head record.*layer=L, head=H"):
        attnlab.explain(model, photo(0), "best_head")
    with pytest.raises(AttnlabError, match="leave out layer="):
        attnlab.explain(model, photo(0), "rollout", layer=1)
    with pytest.raises(AttnlabError, match="layer 5 does not exist"):
        attnlab.explain(model, photo(0), "raw", layer=5)
    cap = attnlab.wrap(model, encode=model.memory, decode=model.decode, cross_attention="dec.*.cross_tap", grid=GRID,
                       image_size=SIDE, mean=(0.5,) * 3, std=(0.5,) * 3, bos=BOS, eos=EOS, vocab=WORDS, max_len=6)  # fmt: skip
    with pytest.raises(AttnlabError, match="self_attention="):
        attnlab.explain(cap, photo(0), "relevance")


def test_a_list_of_images_of_different_sizes_gives_what_each_gives_alone():
    model = catr_tiny()
    imgs = [photo(9, 40, 48), photo(10, 48, 30), photo(11, 40, 48)]
    for name in ("relevance", "rollout"):
        both = attnlab.explain(model, imgs, name, max_len=6)
        assert len(both) == 3
        for img, got in zip(imgs, both):
            alone = attnlab.explain(model, img, name, max_len=6)
            assert got.grid == alone.grid and got.token_ids.tolist() == alone.token_ids.tolist()
            np.testing.assert_allclose(got.cross_attention, alone.cross_attention, atol=1e-6)


def test_explain_works_inside_inference_mode(tiny):
    img = photo(12)
    want = attnlab.explain(tiny, img, "relevance")
    with torch.inference_mode():
        got = attnlab.explain(tiny, img, "relevance")
    np.testing.assert_array_equal(got.cross_attention, want.cross_attention)
