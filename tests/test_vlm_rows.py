"""Attention rows of vision-language models beside sdpa (attnlab.adapters.hf), on tiny random
models of the five supported classes built offline (tests/vlm_tiny.py).

Every map is checked against the rows of one eager, teacher-forced forward with
``output_attentions=True``, placed on the grid by a layout computed here from the photo size
and the processor's settings (not by attnlab's layout module); the boxes are checked on the
pixels the processor made from a photo whose colours encode its own coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny  # noqa: E402  (pytest puts tests/ on the path)

from attnlab.adapters.hf import capture_rows, generate_rows, vlm_layout  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402

PHOTOS = [(640, 480), (480, 640), (1000, 200)]
STEPS = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def coded_photo(width, height):
    """Red encodes x, green encodes y (of the pixel centre), blue is flat."""
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.round(255 * x)[None, :]
    rgb[..., 1] = np.round(255 * y)[:, None]
    rgb[..., 2] = 128
    from PIL import Image

    return Image.fromarray(rgb)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", vlm_tiny.FAMILIES)
def test_tokens_maps_and_shares_match_generate_and_eager(built, family, size):
    model, processor = built(family)
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(*size))
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=STEPS,
                               output_logits=True, return_dict_in_generate=True)
    run = generate_rows(model, inputs, vlm_layout(model, processor, inputs, size), STEPS)
    assert run.tokens.tolist() == plain.sequences[0, T:].tolist()
    assert torch.equal(torch.as_tensor(run.logits), torch.stack([lg[0] for lg in plain.logits]))  # output unchanged
    assert model.config.text_config._attn_implementation == "sdpa"

    views, newlines = vlm_tiny.expected_layout(family, model, processor, inputs["input_ids"][0].numpy(), *size)
    assert [v.grid for v in run.layout.views] == [tuple(g) for g, _ in views]
    rows = vlm_tiny.eager_rows(model, inputs, run.tokens)
    for layer, steps in enumerate(rows):
        for s, row in enumerate(steps):
            for i, (grid, keys) in enumerate(views):
                want = row[:, keys].reshape(row.shape[0], *grid)
                np.testing.assert_allclose(run.maps[i][layer, :, s], want, atol=1e-5, rtol=0)
            np.testing.assert_allclose(run.shares["generated"][layer, :, s], row[:, T:].sum(1), atol=1e-5, rtol=0)
            np.testing.assert_allclose(run.shares["newline"][layer, :, s], row[:, newlines].sum(1), atol=1e-5, rtol=0)
    total = sum(m.sum(axis=(-2, -1)) for m in run.maps) + sum(run.shares.values())  # (layers, heads, steps)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert run.maps[0].shape[:3] == (len(rows), rows[0][0].shape[0], len(run.tokens))


def test_a_kept_cls_token_is_the_prefix_share(tmp_path):
    """LLaVA with vision_feature_select_strategy="full" (LLaVA-NeXT's model cannot run it)."""
    model, processor = vlm_tiny.build("llava", tmp_path, strategy="full")
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(640, 480))
    run = generate_rows(model, inputs, vlm_layout(model, processor, inputs, (640, 480)), 3)
    ids = inputs["input_ids"][0].numpy()
    cls = int(np.flatnonzero(ids == model.config.image_token_index)[0])  # CLS comes first among the image tokens
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for layer, steps in enumerate(vlm_tiny.eager_rows(model, inputs, run.tokens)):
        for s, row in enumerate(steps):
            np.testing.assert_allclose(run.shares["prefix"][layer, :, s], row[:, cls], atol=1e-5, rtol=0)
            base = row[:, cls + 1: cls + 1 + side * side].reshape(-1, side, side)
            np.testing.assert_allclose(run.maps[0][layer, :, s], base, atol=1e-5, rtol=0)
    assert run.shares["prefix"].min() > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_left_padding_is_a_zero_share_and_changes_nothing_else(tmp_path, family):
    model, processor = vlm_tiny.build(family, tmp_path)
    image = vlm_tiny.photo(640, 480)
    inputs = vlm_tiny.prompt(processor, image)
    T = inputs["input_ids"].shape[1]
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image ."}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    padded = dict(processor(text=[chat], images=[image], return_tensors="pt", padding="max_length", max_length=T + 3))
    assert padded["attention_mask"][0, :3].tolist() == [0, 0, 0]
    layout = vlm_layout(model, processor, padded, (640, 480))
    assert layout.kinds["padding"].tolist() == [0, 1, 2]
    plain = generate_rows(model, inputs, vlm_layout(model, processor, inputs, (640, 480)), 4)
    run = generate_rows(model, padded, layout, 4)
    assert run.tokens.tolist() == plain.tokens.tolist()
    assert np.all(run.shares["padding"] == 0)  # masked keys get exactly nothing
    for a, b in zip(run.maps, plain.maps):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def _pixel_centres(pixels, mean, std, points):
    """Photo coordinates (fractions of width, height) decoded from processed pixels at ``points`` (y, x) of (3, h, w)."""
    img = pixels.numpy() * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    out = []
    for y, x in points:
        patch = img[:, y - 1: y + 1, x - 1: x + 1].mean(axis=(1, 2))  # the 2 x 2 pixels around a cell centre
        out.append((patch[0], patch[1]))
    return np.asarray(out)


