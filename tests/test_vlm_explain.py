"""``attnlab.explain`` on vision-language captioners (issue 22 item 2), on the tiny random models of
tests/vlm_tiny.py. Every map is compared with an independent computation: one eager forward over the
prompt and the teacher-forced caption (``output_attentions=True``, autograd for the gradient methods),
split on the layout tests/vlm_tiny.py computes from the photo size, and the rules written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny  # noqa: E402  (pytest puts tests/ on the path)
from helpers import assert_error  # noqa: E402

import attnlab  # noqa: E402
from attnlab.explain import contrast as contrast_mod  # noqa: E402
from attnlab.explain.sequence import mean_rows, relevance_rows, rollout_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "describe this image ."
WORDS = ["a", "red", "car", "dog", "."]


def caption_ids(processor):
    return [int(processor.tokenizer.convert_tokens_to_ids(w)) for w in WORDS]


def eager_forward(model, processor, image, tokens, text=PROMPT, grad=False):
    """One eager forward over the prompt and ``tokens[:-1]``: attentions per layer ``(heads, T, T)``,
    logits ``(T, V)``, the prompt length and the inputs (computed here, not by attnlab)."""
    inputs = vlm_tiny.prompt(processor, image, text)
    n = len(tokens)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.as_tensor([tokens[:-1]])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, n - 1, dtype=torch.long)], 1)
    model.set_attn_implementation("eager")
    try:
        with torch.set_grad_enabled(grad):
            out = model(**full, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    if grad:  # the tensors the model multiplied with its values (autograd needs them, not a view made later)
        return list(out.attentions), out.logits[0], inputs["input_ids"].shape[1], inputs
    return [a[0] for a in out.attentions], out.logits[0], inputs["input_ids"].shape[1], inputs


def split(family, model, processor, inputs, image, rows):
    """Rows ``(n, T)`` -> per view maps ``(n, h, w)`` on the layout tests/vlm_tiny.py computes."""
    ids = inputs["input_ids"][0].numpy()
    views, _ = vlm_tiny.expected_layout(family, model, processor, ids, *image.size)
    return [rows[:, keys].reshape(len(rows), *grid) for grid, keys in views]


def check_views(trace, model, processor, inputs, image, rows, family):
    """The trace's maps are ``rows`` split on the independent layout (and returns that split)."""
    want = split(family, model, processor, inputs, image, rows)
    assert len(trace.views) == len(want)
    for v, w in enumerate(want):
        np.testing.assert_allclose(trace.view_attention(v)[0, 0], w, rtol=1e-4, atol=1e-6)
    return want


CASES = [("qwen2_vl", (64, 48)), ("llava_next", (100, 40)), ("llava", (48, 64)), ("qwen2_5_vl", (40, 90)), ("qwen3_vl", (70, 50))]


def captioner(built, family):
    model, processor = built(family)
    return model, processor, attnlab.from_huggingface(model, processor, prompt=PROMPT)


# ------------------------------------------------------------------ methods without gradients vs eager rows
@pytest.mark.parametrize("family,size", CASES)
def test_raw_layer_mean_best_head_are_eager_rows(built, family, size):
    model, processor, cap = captioner(built, family)
    image, tokens = vlm_tiny.photo(*size, seed=1), caption_ids(processor)
    atts, logits, P, inputs = eager_forward(model, processor, image, tokens)
    q = P - 1 + np.arange(len(tokens))
    at = [a[:, q].numpy().astype(np.float64) for a in atts]  # per layer (heads, n, T)
    expected = {
        ("raw", None, None): at[-1].mean(0), ("raw", 0, 2): at[0][2], ("raw", 1, "mean"): at[1].mean(0),
        ("layer_mean", None, None): np.mean([a.mean(0) for a in at], 0), ("best_head", 0, 3): at[0][3],
    }
    for (method, layer, head), rows in expected.items():
        trace = attnlab.explain(cap, image, method, tokens=tokens, layer=layer, head=head)
        assert trace.token_ids.tolist() == tokens and trace.meta["method"] == method
        check_views(trace, model, processor, inputs, image, rows, family)
        generated = rows[:, P:].sum(1)
        np.testing.assert_allclose(trace.key_shares["generated"][0, 0], generated, atol=1e-6)
        maps = sum(trace.view_attention(v)[0, 0].sum((-2, -1)) for v in range(len(trace.views)))
        np.testing.assert_allclose(maps + sum(s[0, 0] for s in trace.key_shares.values()), 1.0, atol=1e-5)
    np.testing.assert_allclose(trace.logits, logits[q].detach().numpy(), rtol=1e-4, atol=1e-4)  # the word's raw logits


