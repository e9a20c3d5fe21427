"""Where each view's tokens and every other kind of key sit in a vision-language prompt.

One photo becomes one or more *views*: a grid of image tokens ``(h, w)``, row-major as it
sits on the photo, and the box ``(x0, y0, x1, y1)`` of the photo as the user gave it that
the grid covers (it may overhang the photo where the processor padded). Every other key
has a kind: ``"prompt"`` (text), ``"special"`` (template and vision-boundary tokens),
``"prefix"`` (a CLS token among the image tokens), ``"newline"`` (LLaVA-NeXT's
``image_newline``), ``"padding"`` (attention mask 0). :func:`vlm_layout` reads it from
the processor's outputs, the model's config and the photo size; together the views and the
kinds cover every key of the prompt exactly once. Each family's rules live in
:mod:`.families` (one file per family, registered by ``config.model_type``).
"""

from __future__ import annotations

from typing import Any

from ...keys import KeyLayout
from .families import family_of


def vlm_layout(model: Any, processor: Any, inputs: Any, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of the first (only) sequence of ``inputs`` (the processor's output) for a ``(W, H)`` photo."""
    family = family_of(model)  # one line naming every supported class
    return family.layout(model.config, processor, inputs, photo)
