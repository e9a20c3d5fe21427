"""Idefics3 and SmolVLM: rows x cols tiles of the resized photo, then a global view of the whole photo.

The image processor resizes the photo's long side to ``size["longest_edge"]`` (the short side in
proportion), then stretches it to whole multiples of the tile side ``M = max_image_size["longest_edge"]``
and cuts it into ``rows x cols`` tiles of ``M x M``, row by row; the global view is the photo stretched
to ``M x M`` and comes last. Nothing is padded for one photo: each tile covers exactly
``1 / cols`` of the photo's width and ``1 / rows`` of its height. A photo that fits one tile
(``rows = cols = 0``), or ``do_image_splitting=False``, gives the global view only.

In the prompt each tile is ``<fake_token_around_image><row_r_col_c>`` and ``(n / s)^2`` ``<image>``
tokens (``n = image_size / patch_size`` patches a side, pixel shuffle ``s = scale_factor``: each
``s x s`` patch block is one token, row-major per tile), ``\\n`` after each row of tiles, then
``<fake_token_around_image><global-img>``, the global view's tokens and ``<fake_token_around_image>``.
The tile markers are ``"special"`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ....errors import AttnlabError
from ....keys import KeyLayout, View
from . import Family, register
from .common import assemble, ids_and_mask, image_token_id, runs, special_ids

MAX_IMAGE_SIDE = 4096  # the processors' cap on the resized photo (MAX_IMAGE_SIZE)
MARKERS = ("<fake_token_around_image>", "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))


def _resized(W: int, H: int, image_processor: Any) -> tuple[int, int]:
    """``(width, height)`` after the processor's first resize (the long side to ``size["longest_edge"]``)."""
    size = image_processor.size
    get = size.get if hasattr(size, "get") else lambda k: getattr(size, k, None)
    if not getattr(image_processor, "do_resize", True):
        return W, H
    if get("longest_edge"):
        long = int(get("longest_edge"))
        if W >= H:
            w, h = long, int(long / (W / H))
            h += h % 2  # the processor keeps the short side even
        else:
            h, w = long, int(long * (W / H))
            w += w % 2
        h, w = max(h, 1), max(w, 1)
        if max(w, h) > MAX_IMAGE_SIDE:  # scaled below the cap, aspect kept
            if w >= h:
                w, h = MAX_IMAGE_SIDE, max(int(MAX_IMAGE_SIDE / (w / h)), 1)
            else:
                w, h = max(int(MAX_IMAGE_SIDE * (w / h)), 1), MAX_IMAGE_SIDE
        return w, h
    if get("height") and get("width"):
        return int(get("width")), int(get("height"))
    raise AttnlabError("the image processor's size has neither longest_edge nor height and width: pass the model's own processor")


def tiles(image_processor: Any, photo: tuple[int, int]) -> tuple[int, int]:
    """``(rows, cols)`` of tiles the processor cuts a ``(W, H)`` photo into (``(0, 0)``: the global view only)."""
    if not getattr(image_processor, "do_image_splitting", True):
        return 0, 0
    side = int(image_processor.max_image_size["longest_edge"])
    w, h = _resized(*photo, image_processor)
    if w >= h:  # stretched to whole multiples of the tile side
        cw = math.ceil(w / side) * side
        ch = math.ceil(int(cw / (w / h)) / side) * side
    else:
        ch = math.ceil(h / side) * side
        cw = math.ceil(int(ch * (w / h)) / side) * side
    return (ch // side, cw // side) if ch > side or cw > side else (0, 0)


def tile_views(rows: int, cols: int, cells: int, photo: tuple[int, int]) -> list[View]:
    """The tiles row by row (each ``cells x cells`` tokens, its share of the photo), then the global view."""
    W, H = (float(v) for v in photo)
    views = [View(f"tile {r + 1},{c + 1}", (cells, cells), (c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows))
             for r in range(rows) for c in range(cols)]  # fmt: skip
    return [*views, View("global", (cells, cells), (0.0, 0.0, W, H))]


def marker_ids(processor: Any) -> set[int]:
    """The ids of the tile markers the tokenizer knows (``<fake_token_around_image>``, ``<global-img>``, ``<row_r_col_c>``)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return set()
    unknown = getattr(tokenizer, "unk_token_id", None)
    found = {tokenizer.convert_tokens_to_ids(t) for t in MARKERS}
    return {int(i) for i in found if i is not None and i != unknown}


def idefics3_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of an Idefics3 / SmolVLM prompt: every tile a view, the global view last."""
    ids, mask = ids_and_mask(inputs)
    vision = config.vision_config
    cells = (int(vision.image_size) // int(vision.patch_size)) // int(config.scale_factor)  # tokens a side per tile
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "max_image_size", None) is None:
        raise AttnlabError("the processor has no Idefics3 image processor (max_image_size): pass the model's own processor")
    rows, cols = tiles(image_processor, photo)
    found = runs(ids == image_token_id(config))
    if len(found) != rows * cols + 1 or any(len(r) != cells * cells for r in found):
        raise AttnlabError(
            f"the prompt has {len(found)} runs of image tokens ({', '.join(str(len(r)) for r in found[:3])}, ...) where one "
            f"{photo[0]} x {photo[1]} photo gives {rows * cols + 1} of {cells * cells}: pass one photo and the inputs the processor made from it"
        )
    views = tile_views(rows, cols, cells, photo)
    return assemble(ids, mask, views, found, {}, special_ids(config, processor) | marker_ids(processor))


def text_model_attention(model: Any) -> list[Any]:
    """The language model's self-attention modules (``model.model.text_model``)."""
    text = getattr(getattr(model, "model", None), "text_model", None)
    if text is None or not hasattr(text, "layers"):
        raise AttnlabError(f"{type(model).__name__} has no model.text_model with layers: Idefics3 / SmolVLM need transformers >= 5")
    return [layer.self_attn for layer in text.layers]


IDEFICS3 = register(Family(
    name="idefics3", model_types=("idefics3", "smolvlm"),
    classes=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    layout=idefics3_layout, modules=text_model_attention,
))  # fmt: skip
