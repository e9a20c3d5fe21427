"""Florence-2 and BLIP-2 through attnlab's vision-language engine and captioner, on the tiny random models of
tests/vlm_tiny_c.py: tokens equal the model's own greedy ``generate``; Florence-2's maps and shares equal the
decoder's eager cross-attention placed by a layout computed here (the grid read off the vision tower's
output); its box sits on the cells' receptive-field centres, found here from the convolution stack's
gradients; BLIP-2's composed map equals a composition computed here from eager ``output_attentions`` of the
language model and of the Q-Former; figures name the composition; sdpa and eager give the same rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny_c  # noqa: E402  (pytest puts tests/ on the path)

import attnlab  # noqa: E402
from attnlab.adapters.hf import generate_rows  # noqa: E402
from attnlab.adapters.hf.families import layout_of  # noqa: E402
from attnlab.adapters.hf.families.blip2 import CLS_SHARE, decoder_attention, qformer_attention  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402

PHOTOS = [(640, 480), (480, 640), (1000, 200)]
STEPS = 5
ASK = "a photo of"  # BLIP-2's random model ends at once on the empty captioning prompt
pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = vlm_tiny_c.build(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def own_generate(model, inputs, n):
    """The model's own greedy generate: the generated tokens only (after the prompt or the decoder start)."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, out.sequences.shape[1] - len(out.logits):].tolist(), torch.stack([lg[0] for lg in out.logits])


# ------------------------------------------------------------------ Florence-2
@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_florence2_tokens_maps_and_shares_match_generate_and_eager(tiny, size):
    model, processor = tiny("florence2")
    inputs = vlm_tiny_c.inputs(processor, vlm_tiny_c.photo(*size), "<DETAILED_CAPTION>")
    want, logits = own_generate(model, inputs, STEPS)
    run = generate_rows(model, inputs, layout_of(model.config, processor, inputs, size), STEPS)
    assert run.tokens.tolist() == want and want[0] == 0 and len(want) == STEPS  # <s> forced first
    assert torch.equal(torch.as_tensor(run.logits), logits)  # the capture changed nothing
    assert model.config.text_config._attn_implementation == "sdpa"
    exp = vlm_tiny_c.florence2_expected(model, inputs["input_ids"][0].numpy(), inputs["pixel_values"])
    assert run.layout.views[0].grid == exp["grid"] == (4, 5)
    assert len(exp["prompt"]) == len("Describe in detail what is shown in the image .".split())
    T = inputs["input_ids"].shape[1]
    for layer, rows in enumerate(vlm_tiny_c.florence2_eager(model, inputs, run.tokens)):  # (heads, steps, T)
        assert rows.shape[-1] == T  # cross-attention: the keys stay the encoder's
        for s in range(STEPS):
            row = rows[:, s]
            np.testing.assert_allclose(run.maps[0][layer, :, s], row[:, exp["cells"]].reshape(-1, 4, 5), atol=ATOL, rtol=0)
            for kind in ("prefix", "special", "prompt"):
                np.testing.assert_allclose(run.shares[kind][layer, :, s], row[:, exp[kind]].sum(1), atol=ATOL, rtol=0)
    assert np.all(run.shares["generated"] == 0)
    total = run.maps[0].sum(axis=(-2, -1)) + sum(run.shares.values())
    np.testing.assert_allclose(total, 1.0, atol=ATOL)
    assert run.maps[0].std() > 1e-3  # the rows are not uniform: the comparison can fail


def _field_centre(convs, pixels, r, c):
    """The centre (x, y), in pixels of the resized photo, of the pixels whose gradient reaches cell (r, c)."""
    x = pixels.clone().requires_grad_(True)
    out = x
    for conv in convs:
        out = conv(out)
    out[0, :, r, c].sum().backward()
    ys, xs = np.nonzero(x.grad[0].abs().sum(0).numpy())
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # pixel x covers [x, x + 1)


