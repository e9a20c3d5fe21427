"""Beam search (``caption(..., beams=k)``) against an independent brute-force search.

The captioner here is written in this file: a tiny recurrent decoder (its state
carries a hidden vector that depends on every token fed so far) with one
cross-attention layer over a CLS token and 4 x 4 patches. A reordering mistake
in beam search (a hypothesis continued from the wrong row, maps taken from the
wrong row) changes its scores and maps, so the checks below would see it. The
reference search recomputes every hypothesis from scratch (batch of one, no
``select``), and the exhaustive search scores every possible caption.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab import AttnlabError
from attnlab.captioner import CaptionerSpec, Encoded, StepOutput
from attnlab.decode import _assemble, _beam, greedy_steps
from attnlab.preprocess import prepare_for
from attnlab.tokenizer import Vocab

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WORDS = ["[PAD]", "[CLS]", "[SEP]", "red", "blue", "circle"]
BOS, EOS = 1, 2
SIDE, PATCH, PREFIX = 16, 4, 1
GRID = (SIDE // PATCH, SIDE // PATCH)
MAX_LEN = 4


@dataclass
class RecState:
    keys: torch.Tensor  # (N, K, D)
    values: torch.Tensor  # (N, K, D)
    h: torch.Tensor  # (N, D) the hidden state: depends on every token fed so far
    position: int = 0

    def select(self, indices: torch.Tensor) -> "RecState":
        return RecState(self.keys[indices], self.values[indices], self.h[indices], self.position)


class RecurrentToy(nn.Module):
    """spec/begin/step written directly: h = tanh(W h + E[token] + P[t]); attention of q(h) over CLS + patches."""

    def __init__(self, seed: int, d: int = 8, heads: int = 2, eos_bias: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.patch = nn.Conv2d(3, d, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, PREFIX, d))
        self.embed = nn.Embedding(len(WORDS), d)
        self.pos = nn.Embedding(MAX_LEN + 1, d)
        self.w = nn.Linear(d, d, bias=False)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, len(WORDS))
        with torch.no_grad():
            self.w.weight.mul_(2.0)
            self.head.weight.mul_(4.0)  # peaked enough that the best caption is not always the greedy one
            self.head.bias[[0, 1]] = float("-inf")  # never PAD or CLS: probability 0
            self.head.bias[EOS] = eos_bias
        self.eval()

    @property
    def spec(self) -> CaptionerSpec:
        return CaptionerSpec(
            name="rec-toy", vocab=Vocab(WORDS, wordpiece=False), bos=BOS, eos=EOS, pad=0, max_len=MAX_LEN,
            image_size=SIDE, resize="stretch", prefix_tokens=PREFIX,
        )  # fmt: skip

    def begin(self, pixels, record):
        x = torch.stack(list(pixels))  # (N, 3, 16, 16)
        f = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, D)
        mem = torch.cat((self.cls.expand(len(x), -1, -1), f), dim=1)  # (N, 1 + 16, D)
        h0 = torch.zeros(len(x), mem.shape[-1])
        return Encoded(RecState(self.k(mem), self.v(mem), h0), [GRID] * len(x))

    def step(self, state, ids, record):
        n, d = state.h.shape
        dh = d // self.heads
        state.h = torch.tanh(self.w(state.h) + self.embed(ids) + self.pos.weight[state.position])  # (N, D)
        q = self.q(state.h).view(n, self.heads, 1, dh)  # (N, heads, 1, dh)
        k = state.keys.view(n, -1, self.heads, dh).transpose(1, 2)  # (N, heads, K, dh)
        v = state.values.view(n, -1, self.heads, dh).transpose(1, 2)  # (N, heads, K, dh)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (N, heads, 1, K)
        out = (w @ v).reshape(n, d)  # (N, D)
        state.position += 1
        logits = self.head(out + state.h)  # (N, V)
        return StepOutput(logits, None if record == "none" else [w[:, :, 0]])


def photos(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((12 + 4 * i, 20 - 2 * i, 3)) * 255).astype(np.uint8) for i in range(n)]


def from_scratch(model, pixel: torch.Tensor, prefix: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities ``(V,)`` (float64) and attention ``(heads, K)`` of the step after ``prefix``,
    computed alone: a new state, every token fed again, no select."""
    with torch.no_grad():
        state = model.begin([pixel], "cross").state
        for token in [BOS, *prefix]:
            out = model.step(state, torch.tensor([token]), "cross")
    logp = torch.log_softmax(out.logits[0].double(), -1).numpy()
    return logp, out.cross_attention[0][0].numpy()


