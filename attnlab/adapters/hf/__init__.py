"""Hugging Face models through the seam, one file per model kind, imported lazily.

Captioners (:func:`attnlab.from_huggingface`, entry in :mod:`attnlab.adapters.huggingface`):

* :mod:`.base`: :class:`HuggingFaceCaptioner`, what every kind shares (spec, probe,
  ``begin``, ``step`` on the model's own cache under eager attention), on
  :class:`attnlab.adapters.module.ModuleCaptioner`;
* :mod:`.encoder_decoder` (``VisionEncoderDecoderModel``), :mod:`.blip`
  (``BlipForConditionalGeneration``): the kinds, each its encoder, ids and decoder step;
* :mod:`.processor` (the image processor, checked to stretch), :mod:`.vocab` (the
  tokenizer as a token table), :mod:`.attention` (eager attention, the row tap),
  :mod:`.generation` (what ``generate`` would do, from the configs).

Vision-language models (``transformers`` >= 5; the engine, not yet behind ``from_huggingface``):

* :mod:`.rows`: :func:`capture_rows`, the attention rows of the last query position of
  every decoder layer, computed beside the model's own attention implementation (sdpa);
* :mod:`.layout`: :class:`View` and :class:`KeyLayout`, where each view's tokens and every
  other kind of key sit in the sequence (Qwen2/2.5/3-VL, LLaVA-1.5, LLaVA-NeXT);
* :mod:`.stepping`: :func:`generate_rows`, the model's own greedy ``generate`` with the rows
  of every step split into per-view maps and per-kind shares.

Nothing here imports ``transformers`` at import time.
"""

from .layout import KeyLayout, View, vlm_layout
from .rows import capture_rows
from .stepping import VLMRun, generate_rows

__all__ = ["KeyLayout", "VLMRun", "View", "capture_rows", "generate_rows", "vlm_layout"]
