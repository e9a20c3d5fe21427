"""attnlab: see where an image-captioning transformer looks when it writes each word.

>>> import attnlab
>>> model = attnlab.load_model()              # the bundled shapes model, offline
>>> trace = attnlab.caption(model, "image.png")
>>> trace.caption, trace.cross_attention.shape  # (layers, heads, steps, H, W)

Public surface: :func:`load_model`, :func:`caption`, :func:`explain`, :class:`CaptionTrace`,
:func:`capture_attention`, :func:`explore`, :func:`export_html` (a static
explorer page), the :mod:`attnlab.plot` views, :mod:`attnlab.batch` (folders,
shards, resumable runs), :mod:`attnlab.stats` and the captioner protocol
(:class:`Captioner`, :class:`CaptionerSpec`, :class:`Encoded`,
:class:`StepOutput`; see :mod:`attnlab.captioner`).
"""

from __future__ import annotations

import importlib
from typing import Any

from .adapters import wrap
from .capture import AttentionCapture, capture_attention
from .captioner import Captioner, CaptionerSpec, Encoded, StepOutput
from .decode import caption
from .errors import AttnlabError
from .explain import explain
from .hub import load_model, save_checkpoint
from .samples import sample_path
from .tap import AttentionTap
from .trace import CaptionTrace

__version__ = "0.1.0"

__all__ = [
    "AttentionCapture",
    "AttentionTap",
    "AttnlabError",
    "CaptionTrace",
    "Captioner",
    "CaptionerSpec",
    "Encoded",
    "StepOutput",
    "capture_attention",
    "caption",
    "explore",
    "explain",
    "export_html",
    "from_huggingface",
    "load_model",
    "plot",
    "sample_path",
    "save_checkpoint",
    "stats",
    "wrap",
]


def __getattr__(name: str) -> Any:
    # matplotlib and ipywidgets load only when a view is asked for
    # (``from . import plot`` here would call this function again: import by name)
    if name in ("plot", "stats", "batch"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "explore":
        return importlib.import_module(f"{__name__}.explorer").explore
    if name == "export_html":
        return importlib.import_module(f"{__name__}.plot").export_html
    if name == "from_huggingface":  # transformers loads only when a Hugging Face model is wrapped
        return importlib.import_module(f"{__name__}.adapters.huggingface").from_huggingface
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
