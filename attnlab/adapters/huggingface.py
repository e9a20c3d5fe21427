"""``attnlab.from_huggingface``: Hugging Face captioners through the seam.

Two kinds of ``transformers`` models caption images and have a decoder whose
cross-attention looks at image patches:

* ``VisionEncoderDecoderModel``: a ViT-style encoder (ViT, DeiT, BEiT: a fixed
  patch grid after one CLS token, DeiT's distillation token too) and a text
  decoder with cross-attention (GPT-2, BERT, ...), e.g.
  ``nlpconnect/vit-gpt2-image-captioning``;
* ``BlipForConditionalGeneration``, e.g. ``Salesforce/blip-image-captioning-base``.

:func:`from_huggingface` wraps one in a captioner of the seam
(:mod:`attnlab.captioner`) that decodes exactly as the model's own greedy
``generate`` does: the same start token, the model's own key/value cache
(``step`` feeds one token; ``state.select`` reorders the cache), the same end
token. Hugging Face only returns attention weights from its "eager" attention,
so every ``begin``/``step`` switches the model to eager attention and puts the
previous setting back afterwards, exceptions included.

The image processor makes the model input (``spec.transform``); attnlab checks
once, on a synthetic image, that it stretches the photo to a square (what ViT
and BLIP processors do), so that the figures put every patch on the part of the
photo it saw. A processor that crops or pads gets a one-line error instead.

Vision-language models (``transformers`` >= 5): ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration`` with their
combined processor: ``from_huggingface(model, processor, prompt=...)`` gives a
:class:`~attnlab.adapters.hf.vlm.VLMCaptioner` (the model's own ``generate`` with the
attention rows of every step beside sdpa; its traces have views and key shares).

This module is the entry; the captioners live in :mod:`attnlab.adapters.hf`, one
file per model kind on a shared base (a new kind is one class there, added to
:data:`CAPTIONER_KINDS`).

``transformers`` is an optional extra (``pip install "attnlab[hf]"``); this
module imports it only when :func:`from_huggingface` is called.
"""

from __future__ import annotations

from typing import Any

from ..errors import AttnlabError
from ..util import is_int
from .hf.base import HuggingFaceCaptioner
from .hf.blip import BlipCaptioner
from .hf.encoder_decoder import EncoderDecoderCaptioner
from .hf.generation import transformers_module
from .hf.processor import processor_input
from .hf.families import classes as vlm_classes
from .hf.vlm import VLMCaptioner, is_vlm
from .module import refuse_meta

CAPTIONER_KINDS: tuple[type[HuggingFaceCaptioner], ...] = (EncoderDecoderCaptioner, BlipCaptioner)  # a new kind: one more class


def from_huggingface(
    model: Any,
    tokenizer: Any,
    image_processor: Any = None,
    *,
    prompt: str | None = None,
    raw_prompt: str | None = None,
    max_len: int | None = None,
    name: str | None = None,
) -> HuggingFaceCaptioner | VLMCaptioner:
    """Make a Hugging Face captioning model a captioner of the seam.

    Args:
        model: a ``VisionEncoderDecoderModel`` whose encoder is ViT-style (ViT,
            DeiT, BEiT: one CLS token, DeiT's distillation token too, then a fixed
            patch grid) and whose decoder has cross-attention (GPT-2, BERT, ...),
            or a ``BlipForConditionalGeneration``.
            Or a vision-language model (``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
            ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``).
        tokenizer: the model's tokenizer (or its processor, which holds one); for a
            vision-language model its combined processor (``AutoProcessor``).
        image_processor: the model's image processor (or its processor). It
            makes the model input; it must resize to a square (checked here).
            Not given for a vision-language model.
        prompt: vision-language models only: your words ("What colour is the car?"),
            put into the processor's chat template as one user turn holding the
            image and the text (default: "Describe this image.").
        raw_prompt: vision-language models only: the exact text handed to the
            processor, chat template and image placeholder included.
        max_len: most tokens to generate, the end token included (vision-language
            models: generated tokens only, the prompt not counted; default: the
            model's ``generate`` default). Encoder-decoders: default what
            the model's ``generate`` would allow: ``max_new_tokens``, else
            ``max_length - 1``, at most the decoder's positions). More than the
            decoder's positions (``max_position_embeddings``) is refused.
        name: shown in figures (default: the model's hub name or class).

    Decoding is greedy (``generate(do_sample=False, num_beams=1)``), from the
    start token ``generate`` uses (``decoder_start_token_id``; BLIP: its
    ``[DEC]`` token, ending at ``[SEP]``), on the model's own key/value cache.
    """
    tf = transformers_module()
    if is_vlm(model, tf):
        return _vision_language(model, tokenizer, image_processor, prompt, raw_prompt, max_len, name)
    if prompt is not None or raw_prompt is not None:
        raise AttnlabError(f"prompt= and raw_prompt= are for vision-language models ({', '.join(vlm_classes())}), not a {type(model).__name__}")
    kind = next((k for k in CAPTIONER_KINDS if isinstance(model, getattr(tf, k.model_class))), None)
    if kind is None:
        hint = " (load it first, e.g. VisionEncoderDecoderModel.from_pretrained(name))" if isinstance(model, str) else ""
        kinds = ", ".join([*(k.described for k in CAPTIONER_KINDS), *vlm_classes()])
        raise AttnlabError(f"from_huggingface takes {kinds}, not a {type(model).__name__}{hint}")
    if image_processor is None:
        raise AttnlabError("from_huggingface(model, tokenizer, image_processor): pass the model's image processor (or its processor) too")
    refuse_meta(model, "from_pretrained(name) without device_map='meta', or to_empty(device='cpu') then load_state_dict")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a combined processor works too
    if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)) or not callable(getattr(tokenizer, "decode", None)):
        raise AttnlabError(f"tokenizer must be the model's Hugging Face tokenizer (AutoTokenizer.from_pretrained(...)), not a {type(tokenizer).__name__}")
    if max_len is not None and (not is_int(max_len) or max_len < 1):
        raise AttnlabError(f"max_len must be a positive integer, not {max_len!r}")
    if name is not None and not isinstance(name, str):
        raise AttnlabError(f"name must be a string, not {type(name).__name__}")
    return kind(model, tokenizer, processor_input(image_processor), None if max_len is None else int(max_len), name)


def _vision_language(model: Any, processor: Any, extra: Any, prompt: Any, raw_prompt: Any, max_len: Any, name: Any) -> VLMCaptioner:
    """The checks of :func:`from_huggingface` for a vision-language model, then its captioner."""
    if extra is not None:
        raise AttnlabError(f"a {type(model).__name__} takes its combined processor only: from_huggingface(model, processor)")
    refuse_meta(model, "from_pretrained(name) without device_map='meta'")
    if max_len is not None and (not is_int(max_len) or max_len < 1):
        raise AttnlabError(f"max_len must be a positive integer (generated tokens), not {max_len!r}")
    return VLMCaptioner(model, processor, prompt=prompt, raw_prompt=raw_prompt, max_len=max_len, name=name)
