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

Vision-language models (``transformers`` >= 5, behind ``from_huggingface(model, processor)``):

* :mod:`.rows`: :func:`capture_rows`, the attention rows of the last query position of
  every decoder layer, computed beside the model's own attention implementation (sdpa);
* :mod:`.layout`: :func:`vlm_layout`, the :class:`attnlab.keys.KeyLayout` of a prompt (each family's rules in :mod:`.families`): where each
  view's tokens (:class:`attnlab.keys.View`) and every other kind of key sit in the sequence
  (Qwen2/2.5/3-VL, LLaVA-1.5, LLaVA-NeXT, PaliGemma, Gemma 3, LLaVA-OneVision, ...);
* :mod:`.stepping`: :func:`generate_rows`, the model's own greedy ``generate`` with the rows
  of every step split into per-view maps and per-kind shares;
* :mod:`.offline`: :func:`~.offline.photo_tokens`, how many tokens a photo becomes in published
  checkpoints (their preprocessing settings, their real processor classes, built offline without weights)
  and where they sit in the prompt;
* :mod:`.vlm`: :class:`VLMCaptioner`, the seam for these models (``begin`` runs
  :func:`generate_rows`, ``step`` replays it), with the prompt through the chat template.

Nothing here imports ``transformers`` at import time.
"""

from ...keys import KeyLayout, View
from .layout import vlm_layout
from .rows import capture_rows
from .stepping import VLMRun, generate_rows

__all__ = ["KeyLayout", "VLMRun", "View", "capture_rows", "generate_rows", "vlm_layout"]
