"""Idefics3, SmolVLM and GIT through attnlab's vision-language engine (tiny random models built offline,
tests/vlm_tiny_b.py).

Every layout here is computed in the test from the family's rules, not by attnlab's families: Idefics3 /
SmolVLM's rows x cols from the image processor's own ``return_row_col_info``, each tile's tokens after its
``<row_r_col_c>`` marker and the global view's after ``<global-img>``, each tile's box its share of the photo;
GIT's CLS and 4 x 4 grid before the text ids. Maps and shares are compared with the rows of one eager,
teacher-forced forward with ``output_attentions=True``; tokens with the model's own greedy ``generate``;
boxes with the pixels the processor made from a photo whose colours encode their coordinates.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny_b  # noqa: E402  (pytest puts tests/ on the path)
from helpers import assert_error  # noqa: E402
from test_vlm_rows import coded_photo  # noqa: E402

import attnlab  # noqa: E402
from attnlab.adapters.hf import capture_rows, generate_rows, vlm_layout  # noqa: E402
from attnlab.adapters.hf.families import family_of  # noqa: E402

PHOTOS = [(640, 480), (480, 640), (1000, 200)]
STEPS = 4
CELLS = vlm_tiny_b.TILE // vlm_tiny_b.PATCH // vlm_tiny_b.SCALE  # tokens a side per tile
GIT_KEYS = 1 + (28 // 7) ** 2  # CLS + the 4 x 4 grid
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family, **options)``: a model and processor of tests/vlm_tiny_b.py, built once per module."""
    cache = {}

    def get(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = vlm_tiny_b.build(family, tmp_path_factory.mktemp(family), **options)
        return cache[key]

    return get


# ------------------------------------------------------------------ the layouts, computed here
def expected_layout(family, processor, image, ids):
    """``([(grid, box, key positions)] per view, special positions, length)`` from the family's rules."""
    W, H = image.size
    T = len(ids)
    if family == "git":  # CLS, the grid row-major, then the ids; [CLS] among the ids is special
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        special = [GIT_KEYS + i for i, t in enumerate(tokens) if t in ("[CLS]", "[SEP]", "[PAD]")]
        return [((4, 4), None, np.arange(1, GIT_KEYS))], special, GIT_KEYS + T
    info = processor.image_processor(images=[image], return_row_col_info=True)
    rows, cols = info["rows"][0][0], info["cols"][0][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())

    def after(marker):
        (at,) = [i for i, t in enumerate(tokens) if t == marker]
        return at + 1 + np.arange(CELLS * CELLS)

    views = [((CELLS, CELLS), (c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows), after(f"<row_{r + 1}_col_{c + 1}>"))
             for r in range(rows) for c in range(cols)]  # fmt: skip
    views.append(((CELLS, CELLS), (0, 0, W, H), after("<global-img>")))
    special = [i for i, t in enumerate(tokens) if re.fullmatch(r"<[^>]+>", t) and t != "<image>"]  # markers and the template's
    return views, special, T


def check_layout(layout, views, special, length):
    assert layout.length == length
    assert [v.grid for v in layout.views] == [g for g, _, _ in views]
    for v, keys, (_, box, want) in zip(layout.views, layout.view_keys, views):
        assert keys.tolist() == want.tolist()
        if box is not None:
            np.testing.assert_allclose(v.box, box, rtol=0, atol=1e-9)
    assert sorted(layout.kinds["special"].tolist()) == sorted(special)
    placed = np.concatenate([*layout.view_keys, *layout.kinds.values()])
    assert sorted(placed.tolist()) == list(range(length))  # every key exactly once


def eager_rows(model, inputs, tokens, family):
    """Eager attention of one teacher-forced forward over the prompt and the tokens: rows of each step."""
    n = len(tokens)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.as_tensor(tokens[None, :-1])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    before = model.config._attn_implementation
    if family != "git":  # GIT is eager already (it refuses sdpa)
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**full, output_attentions=True)
    finally:
        if family != "git":
            model.set_attn_implementation(before)
    T = inputs["input_ids"].shape[1] + (GIT_KEYS if family == "git" else 0)
    return [[a[0, :, T - 1 + s, : T + s].numpy() for s in range(n)] for a in out.attentions]  # [layer][step] (heads, K)


