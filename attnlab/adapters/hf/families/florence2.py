"""Florence-2: an encoder-decoder (BART). The encoder reads one pooled image token, the ``h x w`` grid of
the vision tower's last stage (row-major) and the task prompt's tokens (``<s> ... </s>``); a word's row
is the decoder's cross-attention over that fixed sequence (``grows=False``).

The photo is stretched to the image processor's ``size``; four convolution stages (kernel ``k``, stride
``s``, padding ``p`` each) make the grid. The receptive field of grid cell ``i`` is centred on pixel
``a * i + b`` of the resized photo (``a`` the product of the strides, ``b`` from the kernels and
paddings; :func:`conv_geometry`), not on its nominal cell's centre ``a * i + a / 2``: with Florence-2's
stages (7/4/3, 3/2/1, 3/2/1, 3/2/1) every cell's field is centred 15.5 px (half a 32-px cell) up and
left of its nominal cell. The view's box is shifted by that offset, so that each drawn cell is centred
where its token's receptive field is (the box overhangs the photo by half a cell at the top and left,
and the last half cell at the bottom and right is under no cell's centre); the figures print the weight
drawn off the photo.

The user's prompt is the task token (``<CAPTION>``, ``<DETAILED_CAPTION>``, ``<MORE_DETAILED_CAPTION>``,
...) or free text: the processor turns a task token into its question. The default is ``<CAPTION>``: a
one-sentence caption ends within ``generate``'s default 20 tokens, where ``<MORE_DETAILED_CAPTION>``'s
paragraph would be cut off mid-sentence, and it is the task attnlab's other captioners do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ....errors import AttnlabError
from ....keys import KeyLayout, View
from . import Family, register
from .common import assemble, ids_and_mask, image_positions, image_token_id, special_ids

DEFAULT_TASK = "<CAPTION>"


def conv_geometry(vision_config: Any, size: int) -> tuple[int, int, float]:
    """One axis of ``size`` pixels through the stages: ``(cells, a, b)``, cell ``i``'s receptive field centred
    on pixel index ``a * i + b`` (pixel ``x`` covers ``[x, x + 1)``)."""
    n, a, b = int(size), 1, 0.0
    for k, s, p in zip(vision_config.patch_size, vision_config.patch_stride, vision_config.patch_padding):
        n = (n + 2 * p - k) // s + 1  # nn.Conv2d's output length
        b += a * ((k - 1) / 2 - p)  # the centre of output j is input index s * j - p + (k - 1) / 2
        a *= s
    if n < 1:
        raise AttnlabError(f"a {size}-pixel side leaves no cell after Florence-2's convolution stages")
    return n, a, b


def florence2_view(vision_config: Any, resized: tuple[int, int], photo: tuple[int, int]) -> View:
    """The grid of a photo stretched to ``resized = (height, width)``, its box shifted onto the cells'
    receptive-field centres (see the module docstring), in pixels of the ``(W, H)`` photo."""
    (H, W), (rh, rw) = (photo[1], photo[0]), resized
    (h, ay, by), (w, ax, bx) = conv_geometry(vision_config, rh), conv_geometry(vision_config, rw)
    x0, y0 = bx + 0.5 - ax / 2, by + 0.5 - ay / 2  # cell 0's centre (bx + 0.5) minus half a cell
    fx, fy = W / rw, H / rh
    return View("image", (h, w), (x0 * fx, y0 * fy, (x0 + w * ax) * fx, (y0 + h * ay) * fy))


def florence2_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The encoder sequence: the pooled token (``"prefix"``), the grid, then ``<s>`` prompt ``</s>``."""
    ids, mask = ids_and_mask(inputs)
    pos = image_positions(ids, image_token_id(config))
    if inputs.get("pixel_values") is None:
        raise AttnlabError("the inputs have no pixel_values: pass the processor's whole output for the photo")
    rh, rw = (int(v) for v in inputs["pixel_values"].shape[-2:])
    view = florence2_view(config.vision_config, (rh, rw), photo)
    cells = view.grid[0] * view.grid[1]
    if len(pos) != cells + 1:
        raise AttnlabError(f"the prompt has {len(pos)} image tokens where a {rh} x {rw} image gives 1 pooled + {cells} "
                           "grid tokens: pass the photo and the inputs the processor made from it")
    return assemble(ids, mask, [view], [pos[1:]], {"prefix": pos[:1]}, special_ids(config, processor))


def cross_attention(model: Any) -> list[Any]:
    """The decoder's cross-attention modules (``encoder_attn``): a word's row over the encoder sequence."""
    decoder = getattr(getattr(getattr(model, "model", None), "language_model", None), "decoder", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise AttnlabError(f"{type(model).__name__} has no model.language_model.decoder: a Florence-2 model of transformers >= 5 is needed")
    return [layer.encoder_attn for layer in decoder.layers]


def task_text(processor: Any, prompt: str) -> str:
    """The prompt as the processor takes it: a task token alone (it becomes the task's question) or free text."""
    tasks = [*getattr(processor, "task_prompts_without_inputs", {})]
    for task in tasks:
        if task in prompt and prompt.strip() != task:
            raise AttnlabError(f"Florence-2's task token {task} takes no other text: pass prompt={task!r} alone")
    return prompt.strip() if prompt.strip() in tasks else prompt


FLORENCE2 = register(Family(
    name="florence2", model_types=("florence2",), classes=("Florence2ForConditionalGeneration",),
    layout=florence2_layout, modules=cross_attention, grows=False, prompt_text=task_text, default_prompt=DEFAULT_TASK,
))
