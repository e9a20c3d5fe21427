"""How many tokens a photo becomes in real checkpoints (attnlab.adapters.hf.offline), checked against the
published rules written out here with the published numbers, never against the module's own tables.

Each count comes from the family's real processor class run offline on a photo; the test recomputes it from
the photo's size: Qwen2-VL's resize to multiples of 28 within [3136, 12845056] pixels (2 x 2 merge),
LLaVA-1.5's short side to 336 and centre crop (24 x 24 tokens, CLS dropped), LLaVA-NeXT's best grid pinpoint,
unpadding and one newline per row, SmolVLM's long side to 1536 and tiles of 384 px (81 tokens each) plus a
global view. Positions in the sequence are checked against the tokens themselves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlab.adapters.hf.offline import CHECKPOINTS, build_offline, photo_tokens
from helpers import assert_error

pytest.importorskip("transformers", minversion="5")  # the family registry's layouts need transformers 5

PHOTOS = [(640, 480), (1024, 768), (300, 500), (1000, 300)]


# ------------------------------------------------------------------ the published rules, written out
def qwen_grid(width, height, factor=28, lo=3136, hi=12845056):
    """Qwen2-VL's smart resize: sides rounded to multiples of 28, rescaled into [lo, hi] pixels; tokens per 28 px."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h // factor, w // factor


def llava_crop(width, height, side=336):
    """LLaVA-1.5: the short side to 336, the centre 336 x 336 kept: the kept box in photo pixels."""
    scale = side / min(width, height)
    nw, nh = int(width * scale) if width > height else side, int(height * scale) if height > width else side
    left, top = round((nw - side) / 2), round((nh - side) / 2)
    return left / scale, top / scale, (left + side) / scale, (top + side) / scale


PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (height, width) of llava-v1.6