def own_generate(model, inputs, n):
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.stack([lg[0] for lg in out.logits])


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", vlm_tiny_b.FAMILIES)
def test_tokens_maps_and_shares_match_generate_and_eager(tiny, family, size):
    model, processor = tiny(family)
    image = vlm_tiny_b.photo(*size)
    inputs = vlm_tiny_b.prompt(family, processor, image)
    ids = inputs["input_ids"][0].numpy()
    views, special, length = expected_layout(family, processor, image, ids)
    layout = vlm_layout(model, processor, inputs, size)
    check_layout(layout, views, special, length)
    want, logits = own_generate(model, inputs, STEPS)
    run = generate_rows(model, inputs, layout, STEPS)
    assert run.tokens.tolist() == want and len(want) == STEPS
    assert torch.equal(torch.as_tensor(run.logits), logits)  # the capture leaves the output unchanged
    placed = np.concatenate([k for _, _, k in views] + [np.asarray(special, dtype=int)])
    for layer, steps in enumerate(eager_rows(model, inputs, run.tokens, family)):
        for s, row in enumerate(steps):
            assert row.shape[1] == length + s  # what the attention sees: the layout's keys, then the tokens generated
            for i, (grid, _, keys) in enumerate(views):
                np.testing.assert_allclose(run.maps[i][layer, :, s], row[:, keys].reshape(-1, *grid), atol=1e-5, rtol=0)
            np.testing.assert_allclose(run.shares["special"][layer, :, s], row[:, special].sum(1), atol=1e-5, rtol=0)
            np.testing.assert_allclose(run.shares["generated"][layer, :, s], row[:, length:].sum(1), atol=1e-5, rtol=0)
            rest = np.setdiff1d(np.arange(length), placed)  # the prompt's words (GIT: and CLS, the prefix)
            np.testing.assert_allclose(run.shares["prompt"][layer, :, s] + run.shares["prefix"][layer, :, s],
                                       row[:, rest].sum(1), atol=1e-5, rtol=0)
            if family == "git":
                np.testing.assert_allclose(run.shares["prefix"][layer, :, s], row[:, 0], atol=1e-6, rtol=0)
    total = sum(m.sum(axis=(-2, -1)) for m in run.maps) + sum(run.shares.values())  # (layers, heads, steps)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert run.shares["prefix"].min() > 0 if family == "git" else run.shares["prefix"].max() == 0


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_sdpa_and_eager_give_the_same_maps(tiny, family):
    model, processor = tiny(family)
    inputs = vlm_tiny_b.prompt(family, processor, vlm_tiny_b.photo(480, 640, seed=1))
    layout = vlm_layout(model, processor, inputs, (480, 640))
    sdpa = generate_rows(model, inputs, layout, STEPS)
    model.set_attn_implementation("eager")
    try:
        assert model.model.text_model.config._attn_implementation == "eager"
        eager = generate_rows(model, inputs, layout, STEPS)
    finally:
        model.set_attn_implementation("sdpa")
    assert eager.tokens.tolist() == sdpa.tokens.tolist()
    for a, b in zip(eager.maps, sdpa.maps):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for kind in sdpa.shares:
        np.testing.assert_allclose(eager.shares[kind], sdpa.shares[kind], atol=1e-5, rtol=0)
    assert model.model.text_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("options", [dict(splitting=False), dict(long=vlm_tiny_b.TILE)], ids=["no-splitting", "small"])
