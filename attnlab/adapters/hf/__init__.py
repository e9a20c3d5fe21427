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

Nothing here imports ``transformers`` at import time.
"""
