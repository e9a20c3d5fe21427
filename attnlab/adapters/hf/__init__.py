"""Vision-language models from Hugging Face (``transformers`` >= 5), imported lazily.

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
