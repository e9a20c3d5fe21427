"""GIT (``GitForCausalLM``): the image encoder's CLS and patch grid are prepended to the text as embeddings.

The keys of every row are ``1 + h * w`` image keys (CLS, the ``"prefix"`` kind, then the grid row-major)
and only then the text ids: ``[CLS]`` (GIT's start token, ``"special"``) and the prompt's words, then the
tokens generated earlier. The image keys are not in ``input_ids``, so the layout's ``length`` is
``1 + h * w + len(input_ids)``. The image processor (CLIP's) resizes the short side and cuts out the
centre: the grid's box is that crop on the photo.

GIT captions from ``[CLS]`` alone (``generate(pixel_values=...)`` starts from ``bos_token_id``); a
prompt's words follow ``[CLS]`` without ``[SEP]`` (GIT's visual question answering), so
:func:`git_inputs` builds the ids itself rather than through the tokenizer's ``[CLS] text [SEP]``.
GIT's attention is its own eager code (no sdpa, not transformers' attention registry):
:func:`git_rows` records each layer's last query row from the probabilities the module returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ....errors import AttnlabError
from ....keys import KeyLayout
from ..rows import RowCapture
from . import Family, register
from .common import assemble, ids_and_mask, special_ids
from .llava import llava_views


def image_keys(config: Any) -> int:
    """How many image keys GIT prepends: CLS + the grid (times the frames of a video model)."""
    vision = config.vision_config
    keys = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
    return keys * int(getattr(config, "num_image_with_embedding", None) or 1)


def git_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of a GIT prompt: CLS, the grid, then the text ids."""
    if getattr(config, "num_image_with_embedding", None):
        raise AttnlabError("a GIT video model (num_image_with_embedding) takes frames, not one photo: use an image GIT model")
    ids, mask = ids_and_mask(inputs)
    n = image_keys(config)
    views = llava_views(processor.image_processor, int(config.vision_config.patch_size), photo)
    if views[0].grid[0] * views[0].grid[1] + 1 != n:
        raise AttnlabError(f"the image processor's crop gives a {views[0].grid} grid where the model takes {n - 1} patches: "
                           "pass the model's own processor")
    full_ids = np.concatenate([np.full(n, -1, dtype=ids.dtype), ids])  # (n + T,) the keys as the attention sees them
    full_mask = np.concatenate([np.ones(n, dtype=mask.dtype), mask])  # (n + T,) the image keys always attended
    special = special_ids(config, processor, "bos_token_id", "eos_token_id")
    return assemble(full_ids, full_mask, views, [np.arange(1, n)], {"prefix": np.arange(1)}, special)


def git_inputs(processor: Any, text: str, photo: Any) -> dict:
    """``[CLS]``, the words of ``text`` (no ``[SEP]``) and the photo's pixels, as GIT's ``generate`` takes them."""
    tokenizer = processor.tokenizer
    start = getattr(tokenizer, "cls_token_id", None)
    if start is None:
        raise AttnlabError("the GIT tokenizer has no [CLS] token (cls_token_id): pass the model's own processor")
    words = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    ids = torch.tensor([[int(start), *words]])
    pixels = processor(images=[photo], return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def git_attention(model: Any) -> list[Any]:
    """The text decoder's self-attention modules (``model.git.encoder.layer[i].attention.self``)."""
    layers = getattr(getattr(getattr(model, "git", None), "encoder", None), "layer", None)
    if layers is None:
        raise AttnlabError(f"{type(model).__name__} has no git.encoder.layer: pass a GitForCausalLM")
    return [layer.attention.self for layer in layers]


@contextlib.contextmanager
def git_rows(model: Any) -> Iterator[RowCapture]:
    """Record the last query row ``(B, heads, K)`` of every GIT layer on every forward (forward hooks,
    removed on exit, exceptions included). GIT's attention module returns its probabilities."""
    attn = git_attention(model)
    capture = RowCapture(len(attn))

    def hook(layer: int):
        def record(module, args, output):
            probs = output[1]  # (B, heads, q, K) after softmax (and dropout, off in eval mode)
            capture.rows[layer].append(probs[:, :, -1, :].detach().float().cpu())
        return record

    handles = [a.register_forward_hook(hook(i)) for i, a in enumerate(attn)]
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()


def git_text(processor: Any, prompt: str) -> str:
    """GIT has no chat template: the prompt's words as they are."""
    return prompt


GIT = register(Family(
    name="git", model_types=("git",), classes=("GitForCausalLM",), layout=git_layout, modules=git_attention,
    prompt_text=git_text, default_prompt="", inputs=git_inputs, capture=git_rows,
))  # fmt: skip