def reference_beam(model, pixel, k: int, alpha: float, max_len: int = MAX_LEN) -> tuple[list[int], float]:
    """Beam search written plainly over token lists (the rules of caption()'s docstring)."""
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []
    for t in range(max_len):
        cands = []
        for hi, (toks, score) in enumerate(live):
            logp, _ = from_scratch(model, pixel, toks)
            cands += [(score + logp[v], hi * len(WORDS) + v, toks + [v]) for v in range(len(WORDS))]
        cands.sort(key=lambda c: (-c[0], c[1]))
        nxt = []
        for score, _, toks in cands:
            if score == -math.inf:
                break
            if toks[-1] == EOS:
                finished.append((score / (t + 1) ** alpha, toks))
            else:
                nxt.append((toks, score))
                if len(nxt) == k:
                    break
        if t + 1 == max_len:
            finished += [(score / (t + 1) ** alpha, toks) for toks, score in nxt]
            break
        if len(finished) >= k:
            break
        live = nxt
    score, toks = max(finished, key=lambda f: f[0])
    return toks, score


def exhaustive(model, pixel, alpha: float, max_len: int = MAX_LEN) -> tuple[list[int], float]:
    """The best caption of all: every word sequence, ended by [SEP] or by max_len."""
    words = [i for i in range(len(WORDS)) if i not in (0, 1, EOS)]
    best: tuple[float, list[int]] | None = None
    for length in range(1, max_len + 1):
        for body in itertools.product(words, repeat=length - 1):
            for last in ([EOS] if length < max_len else [EOS, *words]):
                toks = [*body, last]
                score = sum(from_scratch(model, pixel, toks[:i])[0][toks[i]] for i in range(length))
                if best is None or score / length**alpha > best[0]:
                    best = (score / length**alpha, toks)
    return best[1], best[0]


@pytest.fixture(scope="module")
def toy():
    return RecurrentToy(seed=3, eos_bias=1.5)


@pytest.mark.parametrize("k, alpha", [(2, 0.0), (3, 1.0), (4, 2.0)])
def test_beam_search_equals_reference_search(toy, k, alpha):
    images = photos(0, 4)
    traces = attnlab.caption(toy, images, beams=k, length_penalty=alpha)
    pixels, _ = prepare_for(images, toy.spec)
    for trace, pixel in zip(traces, pixels):
        toks, score = reference_beam(toy, pixel, k, alpha)
        assert trace.token_ids.tolist() == toks
        assert trace.meta["beams"] == k and trace.meta["length_penalty"] == alpha
        assert trace.meta["score"] == pytest.approx(score, abs=1e-6)


def test_maps_and_logits_follow_the_winning_hypothesis(toy):
    """At every step the trace holds the weights of the winner's own prefix, recomputed alone."""
    images = photos(1, 4)
    traces = attnlab.caption(toy, images, beams=3, length_penalty=1.0)
    pixels, _ = prepare_for(images, toy.spec)
    for trace, pixel in zip(traces, pixels):
        toks = trace.token_ids.tolist()
        for s in range(trace.steps):
            logp, weights = from_scratch(toy, pixel, toks[:s])  # (V,), (heads, 1 + 16)
            np.testing.assert_allclose(trace.cross_attention[0, :, s], weights[:, PREFIX:].reshape(-1, *GRID), atol=1e-6)
            np.testing.assert_allclose(trace.prefix_share[0, :, s], weights[:, :PREFIX].sum(-1), atol=1e-6)
            got = torch.log_softmax(torch.from_numpy(trace.logits[s]).double(), -1).numpy()
            np.testing.assert_allclose(got, logp, atol=1e-5)
        assert trace.words == [WORDS[t] for t in toks]


def test_beam_search_finds_better_captions_than_greedy(toy):
    """The test images are ones where search matters: some beam caption beats greedy's by score."""
    images = photos(0, 4) + photos(1, 4)
    greedy = attnlab.caption(toy, images)
    beam = attnlab.caption(toy, images, beams=4, length_penalty=0.0)
    pixels, _ = prepare_for(images, toy.spec)

    def total(pixel, toks):
        return sum(from_scratch(toy, pixel, toks[:i])[0][toks[i]] for i in range(len(toks)))

    better = 0
    for g, b, pixel in zip(greedy, beam, pixels):
        assert total(pixel, b.token_ids.tolist()) >= total(pixel, g.token_ids.tolist()) - 1e-9
        better += b.token_ids.tolist() != g.token_ids.tolist()
    assert better >= 1


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_full_width_beam_finds_the_best_caption_of_all(alpha):
    """With more beams than hypotheses (3 words: at most 27 live after 3 steps) nothing is pruned."""
    model = RecurrentToy(seed=5, eos_bias=1.0)
    images = photos(2, 2)
    traces = attnlab.caption(model, images, beams=64, length_penalty=alpha)
    pixels, _ = prepare_for(images, model.spec)
    for trace, pixel in zip(traces, pixels):
        toks, score = exhaustive(model, pixel, alpha)
        assert trace.token_ids.tolist() == toks
        assert trace.meta["score"] == pytest.approx(score, abs=1e-6)