# ------------------------------------------------------------------ rollout over the whole sequence
def reference_rollout(atts, queries):
    """Abnar & Zuidema's rollout over the eager full matrices: R = Â_L ... Â_1, Â = (mean_h A + I) / rowsum."""
    T = atts[0].shape[-1]
    r = np.eye(T)
    for a in atts:  # first layer first
        step = a.detach().numpy().astype(np.float64).mean(0) + np.eye(T)
        r = (step / step.sum(1, keepdims=True)) @ r
    return r[queries]


@pytest.mark.parametrize("family,size", CASES[:2])
def test_rollout_is_the_rollout_of_eager_full_matrices_and_causal(built, family, size):
    model, processor, cap = captioner(built, family)
    image, tokens = vlm_tiny.photo(*size, seed=2), caption_ids(processor)
    atts, _, P, inputs = eager_forward(model, processor, image, tokens)
    q = P - 1 + np.arange(len(tokens))
    rows = reference_rollout(atts, q)
    trace = attnlab.explain(cap, image, "rollout", tokens=tokens)
    check_views(trace, model, processor, inputs, image, rows, family)
    np.testing.assert_allclose(trace.key_shares["generated"][0, 0], rows[:, P:].sum(1), atol=1e-6)
    assert trace.key_shares["prompt"][0, 0].min() > 0  # the words' rollout runs through the prompt's tokens
    # causal: a later caption token never changes an earlier word's map
    swapped = tokens[:3] + [tokens[4], tokens[3]]  # tokens 3 and 4 swapped: the input changes at position P + 3
    other = attnlab.explain(cap, image, "rollout", tokens=swapped)
    for v in range(len(trace.views)):
        np.testing.assert_array_equal(other.view_attention(v)[0, 0, :4], trace.view_attention(v)[0, 0, :4])
    assert not np.allclose(other.view_attention(0)[0, 0, 4], trace.view_attention(0)[0, 0, 4])


class HandBuilt:
    """A SequencePass with hand-built attention: keys 0, 1 image, 2 a prompt token, 3 the word's query."""

    def __init__(self, layers, grads=None):
        from attnlab.keys import KeyLayout, View

        self.mats, self.grads = layers, grads
        self.layers, self.heads = len(layers), layers[0].shape[0]
        T = layers[0].shape[-1]
        self.layout = KeyLayout.of_views([View("image", (1, 2), (0, 0, 2, 1))], [np.array([0, 1])],
                                         {"prompt": np.arange(2, T)}, T)
        self.queries, self.meta, self.logits = np.array([T - 1]), {}, None

    def attention(self, visit):
        for layer, a in enumerate(self.mats):
            visit(layer, a)

    def gradients(self, layers):
        for layer in layers:
            yield 0, layer, self.mats[layer], self.grads[layer]


def test_rollout_counts_image_information_passed_through_a_prompt_token():
    eye = torch.eye(4)
    first = eye.clone()
    first[2] = torch.tensor([1.0, 0, 0, 0])  # layer 1: the prompt token reads image key 0
    second = eye.clone()
    second[3] = torch.tensor([0, 0, 1.0, 0])  # layer 2: the word reads only the prompt token
    seq = HandBuilt([first[None], second[None]])  # (heads=1, 4, 4) each
    raw_last = second[3]
    assert raw_last[:2].sum() == 0  # raw attention of the last layer sees no image at all
    row = rollout_rows(seq, None)[0]
    np.testing.assert_allclose(row, [0.25, 0.0, 0.25, 0.5])  # half of half of the word came from image key 0


