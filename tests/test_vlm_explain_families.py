"""``attnlab.explain`` on the registry's families (issue 22 item 2 on item 1's families): PaliGemma, Gemma 3,
LLaVA-OneVision (tests/vlm_tiny_more.py), Idefics3 / SmolVLM, GIT (tests/vlm_tiny_b.py), Florence-2 and
BLIP-2 (tests/vlm_tiny_c.py). Every method's rows are compared with one eager forward computed here
(``output_attentions=True``, autograd on the returned attentions) and the method's rule written out here:
decoder-only families (GIT's attention by its own eager code) over the whole sequence, Florence-2 by attnlab's
encoder-decoder rules, BLIP-2 through the Q-Former's cross-attention run here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny  # noqa: E402
import vlm_tiny_b  # noqa: E402
import vlm_tiny_c  # noqa: E402
import vlm_tiny_more  # noqa: E402
from helpers import assert_error  # noqa: E402

import attnlab  # noqa: E402
from attnlab.explain import contrast as contrast_mod  # noqa: E402
from attnlab.explain.kinds import Method  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "describe this image ."
METHODS = [("raw", None, None), ("best_head", 0, 1), ("layer_mean", None, None), ("rollout", None, None),
           ("grad_attn", None, None), ("grad_attn", 0, None), ("relevance", None, None)]
BUILDERS = {"paligemma": vlm_tiny_more, "gemma3": vlm_tiny_more, "llava_onevision": vlm_tiny_more,
            "idefics3": vlm_tiny_b, "smolvlm": vlm_tiny_b, "git": vlm_tiny_b, "florence2": vlm_tiny_c, "blip2": vlm_tiny_c}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = BUILDERS[family].build(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def user_prompt(family):
    return {"paligemma": "caption en", "florence2": "<CAPTION>", "blip2": "Question : colour is car"}.get(family, TEXT)


def model_inputs(family, processor, image, text):
    """The processor's input for one photo, made here the way each family's tests make it."""
    if family in ("paligemma", "gemma3", "llava_onevision"):
        return vlm_tiny_more.prompt(family, processor, image, text)
    if family in ("idefics3", "smolvlm", "git"):
        return vlm_tiny_b.prompt(family, processor, image, text)
    return vlm_tiny_c.inputs(processor, image, text)  # Florence-2: its task token as is; BLIP-2: the words


def words(family, processor):
    names = ["photo", "of", "red", "car"] if family in ("florence2", "blip2") else ["a", "red", "car", "dog"]
    return [int(processor.tokenizer.convert_tokens_to_ids(w)) for w in names]


def eager_attentions(model, grad):
    """A context: the model under eager (its own setting back afterwards)."""
    before = {id(m.config): (m.config, m.config._attn_implementation) for m in model.modules()
              if hasattr(getattr(m, "config", None), "_attn_implementation")}

    class Switch:
        def __enter__(self):
            model.set_attn_implementation("eager")
            self.grad = torch.set_grad_enabled(grad)
            self.grad.__enter__()

        def __exit__(self, *exc):
            self.grad.__exit__(*exc)
            for config, value in before.values():
                config._attn_implementation = value

    return Switch()


def decoder_only_forward(family, model, processor, image, tokens, text):
    """One eager forward over the prompt and ``tokens[:-1]``: attentions (in the graph), logits ``(T, V)``,
    the prompt's key count ``P`` (GIT: its image keys + the ids) and the inputs."""
    inputs = model_inputs(family, processor, image, text)
    inputs.pop("labels", None)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], torch.as_tensor([tokens[:-1]])], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for name, fill in (("token_type_ids", 1 if family == "paligemma" else 0), ("mm_token_type_ids", 0)):
        if name in full:  # as each model's generate extends them (PaliGemma's suffix is causal: 1)
            full[name] = torch.cat([inputs[name], torch.full((1, len(tokens) - 1), fill, dtype=inputs[name].dtype)], 1)
    with eager_attentions(model, True):
        out = model(**full, output_attentions=True)
    atts = out.language_model_outputs.attentions if family == "blip2" else out.attentions
    T = atts[0].shape[-1]
    return list(atts), out.logits[0], T - (len(tokens) - 1), inputs


