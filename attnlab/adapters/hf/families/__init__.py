"""The vision-language families: one file each, every one registered here by ``config.model_type``.

A :class:`Family` says what differs between families for :mod:`..stepping` and :mod:`..vlm`:
where each view's tokens and every other kind of key sit in the prompt (``layout``), which
attention modules give a word's rows (``modules``), whether the keys grow by one per
generated token (decoder self-attention) or stay a fixed encoder sequence, how the user's
prompt becomes the processor's text (``prompt_text``; default the chat template) and an
optional post-processing of a run (``after``); a family whose inputs are not
``processor(text=..., images=...)`` makes them itself (``inputs``), and one whose attention
bypasses transformers' attention registry records its rows itself (``capture``, GIT). For the
explanations (:mod:`..sequence`): ``prefix_lm`` marks the caption as a prefix-LM's suffix and
``compose_rows`` maps a method's rows onto composed keys (BLIP-2). The
family modules are imported at the bottom
of this file, one line each; each calls :func:`register` for its family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ....errors import AttnlabError
from ....keys import KeyLayout
from ..rows import attention_modules


@dataclass(frozen=True)
class Family:
    """One vision-language family (see the module docstring)."""

    name: str  # "qwen2_vl", "llava", "paligemma", ...
    model_types: tuple[str, ...]  # config.model_type values it serves
    classes: tuple[str, ...]  # transformers class names (is_vlm, the error listing what is supported)
    layout: Callable[[Any, Any, Mapping, tuple[int, int]], KeyLayout]  # (config, processor, inputs, (W, H) photo)
    modules: Callable[[Any], list] = attention_modules  # attention modules whose LAST query row is a word's row
    grows: bool = True  # keys grow by one per generated token; False: cross-attention over a fixed encoder sequence
    prompt_text: Callable[[Any, str], str] | None = None  # processor, user prompt -> processor text (None: chat template)
    default_prompt: str = "Describe this image."
    after: Callable[[Any, Mapping, Any], Any] | None = None  # (model, inputs, stepping.VLMRun) -> VLMRun
    inputs: Callable[[Any, str, Any], Mapping] | None = None  # (processor, text, photo) -> the model's inputs
    # (None: processor(text=[text], images=[photo])); GIT builds [CLS] + the words itself
    capture: Callable[[Any], Any] | None = None  # model -> a context manager yielding a rows.RowCapture
    # (None: rows.capture_rows over `modules`); GIT's attention bypasses transformers' attention registry
    prefix_lm: bool = False  # the caption's tokens are the causal suffix of a prefix-LM: token_type_ids 1 (PaliGemma)
    compose_rows: Callable[[Any, Mapping, KeyLayout], tuple[Callable, KeyLayout]] | None = None
    # (model, inputs, layout) -> (rows (n, T) -> rows over the composed keys, the composed layout): BLIP-2's
    # explanations through the queries (the explanation pass; `after` is the caption run's)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` under each of its ``model_types`` (a second family for a type is a programming error)."""
    for kind in family.model_types:
        if kind in FAMILIES and FAMILIES[kind] is not family:
            raise ValueError(f"model_type {kind!r} is registered twice ({FAMILIES[kind].name}, {family.name})")
        FAMILIES[kind] = family
    return family


def classes() -> tuple[str, ...]:
    """Every supported class name, in registration order."""
    seen: dict[str, None] = {}
    for family in FAMILIES.values():
        seen.update(dict.fromkeys(family.classes))
    return tuple(seen)


def family_of(model_or_config: Any) -> Family:
    """The family of a model or its config (``config.model_type``); one line naming every supported class if none."""
    config = getattr(model_or_config, "config", model_or_config)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise AttnlabError(f"{type(model_or_config).__name__} is not a supported vision-language model: use {', '.join(classes())}")
    return family


def layout_of(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The key layout of the first (only) sequence of ``inputs`` (the processor's output) for a ``(W, H)`` photo.

    Takes the model's config (a config built without weights works)."""
    return family_of(config).layout(config, processor, inputs, photo)


def model_inputs(family: Family, processor: Any, text: str, photo: Any, device: Any) -> dict:
    """The model's inputs for one prompt ``text`` and one photo (a PIL image), every tensor on ``device``.

    ``family.inputs`` builds them when the family has its own (GIT: [CLS] and the words), else
    ``processor(text=[text], images=[photo])``; batch size 1, ``input_ids`` ``(1, T)``. A ``labels`` entry
    (PaliGemma's processor adds one) is dropped: the model must not compute a loss."""
    if family.inputs is not None:
        made = family.inputs(processor, text, photo)
    else:
        made = processor(text=[text], images=[photo], return_tensors="pt")
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in dict(made).items() if k != "labels"}


from . import qwen, llava, llava_next, paligemma, gemma3, llava_onevision  # noqa: E402,F401,I001  (each registers its family, in this order)
from . import idefics3, git  # noqa: E402,F401,I001
from . import florence2  # noqa: E402,F401  (Florence-2, fam-c)
from . import blip2  # noqa: E402,F401  (BLIP-2, fam-c)
