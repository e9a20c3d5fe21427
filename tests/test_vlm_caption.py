"""``attnlab.from_huggingface(vlm, processor)`` through ``attnlab.caption``, on the tiny random models
of tests/vlm_tiny.py: tokens equal the model's own ``generate``, prompts go through the chat
template (or as given), and what the replaying captioner cannot do is refused in one line."""

from __future__ import annotations


import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny  # noqa: E402  (pytest puts tests/ on the path)

import attnlab  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


def own_generate(model, inputs, n):
    """The model's own greedy generate: the generated tokens only."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", vlm_tiny.FAMILIES)
def test_caption_tokens_are_generates_own(built, family):
    model, processor = built(family)
    size = (480, 640) if family.endswith("vl") else (1000, 200)
    image = vlm_tiny.photo(*size, seed=3)
    cap = attnlab.from_huggingface(model, processor, prompt="what colour is the car ?", max_len=STEPS)
    trace = attnlab.caption(cap, image)
    want = own_generate(model, vlm_tiny.prompt(processor, image, "what colour is the car ?"), STEPS)
    assert trace.token_ids.tolist() == want
    assert len(want) == STEPS  # max_len counts generated tokens only (the random models never end early here)
    assert trace.logits.argmax(-1).tolist() == want  # caption()'s choice is generate's
    assert trace.caption == processor.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_the_default_prompt_and_a_raw_prompt(built):
    model, processor = built("qwen2_vl")
    image = vlm_tiny.photo(640, 480, seed=1)
    default = attnlab.caption(attnlab.from_huggingface(model, processor, max_len=STEPS), image)
    assert default.token_ids.tolist() == own_generate(model, vlm_tiny.prompt(processor, image, "Describe this image."), STEPS)
    raw = "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>a red car<|im_end|><|im_start|>assistant "
    traced = attnlab.caption(attnlab.from_huggingface(model, processor, raw_prompt=raw, max_len=STEPS), image)
    inputs = dict(processor(text=[raw], images=[image], return_tensors="pt"))
    assert traced.token_ids.tolist() == own_generate(model, inputs, STEPS)
    assert not np.allclose(traced.logits, default.logits)  # the prompt reached the model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert attnlab.from_huggingface(model, processor).meta == {"prompt": "Describe this image.", "raw_prompt": chat}
    assert attnlab.from_huggingface(model, processor, raw_prompt=raw).meta == {"prompt": None, "raw_prompt": raw}
    asked = attnlab.from_huggingface(model, processor, max_len=STEPS).prompted("a red car")
    assert asked.meta["prompt"] == "a red car"
    assert attnlab.caption(asked, image).token_ids.tolist() == own_generate(model, vlm_tiny.prompt(processor, image, "a red car"), STEPS)


def test_max_len_default_is_generates_and_a_shorter_call_is_a_prefix(built):
    model, processor = built("llava")
    image = vlm_tiny.photo(640, 480, seed=2)
    cap = attnlab.from_huggingface(model, processor)
    assert cap.spec.max_len == 20  # generate's own default without max_new_tokens
    before = (model.generation_config.max_length, model.generation_config.max_new_tokens)
    model.generation_config.max_length, model.generation_config.max_new_tokens = 4096, None  # max_length counts the prompt
    try:
        assert attnlab.from_huggingface(model, processor).spec.max_len == 20
        model.generation_config.max_new_tokens = 7
        assert attnlab.from_huggingface(model, processor).spec.max_len == 7
    finally:
        model.generation_config.max_length, model.generation_config.max_new_tokens = before
    longer = attnlab.caption(cap, image, max_len=6)
    shorter = attnlab.caption(cap, image, max_len=3)
    assert shorter.token_ids.tolist() == longer.token_ids.tolist()[:3] == own_generate(model, vlm_tiny.prompt(processor, image, "Describe this image."), 3)


def test_a_list_of_photos_gives_what_each_gives_alone(built):
    model, processor = built("qwen2_5_vl")
    cap = attnlab.from_huggingface(model, processor, max_len=STEPS)
    photos = [vlm_tiny.photo(640, 480, seed=4), vlm_tiny.photo(200, 500, seed=5)]
    both = attnlab.caption(cap, photos)
    for photo, trace in zip(photos, both):
        alone = attnlab.caption(cap, photo)
        assert trace.token_ids.tolist() == alone.token_ids.tolist()
        np.testing.assert_array_equal(trace.cross_attention, alone.cross_attention)
        np.testing.assert_array_equal(trace.logits, alone.logits)


def test_what_the_replay_cannot_do_is_refused_naming_explain(built):
    model, processor = built("qwen2_vl")
    cap = attnlab.from_huggingface(model, processor, max_len=3)
    image = vlm_tiny.photo(640, 480)
    for call in (lambda: attnlab.caption(cap, image, tokens=[5, 6, 7]),  # (explain works: tests/test_vlm_explain.py)
                 lambda: attnlab.caption(cap, image, beams=2)):
        with pytest.raises(AttnlabError, match=r"replays the model's own greedy generate.*attnlab.explain\(captioner, image, \"raw\", tokens=") as err:
            call()
        assert "\n" not in str(err.value)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_bad_arguments_get_one_line_errors(built):
    model, processor = built("llava_next")
    cases = [
        (dict(prompt="a", raw_prompt="b"), "not both"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(max_len=0), "max_len must be a positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AttnlabError, match=message):
            attnlab.from_huggingface(model, processor, **kwargs)
    with pytest.raises(AttnlabError, match="combined processor"):
        attnlab.from_huggingface(model, processor.tokenizer)
    with pytest.raises(AttnlabError, match="combined processor only"):
        attnlab.from_huggingface(model, processor, processor.image_processor)
    text = transformers.LlamaForCausalLM(model.config.text_config)
    with pytest.raises(AttnlabError, match="Qwen2VLForConditionalGeneration.*LlavaNextForConditionalGeneration") as err:
        attnlab.from_huggingface(text, processor)
    assert "\n" not in str(err.value)


VIEW_PHOTOS = {"qwen2_vl": (640, 480), "qwen2_5_vl": (480, 640), "qwen3_vl": (1000, 200), "llava": (480, 640), "llava_next": (1000, 200)}


@pytest.mark.parametrize("family", vlm_tiny.FAMILIES)
def test_trace_views_maps_and_shares_are_the_engines_and_eagers(built, family):
    """The trace holds the engine's views, maps and shares exactly, and the maps are eager's rows
    placed by the layout computed in tests/vlm_tiny.py (not attnlab's)."""
    from attnlab.adapters.hf import generate_rows, vlm_layout

    model, processor = built(family)
    size = VIEW_PHOTOS[family]
    image = vlm_tiny.photo(*size, seed=7)
    trace = attnlab.caption(attnlab.from_huggingface(model, processor, max_len=STEPS), image)
    inputs = vlm_tiny.prompt(processor, image, "Describe this image.")
    run = generate_rows(model, inputs, vlm_layout(model, processor, inputs, size), STEPS)
    assert trace.token_ids.tolist() == run.tokens.tolist()
    assert [(v.name, v.grid) for v in trace.views] == [(v.name, v.grid) for v in run.layout.views]
    H, W = trace.image.shape[:2]
    for got, want in zip(trace.views, run.layout.views):  # boxes on the shown photo: the engine's, scaled
        x0, y0, x1, y1 = want.box
        np.testing.assert_allclose(got.box, (x0 * W / size[0], y0 * H / size[1], x1 * W / size[0], y1 * H / size[1]), rtol=1e-6)
    for i, maps in enumerate(run.maps):
        np.testing.assert_array_equal(trace.view_attention(i), maps)
    assert set(trace.key_shares) >= set(run.shares)
    for kind, share in run.shares.items():
        np.testing.assert_allclose(trace.key_shares[kind], share, atol=1e-6, rtol=0)  # the same keys summed in another order
    total = sum(trace.view_attention(i).sum(axis=(-2, -1)) for i in range(len(trace.views))) + sum(trace.key_shares.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-5)  # (layers, heads, steps): every key accounted for

    views, newlines = vlm_tiny.expected_layout(family, model, processor, inputs["input_ids"][0].numpy(), *size)
    T = inputs["input_ids"].shape[1]
    for layer, steps in enumerate(vlm_tiny.eager_rows(model, inputs, run.tokens)):
        for s, row in enumerate(steps):
            for i, (grid, keys) in enumerate(views):
                np.testing.assert_allclose(trace.view_attention(i)[layer, :, s], row[:, keys].reshape(-1, *grid), atol=1e-5, rtol=0)
            np.testing.assert_allclose(trace.key_shares["generated"][layer, :, s], row[:, T:].sum(1), atol=1e-5, rtol=0)
            np.testing.assert_allclose(trace.key_shares["newline"][layer, :, s], row[:, newlines].sum(1), atol=1e-5, rtol=0)
    if len(trace.views) == 1:
        np.testing.assert_array_equal(trace.cross_attention, trace.view_attention(0))
    else:
        with pytest.raises(AttnlabError, match="view_attention"):
            trace.cross_attention


def test_the_photo_reaches_the_processor_unchanged():
    from attnlab.adapters.hf.vlm import photo_of, photo_tensor

    image = vlm_tiny.photo(37, 23, seed=9)
    assert np.array_equal(np.asarray(photo_of(photo_tensor(image))), np.asarray(image))


def test_vlm_traces_save_load_and_export_html(built, tmp_path):
    model, processor = built("llava_next")
    trace = attnlab.caption(attnlab.from_huggingface(model, processor, max_len=3), vlm_tiny.photo(1000, 200, seed=8))
    back = attnlab.CaptionTrace.load(trace.save(tmp_path / "next.npz"))
    assert back.views == trace.views and [v.name for v in back.views] == ["base", "high-res"]
    for i in range(len(trace.views)):
        np.testing.assert_array_equal(back.view_attention(i), trace.view_attention(i))
    assert set(back.key_shares) == set(trace.key_shares)
    for kind in trace.key_shares:
        np.testing.assert_array_equal(back.key_shares[kind], trace.key_shares[kind])
    # the two views draw: the page and the word grid name both views and print the prompt's share
    two = attnlab.export_html(back, tmp_path / "next.html").read_text(encoding="utf-8")
    assert "base" in two and "high-res" in two and "prompt" in two
    fig = attnlab.plot.word_grid(back)
    text = " ".join(t.get_text() for t in [*fig.texts, *(x for ax in fig.axes for x in (ax.title, *ax.texts))])
    assert "base" in text and "high-res" in text
    model, processor = built("qwen2_vl")
    single = attnlab.caption(attnlab.from_huggingface(model, processor, max_len=3), vlm_tiny.photo(640, 480, seed=8))
    page = attnlab.export_html(single, tmp_path / "qwen.html")
    assert single.caption.split()[0] in page.read_text(encoding="utf-8")


def test_a_folder_run_with_pages_gives_what_caption_gives(built, tmp_path):
    from attnlab.batch import caption_folder

    model, processor = built("qwen3_vl")
    cap = attnlab.from_huggingface(model, processor, max_len=3)
    (tmp_path / "in").mkdir()
    photos = {"a.png": vlm_tiny.photo(640, 480, seed=10), "b.png": vlm_tiny.photo(300, 500, seed=11)}
    for name, photo in photos.items():
        photo.save(tmp_path / "in" / name)
    caption_folder(cap, tmp_path / "in", tmp_path / "out", workers=0, html=True, batch_size=2)
    for name, photo in photos.items():
        written = attnlab.CaptionTrace.load(tmp_path / "out" / f"{name}.npz")
        alone = attnlab.caption(cap, photo)
        assert written.token_ids.tolist() == alone.token_ids.tolist()
        np.testing.assert_allclose(written.view_attention(0), alone.view_attention(0), atol=1e-6)
        assert (tmp_path / "out" / f"{name}.html").stat().st_size > 0


def test_end_tokens_stop_the_caption_like_generate(built):
    model, processor = built("llava")
    image = vlm_tiny.photo(640, 480, seed=12)
    cap = attnlab.from_huggingface(model, processor, max_len=6)
    free = attnlab.caption(cap, image).token_ids.tolist()
    before = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = int(free[2])  # the model's third token ends it
        cap = attnlab.from_huggingface(model, processor, max_len=6)
        trace = attnlab.caption(cap, image)
        assert trace.token_ids.tolist() == free[:3] == own_generate(model, vlm_tiny.prompt(processor, image, "Describe this image."), 6)
        assert trace.meta["stopped"] == "end"
        model.generation_config.eos_token_id = [int(before), int(free[2])]  # a list: the second ends it, as in generate
        listed = attnlab.caption(attnlab.from_huggingface(model, processor, max_len=6), image)
        assert listed.token_ids.tolist() == free[:3] and listed.stopped == "end"
    finally:
        model.generation_config.eos_token_id = before


def test_caption_asks_per_call_and_records_the_prompt(built):
    model, processor = built("llava")
    image = vlm_tiny.photo(480, 640, seed=13)
    cap = attnlab.from_huggingface(model, processor, max_len=STEPS)
    default = attnlab.caption(cap, image)
    assert default.meta["prompt"] == "Describe this image." and default.meta["raw_prompt"] == cap.meta["raw_prompt"]
    asked = attnlab.caption(cap, image, prompt="what colour is the car ?")
    assert asked.token_ids.tolist() == own_generate(model, vlm_tiny.prompt(processor, image, "what colour is the car ?"), STEPS)
    assert asked.meta["prompt"] == "what colour is the car ?" and "what colour is the car ?" in asked.meta["raw_prompt"]
    assert cap.meta["prompt"] == "Describe this image."  # the captioner keeps its own prompt
    shapes = attnlab.load_model()
    with pytest.raises(AttnlabError, match="vision-language captioners"):
        attnlab.caption(shapes, image, prompt="a question")