def next_grid(width, height, tile=336, cells=24):
    """LLaVA-NeXT: the pinpoint keeping most of the photo (then wasting least), its 24-cell tiles stitched,
    the rows (or columns) of padding dropped: (rows, cols) of the high-res view."""
    def fit(pin):
        ph, pw = pin
        s = min(pw / width, ph / height)
        kept = min(int(width * s) * int(height * s), width * height)
        return -kept, ph * pw - kept
    ph, pw = min(PINPOINTS, key=fit)
    rows, cols = ph // tile * cells, pw // tile * cells
    if width / height > cols / rows:
        return rows - 2 * ((rows - int(height * cols / width)) // 2), cols
    return rows, cols - 2 * ((cols - int(width * rows / height)) // 2)


def smol_tiles(width, height, longest=1536, tile=384):
    """SmolVLM: the long side to 1536, the other in proportion (even), both up to multiples of 384: (rows, cols)."""
    if width >= height:
        w, h = longest, int(longest / (width / height))
    else:
        h, w = longest, int(longest * width / height)
    h, w = h + h % 2, w + w % 2
    return math.ceil(h / tile), math.ceil(w / tile)


# ------------------------------------------------------------------ the counts
def test_the_issue_numbers_for_a_640_x_480_photo():
    qwen, llava, nxt, smol = (photo_tokens(n, (640, 480)) for n in ("qwen2-vl", "llava-1.5", "llava-next", "smolvlm"))
    assert (qwen.image_tokens, qwen.views[0].grid) == (391, (17, 23))
    assert llava.image_tokens == 576 and llava.views[0].box == pytest.approx((80, 0, 560, 480))  # 80 px cut each side
    assert nxt.image_tokens == 2340 == 576 + 36 * (48 + 1)
    assert nxt.counts()["newline"] == 36 and nxt.views[1].grid == (36, 48)
    assert smol.tile_grid == (3, 4) and smol.tiles == (13, 384, 384) and smol.image_tokens == 13 * 81 == 1053


@pytest.mark.parametrize("photo", PHOTOS)
def test_qwen2_vl_one_grid_of_the_resized_photo(photo):
    p = photo_tokens("qwen2-vl", photo)
    h, w = qwen_grid(*photo)
    assert p.image_tokens == h * w and [v.grid for v in p.views] == [(h, w)]
    assert p.views[0].box == (0.0, 0.0, float(photo[0]), float(photo[1]))
    assert p.tiles == (1, 28 * h, 28 * w)
    keys = p.layout.view_keys[0]
    assert np.array_equal(keys, np.arange(keys[0], keys[0] + h * w))  # one run, row-major
    assert (p.tokens[keys[0] - 1], p.tokens[keys[-1] + 1]) == ("<|vision_start|>", "<|vision_end|>")
    assert {p.tokens[k] for k in p.layout.kinds["special"]} == {"<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"}
    assert [p.tokens[k] for k in p.layout.kinds["prompt"]] == ["system", "\n", "You", "are", "a", "helpful", "assistant", ".", "\n",
                                                            "user", "\n", "Describe", "this", "image", ".", "\n", "assistant", "\n"]


@pytest.mark.parametrize("photo", PHOTOS)
def test_llava_1_5_the_centre_crop(photo):
    p = photo_tokens("llava-1.5", photo)
    assert p.image_tokens == 576 and p.views[0].grid == (24, 24) and p.tiles == (1, 336, 336)
    assert p.views[0].box == pytest.approx(llava_crop(*photo))
    assert p.sequence() == "<s> USER : [image: 24 x 24 = 576] \\n Describe this image . ASSISTANT :"
    assert p.tokens[0] == "<s>" and list(p.layout.kinds["special"]) == [0]


@pytest.mark.parametrize("photo", PHOTOS)
def test_llava_next_base_view_then_rows_with_newlines(photo):
    p = photo_tokens("llava-next", photo)
    rows, cols = next_grid(*photo)
    assert p.image_tokens == 576 + rows * (cols + 1)
    assert [(v.name, v.grid) for v in p.views] == [("base", (24, 24)), ("high-res", (rows, cols))]
    first = int(np.flatnonzero(np.array(p.tokens) == "<image>")[0])
    assert np.array_equal(p.layout.view_keys[0], first + np.arange(576))
    assert np.array_equal(p.layout.kinds["newline"], first + 576 + np.arange(rows) * (cols + 1) + cols)
    cells = first + 576 + np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]
    assert np.array_equal(p.layout.view_keys[1], cells.reshape(-1))
    assert f"[high-res: {rows} rows of {cols} + newline = {rows * (cols + 1):,}]" in p.sequence()


@pytest.mark.parametrize("photo", PHOTOS)
def test_smolvlm_tiles_plus_a_global_view(photo):
    p = photo_tokens("smolvlm", photo)
    rows, cols = smol_tiles(*photo)
    assert p.tile_grid == (rows, cols) and p.tiles == (rows * cols + 1, 384, 384)
    assert p.image_tokens == (rows * cols + 1) * 81
    tokens = list(p.tokens)
    # line breaks: after each row of tiles, before the global view, and the template's after <end_of_utterance>
    assert tokens.count("<global-img>") == 1 and tokens.count("\n") == rows + 2
    W, H = photo  # every tile a view of 9 x 9 tokens covering 1 / cols by 1 / rows of the photo, the global view last
    boxes = [(c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows) for r in range(rows) for c in range(cols)]
    assert [v.grid for v in p.views] == [(9, 9)] * (rows * cols + 1)
    assert np.allclose([v.box for v in p.views], [*boxes, (0, 0, W, H)])
    for k, keys in enumerate(p.layout.view_keys):  # each view's 81 tokens right after its markers, in one run
        r, c = divmod(k, cols)
        marker = f"<row_{r + 1}_col_{c + 1}>" if k < rows * cols else "<global-img>"
        assert p.tokens[keys[0] - 1] == marker and p.tokens[keys[0] - 2] == "<fake_token_around_image>"
        assert np.array_equal(keys, np.arange(keys[0], keys[0] + 81))
    special = 2 * rows * cols + 3 + 2  # two markers a tile, three around the global view, <|im_start|>, <end_of_utterance>
    assert p.totals() == {"views": p.image_tokens, "prompt": p.length - p.image_tokens - special, "special": special}


def test_where_the_image_sits_among_the_prompt():
    for name, before, after in [("qwen2-vl", "<|vision_start|>", "<|vision_end|>"), ("llava-1.5", ":", "\n"),
                                ("llava-next", "]", "\n")]:
        p = photo_tokens(name, (640, 480), prompt="What colour is the car?")
        image = np.concatenate(p.layout.view_keys + ((p.layout.kinds.get("newline", np.zeros(0, int))),))
        lo, hi = image.min(), image.max()
        assert hi - lo + 1 == p.image_tokens and (p.tokens[lo - 1], p.tokens[hi + 1]) == (before, after), name
        words = [p.tokens[k] for k in p.layout.kinds["prompt"] if k > hi and p.tokens[k] != "\n"]
        assert words[:6] == ["What", "colour", "is", "the", "car", "?"], name
        specials = [p.tokens[k] for k in p.layout.kinds["special"]]
        assert specials == (["<s>"] if name.startswith("llava") else ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>",
                                                                       "<|vision_end|>", "<|im_end|>", "<|im_start|>"]), name


def test_eager_attention_memory_grows_as_the_square_of_the_sequence():
    p = photo_tokens("llava-next", (640, 480))
    assert p.eager_bytes() == 32 * 32 * p.length**2 * 2 and p.length == 2340 + 13
    assert p.eager_bytes(4) == 2 * p.eager_bytes()


def test_every_checkpoint_builds_without_weights():
    assert set(CHECKPOINTS) == {"qwen2-vl", "llava-1.5", "llava-next", "smolvlm"}
    for name in CHECKPOINTS:
        processor, config, text = build_offline(name, prompt="Hi .")
        assert "Hi ." in text and type(config).__name__ == CHECKPOINTS[name].config_class
        assert type(processor.image_processor).__name__ == CHECKPOINTS[name].image_processor


def test_bad_input_is_one_line():
    assert_error(lambda: photo_tokens("llava-2"), "llava-2", "qwen2-vl")
    assert_error(lambda: photo_tokens("qwen2-vl", (10, 480)), "between 28 and 8192")
    assert_error(lambda: photo_tokens("qwen2-vl", "big"), "(width, height)")