def test_relevance_read_as_a_row_from_the_last_layer_is_the_product_of_the_rules():
    g = torch.Generator().manual_seed(0)
    mats = [torch.softmax(torch.randn(3, 6, 6, generator=g).tril() - torch.triu(torch.full((6, 6), 1e9), 1), -1) for _ in range(3)]
    grads = [torch.randn(3, 6, 6, generator=g) for _ in range(3)]
    seq = HandBuilt(mats, grads)
    r = torch.eye(6, dtype=torch.float64)
    for a, d in zip(mats, grads):  # Chefer: R = I; per layer, first first, R += mean_h((dA * A)+) R
        r = r + (d * a).clamp(min=0).double().mean(0) @ r  # the product of the float32 pair, the rest in float64
    np.testing.assert_allclose(relevance_rows(seq, None)[0], r[5].numpy(), rtol=1e-12)


# ------------------------------------------------------------------ gradient methods vs autograd on one eager forward
def eager_gradients(model, processor, image, tokens):
    """Per word: every layer's eager ``A`` and the gradient of the word's logit w.r.t. it (autograd)."""
    atts, logits, P, inputs = eager_forward(model, processor, image, tokens, grad=True)
    per_word = []
    for i, t in enumerate(tokens):
        grads = torch.autograd.grad(logits[P - 1 + i, t], atts, retain_graph=True)
        per_word.append([(a[0].detach().double(), g[0].double()) for a, g in zip(atts, grads)])  # (heads, T, T) each
    return per_word, P, inputs


def scaled(rows):
    return rows / rows.sum(1, keepdims=True)


@pytest.mark.parametrize("family,size", CASES[:2] + CASES[4:])
def test_relevance_and_grad_attn_are_the_rules_on_one_eager_forward(built, family, size):
    model, processor, cap = captioner(built, family)
    image, tokens = vlm_tiny.photo(*size, seed=4), caption_ids(processor)
    before = [p.requires_grad for p in model.parameters()]
    per_word, P, inputs = eager_gradients(model, processor, image, tokens)
    T = per_word[0][0][0].shape[-1]
    relevance, grad_last, grad_first = [], [], []
    for i, layers in enumerate(per_word):
        r = torch.eye(T, dtype=torch.float64)
        for a, g in layers:  # Chefer et al. 2021, self-attention rule: R += mean_h((grad * A)+) R, first layer first
            r = r + (g * a).clamp(min=0).mean(0) @ r
        relevance.append(r[P - 1 + i].numpy())
        grad_last.append((layers[-1][1] * layers[-1][0]).clamp(min=0).mean(0)[P - 1 + i].numpy())
        grad_first.append((layers[0][1] * layers[0][0]).clamp(min=0).mean(0)[P - 1 + i].numpy())
    for method, layer, rows in (("relevance", None, relevance), ("grad_attn", None, grad_last), ("grad_attn", 0, grad_first)):
        trace = attnlab.explain(cap, image, method, tokens=tokens, layer=layer)
        assert trace.meta["normalised"] is True
        check_views(trace, model, processor, inputs, image, scaled(np.array(rows)), family)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


