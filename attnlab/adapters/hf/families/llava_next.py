"""LLaVA-NeXT: a base view (the photo stretched to one tile) then the high-resolution tiles of the best
pinpoint stitched into one grid, padding rows / columns removed, ``image_newline`` after every row."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ....keys import KeyLayout, View
from . import Family, register
from .common import assemble, extra_tokens, ids_and_mask, image_positions, image_token_id, special_ids


def best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """transformers' select_best_resolution: the most effective resolution, then the least waste."""
    H, W = size
    best, best_eff, best_waste = None, -1, float("inf")
    for h, w in pinpoints:
        scale = min(w / W, h / H)
        dw, dh = int(W * scale), int(H * scale)
        eff = min(dw * dh, W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def unpadded(rows: int, cols: int, photo: tuple[int, int]) -> tuple[int, int, int, int]:
    """transformers' unpad_image on a ``(rows, cols)`` grid of the photo padded to its aspect: ``(r0, r1, c0, c1)`` kept."""
    W, H = photo
    if W / H > cols / rows:  # rows removed top and bottom
        pad = (rows - int(round(H * (cols / W), 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(W * (rows / H), 7))) // 2
    return 0, rows, pad, cols - pad


def grid_box(kept: tuple[int, int, int, int], cell: float, best: tuple[int, int], photo: tuple[int, int]) -> tuple:
    """The photo box of the kept cells of a grid of ``cell``-pixel cells over the photo resized into ``best``
    ``(h, w)`` and centred (the processor's resize-and-pad)."""
    (r0, r1, c0, c1), (bh, bw), (W, H) = kept, best, photo
    sw, sh = bw / W, bh / H
    if sw < sh:
        nw, nh = bw, min(math.ceil(H * sw), bh)
    else:
        nh, nw = bh, min(math.ceil(W * sh), bw)
    px, py = (bw - nw) // 2, (bh - nh) // 2
    return ((c0 * cell - px) * W / nw, (r0 * cell - py) * H / nh, (c1 * cell - px) * W / nw, (r1 * cell - py) * H / nh)


def base_and_high_res(config: Any, photo: tuple[int, int]) -> tuple[View, tuple[int, int, int, int], tuple[float, float, float, float]]:
    """The base view (the photo stretched to a square), and the high-resolution grid's kept rows and columns
    ``(r0, r1, c0, c1)`` after unpadding with their box on the photo (LLaVA-NeXT and LLaVA-OneVision)."""
    W, H = photo
    tile = config.vision_config.image_size
    cells = tile // config.vision_config.patch_size
    bh, bw = best_resolution((H, W), config.image_grid_pinpoints)
    kept = unpadded((bh // tile) * cells, (bw // tile) * cells, photo)
    base = View("base", (cells, cells), (0.0, 0.0, float(W), float(H)))
    return base, kept, grid_box(kept, tile / cells, (bh, bw), photo)


def llava_next_views(config: Any, photo: tuple[int, int]) -> list[View]:
    """The base view and the unpadded high-resolution grid."""
    base, (r0, r1, c0, c1), box = base_and_high_res(config, photo)
    return [base, View("high-res", (r1 - r0, c1 - c0), box)]


def base_and_grid(config: Any, processor: Any, inputs: Mapping, views: list[View]) -> KeyLayout:
    """The layout of a prompt holding the base view then the high-res grid with one newline per row."""
    ids, mask = ids_and_mask(inputs)
    pos = image_positions(ids, image_token_id(config))
    (bh, bw), (h, w) = views[0].grid, views[1].grid
    extra = extra_tokens(len(pos), bh * bw + h * (w + 1))
    hi = pos[extra + bh * bw:].reshape(h, w + 1)  # (h, w + 1): the last column is image_newline
    kinds = {"prefix": pos[:extra], "newline": hi[:, w]}
    view_keys = [pos[extra: extra + bh * bw], hi[:, :w].reshape(-1)]  # (bh * bw,), (h * w,) row-major
    return assemble(ids, mask, views, view_keys, kinds, special_ids(config, processor))


def llava_next_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a LLaVA-NeXT prompt."""
    return base_and_grid(config, processor, inputs, llava_next_views(config, photo))


LLAVA_NEXT = register(Family(name="llava_next", model_types=("llava_next",), classes=("LlavaNextForConditionalGeneration",),
                             layout=llava_next_layout))