def chefer(layers):
    """Chefer et al.'s self-attention rule: R = I; per layer (first first) R += mean_h((dA * A)+) R."""
    r = torch.eye(layers[0][0].shape[-1], dtype=torch.float64)
    for a, g in layers:
        r = r + (g * a).clamp(min=0).mean(0) @ r
    return r


def roll(mats):
    """Abnar & Zuidema's rollout: R = Â_L ... Â_1, Â = (mean_h A + I) / rowsum."""
    r = np.eye(mats[0].shape[-1])
    for a in mats:
        step = a.mean(0) + np.eye(a.shape[-1])
        r = (step / step.sum(1, keepdims=True)) @ r
    return r


def decoder_only_expected(atts, logits, P, tokens):
    """Every method's rows ``(n, T)`` from one eager forward (the rules written here)."""
    q = P - 1 + np.arange(len(tokens))
    at = [a[0].detach().double() for a in atts]  # (heads, T, T) each
    rel, last, first = [], [], []
    for i, t in enumerate(tokens):
        grads = torch.autograd.grad(logits[q[i], t], atts, retain_graph=True)
        layers = [(a, g[0].double()) for a, g in zip(at, grads)]
        rel.append(chefer(layers)[q[i]].numpy())
        last.append((layers[-1][1] * layers[-1][0]).clamp(min=0).mean(0)[q[i]].numpy())
        first.append((layers[0][1] * layers[0][0]).clamp(min=0).mean(0)[q[i]].numpy())
    np_at = [a.numpy() for a in at]
    return {("raw", None, None): np_at[-1].mean(0)[q], ("best_head", 0, 1): np_at[0][1][q],
            ("layer_mean", None, None): np.mean([a.mean(0) for a in np_at], 0)[q], ("rollout", None, None): roll(np_at)[q],
            ("grad_attn", None, None): np.array(last), ("grad_attn", 0, None): np.array(first),
            ("relevance", None, None): np.array(rel)}


def pass_rows(cap, image, tokens, method, layer, head, reference=None):
    """The method's rows on the captioner's pass (before the trace's scaling)."""
    from attnlab.explain.methods import _checked

    pixels = attnlab.preprocess.prepare_for([image], cap.spec)[0][0]
    seq = cap.sequence(pixels, tokens)
    m = _checked(Method(method, -1 if layer is None and method in ("raw", "grad_attn") else layer, head), seq.layers, seq.heads)
    return m.kind.sequence(seq, m, lambda: cap.sequence(pixels, tokens, prompt=reference)), seq


def check_trace_totals(trace):
    maps = sum(trace.view_attention(v)[0, 0].sum((-2, -1)) for v in range(len(trace.views)))
    np.testing.assert_allclose(maps + sum(s[0, 0] for s in trace.key_shares.values()), 1.0, atol=1e-5)