def _decode_internal(model, images, beams: int | None):
    """caption()'s steps with the greedy loop (beams=None) or the beam loop forced to run."""
    pixels, shown = prepare_for(images, model.spec)
    with torch.inference_mode():
        enc = model.begin(pixels, "all")
        if beams is None:
            steps, paths = greedy_steps(model, enc.state, len(pixels), None, model.spec.max_len, "all")
        else:
            steps, paths = _beam(model, enc.state, len(pixels), model.spec.max_len, "all", beams, 1.0)
        return _assemble(model.spec, steps, enc, paths, shown, "all", "incremental")


@pytest.fixture(scope="module")
def shapes_model():
    """The bundled model: CATR's classes (key/value cache, decoder self-attention), trained, so
    captions depend on the image and differ in length."""
    return attnlab.load_model()


def scenes(n: int) -> list[np.ndarray]:
    from attnlab.shapes import make_scenes

    images = [s.image for s in make_scenes(n, seed=11, split="eval")]
    images[0] = images[0][:, :96]  # another size: a 128 x 96 input, a different grid
    return images


@pytest.mark.parametrize("which", ["toy", "shapes"])
def test_one_beam_is_greedy_exactly(which, toy, shapes_model):
    model = toy if which == "toy" else shapes_model
    images = photos(3, 3) if which == "toy" else scenes(4)
    greedy = _decode_internal(model, images, None)
    beam = _decode_internal(model, images, 1)
    assert len({t.steps for t in greedy}) > 1  # captions end at different steps: rows leave the batch
    for g, b in zip(greedy, beam):
        np.testing.assert_array_equal(b.token_ids, g.token_ids)
        np.testing.assert_array_equal(b.cross_attention, g.cross_attention)
        np.testing.assert_array_equal(b.logits, g.logits)
        if which == "shapes":
            np.testing.assert_array_equal(b.decoder_self_attention, g.decoder_self_attention)
    assert [t.token_ids.tolist() for t in attnlab.caption(model, images, beams=1)] == [g.token_ids.tolist() for g in greedy]


def test_catr_beams_keep_maps_and_self_attention_aligned(shapes_model):
    """CATR's key/value cache through beam search: the winner's maps and decoder self-attention
    equal a teacher-forced run of the winning caption; a batch equals each image alone."""
    images = scenes(3)
    traces = attnlab.caption(shapes_model, images, beams=3, record="all")
    assert len({t.grid for t in traces}) > 1  # mixed sizes
    for image, trace in zip(images, traces):
        forced = attnlab.caption(shapes_model, image, tokens=trace.token_ids.tolist(), record="all")
        np.testing.assert_allclose(trace.cross_attention, forced.cross_attention, atol=1e-5)
        np.testing.assert_allclose(trace.decoder_self_attention, forced.decoder_self_attention, atol=1e-5)
        np.testing.assert_allclose(trace.logits, forced.logits, atol=1e-4)
        alone = attnlab.caption(shapes_model, image, beams=3, record="all")
        np.testing.assert_array_equal(alone.token_ids, trace.token_ids)
        np.testing.assert_allclose(alone.cross_attention, trace.cross_attention, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"beams": 0}, "beams must be an integer from 1"),
        ({"beams": 2.5}, "beams must be an integer from 1"),
        ({"beams": True}, "beams must be an integer from 1"),
        ({"beams": 65}, "beams must be an integer from 1 to 64"),
        ({"beams": 2, "length_penalty": -1}, "length_penalty must be a finite number"),
        ({"beams": 2, "length_penalty": float("nan")}, "length_penalty must be a finite number"),
        ({"beams": 2, "tokens": [3, 4]}, "beam search (beams > 1) has nothing to choose"),
    ],
)
def test_bad_beam_arguments_are_one_line_errors(toy, kwargs, needle):
    with pytest.raises(AttnlabError) as info:
        attnlab.caption(toy, photos(0, 1)[0], **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_numpy_beams_are_accepted(toy):
    image = photos(0, 1)[0]
    a = attnlab.caption(toy, image, beams=np.int64(2))
    b = attnlab.caption(toy, image, beams=2)
    assert a.token_ids.tolist() == b.token_ids.tolist()