@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_florence2_box_puts_each_cell_on_its_receptive_field_centre(tiny, size):
    model, processor = tiny("florence2")
    W, H = size
    inputs = vlm_tiny_c.inputs(processor, vlm_tiny_c.photo(W, H), "<CAPTION>")
    view = layout_of(model.config, processor, inputs, size).views[0]
    rh, rw = inputs["pixel_values"].shape[-2:]
    h, w = view.grid
    x0, y0, x1, y1 = view.box
    convs = [stage.conv for stage in model.model.vision_tower.convs]  # the stages' convolutions: the geometry
    for r, c in [(1, 1), (1, 3), (2, 2)]:  # fields inside the image (not cut by its border)
        want = _field_centre(convs, torch.randn(1, 3, rh, rw), r, c)
        got = ((x0 + (c + 0.5) * (x1 - x0) / w) * rw / W, (y0 + (r + 0.5) * (y1 - y0) / h) * rh / H)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert abs(x0 * rw / W + 15.5) < 1e-9 and abs(y0 * rh / H + 15.5) < 1e-9  # half a 32-px cell up-left
    assert (x1 - x0) * rw / W == 32 * w and (y1 - y0) * rh / H == 32 * h


def test_florence2_at_the_released_size_is_577_tokens_half_a_cell_up_left(tiny):
    """The released processors resize to 768 x 768 (image_seq_length 577): 1 pooled + 24 x 24, the box 15.5 px
    (of 32) up-left, for a 640 x 480 photo scaled by 640 / 768 and 480 / 768."""
    model, processor = tiny("florence2")
    pixels = torch.zeros(1, 3, 768, 768)
    with torch.no_grad():  # the real stages' geometry (the tiny model keeps the kernels, strides and paddings)
        assert tuple(model.model.vision_tower(pixels).last_hidden_state.shape[-2:]) == (24, 24)
    prompt = processor.tokenizer("<s>What does the image describe ?</s>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[model.config.image_token_id] * 577 + prompt])
    layout = layout_of(model.config, processor, {"input_ids": ids, "pixel_values": pixels}, (640, 480))
    view = layout.views[0]
    assert view.grid == (24, 24) and layout.kinds["prefix"].tolist() == [0] and layout.view_keys[0].tolist() == list(range(1, 577))
    np.testing.assert_allclose(view.box, (-15.5 * 640 / 768, -15.5 * 480 / 768, 752.5 * 640 / 768, 752.5 * 480 / 768))
    assert layout.kinds["prompt"].tolist() == list(range(578, 584)) and layout.kinds["special"].tolist() == [577, 584]


def test_florence2_captions_with_task_prompts_like_generate(tiny):
    model, processor = tiny("florence2")
    image = vlm_tiny_c.photo(1000, 200, seed=3)
    default = attnlab.from_huggingface(model, processor, max_len=STEPS)
    assert default.meta == {"prompt": "<CAPTION>", "raw_prompt": "<CAPTION>"}
    for cap in (default, default.prompted("<MORE_DETAILED_CAPTION>"), default.prompted("what is shown ?")):
        trace = attnlab.caption(cap, image)
        want, _ = own_generate(model, vlm_tiny_c.inputs(processor, image, cap.meta["prompt"]), STEPS)
        assert trace.token_ids.tolist() == want
        assert trace.logits.argmax(-1).tolist() == want  # caption()'s choice is generate's (forced tokens included)
        assert trace.meta["prompt"] == cap.meta["prompt"]
    with pytest.raises(AttnlabError, match="takes no other text") as err:
        attnlab.from_huggingface(model, processor, prompt="<CAPTION> of a cat")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ BLIP-2
@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_blip2_composed_map_equals_an_independent_composition(tiny, size):
    model, processor = tiny("blip2")
    image = vlm_tiny_c.photo(*size, seed=4)
    trace = attnlab.caption(attnlab.from_huggingface(model, processor, prompt=ASK, max_len=STEPS), image)
    inputs = vlm_tiny_c.inputs(processor, image, ASK)
    want, _ = own_generate(model, inputs, STEPS)
    assert trace.token_ids.tolist() == want and len(want) == STEPS
    ids = inputs["input_ids"][0].numpy()
    queries = np.flatnonzero(ids == model.config.image_token_index)
    assert queries.tolist() == list(range(vlm_tiny_c.BLIP_QUERIES))  # the queries come first
    rows, cross = vlm_tiny_c.blip2_eager(model, inputs, np.asarray(want))
    C = cross.mean(axis=(0, 1))  # (queries, 1 + h * w): mean over the Q-Former's cross-attention layers and heads
    side = vlm_tiny_c.BLIP_SIDE // 14
    assert C.shape == (len(queries), 1 + side * side)
    view = trace.views[0]
    assert view.name == "composed: language model -> 8 queries -> patches" and view.composed and view.grid == (side, side)
    T = len(ids)
    bos = np.array([q for q in range(T) if q not in queries and ids[q] == processor.tokenizer.bos_token_id])
    prompt = np.array([q for q in range(T) if q not in queries and q not in bos])
    for layer, row in enumerate(rows):  # (heads, steps, T + steps)
        for s in range(STEPS):
            composed = row[:, s, queries] @ C  # (heads, 1 + h * w)
            np.testing.assert_allclose(trace.view_attention(0)[layer, :, s], composed[:, 1:].reshape(-1, side, side), atol=ATOL, rtol=0)
            np.testing.assert_allclose(trace.key_shares[CLS_SHARE][layer, :, s], composed[:, 0], atol=ATOL, rtol=0)
            np.testing.assert_allclose(trace.key_shares["special"][layer, :, s], row[:, s, bos].sum(1), atol=ATOL, rtol=0)
            np.testing.assert_allclose(trace.key_shares["prompt"][layer, :, s], row[:, s, prompt].sum(1), atol=ATOL, rtol=0)
            np.testing.assert_allclose(trace.key_shares["generated"][layer, :, s], row[:, s, T:].sum(1), atol=ATOL, rtol=0)
            drawn = trace.view_attention(0)[layer, :, s].sum((-2, -1)) + trace.key_shares[CLS_SHARE][layer, :, s]
            np.testing.assert_allclose(drawn, row[:, s, queries].sum(1), atol=ATOL, rtol=0)  # the queries' share, kept
    total = trace.view_attention(0).sum(axis=(-2, -1)) + sum(trace.key_shares.values())
    np.testing.assert_allclose(total, 1.0, atol=ATOL)
    assert trace.view_attention(0).std() > 1e-4
    assert model.config.qformer_config._attn_implementation == "sdpa"  # the eager Q-Former run was undone


def test_blip2_default_prompt_is_plain_captioning(tiny):
    model, processor = tiny("blip2")
    image = vlm_tiny_c.photo(640, 480, seed=5)
    cap = attnlab.from_huggingface(model, processor, max_len=STEPS)
    assert cap.meta == {"prompt": "", "raw_prompt": ""}
    trace = attnlab.caption(cap, image)
    with torch.no_grad():  # what the model card runs for a caption: the image alone, no text
        card = model.generate(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"],
                              do_sample=False, num_beams=1, max_new_tokens=STEPS)
    assert trace.token_ids.tolist() == card[0, vlm_tiny_c.BLIP_QUERIES + 1:].tolist()


@pytest.mark.parametrize("family", vlm_tiny_c.FAMILIES)
def test_sdpa_and_eager_give_the_same_tokens_and_maps(tiny, family):
    model, processor = tiny(family)
    image = vlm_tiny_c.photo(480, 640, seed=6)
    prompt = ASK if family == "blip2" else None
    sdpa = attnlab.caption(attnlab.from_huggingface(model, processor, prompt=prompt, max_len=STEPS), image)
    model.set_attn_implementation("eager")
    try:
        eager = attnlab.caption(attnlab.from_huggingface(model, processor, prompt=prompt, max_len=STEPS), image)
        assert model.config.text_config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    assert eager.token_ids.tolist() == sdpa.token_ids.tolist()
    np.testing.assert_allclose(eager.view_attention(0), sdpa.view_attention(0), atol=ATOL, rtol=0)
    for kind in sdpa.key_shares:
        np.testing.assert_allclose(eager.key_shares[kind], sdpa.key_shares[kind], atol=ATOL, rtol=0)


def test_every_blip2_figure_names_the_composition_and_the_shares(tiny, tmp_path):
    model, processor = tiny("blip2")
    trace = attnlab.caption(attnlab.from_huggingface(model, processor, prompt=ASK, max_len=3), vlm_tiny_c.photo(640, 480))
    back = attnlab.CaptionTrace.load(trace.save(tmp_path / "blip2.npz"))
    assert back.views == trace.views and back.views[0].composed  # the file keeps the name, so the flag
    name = "composed: language model -> 8 queries -> patches"

    def texts(fig):
        titles = [ax.get_title(loc) for ax in fig.axes for loc in ("left", "center", "right")]
        return " ".join([*titles, *(t.get_text() for t in [*fig.texts, *(x for ax in fig.axes for x in ax.texts)])])

    for fig in (attnlab.plot.overlay(back, 1), attnlab.plot.word_grid(back)):
        shown = texts(fig)
        assert name in shown and CLS_SHARE in shown and "prompt" in shown
        assert "unaccounted" not in shown  # the composed map and the shares add up to the whole row
    with pytest.raises(AttnlabError, match="a composed view \\(composed: language model") as err:
        attnlab.plot.head_grid(back)  # a one-grid figure would draw it unnamed: refused, naming the figures that draw it
    assert "\n" not in str(err.value)
    page = attnlab.export_html(back, tmp_path / "blip2.html").read_text(encoding="utf-8")
    escaped = [t.replace(">", "\\u003e") for t in (name, CLS_SHARE)]  # the page's data is script-safe JSON
    assert all(t in page for t in escaped)  # the page labels the view by its name and lists the shares


# ------------------------------------------------------------------ what is undone and what is refused
def test_florence2_capture_records_only_the_cross_attention_and_is_undone(tiny):
    from transformers.masking_utils import AttentionMaskInterface

    from attnlab.adapters.hf.families.florence2 import cross_attention
    from attnlab.adapters.hf.rows import capture_rows

    model, processor = tiny("florence2")
    inputs = vlm_tiny_c.inputs(processor, vlm_tiny_c.photo(640, 480), "<CAPTION>")
    decoder = torch.tensor([[2, 0]])
    before = dict(transformers.AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    with torch.no_grad():
        plain = model(**inputs, decoder_input_ids=decoder).logits
        with capture_rows(model, cross_attention(model)) as capture:
            captured = model(**inputs, decoder_input_ids=decoder).logits
    assert torch.equal(plain, captured)
    assert capture.calls == 1 and len(capture.rows) == model.config.text_config.decoder_layers  # no encoder rows among them
    assert capture.rows[0][0].shape[-1] == inputs["input_ids"].shape[1]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_rows(model, cross_attention(model)):
            raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert (dict(transformers.AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)) == before


def test_the_qformer_setting_comes_back_on_errors(tiny, monkeypatch):
    model, processor = tiny("blip2")
    pixels = vlm_tiny_c.inputs(processor, vlm_tiny_c.photo(640, 480), ASK)["pixel_values"]

    def boom(*args, **kwargs):
        assert model.qformer.config._attn_implementation == "eager"
        raise RuntimeError("boom")

    monkeypatch.setattr(model.qformer, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        qformer_attention(model, pixels)
    assert model.qformer.config._attn_implementation == "sdpa"


def test_bad_inputs_get_one_line_errors(tiny):
    from types import SimpleNamespace

    model, processor = tiny("blip2")
    inputs = vlm_tiny_c.inputs(processor, vlm_tiny_c.photo(640, 480), ASK)
    short = {**inputs, "input_ids": inputs["input_ids"][:, 1:], "attention_mask": inputs["attention_mask"][:, 1:]}
    florence, fprocessor = tiny("florence2")
    finputs = vlm_tiny_c.inputs(fprocessor, vlm_tiny_c.photo(640, 480), "<CAPTION>")
    fshort = {**finputs, "input_ids": finputs["input_ids"][:, 1:], "attention_mask": finputs["attention_mask"][:, 1:]}
    t5 = SimpleNamespace(config=SimpleNamespace(use_decoder_only_language_model=False))
    for call, message in [(lambda: layout_of(model.config, processor, short, (640, 480)), "7 image tokens"),
                          (lambda: layout_of(florence.config, fprocessor, fshort, (640, 480)), "1 pooled"),
                          (lambda: decoder_attention(t5), "OPT")]:
        with pytest.raises(AttnlabError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