def test_the_pass_hands_over_each_layer_once_in_order_with_eager_matrices_and_gradients(built):
    model, processor, cap = captioner(built, "llava_next")
    image, tokens = vlm_tiny.photo(100, 40, seed=7), caption_ids(processor)
    atts, logits, P, _ = eager_forward(model, processor, image, tokens, grad=True)
    pixels = attnlab.preprocess.prepare_for([image], cap.spec)[0][0]
    seq = cap.sequence(pixels, tokens)
    seen = []
    seq.attention(lambda layer, a: seen.append((layer, a.clone())))
    assert [layer for layer, _ in seen] == list(range(len(atts)))  # one layer at a time, first first
    for (layer, a), want in zip(seen, atts):
        np.testing.assert_allclose(a.numpy(), want[0].detach().numpy(), rtol=1e-4, atol=1e-6)  # (heads, T, T)
    grads = torch.autograd.grad(logits[P + 1, tokens[2]], atts)  # word 2's logit
    handed = [(i, layer) for i, layer, *_ in seq.gradients([1, 0])]
    assert handed == [(i, layer) for i in range(len(tokens)) for layer in (1, 0)]  # per word, the layers asked, in that order
    for i, layer, a, da in seq.gradients([1, 0]):
        if i == 2:
            np.testing.assert_allclose(da.numpy(), grads[layer][0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(seq.logits.numpy(), logits[P - 1 + np.arange(len(tokens))].detach().numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ contrast
def test_contrast_cancels_a_key_that_takes_the_same_share_under_both_prompts():
    keys = np.array([1, 2, 3, 4])  # key 0 a text token, keys 1-4 the image
    asked = np.array([[0.6, 0.2, 0.04, 0.12, 0.04]])  # image shares: sink 0.5, key 2 0.1, the object 0.3, key 4 0.1
    neutral = np.array([[0.2, 0.4, 0.08, 0.08, 0.24]])  # image shares: sink 0.5, key 2 0.1, the object 0.1, key 4 0.3
    row = contrast_mod.contrast(asked, keys, neutral, keys)[0]
    assert row[0] == 0  # off-image keys are excluded
    np.testing.assert_allclose(row.sum(), 1.0)
    # known answer: ratios 1, 1, 3, 1/3 (up to eps): the sink weighs as key 2, which the prompt left alone
    np.testing.assert_allclose(row[keys], np.array([1, 1, 3, 1 / 3]) / (16 / 3), rtol=1e-2)
    assert asked[0, 1] > asked[0, 3] and row[3] == row.max()  # raw attention peaks on the sink; contrast on the object
    p, r = np.array([0.5, 0.1, 0.3, 0.1]), np.array([0.5, 0.1, 0.1, 0.3])
    want = p / (r + contrast_mod.EPS_SHARE / 4)
    np.testing.assert_allclose(row[keys], want / want.sum())  # exactly the documented division
    same = contrast_mod.contrast(asked, keys, asked, keys)[0]
    np.testing.assert_allclose(same[keys], 0.25, rtol=1e-2)  # one prompt against itself: nothing stands out


def image_rows(atts, queries, keys):
    """Head-and-layer mean of the eager rows at the queries, restricted to ``keys``."""
    return np.mean([a.numpy().astype(np.float64).mean(0) for a in atts], 0)[queries][:, keys]


@pytest.mark.parametrize("family,size", CASES[:2])
@pytest.mark.parametrize("reference", [None, "what colour is the car ?"])
def test_contrast_is_the_division_of_eager_rows_under_the_two_prompts(built, family, size, reference):
    model, processor, cap = captioner(built, family)
    image, tokens = vlm_tiny.photo(*size, seed=5), caption_ids(processor)
    ref_text = contrast_mod.REFERENCE if reference is None else reference
    sides = []
    for text in (PROMPT, ref_text):
        atts, _, P, inputs = eager_forward(model, processor, image, tokens, text=text)
        views, _ = vlm_tiny.expected_layout(family, model, processor, inputs["input_ids"][0].numpy(), *image.size)
        keys = np.concatenate([k for _, k in views])
        sides.append((image_rows(atts, P - 1 + np.arange(len(tokens)), keys), P, inputs, atts[0].shape[-1], keys))
    (a, P, inputs, T, keys), (b, *_) = sides
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    ratio = a / (b + 1e-3 / len(keys))
    rows = np.zeros((len(tokens), T))
    rows[:, keys] = ratio / ratio.sum(1, keepdims=True)
    trace = attnlab.explain(cap, image, "contrast", tokens=tokens, reference=reference)
    check_views(trace, model, processor, inputs, image, rows, family)
    assert all(np.all(s == 0) for s in trace.key_shares.values())
    assert trace.meta["reference_prompt"] == ref_text and trace.meta["prompt"] == PROMPT


# ------------------------------------------------------------------ hygiene and bad input
def test_explanations_are_deterministic_and_leave_nothing_behind(built):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model, processor, cap = captioner(built, "qwen2_vl")
    image, tokens = vlm_tiny.photo(64, 48, seed=6), caption_ids(processor)
    names = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))
    for method in ("rollout", "relevance"):
        one, two = (attnlab.explain(cap, image, method, tokens=tokens) for _ in range(2))
        assert np.array_equal(one.view_attention(0), two.view_attention(0))
    seq = cap.sequence(attnlab.preprocess.prepare_for([image], cap.spec)[0][0], tokens)

    def boom(layer, a):
        raise ValueError("stop")

    with pytest.raises(ValueError):
        seq.attention(boom)
    next(iter(seq.gradients([0])))  # a pass abandoned after its first layer
    assert model.config.text_config._attn_implementation == "sdpa"
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == names
    assert all(p.grad is None for p in model.parameters())
    assert attnlab.caption(cap, image).token_ids.tolist() == attnlab.caption(cap, image).token_ids.tolist()


def test_bad_input_is_refused_in_one_line(built):
    model, processor, cap = captioner(built, "llava")
    image = vlm_tiny.photo(48, 64)
    assert_error(lambda: attnlab.explain(cap, image, "nope"), "use one of", "contrast", "relevance")
    assert_error(lambda: attnlab.explain(cap, image, "chefer_rollout"), "encoder-decoder", "contrast")
    assert_error(lambda: attnlab.explain(cap, image, "rollout", reference="a"), "reference=", "'contrast'")
    assert_error(lambda: attnlab.explain(cap, image, "contrast", reference=""), "reference=", "non-empty")
    assert_error(lambda: attnlab.explain(cap, image, "raw", layer=5), "layer 5 does not exist", "2 layers")
    assert_error(lambda: attnlab.explain(cap, image, "best_head"), "layer=L, head=H")
    placeholder = model.config.image_token_index
    assert_error(lambda: attnlab.explain(cap, image, "raw", tokens=[placeholder, 9]), "image placeholder", str(placeholder))
    shapes = attnlab.load_model("shapes")
    assert_error(lambda: attnlab.explain(shapes, image, "contrast"), "reference prompt", "vision-language")


# ------------------------------------------------------------------ the families of the registry (tests/vlm_tiny_more.py, branch fam-a)
@pytest.mark.parametrize("family", ["paligemma", "gemma3", "llava_onevision"])
def test_layer_mean_and_relevance_on_the_registry_families(tmp_path, family):
    """PaliGemma (prefix-LM: generated tokens are token type 1), Gemma 3 (sliding-window layers) and
    LLaVA-OneVision: the rows equal one eager forward's (mean) and Chefer's rules on it (relevance)."""
    more = pytest.importorskip("vlm_tiny_more")  # present once the family registry is merged
    model, processor = more.build(family, tmp_path)
    cap = attnlab.from_huggingface(model, processor)
    image, tokens = vlm_tiny.photo(64, 48, seed=1), [int(processor.tokenizer.convert_tokens_to_ids(w)) for w in ["a", "red", "car", "dog"]]
    inputs = more.prompt(family, processor, image, cap.prompt)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], torch.as_tensor([tokens[:-1]])], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "token_type_ids" in full:  # as each model's generate extends them
        fill = 1 if family == "paligemma" else 0
        full["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.full((1, len(tokens) - 1), fill, dtype=torch.long)], 1)
    before = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(**full, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    P = inputs["input_ids"].shape[1]
    q = P - 1 + np.arange(len(tokens))
    pixels = attnlab.preprocess.prepare_for([image], cap.spec)[0][0]
    want = np.mean([a[0].detach().double().numpy().mean(0) for a in out.attentions], 0)[q]
    np.testing.assert_allclose(mean_rows(cap.sequence(pixels, tokens), None), want, rtol=1e-4, atol=1e-6)
    relevance = []
    for i, t in enumerate(tokens):
        grads = torch.autograd.grad(out.logits[0, q[i], t], out.attentions, retain_graph=True)
        r = torch.eye(full["input_ids"].shape[1], dtype=torch.float64)
        for a, g in zip(out.attentions, grads):
            r = r + (g[0] * a[0]).clamp(min=0).double().mean(0) @ r
        relevance.append(r[q[i]].detach().numpy())
    np.testing.assert_allclose(relevance_rows(cap.sequence(pixels, tokens), None), np.array(relevance), rtol=1e-4, atol=1e-6)
