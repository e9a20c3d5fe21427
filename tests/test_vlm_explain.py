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
from attnlab.explain.sequence import relevance_rows, rollout_rows  # noqa: E402

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


CASES = [("qwen2_vl", (64, 48)), ("llava_next", (100, 40)), ("llava", (48, 64))]


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