def test_a_photo_without_tiles_is_the_global_view_only(tiny, options):
    model, processor = tiny("idefics3", **options)
    image = vlm_tiny_b.photo(300, 200, seed=2)
    inputs = vlm_tiny_b.prompt("idefics3", processor, image)
    info = processor.image_processor(images=[image], return_row_col_info=True)
    assert (info["rows"][0][0], info["cols"][0][0]) == (0, 0)  # the processor made no tiles
    layout = vlm_layout(model, processor, inputs, image.size)
    views, special, length = expected_layout("idefics3", processor, image, inputs["input_ids"][0].numpy())
    check_layout(layout, views, special, length)
    assert [(v.name, v.box) for v in layout.views] == [("global", (0.0, 0.0, 300.0, 200.0))]
    run = generate_rows(model, inputs, layout, STEPS)
    assert run.tokens.tolist() == own_generate(model, inputs, STEPS)[0]
    keys = views[0][2]
    for layer, steps in enumerate(eager_rows(model, inputs, run.tokens, "idefics3")):
        for s, row in enumerate(steps):
            np.testing.assert_allclose(run.maps[0][layer, :, s], row[:, keys].reshape(-1, CELLS, CELLS), atol=1e-5, rtol=0)


def test_pixel_shuffle_makes_each_block_of_patches_one_token_row_major(tiny):
    """The connector's own pixel shuffle on patch features that carry their index: token t of a tile
    holds exactly the s x s patches of cell (t // cells, t % cells)."""
    model, _ = tiny("idefics3")
    n, s = vlm_tiny_b.TILE // vlm_tiny_b.PATCH, vlm_tiny_b.SCALE
    x = torch.arange(n * n, dtype=torch.float32).reshape(1, n * n, 1)  # (1, patches, 1): each patch's index
    out = model.model.connector.pixel_shuffle(x, s)[0]  # (cells * cells, s * s)
    for t in range(CELLS * CELLS):
        r, c = divmod(t, CELLS)
        block = {(r * s + i) * n + c * s + j for i in range(s) for j in range(s)}
        assert set(out[t].long().tolist()) == block


def _centre(img, cy, cx):
    """The (x, y) a coded photo's processed pixels encode around the point (cy, cx) of ``img`` (3, h, w)."""
    ys = range(int(np.floor(cy - 0.5)), int(np.ceil(cy - 0.5)) + 1)
    xs = range(int(np.floor(cx - 0.5)), int(np.ceil(cx - 0.5)) + 1)
    patch = img[:, ys[0]: ys[-1] + 1, xs[0]: xs[-1] + 1].mean(axis=(1, 2))
    return patch[0], patch[1]


@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", ["idefics3", "git"])
def test_boxes_are_where_the_processor_put_the_pixels(tiny, family, size):
    model, processor = tiny(family)
    W, H = size
    inputs = vlm_tiny_b.prompt(family, processor, coded_photo(W, H))
    layout = vlm_layout(model, processor, inputs, size)
    ip = processor.image_processor
    pixels = inputs["pixel_values"].numpy()
    frames = pixels[0] if family != "git" else pixels  # Idefics3: one frame per view (tiles row by row, global last)
    assert len(frames) == len(layout.views)
    for frame, view in zip(frames, layout.views):
        img = frame * np.asarray(ip.image_std)[:, None, None] + np.asarray(ip.image_mean)[:, None, None]
        h, w = view.grid
        cell = img.shape[1] / h  # processed pixels a side per token
        x0, y0, x1, y1 = view.box
        for r in range(h):
            for c in range(w):
                got = _centre(img, (r + 0.5) * cell, (c + 0.5) * cell)
                want = ((x0 + (c + 0.5) * (x1 - x0) / w) / W, (y0 + (r + 0.5) * (y1 - y0) / h) / H)
                tol = max((x1 - x0) / img.shape[2] / W, (y1 - y0) / img.shape[1] / H) + 3 / 255
                np.testing.assert_allclose(got, want, atol=tol, err_msg=f"{view.name} cell {r},{c}")


