"""PaliGemma, Gemma 3 and LLaVA-OneVision through the family registry, on the tiny random models of
tests/vlm_tiny_more.py.

Every map is checked against the rows of one eager, teacher-forced forward with
``output_attentions=True`` (the family's own masks: PaliGemma's bidirectional prefix, Gemma 3's
sliding window and bidirectional image block), placed on the grid by a layout computed HERE from each
family's rules (image tokens first; pooled tokens between the image markers; OneVision's unpadding and
anyres_max pooling), never by attnlab's layout code. Tokens are the model's own ``generate``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import vlm_tiny  # noqa: E402  (pytest puts tests/ on the path)
import vlm_tiny_more as more  # noqa: E402

import attnlab  # noqa: E402
from attnlab.adapters.hf import generate_rows, vlm_layout  # noqa: E402
from attnlab.adapters.hf.families import family_of, layout_of  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402

PHOTOS = [(50, 30), (30, 50)]
STEPS = 4
CASES = [("paligemma", {}), ("gemma3", {}), ("llava_onevision", {"aspect": "anyres_max_9"}),
         ("llava_onevision", {"aspect": "anyres_max_1"}), ("paligemma", {"text": "gemma2"}),
         ("llava_onevision", {"aspect": "anyres_max_1", "vision": "siglip"})]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``made(family, **options)``: a tiny model and its processor, built once per module."""
    cache = {}

    def get(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = more.build(family, tmp_path_factory.mktemp(family), **options)
        return cache[key]

    return get


# ------------------------------------------------------------------ the layout, from each family's rules
def onevision_grid(config, width, height, unpooled=False):
    """(rows, cols) of the high-res grid: best pinpoint, padding rows/columns dropped, anyres_max pooling.
    ``unpooled``: ``(pinpoint (h, w), rows and columns kept before pooling, rows and columns dropped each side)``."""
    tile, side = config.vision_config.image_size, config.vision_config.image_size // config.vision_config.patch_size
    fits = []
    for ph, pw in config.image_grid_pinpoints:  # the pinpoint that keeps most of the photo, then wastes least
        s = min(pw / width, ph / height)
        kept = min(int(width * s) * int(height * s), width * height)
        fits.append((-kept, ph * pw - kept, ph, pw))
    _, _, ph, pw = min(fits)
    rows, cols = ph // tile * side, pw // tile * side
    drop_r = drop_c = 0
    if width * rows > height * cols:  # wider than the grid: whole rows of padding go, as many each side
        drop_r = (rows - int(round(height * cols / width, 7))) // 2
    else:
        drop_c = (cols - int(round(width * rows / height, 7))) // 2
    rows, cols = rows - 2 * drop_r, cols - 2 * drop_c
    if unpooled:
        return (ph, pw), (rows, cols), (drop_r, drop_c)
    n = int(config.vision_aspect_ratio.split("_")[-1])
    r = math.sqrt(rows * cols / (n * side * side))
    return (int(rows // r), int(cols // r)) if r > 1.1 else (rows, cols)


def expected(family, model, ids, width, height):
    """[(grid, key positions row-major)] per view, and the newline positions."""
    cfg = model.config
    image = np.flatnonzero(ids == cfg.image_token_id)
    if family == "paligemma":  # the image tokens first, then <bos>
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        assert ids[side * side] == cfg.text_config.bos_token_id and image.tolist() == list(range(side * side))
        return [((side, side), np.arange(side * side))], []
    if family == "gemma3":  # the pooled tokens right after <start_of_image>, then <end_of_image>
        side = int(round(cfg.mm_tokens_per_image**0.5))
        start = int(np.flatnonzero(ids == cfg.boi_token_id)[0]) + 1
        assert ids[start + side * side] == cfg.eoi_token_id
        return [((side, side), start + np.arange(side * side))], []
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # OneVision: base view, then rows + newline
    start = int(image[0])
    h, w = onevision_grid(cfg, width, height)
    first = start + side * side
    cells = first + np.arange(h)[:, None] * (w + 1) + np.arange(w)[None, :]
    assert len(image) == side * side + h * (w + 1)
    return [((side, side), start + np.arange(side * side)), ((h, w), cells.reshape(-1))], list(first + np.arange(h) * (w + 1) + w)


def eager_rows(model, inputs, tokens):
    """Eager attention of one teacher-forced forward over the prompt and the tokens: rows of each step.
    Generated tokens get token type 1 in PaliGemma (the causal suffix), 0 (text) in Gemma 3."""
    n, full = len(tokens), dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.as_tensor(tokens[None, :-1])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "token_type_ids" in full:
        fill = 1 if model.config.model_type == "paligemma" else 0
        full["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.full((1, n - 1), fill, dtype=torch.long)], 1)
    before = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**full, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    T = inputs["input_ids"].shape[1]
    return [[a[0, :, T - 1 + s, : T + s].numpy() for s in range(n)] for a in out.attentions]  # [layer][step] (heads, K)


def own_generate(model, inputs, n):
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:], torch.stack([lg[0] for lg in out.logits])


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("size", PHOTOS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family,options", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c.values()))
def test_tokens_maps_and_shares_match_generate_and_eager(made, family, options, size):
    model, processor = made(family, **options)
    inputs = more.prompt(family, processor, vlm_tiny.photo(*size))
    T = inputs["input_ids"].shape[1]
    tokens, logits = own_generate(model, inputs, STEPS)
    before = model.config.text_config._attn_implementation  # sdpa; PaliGemma 2 (Gemma 2 refuses sdpa): eager
    run = generate_rows(model, inputs, vlm_layout(model, processor, inputs, size), STEPS)
    assert run.tokens.tolist() == tokens.tolist()
    assert torch.equal(torch.as_tensor(run.logits), logits)  # the model's output unchanged
    assert model.config.text_config._attn_implementation == before

    views, newlines = expected(family, model, inputs["input_ids"][0].numpy(), *size)
    assert [v.grid for v in run.layout.views] == [tuple(g) for g, _ in views]
    placed = np.concatenate([*run.layout.view_keys, *run.layout.kinds.values()])
    assert sorted(placed.tolist()) == list(range(T))  # every key exactly once
    for layer, steps in enumerate(eager_rows(model, inputs, run.tokens)):
        for s, row in enumerate(steps):
            for i, (grid, keys) in enumerate(views):
                np.testing.assert_allclose(run.maps[i][layer, :, s], row[:, keys].reshape(row.shape[0], *grid), atol=1e-5, rtol=0)
            np.testing.assert_allclose(run.shares["generated"][layer, :, s], row[:, T:].sum(1), atol=1e-5, rtol=0)
            np.testing.assert_allclose(run.shares["newline"][layer, :, s], row[:, newlines].sum(1), atol=1e-5, rtol=0)
    total = sum(m.sum(axis=(-2, -1)) for m in run.maps) + sum(run.shares.values())  # (layers, heads, steps)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


@pytest.mark.parametrize("family,options", CASES[:3], ids=lambda c: c if isinstance(c, str) else "-".join(c.values()))
def test_sdpa_and_eager_give_the_same_maps(made, family, options):
    model, processor = made(family, **options)
    inputs = more.prompt(family, processor, vlm_tiny.photo(50, 30, seed=2))
    layout = vlm_layout(model, processor, inputs, (50, 30))
    sdpa = generate_rows(model, inputs, layout, STEPS)
    model.set_attn_implementation("eager")
    try:
        eager = generate_rows(model, inputs, layout, STEPS)
    finally:
        model.set_attn_implementation("sdpa")
    assert eager.tokens.tolist() == sdpa.tokens.tolist()
    for a, b in zip(sdpa.maps, eager.maps):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for kind in sdpa.shares:
        np.testing.assert_allclose(sdpa.shares[kind], eager.shares[kind], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,options", CASES[:3], ids=lambda c: c if isinstance(c, str) else "-".join(c.values()))
def test_caption_tokens_are_generates_own(made, family, options):
    model, processor = made(family, **options)
    image = vlm_tiny.photo(30, 50, seed=3)
    cap = attnlab.from_huggingface(model, processor, max_len=STEPS)
    trace = attnlab.caption(cap, image)
    default = "caption en" if family == "paligemma" else "Describe this image."
    want, _ = own_generate(model, more.prompt(family, processor, image, default), STEPS)
    assert cap.meta["prompt"] == default
    assert trace.token_ids.tolist() == want.tolist()
    assert trace.logits.argmax(-1).tolist() == want.tolist()  # caption()'s choice is generate's


def test_paligemma_prompt_is_plain_text_and_its_labels_stay_out(made):
    model, processor = made("paligemma")
    image = vlm_tiny.photo(50, 30, seed=4)
    cap = attnlab.from_huggingface(model, processor, prompt="describe this image", max_len=STEPS)
    assert cap.meta["raw_prompt"] == "<image>describe this image"  # no chat template; the processor adds <bos> and \n
    made_inputs = dict(processor(text=[cap.meta["raw_prompt"]], images=[image], return_tensors="pt"))
    assert "labels" in made_inputs  # what the captioner drops before generate
    ids = made_inputs["input_ids"][0].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(ids[16:]) == ["<bos>", "describe", "this", "image", "\n"]
    want, _ = own_generate(model, more.prompt("paligemma", processor, image, "describe this image"), STEPS)
    assert attnlab.caption(cap, image).token_ids.tolist() == want.tolist()


def test_gemma3_sliding_window_rows_are_zero_left_of_the_window(made):
    """The prompt is longer than the window: the sliding layer's cache drops keys; their weight is 0."""
    model, processor = made("gemma3")
    inputs = more.prompt("gemma3", processor, vlm_tiny.photo(50, 30))
    T, window = inputs["input_ids"].shape[1], model.config.text_config.sliding_window
    assert T > window and model.config.text_config.layer_types[0] == "sliding_attention"
    run = generate_rows(model, inputs, vlm_layout(model, processor, inputs, (50, 30)), STEPS, keep_rows=True)
    for s in range(STEPS):
        last = T - 1 + s  # the query position
        assert not run.rows[0, :, s, : last - window + 1].any()  # the sliding layer: nothing left of its window
        assert run.rows[1, :, s, : last - window + 1].all()  # the full layer sees them


def test_paligemma2_softcapped_sliding_rows_are_the_softcapped_softmax(made):
    """Gemma 2 hands ``softcap`` to its attention function: rows.last_row applies it (else the rows above would
    differ from eager); the sliding layer's keys left of the window get weight 0."""
    model, processor = made("paligemma", text="gemma2")
    text = model.config.text_config
    assert text.attn_logit_softcapping == 5.0 and text.layer_types[0] == "sliding_attention"
    inputs = more.prompt("paligemma", processor, vlm_tiny.photo(50, 30))
    T = inputs["input_ids"].shape[1]
    assert T > text.sliding_window
    run = generate_rows(model, inputs, vlm_layout(model, processor, inputs, (50, 30)), STEPS, keep_rows=True)
    rows = eager_rows(model, inputs, run.tokens)
    for s in range(STEPS):
        np.testing.assert_allclose(run.rows[0, :, s, : T + s], rows[0][s], atol=1e-5, rtol=0)
        np.testing.assert_allclose(run.rows[1, :, s, : T + s], rows[1][s], atol=1e-5, rtol=0)
        if s:  # a generated token (causal suffix) in the sliding layer: nothing left of its window
            assert not run.rows[0, :, s, : T + s - text.sliding_window].any() and run.rows[0, :, s, T - 1: T + s].all()
        else:  # the last prompt token: the bidirectional prefix reaches past the window (as under eager)
            assert run.rows[0, :, s, :T].all()


def test_the_registry_lists_the_new_classes_and_works_from_a_config(made):
    model, processor = made("llava_onevision", aspect="anyres_max_1")
    inputs = more.prompt("llava_onevision", processor, vlm_tiny.photo(50, 30))
    assert layout_of(model.config, processor, inputs, (50, 30)).views == vlm_layout(model, processor, inputs, (50, 30)).views
    assert family_of(model).name == "llava_onevision"
    with pytest.raises(AttnlabError, match="PaliGemmaForConditionalGeneration.*Gemma3ForConditionalGeneration.*"
                       "LlavaOnevisionForConditionalGeneration") as err:
        family_of(torch.nn.Linear(2, 2))
    assert "\n" not in str(err.value)


def coded_photo(width, height):
    """Red encodes x, green encodes y (of the pixel centre), blue is flat."""
    from PIL import Image

    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.round(255 * (np.arange(width) + 0.5) / width)[None, :]
    rgb[..., 1] = np.round(255 * (np.arange(height) + 0.5) / height)[:, None]
    rgb[..., 2] = 128
    return Image.fromarray(rgb)


def where_on_photo(img, y, x):
    """The (x, y) photo fractions a de-normalised ``(3, H, W)`` image holds at pixel position ``(y, x)`` (a cell centre)."""
    yi, xi = int(round(y)), int(round(x))
    return img[:2, yi - 1: yi + 1, xi - 1: xi + 1].mean(axis=(1, 2))  # red = x, green = y


@pytest.mark.parametrize("size", [(200, 120), (120, 200), (300, 60)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family,options", [*CASES[:4]], ids=lambda c: c if isinstance(c, str) else "-".join(c.values()))
def test_boxes_are_where_the_processor_put_the_pixels(made, family, options, size):
    """Each view's cell (r, c) centre, placed by its box on the photo, is where the processor put that part of
    the photo: read back from ``pixel_values`` of a photo whose colours encode its own coordinates."""
    model, processor = made(family, **options)
    W, H = size
    inputs = more.prompt(family, processor, coded_photo(W, H))
    layout = vlm_layout(model, processor, inputs, size)
    ip = processor.image_processor
    mean, std = np.asarray(ip.image_mean)[:, None, None], np.asarray(ip.image_std)[:, None, None]
    pixels = inputs["pixel_values"][0].numpy() * std[None] + mean[None] if family == "llava_onevision" else None
    if family != "llava_onevision":  # one image, stretched: cell (r, c) of a (h, w) grid centred at ((r + .5) S / h, ...)
        img = inputs["pixel_values"][0].numpy() * std + mean
        cells = [(layout.views[0], lambda r, c, g: where_on_photo(img, (r + 0.5) * img.shape[1] / g[0], (c + 0.5) * img.shape[2] / g[1]))]
    else:
        tile, cfg = pixels.shape[-1], model.config
        (ph, pw), (rows, cols), (drop_r, drop_c) = onevision_grid(cfg, W, H, unpooled=True)
        cell = tile // (cfg.vision_config.image_size // cfg.vision_config.patch_size)
        stitched = np.concatenate([np.concatenate(list(pixels[1 + i * (pw // tile): 1 + (i + 1) * (pw // tile)]), axis=2)
                                   for i in range(ph // tile)], axis=1)  # (3, ph, pw): the tiles put back together

        def high_res(r, c, g):  # a pooled cell spans rows * cell / g[0] pixels of the kept part
            return where_on_photo(stitched, (drop_r + (r + 0.5) * rows / g[0]) * cell, (drop_c + (c + 0.5) * cols / g[1]) * cell)

        cells = [(layout.views[0], lambda r, c, g: where_on_photo(pixels[0], (r + 0.5) * tile / g[0], (c + 0.5) * tile / g[1])),
                 (layout.views[1], high_res)]
    for view, where in cells:
        (h, w), (x0, y0, x1, y1) = view.grid, view.box
        got = np.array([where(r, c, (h, w)) for r in range(h) for c in range(w)])
        want_x = np.array([(x0 + (c + 0.5) * (x1 - x0) / w) / W for r in range(h) for c in range(w)])
        want_y = np.array([(y0 + (r + 0.5) * (y1 - y0) / h) / H for r in range(h) for c in range(w)])
        tol = 2 * max(1 / W, 1 / H) + 3 / 255  # a photo pixel either side (resampling), and rounding
        inside = (want_x > tol) & (want_x < 1 - tol) & (want_y > tol) & (want_y < 1 - tol)  # padding is not the photo
        assert inside.sum() >= h * w // 2
        np.testing.assert_allclose(got[inside, 0], want_x[inside], atol=tol)
        np.testing.assert_allclose(got[inside, 1], want_y[inside], atol=tol)


def test_gemma3_pan_and_scan_crops_are_refused_in_one_line(made):
    model, processor = made("gemma3")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[chat], images=[vlm_tiny.photo(1000, 200)], return_tensors="pt", do_pan_and_scan=True,
                            pan_and_scan_min_crop_size=20, pan_and_scan_min_ratio_to_activate=1.2))
    assert inputs["pixel_values"].shape[0] > 1  # the photo and its crops
    with pytest.raises(AttnlabError, match="pan-and-scan") as err:
        vlm_layout(model, processor, inputs, (1000, 200))
    assert "\n" not in str(err.value)