@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_boxes_are_where_the_processor_put_the_pixels(built, family, size):
    model, processor = built(family)
    W, H = size
    inputs = vlm_tiny.prompt(processor, coded_photo(W, H))
    layout = vlm_layout(model, processor, inputs, size)
    ip = processor.image_processor
    pixels = inputs["pixel_values"][0]
    patch = model.config.vision_config.patch_size
    half = patch // 2
    first = pixels if family == "llava" else pixels[0]
    tiles = [(layout.views[0], lambda r, c: (first, r * patch + half, c * patch + half))]
    if family == "llava_next":
        rows, cols, drop_r, drop_c = vlm_tiny.next_grid(model, W, H)
        side = model.config.vision_config.image_size // patch

        def high_res(r, c):
            R, C = r + drop_r, c + drop_c
            return pixels[1 + (R // side) * (cols // side) + C // side], (R % side) * patch + half, (C % side) * patch + half

        tiles.append((layout.views[1], high_res))
    for view, where in tiles:
        h, w = view.grid
        x0, y0, x1, y1 = view.box
        points = [where(r, c) for r in range(h) for c in range(w)]
        got = np.concatenate([_pixel_centres(px, ip.image_mean, ip.image_std, [(y, x)]) for px, y, x in points])
        want_x = np.array([(x0 + (c + 0.5) * (x1 - x0) / w) / W for r in range(h) for c in range(w)])
        want_y = np.array([(y0 + (r + 0.5) * (y1 - y0) / h) / H for r in range(h) for c in range(w)])
        tol = max((x1 - x0) / (w * patch) / W, (y1 - y0) / (h * patch) / H) + 3 / 255
        inside = (want_x > tol) & (want_x < 1 - tol) & (want_y > tol) & (want_y < 1 - tol)  # padding is black
        assert inside.sum() >= h * w // 2
        got, want_x, want_y = got[inside], want_x[inside], want_y[inside]
        np.testing.assert_allclose(got[:, 0], want_x, atol=tol)
        np.testing.assert_allclose(got[:, 1], want_y, atol=tol)


@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qwen_box_is_the_whole_photo_on_its_pixels(built, size):
    """Qwen's pixel_values are (cells * m * m, C * t * p * p) in the order (h/m, w/m, m, m, C, t, p, p):
    the centre of merged cell (r, c) is the corner shared by its m x m patches."""
    model, processor = built("qwen2_vl")
    W, H = size
    inputs = vlm_tiny.prompt(processor, coded_photo(W, H))
    view = vlm_layout(model, processor, inputs, size).views[0]
    ip = processor.image_processor
    m, p, t = ip.merge_size, ip.patch_size, ip.temporal_patch_size
    h, w = view.grid
    patches = inputs["pixel_values"].reshape(h, w, m, m, 3, t, p, p)[:, :, :, :, :, 0]  # (h, w, m, m, C, p, p)
    cells = patches.permute(0, 2, 5, 1, 3, 6, 4).reshape(h * m * p, w * m * p, 3)  # the resized photo, (Y, X, C)
    img = cells.numpy() * np.asarray(ip.image_std) + np.asarray(ip.image_mean)
    x0, y0, x1, y1 = view.box
    for r in range(h):
        for c in range(w):
            y, x = (2 * r + 1) * m * p // 2, (2 * c + 1) * m * p // 2
            got = img[y - 1: y + 1, x - 1: x + 1].mean(axis=(0, 1))
            tol = max((x1 - x0) / (w * m * p) / W, (y1 - y0) / (h * m * p) / H) + 3 / 255
            assert abs(got[0] - (x0 + (c + 0.5) * (x1 - x0) / w) / W) < tol
            assert abs(got[1] - (y0 + (r + 0.5) * (y1 - y0) / h) / H) < tol


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_capture_leaves_the_forward_unchanged_and_is_undone_on_exceptions(built, family):
    from transformers.masking_utils import AttentionMaskInterface

    model, processor = built(family)
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(640, 480))
    before = dict(transformers.AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    with torch.no_grad():
        plain = model(**inputs).logits
        with capture_rows(model) as capture:
            assert model.config.text_config._attn_implementation.startswith("attnlab_rows")
            assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is left alone
            captured = model(**inputs).logits
    assert torch.equal(plain, captured)
    assert capture.calls == 1 and capture.rows[0][0].shape[-1] == inputs["input_ids"].shape[1]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_rows(model):
            raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.language_model.layers)
    assert (dict(transformers.AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)) == before


def test_end_tokens_from_generation_config_stop_like_generate(built):
    model, processor = built("qwen3_vl")
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(480, 640))
    layout = vlm_layout(model, processor, inputs, (480, 640))
    free = generate_rows(model, inputs, layout, 6).tokens
    assert len(free) == 6  # max_new_tokens counts generated tokens only
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [int(before), int(free[2])]  # a list of end tokens, one of them generated
    try:
        run = generate_rows(model, inputs, layout, 6)
        with torch.no_grad():
            own = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=6)
    finally:
        model.generation_config.eos_token_id = before
    T = inputs["input_ids"].shape[1]
    assert run.tokens.tolist() == own[0, T:].tolist() == free[: list(free).index(free[2]) + 1].tolist()
    assert run.maps[0].shape[2] == len(run.tokens)