@pytest.mark.parametrize("family", vlm_tiny_b.FAMILIES)
def test_caption_tokens_are_generates_own(tiny, family):
    model, processor = tiny(family)
    size = (1000, 200) if family == "smolvlm" else (480, 640)
    image = vlm_tiny_b.photo(*size, seed=3)
    cap = attnlab.from_huggingface(model, processor, prompt="what colour is the car ?", max_len=STEPS)
    trace = attnlab.caption(cap, image)
    want = own_generate(model, vlm_tiny_b.prompt(family, processor, image, "what colour is the car ?"), STEPS)[0]
    assert trace.token_ids.tolist() == want
    assert trace.logits.argmax(-1).tolist() == want
    layout = vlm_layout(model, processor, vlm_tiny_b.prompt(family, processor, image, "what colour is the car ?"), size)
    assert [v.name for v in trace.views] == [v.name for v in layout.views]
    fx, fy = trace.image.shape[1] / size[0], trace.image.shape[0] / size[1]  # the boxes on the image figures draw on
    for got, v in zip(trace.views, layout.views):
        np.testing.assert_allclose(got.box, np.asarray(v.box) * [fx, fy, fx, fy], rtol=1e-6)
    total = sum(trace.view_attention(i).sum(axis=(-2, -1)) for i in range(len(trace.views))) + sum(trace.key_shares.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_git_captions_as_its_own_generate_from_the_photo_alone(tiny):
    """GIT's captioning: ``generate(pixel_values=...)`` starts from [CLS]; attnlab's default prompt is that."""
    model, processor = tiny("git")
    image = vlm_tiny_b.photo(640, 480, seed=4)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        own = model.generate(pixel_values=pixels, do_sample=False, num_beams=1, max_new_tokens=STEPS)
    assert own[0, 0] == processor.tokenizer.cls_token_id
    cap = attnlab.from_huggingface(model, processor, max_len=STEPS)
    trace = attnlab.caption(cap, image)
    assert trace.token_ids.tolist() == own[0, 1:].tolist()
    assert cap.meta == {"prompt": "", "raw_prompt": ""}
    assert trace.key_shares["prefix"].min() > 0  # CLS, the image's first key
    assert model.config._attn_implementation == "eager"


def test_git_rows_are_recorded_under_eager_and_the_hooks_are_removed(tiny):
    model, processor = tiny("git")
    inputs = vlm_tiny_b.prompt("git", processor, vlm_tiny_b.photo(640, 480))
    layout = vlm_layout(model, processor, inputs, (640, 480))
    attn = [layer.attention.self for layer in model.git.encoder.layer]
    before = [dict(a._forward_hooks) for a in attn]  # (transformers keeps hooks of its own there)
    with pytest.raises(RuntimeError, match="boom"):
        with family_of(model).capture(model) as capture:
            assert [len(a._forward_hooks) for a in attn] == [len(b) + 1 for b in before]
            raise RuntimeError("boom")
    assert [dict(a._forward_hooks) for a in attn] == before and capture.calls == 0
    run = generate_rows(model, inputs, layout, STEPS)
    assert [dict(a._forward_hooks) for a in attn] == before
    with torch.no_grad():
        own = model.generate(**inputs, do_sample=False, max_new_tokens=STEPS, output_attentions=True, return_dict_in_generate=True)
    for s, step in enumerate(own.attentions):  # generate's own eager attentions, step by step
        for layer, a in enumerate(step):
            np.testing.assert_allclose(run.maps[0][layer, :, s], a[0, :, -1, 1:GIT_KEYS].reshape(-1, 4, 4).numpy(), atol=1e-6, rtol=0)


def test_inputs_that_do_not_fit_the_photo_get_one_line_errors(tiny):
    model, processor = tiny("smolvlm")
    inputs = vlm_tiny_b.prompt("smolvlm", processor, vlm_tiny_b.photo(640, 480))
    assert_error(lambda: vlm_layout(model, processor, inputs, (1000, 200)), "runs of image tokens", "1000 x 200")
    two = dict(inputs)
    two["input_ids"] = torch.cat([inputs["input_ids"], inputs["input_ids"]], 1)
    two["attention_mask"] = torch.ones_like(two["input_ids"])
    assert_error(lambda: vlm_layout(model, processor, two, (640, 480)), "runs of image tokens")
    assert_error(lambda: capture_rows(model).__enter__(), "language_model")  # its decoder is model.model.text_model
