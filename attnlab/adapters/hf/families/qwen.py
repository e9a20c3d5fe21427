"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the photo resized (aspect roughly kept, not cropped) to multiples of
``patch * merge``, one grid ``(h / merge, w / merge)`` of tokens row-major between ``<|vision_start|>`` and
``<|vision_end|>``; ``image_grid_thw`` gives the grid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ....errors import AttnlabError
from ....keys import KeyLayout, View
from . import Family, register
from .common import assemble, ids_and_mask, image_positions, image_token_id, special_ids


def qwen_views(grid_thw: Any, merge: int, photo: tuple[int, int]) -> list[View]:
    """One grid ``(h / merge, w / merge)`` of the photo resized (not cropped) to the grid."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(-1)[:3])
    if t != 1:
        raise AttnlabError(f"image_grid_thw has t={t}: only still images (t=1) are supported")
    return [View("image", (h // merge, w // merge), (0.0, 0.0, float(photo[0]), float(photo[1])))]


def qwen_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a Qwen-VL prompt."""
    ids, mask = ids_and_mask(inputs)
    pos = image_positions(ids, image_token_id(config))
    if inputs.get("image_grid_thw") is None:
        raise AttnlabError("the inputs have no image_grid_thw: pass the processor's whole output for the photo")
    views = qwen_views(inputs["image_grid_thw"][0], config.vision_config.spatial_merge_size, photo)
    special = special_ids(config, processor, "vision_start_token_id", "vision_end_token_id")
    return assemble(ids, mask, views, [pos], {}, special)


QWEN = register(Family(
    name="qwen_vl", model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    classes=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"),
    layout=qwen_layout,
))  # fmt: skip