def test_an_eager_model_gives_its_own_rows(built):
    model, processor = built("llava")
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(640, 480))
    layout = vlm_layout(model, processor, inputs, (640, 480))
    model.set_attn_implementation("eager")
    try:
        run = generate_rows(model, inputs, layout, 3)
        with torch.no_grad():
            own = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=3,
                                 output_attentions=True, return_dict_in_generate=True)
        assert model.config.text_config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    keys = layout.view_keys[0]
    for layer in range(len(own.attentions[0])):
        for s, step in enumerate(own.attentions):
            want = step[layer][0, :, -1, keys].reshape(-1, *layout.views[0].grid).numpy()
            np.testing.assert_allclose(run.maps[0][layer, :, s], want, atol=1e-6, rtol=0)


def test_unsupported_inputs_get_one_line_errors(built):
    model, processor = built("qwen2_vl")
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(640, 480))
    layout = vlm_layout(model, processor, inputs, (640, 480))
    for bad in (0, 2.5):
        with pytest.raises(AttnlabError, match="max_new_tokens"):
            generate_rows(model, inputs, layout, bad)
    text = model.config.text_config
    text._attn_implementation = "flex_attention"
    try:
        with pytest.raises(AttnlabError, match="sdpa") as err:
            with capture_rows(model):
                pass
        assert "\n" not in str(err.value)
        assert text._attn_implementation == "flex_attention"  # refused before anything was switched
    finally:
        text._attn_implementation = "sdpa"
    with pytest.raises(AttnlabError, match="Qwen2VLForConditionalGeneration") as err:
        vlm_layout(torch.nn.Linear(2, 2), processor, inputs, (640, 480))
    assert "\n" not in str(err.value)
    two = vlm_tiny.prompt(processor, vlm_tiny.photo(640, 480))
    two["input_ids"] = torch.cat([two["input_ids"], two["input_ids"]], 1)
    two["attention_mask"] = torch.ones_like(two["input_ids"])
    with pytest.raises(AttnlabError, match="exactly one image"):
        vlm_layout(model, processor, two, (640, 480))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_inputs_that_do_not_fit_the_photo_are_refused(built, family):
    model, processor = built(family)
    inputs = vlm_tiny.prompt(processor, vlm_tiny.photo(640, 480))
    ids = inputs["input_ids"]
    image = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[int((ids[0] == image).nonzero()[0])] = False  # one image token short
    short = {**inputs, "input_ids": ids[:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
    cases = [(short, (640, 480))] + ([(inputs, (1000, 200))] if family == "llava_next" else [])  # NeXT's grid follows the photo
    for given, size in cases:
        with pytest.raises(AttnlabError, match="image tokens|tokens for view") as err:
            vlm_layout(model, processor, given, size)
        assert "\n" not in str(err.value)
