"""LLaVA-1.5: CLIP at ``image_size``, the short side resized then a centre crop; ``(size / patch)^2`` tokens
in place of ``<image>`` (after CLS when ``vision_feature_select_strategy="full"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ....keys import KeyLayout, View
from . import Family, register
from .common import assemble, extra_tokens, ids_and_mask, image_positions, image_token_id, special_ids


def llava_views(image_processor: Any, patch: int, photo: tuple[int, int]) -> list[View]:
    """The short side resized to ``size``, then a centre crop of ``crop_size``: the crop's box."""
    W, H = photo
    size = image_processor.size
    short = size["shortest_edge"] if "shortest_edge" in size and size["shortest_edge"] else None
    if short is not None:
        if W <= H:
            nw, nh = short, int(short * H / W)
        else:
            nh, nw = short, int(short * W / H)
    else:
        nh, nw = size["height"], size["width"]
    if getattr(image_processor, "do_center_crop", False):
        ch, cw = image_processor.crop_size["height"], image_processor.crop_size["width"]
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    else:
        ch, cw, top, left = nh, nw, 0, 0
    sx, sy = nw / W, nh / H
    box = (left / sx, top / sy, (left + cw) / sx, (top + ch) / sy)
    return [View("image", (ch // patch, cw // patch), box)]


def llava_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a LLaVA-1.5 prompt."""
    ids, mask = ids_and_mask(inputs)
    pos = image_positions(ids, image_token_id(config))
    views = llava_views(processor.image_processor, config.vision_config.patch_size, photo)
    extra = extra_tokens(len(pos), views[0].grid[0] * views[0].grid[1])
    return assemble(ids, mask, views, [pos[extra:]], {"prefix": pos[:extra]}, special_ids(config, processor))


LLAVA = register(Family(name="llava", model_types=("llava",), classes=("LlavaForConditionalGeneration",), layout=llava_layout))
