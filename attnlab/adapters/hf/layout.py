"""Where each view's tokens and every other kind of key sit in a vision-language prompt.

One photo becomes one or more *views*: a grid of image tokens ``(h, w)``, row-major as it
sits on the photo, and the box ``(x0, y0, x1, y1)`` of the photo as the user gave it that
the grid covers (it may overhang the photo where the processor padded). Every other key
has a kind: ``"prompt"`` (text), ``"special"`` (template and vision-boundary tokens),
``"prefix"`` (a CLS token among the image tokens), ``"newline"`` (LLaVA-NeXT's
``image_newline``), ``"padding"`` (attention mask 0). :func:`vlm_layout` reads it from
the processor's outputs, the model's config and the photo size; together the views and the
kinds cover every key of the prompt exactly once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import AttnlabError
from ...keys import KeyLayout, View

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next")


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the maximal runs of True."""
    idx = np.flatnonzero(mask)
    return [r for r in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(r)] if len(idx) else []


def _image_positions(ids: np.ndarray, image_id: int) -> np.ndarray:
    runs = _runs(ids == image_id)
    if len(runs) != 1:
        raise AttnlabError(f"the prompt holds {len(runs)} images: vision-language captions take exactly one image per prompt")
    return runs[0]


def qwen_views(grid_thw: Any, merge: int, photo: tuple[int, int]) -> list[View]:
    """Qwen2/2.5/3-VL: one grid ``(h / merge, w / merge)`` of the photo resized (not cropped) to the grid."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(-1)[:3])
    if t != 1:
        raise AttnlabError(f"image_grid_thw has t={t}: only still images (t=1) are supported")
    return [View("image", (h // merge, w // merge), (0.0, 0.0, float(photo[0]), float(photo[1])))]


def llava_views(image_processor: Any, patch: int, photo: tuple[int, int]) -> list[View]:
    """LLaVA-1.5: the short side resized to ``size``, then a centre crop of ``crop_size``: the crop's box."""
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


def llava_next_views(config: Any, photo: tuple[int, int]) -> list[View]:
    """LLaVA-NeXT: the base view (the photo stretched to a square) and the unpadded high-resolution grid."""
    W, H = photo
    tile = config.vision_config.image_size
    cells = tile // config.vision_config.patch_size
    bh, bw = _best_resolution((H, W), config.image_grid_pinpoints)
    rows, cols = (bh // tile) * cells, (bw // tile) * cells
    if W / H > cols / rows:  # unpad_image: rows removed top and bottom
        pad = (rows - int(round(H * (cols / W), 7))) // 2
        r0, r1, c0, c1 = pad, rows - pad, 0, cols
    else:
        pad = (cols - int(round(W * (rows / H), 7))) // 2
        r0, r1, c0, c1 = 0, rows, pad, cols - pad
    sw, sh = bw / W, bh / H  # the processor's resize inside the best resolution, then centred padding
    if sw < sh:
        nw, nh = bw, min(math.ceil(H * sw), bh)
    else:
        nh, nw = bh, min(math.ceil(W * sh), bw)
    px, py = (bw - nw) // 2, (bh - nh) // 2
    cell = tile / cells
    box = ((c0 * cell - px) * W / nw, (r0 * cell - py) * H / nh, (c1 * cell - px) * W / nw, (r1 * cell - py) * H / nh)
    base = View("base", (cells, cells), (0.0, 0.0, float(W), float(H)))
    return [base, View("high-res", (r1 - r0, c1 - c0), box)]


def _best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
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


def _extra(found: int, grid_tokens: int) -> int:
    """Leading image tokens that are not patches: 0, or 1 (CLS, ``vision_feature_select_strategy="full"``)."""
    if found - grid_tokens not in (0, 1):
        raise AttnlabError(f"the prompt has {found} image tokens where the processor's layout gives {grid_tokens}: "
                           "pass the photo and the inputs the processor made from it")
    return found - grid_tokens


def _family(model: Any) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in FAMILIES:
        raise AttnlabError(
            f"{type(model).__name__} is not a supported vision-language model: use Qwen2VLForConditionalGeneration, "
            "Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, LlavaForConditionalGeneration or "
            "LlavaNextForConditionalGeneration"
        )
    return kind


def vlm_layout(model: Any, processor: Any, inputs: Any, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of the first (only) sequence of ``inputs`` (the processor's output) for a ``(W, H)`` photo."""
    family = _family(model)
    cfg = model.config
    ids = np.asarray(inputs["input_ids"])[0]
    mask = np.asarray(inputs["attention_mask"])[0] if inputs.get("attention_mask") is not None else np.ones_like(ids)
    image_id = getattr(cfg, "image_token_id", None)
    image_id = getattr(cfg, "image_token_index", None) if image_id is None else image_id
    pos = _image_positions(ids, image_id)
    kinds = {"prefix": pos[:0], "newline": pos[:0]}
    if family.startswith("qwen"):
        views = qwen_views(inputs["image_grid_thw"][0], cfg.vision_config.spatial_merge_size, photo)
        view_keys = [pos]
    elif family == "llava":
        views = llava_views(processor.image_processor, cfg.vision_config.patch_size, photo)
        extra = _extra(len(pos), views[0].grid[0] * views[0].grid[1])
        kinds["prefix"], view_keys = pos[:extra], [pos[extra:]]
    else:
        views = llava_next_views(cfg, photo)
        (bh, bw), (h, w) = views[0].grid, views[1].grid
        extra = _extra(len(pos), bh * bw + h * (w + 1))
        hi = pos[extra + bh * bw:].reshape(h, w + 1)  # the last column is image_newline
        kinds["prefix"], kinds["newline"] = pos[:extra], hi[:, w]
        view_keys = [pos[extra: extra + bh * bw], hi[:, :w].reshape(-1)]
    for v, k in zip(views, view_keys):
        if len(k) != v.grid[0] * v.grid[1]:
            raise AttnlabError(f"the prompt has {len(k)} tokens for view {v.name!r} where its grid {v.grid} needs {v.grid[0] * v.grid[1]}")
    tokenizer = getattr(processor, "tokenizer", None)
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
    special |= {int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    for attr in ("vision_start_token_id", "vision_end_token_id"):
        if getattr(cfg, attr, None) is not None:
            special.add(int(getattr(cfg, attr)))
    rest = np.ones(len(ids), bool)
    rest[pos] = False
    padding = rest & (mask == 0)
    specials = rest & ~padding & np.isin(ids, list(special))
    prompt = rest & ~padding & ~specials
    out = {"prompt": np.flatnonzero(prompt), "special": np.flatnonzero(specials), "padding": np.flatnonzero(padding)}
    out.update({k: np.asarray(v, dtype=int) for k, v in kinds.items()})
    return KeyLayout.of_views(views, view_keys, out, len(ids))  # one line unless every key is placed exactly once
