"""PaliGemma (1 and 2): SigLIP without CLS on the photo stretched to a square, ``(size / patch)^2`` tokens
FIRST, then ``<bos>``, the plain-text prompt (``"caption en"``, no chat template) and ``"\\n"``. Prefix-LM:
image and prompt attend both ways (``token_type_ids`` 0), generated tokens causally; the last prompt row
sees every prompt key either way. The processor also returns ``labels``, which the captioner drops."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ....keys import KeyLayout, View
from . import Family, register
from .common import assemble, ids_and_mask, image_positions, image_token_id, special_ids


def stretched_view(side: int, photo: tuple[int, int], name: str = "image") -> View:
    """One ``(side, side)`` grid over the whole photo (resized to a square, not cropped)."""
    return View(name, (side, side), (0.0, 0.0, float(photo[0]), float(photo[1])))


def paligemma_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a PaliGemma prompt."""
    ids, mask = ids_and_mask(inputs)
    pos = image_positions(ids, image_token_id(config))
    side = config.vision_config.image_size // config.vision_config.patch_size
    view = stretched_view(side, photo)
    return assemble(ids, mask, [view], [pos], {}, special_ids(config, processor))  # one line unless side^2 image tokens


def plain_prompt(processor: Any, prompt: str) -> str:
    """The image placeholder then the prompt: the processor adds ``<bos>`` after the image tokens and ``"\\n"``."""
    return f"{getattr(processor, 'image_token', '<image>')}{prompt}"


PALIGEMMA = register(Family(
    name="paligemma", model_types=("paligemma",), classes=("PaliGemmaForConditionalGeneration",),
    layout=paligemma_layout, prompt_text=plain_prompt, default_prompt="caption en", prefix_lm=True,
))  # fmt: skip
