"""LLaVA-OneVision: as LLaVA-NeXT (a base view of the photo stretched to one tile, then the best pinpoint's
tiles stitched into one grid, padding rows / columns removed, ``image_newline`` after every row), and then
``anyres_max_N``: a grid of more than ``1.1^2 N`` tiles' worth of cells is bilinearly resized to
``(int(h // r), int(w // r))``, ``r = sqrt(h w / (N cells^2))``; the pooled grid covers the same box."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ....errors import AttnlabError
from ....keys import KeyLayout, View
from . import Family, register
from .llava_next import base_and_grid, base_and_high_res


def max_tiles(aspect: str) -> int:
    """``"anyres_max_9"`` -> 9."""
    text = str(aspect)
    if not text.startswith("anyres_max_") or not text[len("anyres_max_"):].isdigit():
        raise AttnlabError(f"vision_aspect_ratio {aspect!r} is not supported: LLaVA-OneVision captions take anyres_max_<N>")
    return int(text[len("anyres_max_"):])


def pooled(h: int, w: int, cells: int, tiles: int) -> tuple[int, int]:
    """The grid after anyres_max pooling (unchanged unless it holds more than about ``tiles`` tiles)."""
    ratio = math.sqrt(h * w / (tiles * cells**2))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)


def onevision_views(config: Any, photo: tuple[int, int]) -> list[View]:
    """The base view and the unpadded, pooled high-resolution grid."""
    base, (r0, r1, c0, c1), box = base_and_high_res(config, photo)
    grid = pooled(r1 - r0, c1 - c0, base.grid[0], max_tiles(getattr(config, "vision_aspect_ratio", "anyres_max_9")))
    return [base, View("high-res", grid, box)]


def onevision_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a LLaVA-OneVision prompt."""
    return base_and_grid(config, processor, inputs, onevision_views(config, photo))


ONEVISION = register(Family(
    name="llava_onevision", model_types=("llava_onevision",), classes=("LlavaOnevisionForConditionalGeneration",),
    layout=onevision_layout,
))  # fmt: skip
