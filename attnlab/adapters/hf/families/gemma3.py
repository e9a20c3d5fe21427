"""Gemma 3: SigLIP on the photo stretched to a square (pan-and-scan off), its patches average-pooled to
``mm_tokens_per_image`` tokens (``16 x 16 = 256`` in real checkpoints), row-major between
``<start_of_image>`` and ``<end_of_image>``; chat template; sliding-window layers (their keys slide out of
the window on cached steps: :func:`..stepping.generate_rows` gives those keys weight 0)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ....errors import AttnlabError
from ....keys import KeyLayout
from . import Family, register
from .common import assemble, ids_and_mask, image_token_id, runs, special_ids
from .paligemma import stretched_view


def gemma3_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a Gemma 3 prompt."""
    ids, mask = ids_and_mask(inputs)
    found = runs(ids == image_token_id(config))
    if len(found) > 1:  # pan-and-scan: the whole photo, then each crop, each its own run of image tokens
        raise AttnlabError(f"the prompt holds {len(found)} images: Gemma 3 captions take one image without pan-and-scan crops "
                           "(set processor.image_processor.do_pan_and_scan = False)")
    if not found:
        raise AttnlabError(f"the prompt holds {len(found)} images: vision-language captions take exactly one image per prompt")
    side = math.isqrt(int(config.mm_tokens_per_image))
    special = special_ids(config, processor, "boi_token_id", "eoi_token_id")
    return assemble(ids, mask, [stretched_view(side, photo)], [found[0]], {}, special)


GEMMA3 = register(Family(
    name="gemma3", model_types=("gemma3",), classes=("Gemma3ForConditionalGeneration",), layout=gemma3_layout,
))  # fmt: skip