# ------------------------------------------------------------------ decoder-only families
DECODER_ONLY = ["paligemma", "gemma3", "llava_onevision", "idefics3", "smolvlm", "git"]


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_every_method_is_its_rule_on_one_eager_forward(made, family):
    model, processor = made(family)
    cap = attnlab.from_huggingface(model, processor, prompt=user_prompt(family))
    image, tokens = vlm_tiny.photo(64, 48, seed=3), words(family, processor)
    before = [p.requires_grad for p in model.parameters()]
    atts, logits, P, inputs = decoder_only_forward(family, model, processor, image, tokens, user_prompt(family))
    expected = decoder_only_expected(atts, logits, P, tokens)
    for (method, layer, head), want in expected.items():
        rows, seq = pass_rows(cap, image, tokens, method, layer, head)
        np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-6, err_msg=f"{family} {method} {layer}")
    np.testing.assert_allclose(seq.logits.numpy(), logits[P - 1 + np.arange(len(tokens))].detach().numpy(), rtol=1e-4, atol=1e-4)
    # the trace: the image keys' mass of the rows, on keys found here (GIT: CLS is key 0, the grid 1..h*w;
    # the others: the image placeholder's positions, less OneVision's newline keys, which the layout tests place)
    ids = inputs["input_ids"][0].numpy()
    if family == "git":
        keys = np.arange(1, int(model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1)
    else:
        keys = np.flatnonzero(ids == (getattr(model.config, "image_token_id", None) or model.config.image_token_index))
        keys = np.setdiff1d(keys, seq.layout.kinds.get("newline", []))
    for method, layer, head in [("layer_mean", None, None), ("relevance", None, None)]:
        trace = attnlab.explain(cap, image, method, tokens=tokens, layer=layer, head=head)
        want = expected[(method, layer, head)]
        want = want / want.sum(1, keepdims=True) if method == "relevance" else want
        mass = sum(trace.view_attention(v)[0, 0].sum((-2, -1)) for v in range(len(trace.views)))
        np.testing.assert_allclose(mass, want[:, keys].sum(1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(trace.key_shares["generated"][0, 0], want[:, P:].sum(1), atol=1e-6)
        check_trace_totals(trace)
    assert [p.requires_grad for p in model.parameters()] == before and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["paligemma", "idefics3", "git"])
def test_contrast_divides_the_eager_rows_of_the_two_prompts(made, family):
    model, processor = made(family)
    cap = attnlab.from_huggingface(model, processor, prompt=user_prompt(family))
    image, tokens = vlm_tiny.photo(64, 48, seed=5), words(family, processor)
    sides = []
    for text in (user_prompt(family), "what colour is the car ?"):
        atts, _, P, _ = decoder_only_forward(family, model, processor, image, tokens, text)
        q = P - 1 + np.arange(len(tokens))
        sides.append(np.mean([a[0].detach().double().numpy().mean(0) for a in atts], 0)[q])
    rows, seq = pass_rows(cap, image, tokens, "contrast", None, None, reference="what colour is the car ?")
    ref = cap.sequence(attnlab.preprocess.prepare_for([image], cap.spec)[0][0], tokens, prompt="what colour is the car ?")
    keys, ref_keys = np.concatenate(seq.layout.view_keys), np.concatenate(ref.layout.view_keys)
    a, b = sides[0][:, keys], sides[1][:, ref_keys]
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    ratio = a / (b + contrast_mod.EPS_SHARE / len(keys))
    np.testing.assert_allclose(rows[:, keys], ratio / ratio.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)
    assert np.all(np.delete(rows, keys, axis=1) == 0)


@pytest.mark.parametrize("family", ["gemma3", "florence2", "blip2"])
def test_best_head_without_a_record_is_the_head_with_the_most_image_weight_and_says_so(made, family):
    model, processor = made(family)
    cap = attnlab.from_huggingface(model, processor, prompt=user_prompt(family))
    image, tokens = vlm_tiny.photo(64, 48, seed=8), words(family, processor)
    if family == "florence2":
        out, inputs = florence_forward(model, processor, image, tokens, "<CAPTION>", False)
        keys = vlm_tiny_c.florence2_expected(model, inputs["input_ids"][0].numpy(), inputs["pixel_values"])["cells"]
        rows = [a[0].double().numpy() for a in out.cross_attentions]  # (heads, n, S): word i at query i
    else:
        atts, _, P, inputs = decoder_only_forward(family, model, processor, image, tokens, user_prompt(family))
        ids = inputs["input_ids"][0].numpy()
        keys = np.flatnonzero(ids == (getattr(model.config, "image_token_id", None) or model.config.image_token_index))
        rows = [a[0].detach().double().numpy()[:, P - 1 + np.arange(len(tokens))] for a in atts]  # (heads, n, T)
    mass = np.array([r[:, :, keys].sum(-1).mean(-1) for r in rows])  # (layers, heads)
    layer, head = np.unravel_index(mass.argmax(), mass.shape)
    assert mass.max() - np.sort(mass.ravel())[-2] > 1e-6  # one clear winner in this setting
    trace = attnlab.explain(cap, image, "best_head", tokens=tokens)
    assert (trace.meta["layer"], trace.meta["head"]) == (layer, head) and trace.meta["head_choice"] == "image mass"
    assert f"layer {layer}, head {head}" in trace.meta["method_label"] and "most image attention" in trace.meta["method_label"]
    same = attnlab.explain(cap, image, "best_head", tokens=tokens, layer=int(layer), head=int(head))
    np.testing.assert_array_equal(trace.view_attention(0), same.view_attention(0))
    assert same.meta["method_label"].startswith("best head")


@pytest.mark.parametrize("family", ["git", "florence2", "idefics3"])
def test_gradient_methods_work_on_a_frozen_model_and_leave_it_frozen(made, family):
    """No parameter tracked (a frozen model): the passes start the graph themselves (registry families at each
    attention output, GIT at its first layer's input, Florence-2 by tracking the parameters for the forward
    only); the rows are those of the tracked model and the model stays frozen."""
    model, processor = made(family)
    cap = attnlab.from_huggingface(model, processor, prompt=user_prompt(family))
    image, tokens = vlm_tiny.photo(64, 48, seed=9), words(family, processor)
    tracked = pass_rows(cap, image, tokens, "relevance", None, None)[0]
    params = list(model.parameters())
    try:
        for p in params:
            p.requires_grad_(False)
        frozen = pass_rows(cap, image, tokens, "relevance", None, None)[0]
        assert not any(p.requires_grad for p in params) and all(p.grad is None for p in params)
    finally:
        for p in params:
            p.requires_grad_(True)
    assert frozen[:, :].sum() > 0
    np.testing.assert_allclose(frozen, tracked, rtol=1e-6, atol=1e-9)


def test_passes_leave_no_hook_or_switch_behind_also_on_errors(made):
    from transformers import AttentionInterface

    git, git_processor = made("git")
    cap = attnlab.from_huggingface(git, git_processor, prompt=TEXT)
    image = vlm_tiny.photo(64, 48, seed=1)
    pixels = attnlab.preprocess.prepare_for([image], cap.spec)[0][0]
    seq = cap.sequence(pixels, words("git", git_processor))
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in git.modules()]  # transformers' own, if any
    seen = []
    seq.attention(lambda layer, a: seen.append((layer, tuple(a.shape))))
    T = seq.layout.length
    assert seen == [(i, (git.config.num_attention_heads, T, T)) for i in range(git.config.num_hidden_layers)]  # once each, in order

    def boom(layer, a):
        raise ValueError("stop")

    with pytest.raises(ValueError):
        seq.attention(boom)
    next(iter(seq.gradients([0])))  # abandoned after its first layer
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in git.modules()] == hooks
    florence, processor = made("florence2")
    names = set(AttentionInterface._global_mapping)
    fcap = attnlab.from_huggingface(florence, processor)
    fseq = fcap.sequence(attnlab.preprocess.prepare_for([image], fcap.spec)[0][0], words("florence2", processor))
    handle = florence.model.language_model.encoder.layers[1].register_forward_hook(lambda *a: boom(0, None))
    try:
        with pytest.raises(ValueError):
            fseq.attention(lambda layer, a: None)
    finally:
        handle.remove()
    assert {m.config._attn_implementation for m in florence.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")} <= {"sdpa", None}
    assert set(AttentionInterface._global_mapping) == names and all(p.grad is None for p in florence.parameters())


def test_paligemma_prefix_lm_is_a_family_field():
    from attnlab.adapters.hf.families import FAMILIES

    assert FAMILIES["paligemma"].prefix_lm and not any(f.prefix_lm for k, f in FAMILIES.items() if k != "paligemma")


# ------------------------------------------------------------------ Florence-2 (encoder-decoder)
def bar(a, g):
    return (g * a).clamp(min=0).mean(0)


def encoder_decoder_relevance(encoder, decoder, cross):
    """Chefer et al.'s encoder-decoder rules as attnlab documents them (docs/explanations.md), written out here."""
    q, k = cross[0][0].shape[-2:]
    eye_k, eye_q = torch.eye(k, dtype=torch.float64), torch.eye(q, dtype=torch.float64)

    def norm(r, eye):
        extra = r - eye
        total = extra.sum(1, keepdim=True)
        return torch.where(total > 0, extra / torch.where(total > 0, total, 1.0) + eye, r)

    r_ii = eye_k.clone()
    for a, g in encoder:
        r_ii = r_ii + bar(a, g) @ r_ii
    r_qq, r_qi = eye_q.clone(), torch.zeros(q, k, dtype=torch.float64)
    for (a_s, g_s), (a_c, g_c) in zip(decoder, cross):
        r_qq = r_qq + bar(a_s, g_s) @ r_qq
        r_qi = r_qi + bar(a_s, g_s) @ r_qi
        r_qi = r_qi + norm(r_qq, eye_q).T @ bar(a_c, g_c) @ norm(r_ii, eye_k)
    return r_qi


def florence_forward(model, processor, image, tokens, text, grad):
    inputs = vlm_tiny_c.inputs(processor, image, text)
    decoder = torch.as_tensor([[model.generation_config.decoder_start_token_id, *tokens[:-1]]])
    with eager_attentions(model, grad):
        out = model(**inputs, decoder_input_ids=decoder, output_attentions=True)
    return out, inputs


def florence_expected(model, processor, image, tokens):
    out, inputs = florence_forward(model, processor, image, tokens, "<CAPTION>", True)
    kinds = [out.encoder_attentions, out.decoder_attentions, out.cross_attentions]
    flat = [a for kind in kinds for a in kind]
    enc, dec, cross = ([a[0].detach().double() for a in kind] for kind in kinds)
    rel, last, first = [], [], []
    for i, t in enumerate(tokens):
        grads = [g[0].double() for g in torch.autograd.grad(out.logits[0, i, t], flat, retain_graph=True)]
        e, d = len(enc), len(dec)
        pairs = [list(zip(enc, grads[:e])), list(zip(dec, grads[e:e + d])), list(zip(cross, grads[e + d:]))]
        rel.append(encoder_decoder_relevance(*pairs)[i].numpy())
        last.append(bar(cross[-1], grads[-1])[i].numpy())
        first.append(bar(cross[0], grads[e + d])[i].numpy())
    c = [a.numpy() for a in cross]
    rollout = roll([a.numpy() for a in dec]) @ c[-1].mean(0) @ roll([a.numpy() for a in enc])  # Roll(A^qq) A^qi Roll(A^ii)
    expected = {("raw", None, None): c[-1].mean(0), ("best_head", 0, 1): c[0][1], ("layer_mean", None, None): np.mean([a.mean(0) for a in c], 0),
                ("rollout", None, None): rollout, ("grad_attn", None, None): np.array(last), ("grad_attn", 0, None): np.array(first),
                ("relevance", None, None): np.array(rel)}
    return expected, out, inputs


def test_florence2_every_method_is_attnlabs_encoder_decoder_rule_on_one_eager_forward(made):
    model, processor = made("florence2")
    cap = attnlab.from_huggingface(model, processor)
    image, tokens = vlm_tiny_c.photo(640, 480, seed=2), words("florence2", processor)
    expected, out, inputs = florence_expected(model, processor, image, tokens)
    where = vlm_tiny_c.florence2_expected(model, inputs["input_ids"][0].numpy(), inputs["pixel_values"])
    n = len(tokens)
    for (method, layer, head), want in expected.items():
        rows, seq = pass_rows(cap, image, tokens, method, layer, head)
        np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-6, err_msg=f"{method} {layer}")
        if method in ("raw", "rollout", "relevance"):
            trace = attnlab.explain(cap, image, method, tokens=tokens, layer=layer, head=head)
            scaled = want / want.sum(1, keepdims=True) if method != "raw" else want
            np.testing.assert_allclose(trace.view_attention(0)[0, 0], scaled[:, where["cells"]].reshape(n, *where["grid"]), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(trace.key_shares["prefix"][0, 0], scaled[:, where["prefix"]].sum(1), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(trace.key_shares["prompt"][0, 0], scaled[:, where["prompt"]].sum(1), rtol=1e-4, atol=1e-6)
            check_trace_totals(trace)
    np.testing.assert_allclose(seq.logits.numpy(), out.logits[0].detach().numpy(), rtol=1e-4, atol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa" and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reference", [None, "<MORE_DETAILED_CAPTION>"])
def test_florence2_contrast_divides_the_cross_attention_under_the_two_prompts(made, reference):
    model, processor = made("florence2")
    cap = attnlab.from_huggingface(model, processor)
    image, tokens = vlm_tiny_c.photo(480, 640, seed=4), words("florence2", processor)
    sides = []
    for text in ("<CAPTION>", contrast_mod.REFERENCE if reference is None else reference):
        out, inputs = florence_forward(model, processor, image, tokens, text, False)
        cells = vlm_tiny_c.florence2_expected(model, inputs["input_ids"][0].numpy(), inputs["pixel_values"])["cells"]
        mean = np.mean([a[0].double().numpy().mean(0) for a in out.cross_attentions], 0)[:, cells]
        sides.append(mean / mean.sum(1, keepdims=True))
    ratio = sides[0] / (sides[1] + contrast_mod.EPS_SHARE / len(cells))
    trace = attnlab.explain(cap, image, "contrast", tokens=tokens, reference=reference)
    grid = trace.views[0].grid
    np.testing.assert_allclose(trace.view_attention(0)[0, 0], (ratio / ratio.sum(1, keepdims=True)).reshape(len(tokens), *grid), rtol=1e-4, atol=1e-7)
    assert all(np.all(s == 0) for s in trace.key_shares.values())
    assert trace.meta["reference_prompt"] == (contrast_mod.REFERENCE if reference is None else reference)


# ------------------------------------------------------------------ BLIP-2 (composed through the queries)
def qformer_by_hand(model, pixel_values):
    """The Q-Former's cross-attention, run here under eager: mean over its cross-attention layers and heads ``(queries, 1 + h*w)``."""
    with eager_attentions(model, False):
        vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        q = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=vision, output_attentions=True)
    return np.stack([a[0].double().numpy() for a in q.cross_attentions]).mean((0, 1))


def test_blip2_every_method_composed_through_the_qformers_cross_attention(made):
    model, processor = made("blip2")
    prompt = user_prompt("blip2")
    cap = attnlab.from_huggingface(model, processor, prompt=prompt)
    image, tokens = vlm_tiny_c.photo(640, 480, seed=6), words("blip2", processor)
    atts, logits, P, inputs = decoder_only_forward("blip2", model, processor, image, tokens, prompt)
    expected = decoder_only_expected(atts, logits, P, tokens)
    C = qformer_by_hand(model, inputs["pixel_values"])  # (queries, 1 + 25)
    queries = np.flatnonzero(inputs["input_ids"][0].numpy() == model.config.image_token_index)
    assert len(queries) == vlm_tiny_c.BLIP_QUERIES
    n, side = len(tokens), vlm_tiny_c.BLIP_SIDE // 14
    for (method, layer, head), want in expected.items():
        rows, _ = pass_rows(cap, image, tokens, method, layer, head)
        np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-6, err_msg=method)  # the language model's rows
        trace = attnlab.explain(cap, image, method, tokens=tokens, layer=layer, head=head)
        want = want / want.sum(1, keepdims=True) if method in ("rollout", "grad_attn", "relevance") else want
        composed = want[:, queries] @ C  # (n, 1 + h*w): the word's weight on the queries, carried to CLS and patches
        assert trace.views[0].composed and "32" not in trace.views[0].name and f"{len(queries)} queries" in trace.views[0].name
        np.testing.assert_allclose(trace.view_attention(0)[0, 0], composed[:, 1:].reshape(n, side, side), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(trace.key_shares["queries -> vision CLS"][0, 0], composed[:, 0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(trace.key_shares["generated"][0, 0], want[:, P:].sum(1), rtol=1e-4, atol=1e-6)
        check_trace_totals(trace)
    ref = contrast_mod.REFERENCE
    (a_atts, _, _, _), (b_atts, _, Pb, b_inputs) = (decoder_only_forward("blip2", model, processor, image, tokens, t) for t in (prompt, ref))
    rows = []
    for atts_, P_, ids in ((a_atts, P, inputs), (b_atts, Pb, b_inputs)):
        keys = np.flatnonzero(ids["input_ids"][0].numpy() == model.config.image_token_index)
        mean = np.mean([a[0].detach().double().numpy().mean(0) for a in atts_], 0)[P_ - 1 + np.arange(n)][:, keys]
        rows.append(mean / mean.sum(1, keepdims=True))
    ratio = rows[0] / (rows[1] + contrast_mod.EPS_SHARE / len(queries))
    composed = (ratio / ratio.sum(1, keepdims=True)) @ C
    trace = attnlab.explain(cap, image, "contrast", tokens=tokens)
    np.testing.assert_allclose(trace.view_attention(0)[0, 0], composed[:, 1:].reshape(n, side, side), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trace.key_shares["queries -> vision CLS"][0, 0], composed[:, 0], rtol=1e-4, atol=1e-6)
