"""attnlab: see where an image-captioning transformer looks when it writes each word.

>>> import attnlab
>>> model = attnlab.load_model()              # the bundled shapes model, offline
>>> trace = attnlab.caption(model, "image.png")
>>> trace.caption, trace.cross_attention.shape  # (layers, heads, steps, H, W)

Public surface: :func:`load_model`, :func:`caption`, :class:`CaptionTrace`,
:func:`capture_attention`, :func:`explore`, the :mod:`attnlab.plot` views and
the captioner protocol (:class:`Captioner`, :class:`CaptionerSpec`,
:class:`Encoded`, :class:`StepOutput`; see :mod:`attnlab.captioner`).
"""

from __future__ import annotations

import importlib
from typing import Any

from .capture import AttentionCapture, capture_attention
from .captioner import Captioner, CaptionerSpec, Encoded, StepOutput
from .decode import caption
from .errors import AttnlabError
from .hub import load_model, save_checkpoint
from .trace import CaptionTrace

__version__ = "0.1.0"

__all__ = [
    "AttentionCapture",
    "AttnlabError",
    "CaptionTrace",
    "Captioner",
    "CaptionerSpec",
    "Encoded",
    "StepOutput",
    "capture_attention",
    "caption",
    "explore",
    "load_model",
    "plot",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    # matplotlib and ipywidgets load only when a view is asked for
    # (``from . import plot`` here would call this function again: import by name)
    if name == "plot":
        return importlib.import_module(f"{__name__}.plot")
    if name == "explore":
        return importlib.import_module(f"{__name__}.explorer").explore
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
